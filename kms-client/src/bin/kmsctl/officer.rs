//! Officers and their sessions: `kmsctl login`, `logout` and `officer`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::pb::session_client::SessionClient;
use kms_client::{Error, channel, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::output::{local_time, now, write_private};

// The arguments of `kmsctl login`. No doc comment: clap would take it for the command's help
// text, which `Command::Login` gives.
#[derive(Args)]
pub(crate) struct LoginArgs {
    /// The officer's name.
    #[arg(long, required_unless_present = "dev")]
    name: Option<String>,
    /// A file holding the passphrase (default: the first line of standard input).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// The six-digit code from the authenticator app (default: the next line of standard input).
    #[arg(long)]
    totp: Option<String>,
    /// Development mode only: log in as dev-officer with the credentials `kms-server dev`
    /// wrote to .kms-dev/ (or `cargo xtask cluster` to .kms-cluster/: see --dev-dir).
    #[arg(long, conflicts_with_all = ["name", "passphrase_file", "totp"])]
    dev: bool,
}

impl LoginArgs {
    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let LoginArgs { name, passphrase_file, totp, dev } = self;
        let (name, passphrase, code) = if dev {
            let dir = &ctx.dev_dir;
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .map_err(|e| Error::Config(format!("{}: {e} (is `cargo xtask dev` running from here?)", dir.join(f).display())))
            };
            let secret = read("dev-officer.totp")?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let code = kms_client::totp::code(&secret, now).ok_or_else(|| Error::Config("bad development TOTP secret".into()))?;
            ("dev-officer".to_string(), zeroize::Zeroizing::new(read("dev-officer.passphrase")?), zeroize::Zeroizing::new(code))
        } else {
            let passphrase = secret_input(&passphrase_file)?;
            let code = match totp {
                Some(code) => zeroize::Zeroizing::new(code),
                None => secret_input(&None)?,
            };
            (name.unwrap_or_default(), passphrase, code)
        };
        let mut c = SessionClient::new(channel(&ctx.endpoint, &ctx.tls).await?);
        let mut r =
            c.login(pb::LoginRequest { name: name.clone(), passphrase: passphrase.to_string(), totp_code: code.to_string() }).await?.into_inner();
        let token = zeroize::Zeroizing::new(std::mem::take(&mut r.session_token));
        write_private(&ctx.session, token.as_bytes())?;
        out.print(json!({"officer": name, "role": r.role, "expiration_time": r.expiration_time}), || {
            let left = (r.expiration_time - now()).max(0);
            format!("logged in as {name} ({}) until {} (in {} minutes)", r.role, local_time(r.expiration_time), (left + 30) / 60)
        });
        Ok(())
    }
}

/// `kmsctl logout`: ends the session on the server and forgets it here.
pub(crate) async fn logout(ctx: &Context) -> Result<(), Error> {
    let out = &ctx.out;
    let mut c = SessionClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
    let ended = c.logout(pb::LogoutRequest {}).await;
    let _ = std::fs::remove_file(&ctx.session);
    ended?;
    out.print(json!({"logged_out": true}), || "logged out".to_string());
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum OfficerCommand {
    /// Adds an officer or an auditor; prints the TOTP enrolment URI (shown once).
    Add {
        name: String,
        #[arg(long, value_parser = ["officer", "auditor"])]
        role: String,
        /// A file holding the new officer's passphrase (default: the first line of standard input).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    List,
    /// Disables an officer and ends their sessions.
    Disable {
        name: String,
    },
    /// Changes your own passphrase (both read from files, or from two lines of standard input).
    Passphrase {
        #[arg(long)]
        current_file: Option<PathBuf>,
        #[arg(long)]
        new_file: Option<PathBuf>,
    },
    /// A new TOTP secret for yourself; prints the new enrolment URI.
    ReenrollTotp,
}

impl OfficerCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, OfficerCommand::List)
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            OfficerCommand::Add { name, role, passphrase_file } => {
                let passphrase = secret_input(&passphrase_file)?;
                let mut r =
                    c.create_officer(pb::CreateOfficerRequest { name: name.clone(), role, passphrase: passphrase.to_string() }).await?.into_inner();
                let uri = zeroize::Zeroizing::new(std::mem::take(&mut r.otpauth_uri));
                out.print(json!({"officer": name, "otpauth_uri": uri.as_str()}), || {
                    format!("officer {name} added; add this to their authenticator app (shown once):\n{}", uri.as_str())
                });
                Ok(())
            }
            OfficerCommand::List => {
                let r = c.list_officers(pb::ListOfficersRequest {}).await?.into_inner();
                out.print(Value::Array(r.officers.iter().map(officer_json).collect()), || {
                    r.officers
                        .iter()
                        .map(|o| format!("{}  {}  {}", o.name, o.role, if o.enabled { "enabled" } else { "disabled" }))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                Ok(())
            }
            OfficerCommand::Disable { name } => {
                let r = c.disable_officer(pb::DisableOfficerRequest { name }).await?.into_inner();
                let o = r.officer.unwrap_or_default();
                out.print(officer_json(&o), || format!("{} disabled", o.name));
                Ok(())
            }
            OfficerCommand::Passphrase { current_file, new_file } => {
                let current = secret_input(&current_file)?;
                let new = secret_input(&new_file)?;
                c.change_passphrase(pb::ChangePassphraseRequest { current_passphrase: current.to_string(), new_passphrase: new.to_string() }).await?;
                out.print(json!({"changed": true}), || "passphrase changed".to_string());
                Ok(())
            }
            OfficerCommand::ReenrollTotp => {
                let mut r = c.reenroll_totp(pb::ReenrollTotpRequest {}).await?.into_inner();
                let uri = zeroize::Zeroizing::new(std::mem::take(&mut r.otpauth_uri));
                out.print(json!({"otpauth_uri": uri.as_str()}), || format!("new enrolment (shown once):\n{}", uri.as_str()));
                Ok(())
            }
        }
    }
}

/// A secret from a file, or the next line of standard input.
pub(crate) fn secret_input(file: &Option<PathBuf>) -> Result<zeroize::Zeroizing<String>, Error> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| Error::Config(e.to_string()))?;
            line
        }
    };
    Ok(zeroize::Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_string()))
}

fn officer_json(o: &pb::Officer) -> Value {
    json!({"name": o.name, "role": o.role, "enabled": o.enabled, "creation_time": o.creation_time,
           "last_login_time": o.last_login_time, "locked_until": o.locked_until})
}
