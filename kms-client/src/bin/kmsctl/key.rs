//! Keys, their versions and their aliases: `kmsctl key` and `kmsctl alias`.

use std::path::PathBuf;

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::output::{Out, parse_period};

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Creates a key (Enabled, version 1 primary) in the HSM.
    Create {
        #[arg(long)]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Automatic rotation period: 365d, 90d, ... (none by default).
        #[arg(long, value_parser = parse_period)]
        rotation_period: Option<u64>,
    },
    /// Shows a key and its versions.
    Describe { key: String },
    /// Lists keys.
    List {
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Only keys in this state; `--state destroyed --ids` lists what a restore needs to be
        /// told about (`kms-server restore --destroyed-since`).
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Print only the key ids, one per line.
        #[arg(long)]
        ids: bool,
    },
    /// Lists a key's versions with their usage counts.
    Versions { key: String },
    /// Adds a new primary version; older versions only decrypt.
    Rotate { key: String },
    /// Disabled -> Enabled.
    Enable { key: String },
    /// Enabled -> Disabled: every operation refused from the next call on (reversible).
    Disable { key: String },
    /// Marks a key compromised: irreversible; data under it can only be re-encrypted elsewhere.
    Compromise {
        key: String,
        /// Confirms the irreversible change.
        #[arg(long)]
        yes: bool,
    },
    /// Schedules destruction after a pending window of 7 to 30 days.
    ScheduleDestruction {
        key: String,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(7..=30))]
        pending_days: u32,
    },
    /// Cancels a scheduled destruction (the key becomes Disabled).
    CancelDestruction { key: String },
    /// One version of a key.
    #[command(subcommand)]
    Version(VersionCommand),
    /// BYOK: a fresh RSA-3072 key pair in the HSM to wrap key material under, for one import
    /// within 24 hours; prints the import token.
    ImportParameters {
        /// Where to write the public key (PEM).
        #[arg(long)]
        public_key_out: PathBuf,
    },
    /// BYOK: imports 32 bytes of AES key material, wrapped offline under the import parameters'
    /// public key, as a new key whose origin is external.
    Import {
        #[arg(long)]
        token: String,
        /// The wrapped material.
        #[arg(long)]
        material: PathBuf,
        /// RSAES_OAEP_SHA_1: the material under RSA-OAEP (SHA-1, MGF1-SHA-1).
        #[arg(long, default_value = "RSAES_OAEP_SHA_1")]
        wrapping_algorithm: String,
        #[arg(long)]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum VersionCommand {
    Enable {
        key: String,
        version: u32,
    },
    Disable {
        key: String,
        version: u32,
    },
    ScheduleDestruction {
        key: String,
        version: u32,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(7..=30))]
        pending_days: u32,
    },
    CancelDestruction {
        key: String,
        version: u32,
    },
}

impl KeyCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, KeyCommand::Describe { .. } | KeyCommand::List { .. } | KeyCommand::Versions { .. })
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            KeyCommand::Create { alias, description, rotation_period } => {
                let r = c
                    .create_key(pb::CreateKeyRequest {
                        description,
                        alias: alias.unwrap_or_default(),
                        rotation_period_seconds: rotation_period.unwrap_or(0),
                    })
                    .await?;
                out.key(r.into_inner().key)
            }
            KeyCommand::Describe { key } => {
                let r = c.describe_key(pb::DescribeKeyRequest { key_id: key }).await?.into_inner();
                let k = r.key.unwrap_or_default();
                let mut j = key_json(&k);
                j["versions"] = Value::Array(r.versions.iter().map(version_json).collect());
                out.print(j, || {
                    let mut s = key_text(&k);
                    if !k.description.is_empty() {
                        s.push_str(&format!("\n  description: {}", k.description));
                    }
                    for v in &r.versions {
                        s.push('\n');
                        s.push_str(&version_text(v));
                    }
                    s
                });
                Ok(())
            }
            KeyCommand::List { page_size, state, ids } => {
                let mut all = Vec::new();
                let mut token = String::new();
                loop {
                    let r = c.list_keys(pb::ListKeysRequest { page_size, page_token: token }).await?.into_inner();
                    all.extend(r.keys.into_iter().filter(|k| state.is_none_or(|s| s.matches(k.state))));
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    token = r.next_page_token;
                }
                if ids {
                    out.print(Value::Array(all.iter().map(|k| json!(k.key_id)).collect()), || {
                        all.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>().join("\n")
                    });
                } else {
                    out.print(Value::Array(all.iter().map(key_json).collect()), || all.iter().map(key_text).collect::<Vec<_>>().join("\n"));
                }
                Ok(())
            }
            KeyCommand::Versions { key } => {
                let r = c.list_key_versions(pb::ListKeyVersionsRequest { key_id: key }).await?.into_inner();
                out.print(json!({"key_id": r.key_id, "versions": r.versions.iter().map(version_json).collect::<Vec<_>>()}), || {
                    std::iter::once(r.key_id.clone()).chain(r.versions.iter().map(version_text)).collect::<Vec<_>>().join("\n")
                });
                Ok(())
            }
            KeyCommand::ImportParameters { public_key_out } => crate::transfer::import_parameters(ctx, &public_key_out).await,
            KeyCommand::Import { token, material, wrapping_algorithm, alias, description } => {
                out.key(crate::transfer::import_material(ctx, token, &material, wrapping_algorithm, description, alias).await?)
            }
            KeyCommand::Rotate { key } => {
                let r = c.rotate_key(pb::RotateKeyRequest { key_id: key }).await?.into_inner();
                out.key(r.key)
            }
            KeyCommand::Enable { key } => out.key(c.enable_key(pb::EnableKeyRequest { key_id: key }).await?.into_inner().key),
            KeyCommand::Disable { key } => out.key(c.disable_key(pb::DisableKeyRequest { key_id: key }).await?.into_inner().key),
            KeyCommand::Compromise { key, yes } => {
                if !yes && !out.dry_run.on() {
                    return Err(Error::Status(tonic::Status::invalid_argument("marking a key compromised is irreversible; add --yes to confirm")));
                }
                out.key(c.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key }).await?.into_inner().key)
            }
            KeyCommand::ScheduleDestruction { key, pending_days } => out.key(
                c.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key, pending_window_days: pending_days })
                    .await?
                    .into_inner()
                    .key,
            ),
            KeyCommand::CancelDestruction { key } => {
                out.key(c.cancel_key_destruction(pb::CancelKeyDestructionRequest { key_id: key }).await?.into_inner().key)
            }
            KeyCommand::Version(v) => match v {
                VersionCommand::Enable { key, version } => {
                    out.version(c.enable_key_version(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                }
                VersionCommand::Disable { key, version } => {
                    out.version(c.disable_key_version(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                }
                VersionCommand::ScheduleDestruction { key, version, pending_days } => out.version(
                    c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
                        key_id: key,
                        key_version: version,
                        pending_window_days: pending_days,
                    })
                    .await?
                    .into_inner(),
                ),
                VersionCommand::CancelDestruction { key, version } => {
                    out.version(c.cancel_key_version_destruction(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                }
            },
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum AliasCommand {
    /// Points alias/NAME at a key id.
    Create {
        alias: String,
        key: String,
    },
    Delete {
        alias: String,
    },
    List {
        #[arg(long)]
        key: Option<String>,
    },
}

impl AliasCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, AliasCommand::List { .. })
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            AliasCommand::Create { alias, key } => {
                let r = c.create_alias(pb::CreateAliasRequest { alias, key_id: key }).await?.into_inner();
                out.print(json!({"alias": r.alias, "key_id": r.key_id}), || format!("{} -> {}", r.alias, r.key_id));
                Ok(())
            }
            AliasCommand::Delete { alias } => {
                c.delete_alias(pb::DeleteAliasRequest { alias: alias.clone() }).await?;
                out.print(json!({"deleted": alias}), || format!("deleted {alias}"));
                Ok(())
            }
            AliasCommand::List { key } => {
                let r = c.list_aliases(pb::ListAliasesRequest { key_id: key.unwrap_or_default() }).await?.into_inner();
                out.print(
                    Value::Array(r.aliases.iter().map(|a| json!({"alias": a.alias, "key_id": a.key_id, "creation_time": a.creation_time})).collect()),
                    || r.aliases.iter().map(|a| format!("{} -> {}", a.alias, a.key_id)).collect::<Vec<_>>().join("\n"),
                );
                Ok(())
            }
        }
    }
}

/// A key state, as `kmsctl key list --state` names it.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum StateFilter {
    Enabled,
    Disabled,
    Compromised,
    PendingDestruction,
    Destroyed,
}

impl StateFilter {
    fn matches(self, state: i32) -> bool {
        let want = match self {
            StateFilter::Enabled => pb::KeyState::Enabled,
            StateFilter::Disabled => pb::KeyState::Disabled,
            StateFilter::Compromised => pb::KeyState::Compromised,
            StateFilter::PendingDestruction => pb::KeyState::PendingDestruction,
            StateFilter::Destroyed => pb::KeyState::Destroyed,
        };
        state == want as i32
    }
}

pub(crate) fn key_state_name(n: i32) -> &'static str {
    pb::KeyState::try_from(n).map(|s| s.as_str_name()).unwrap_or("UNKNOWN")
}

fn version_state_name(n: i32) -> &'static str {
    pb::KeyVersionState::try_from(n).map(|s| s.as_str_name().trim_start_matches("VERSION_")).unwrap_or("UNKNOWN")
}

fn key_json(k: &pb::KeyMetadata) -> Value {
    json!({
        "key_id": k.key_id,
        "description": k.description,
        "state": key_state_name(k.state),
        "key_spec": k.key_spec,
        "primary_version": k.primary_version,
        "creation_time": k.creation_time,
        "rotation_period_seconds": k.rotation_period_seconds,
        "next_rotation_time": k.next_rotation_time,
        "destruction_time": k.destruction_time,
        "aliases": k.aliases,
        "material_missing": k.material_missing,
        "origin": k.origin,
    })
}

fn version_json(v: &pb::KeyVersion) -> Value {
    json!({
        "version": v.version,
        "state": version_state_name(v.state),
        "primary": v.primary,
        "creation_time": v.creation_time,
        "encryptions": v.encryptions,
        "rotation_threshold": v.rotation_threshold,
        "encryption_limit": v.encryption_limit,
        "destruction_time": v.destruction_time,
        "material_missing": v.material_missing,
    })
}

fn key_text(k: &pb::KeyMetadata) -> String {
    let mut s = format!("{}  {}  primary v{}", k.key_id, key_state_name(k.state), k.primary_version);
    if !k.aliases.is_empty() {
        s.push_str(&format!("  {}", k.aliases.join(",")));
    }
    if k.destruction_time != 0 {
        s.push_str(&format!("  destruction at {}", k.destruction_time));
    }
    if k.origin == "external" {
        s.push_str("  origin external");
    }
    if k.material_missing {
        s.push_str("  MATERIAL MISSING");
    }
    s
}

fn version_text(v: &pb::KeyVersion) -> String {
    format!(
        "  v{}{}  {}  encryptions {} / {}",
        v.version,
        if v.primary { " (primary)" } else { "" },
        version_state_name(v.state),
        v.encryptions,
        v.encryption_limit
    )
}

// The answer of a command that changes one key or one version: here with the rest of the key
// printing rather than in `output.rs`, which knows nothing of keys.
impl Out {
    fn key(&self, k: Option<pb::KeyMetadata>) -> Result<(), Error> {
        let k = k.unwrap_or_default();
        self.print(key_json(&k), || key_text(&k));
        Ok(())
    }

    fn version(&self, r: pb::KeyVersionResponse) -> Result<(), Error> {
        let v = r.version.unwrap_or_default();
        let mut j = version_json(&v);
        j["key_id"] = json!(r.key_id);
        self.print(j, || format!("{}\n{}", r.key_id, version_text(&v)));
        Ok(())
    }
}
