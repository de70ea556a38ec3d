//! Who may do what: workload principals, grants, `kmsctl explain`, and the yearly access review.

use clap::{Args, Subcommand};
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::data::ContextArgs;
use crate::key::key_state_name;
use crate::output::{parse_pair, parse_period};

#[derive(Subcommand)]
pub(crate) enum PrincipalCommand {
    /// Registers a workload identity (a SPIFFE ID or certificate CN).
    Add {
        name: String,
    },
    List,
    /// Cuts a workload off from its next call on.
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
}

impl PrincipalCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, PrincipalCommand::List)
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let one = |p: Option<pb::Principal>| {
            let p = p.unwrap_or_default();
            out.print(principal_json(&p), || format!("{}  {}", p.name, p.state));
            Ok(())
        };
        match self {
            PrincipalCommand::Add { name } => one(c.create_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
            PrincipalCommand::Disable { name } => one(c.disable_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
            PrincipalCommand::Enable { name } => one(c.enable_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
            PrincipalCommand::List => {
                let r = c.list_principals(pb::ListPrincipalsRequest {}).await?.into_inner();
                out.print(Value::Array(r.principals.iter().map(principal_json).collect()), || {
                    r.principals.iter().map(|p| format!("{}  {}", p.name, p.state)).collect::<Vec<_>>().join("\n")
                });
                Ok(())
            }
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum GrantCommand {
    /// Allows a principal some operations on a key.
    Create {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        key: String,
        /// Comma-separated: GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, Decrypt,
        /// ReEncryptFrom, ReEncryptTo; or `all`.
        #[arg(long, value_delimiter = ',', required = true)]
        operations: Vec<String>,
        /// A pair the encryption context must contain, KEY=VALUE; repeat for more.
        #[arg(long = "require", value_parser = parse_pair)]
        require: Vec<(String, String)>,
        /// A key the encryption context must contain; repeat for more.
        #[arg(long = "require-key")]
        require_keys: Vec<String>,
        /// Expiry after this period (30d, 12h, ...); none by default.
        #[arg(long, value_parser = parse_period)]
        expires_in: Option<u64>,
    },
    List {
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        principal: Option<String>,
    },
    /// Revokes a grant: it allows nothing from the next call on.
    Revoke { grant_id: String },
}

impl GrantCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, GrantCommand::List { .. })
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            GrantCommand::Create { principal, key, operations, require, require_keys, expires_in } => {
                let operations =
                    if operations.iter().any(|o| o == "all") { ALL_OPERATIONS.iter().map(|o| o.to_string()).collect() } else { operations };
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let r = c
                    .create_grant(pb::CreateGrantRequest {
                        principal,
                        key_id: key,
                        operations,
                        required_encryption_context: require.into_iter().collect(),
                        required_encryption_context_keys: require_keys,
                        expiration_time: expires_in.map_or(0, |p| (now + p) as i64),
                    })
                    .await?
                    .into_inner();
                let g = r.grant.unwrap_or_default();
                out.print(grant_json(&g), || grant_text(&g));
                Ok(())
            }
            GrantCommand::List { key, principal } => {
                let r = c
                    .list_grants(pb::ListGrantsRequest { key_id: key.unwrap_or_default(), principal: principal.unwrap_or_default() })
                    .await?
                    .into_inner();
                out.print(Value::Array(r.grants.iter().map(grant_json).collect()), || r.grants.iter().map(grant_text).collect::<Vec<_>>().join("\n"));
                Ok(())
            }
            GrantCommand::Revoke { grant_id } => {
                c.revoke_grant(pb::RevokeGrantRequest { grant_id: grant_id.clone() }).await?;
                out.print(json!({"revoked": grant_id}), || format!("revoked {grant_id}"));
                Ok(())
            }
        }
    }
}

/// Every grant operation, for `--operations all`.
const ALL_OPERATIONS: [&str; 6] = ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo"];

fn principal_json(p: &pb::Principal) -> Value {
    json!({"name": p.name, "state": p.state, "creation_time": p.creation_time})
}

pub(crate) fn grant_json(g: &pb::Grant) -> Value {
    json!({
        "grant_id": g.grant_id, "principal": g.principal, "key_id": g.key_id, "operations": g.operations,
        "required_encryption_context": g.required_encryption_context,
        "required_encryption_context_keys": g.required_encryption_context_keys,
        "expiration_time": g.expiration_time, "creation_time": g.creation_time,
    })
}

pub(crate) fn grant_text(g: &pb::Grant) -> String {
    format!("{}  {}  {}  {}", g.grant_id, g.principal, g.key_id, g.operations.join(","))
}

// The arguments of `kmsctl explain`. No doc comment: clap would take it for the command's help
// text, which `Command::Explain` gives.
#[derive(Args)]
pub(crate) struct ExplainArgs {
    /// The principal (default: every principal holding a grant on the key).
    #[arg(long)]
    principal: Option<String>,
    /// GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, Decrypt, ReEncryptFrom or
    /// ReEncryptTo.
    #[arg(long)]
    operation: String,
    #[arg(long)]
    key: String,
    #[command(flatten)]
    context: ContextArgs,
}

impl ExplainArgs {
    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let ExplainArgs { principal, operation, key, context } = self;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let encryption_context: std::collections::HashMap<String, String> = context.map().map_err(Error::Config)?.into_iter().collect();
        let r = c
            .explain_access(pb::ExplainAccessRequest {
                principal: principal.unwrap_or_default(),
                operation: operation.clone(),
                key_id: key,
                encryption_context,
            })
            .await?
            .into_inner();
        let decisions: Vec<Value> = r
            .decisions
            .iter()
            .map(|d| json!({"principal": d.principal, "allowed": d.allowed, "grant_id": d.grant_id, "reasons": d.reasons}))
            .collect();
        out.print(json!({"key_id": r.key_id, "key_state": key_state_name(r.key_state), "operation": operation, "decisions": decisions}), || {
            let pairs: Vec<String> = context.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let with = if pairs.is_empty() { "no encryption context".to_string() } else { format!("the context {}", pairs.join(", ")) };
            let mut lines = vec![format!("{operation} on key {} ({}), with {with}:", r.key_id, key_state_name(r.key_state))];
            if r.decisions.is_empty() {
                lines.push(format!("  nobody: no principal holds a grant on key {}", r.key_id));
            }
            for d in &r.decisions {
                let by = if d.grant_id.is_empty() { String::new() } else { format!(" (grant {})", d.grant_id) };
                lines.push(format!("{}  {}{by}", if d.allowed { "ALLOWED" } else { "DENIED " }, d.principal));
                lines.extend(d.reasons.iter().map(|why| format!("    - {why}")));
            }
            lines.join("\n")
        });
        Ok(())
    }
}

// The arguments of `kmsctl review`. No doc comment: clap would take it for the command's help
// text, which `Command::Review` gives.
#[derive(Args)]
pub(crate) struct ReviewArgs {
    #[command(subcommand)]
    action: Option<ReviewCommand>,
}

impl ReviewArgs {
    /// Whether the command changes the service's state (and so takes `--dry-run`): a sign-off
    /// does, the review itself only reads.
    pub(crate) fn changes(&self) -> bool {
        self.action.is_some()
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self.action {
            Some(ReviewCommand::SignOff { note }) => {
                let r = c.sign_off_review(pb::SignOffReviewRequest { note }).await?.into_inner();
                out.print(json!({"signoff_time": r.signoff_time}), || format!("review signed off at {}", r.signoff_time));
            }
            None => {
                let r = c.access_review(pb::AccessReviewRequest {}).await?.into_inner();
                let rows: Vec<Value> = r
                    .entries
                    .iter()
                    .map(|e| {
                        json!({"kind": e.kind, "name": e.name, "detail": e.detail, "enabled": e.enabled,
                                   "creation_time": e.creation_time, "last_used_time": e.last_used_time,
                                   "unused_90_days": e.unused_90_days})
                    })
                    .collect();
                out.print(
                    json!({"entries": rows, "last_signoff_time": r.last_signoff_time, "last_signoff_by": r.last_signoff_by,
                               "signoff_overdue": r.signoff_overdue}),
                    || {
                        let mut lines: Vec<String> = r
                            .entries
                            .iter()
                            .map(|e| {
                                let used = if e.last_used_time == 0 { "never used".to_string() } else { format!("last used {}", e.last_used_time) };
                                let flag = if e.unused_90_days { "  UNUSED 90 DAYS: remove?" } else { "" };
                                format!("{:<9} {}  {}  {used}{flag}", e.kind, e.name, e.detail)
                            })
                            .collect();
                        lines.push(if r.signoff_overdue {
                            "WARNING: the access review has not been signed off in the last 365 days (kmsctl review sign-off)".to_string()
                        } else {
                            format!("last signed off by {} at {}", r.last_signoff_by, r.last_signoff_time)
                        });
                        lines.join("\n")
                    },
                );
            }
        }
        Ok(())
    }
}

#[derive(Subcommand)]
pub(crate) enum ReviewCommand {
    /// Records your sign-off of the access review (audited).
    SignOff {
        #[arg(long, default_value = "")]
        note: String,
    },
}
