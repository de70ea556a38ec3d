//! Google Workspace client-side encryption (the CSE facade, docs/facades.md): where Google
//! reaches the key service, which key wraps, and whose tokens are trusted.

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;

#[derive(Subcommand)]
pub(crate) enum CseCommand {
    /// Sets the KACLS URL Google Workspace is given, the key new wraps use, and who may do what;
    /// the first time, registers the principal cse:workspace, and grants it Encrypt and Decrypt
    /// on the key when it holds no such grant.
    Configure {
        /// https://HOST[:PORT][/PATH], as entered in the Google Workspace admin console.
        #[arg(long)]
        kacls_url: String,
        /// The key new wraps use (id or alias/NAME).
        #[arg(long)]
        key: String,
        /// Lets guests (email_type google-visitor or customer-idp) use the keys.
        #[arg(long)]
        allow_guests: bool,
        /// A user who may call privilegedwrap and privilegedunwrap (Google's bulk import, takeout and migration); repeatable.
        #[arg(long = "privileged-user")]
        privileged_users: Vec<String>,
        /// Another key service (its KACLS URL) whose wrapped keys rewrap may fetch and wrap
        /// again here, for Google's migration between key services; repeatable.
        #[arg(long = "migration-source")]
        migration_sources: Vec<String>,
        /// Your Google Workspace domain: Google's tokens naming another owner
        /// (kacls_owner_domain) are refused, so that no other Workspace can use this service.
        #[arg(long)]
        owner_domain: Option<String>,
    },
    /// The settings and the trusted issuers.
    Show,
    /// The issuers whose tokens are trusted.
    #[command(subcommand)]
    Issuer(IssuerCommand),
}

#[derive(Subcommand)]
pub(crate) enum IssuerCommand {
    /// Trusts an issuer's tokens (replacing its earlier entry): the customer's identity
    /// provider for the authentication token, Google for the authorization token.
    Add {
        /// The tokens' iss claim, such as gsuitecse-tokenissuer-drive@system.gserviceaccount.com.
        iss: String,
        /// authentication (the identity provider), authorization (Google) or kacls (another key
        /// service migrating keys out of this one; ISS is its KACLS URL).
        #[arg(long)]
        token: String,
        /// An aud value its tokens may name (Google's: cse-authorization); repeatable.
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Its key set, a JWKS file (RSA and EC keys only).
        #[arg(long, required_unless_present = "jwks_url")]
        jwks_file: Option<std::path::PathBuf>,
        /// Where the key set is published (https): fetched by the service now (unless
        /// --jwks-file gives it) and again every hour.
        #[arg(long)]
        jwks_url: Option<String>,
    },
    /// Stops trusting an issuer: its tokens are refused from now on, on every node.
    Remove { iss: String },
}

fn configuration_json(c: &pb::CseConfiguration) -> Value {
    json!({
        "configured": c.configured, "principal": "cse:workspace", "kacls_url": c.kacls_url, "key_id": c.key_id,
        "allow_guests": c.allow_guests, "privileged_users": c.privileged_users, "migration_sources": c.migration_sources,
        "owner_domain": c.owner_domain,
        "update_time": c.update_time,
        "issuers": c.issuers.iter().map(|i| json!({
            "iss": i.iss, "token": i.token, "audiences": i.audiences, "key_ids": i.key_ids,
            "jwks_url": i.jwks_url, "update_time": i.update_time,
        })).collect::<Vec<_>>(),
    })
}

fn configuration_text(c: &pb::CseConfiguration) -> String {
    let mut lines = vec![match c.configured {
        true => format!(
            "KACLS {}  key {}  owner domain {}  guests {}  privileged users: {}",
            c.kacls_url,
            c.key_id,
            if c.owner_domain.is_empty() { "not checked" } else { &c.owner_domain },
            if c.allow_guests { "allowed" } else { "refused" },
            if c.privileged_users.is_empty() { "none".to_string() } else { c.privileged_users.join(", ") }
        ),
        false => "not configured (kmsctl cse configure)".to_string(),
    }];
    for i in &c.issuers {
        lines.push(format!("{:<14} {}  audiences: {}  keys: {}", i.token, i.iss, i.audiences.join(", "), i.key_ids.join(", ")));
    }
    if c.issuers.is_empty() {
        lines.push("no trusted issuer (kmsctl cse issuer add)".to_string());
    }
    lines.join("\n")
}

impl CseCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, CseCommand::Show)
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let r = match self {
            CseCommand::Configure { kacls_url, key, allow_guests, privileged_users, migration_sources, owner_domain } => {
                let owner_domain = owner_domain.unwrap_or_default();
                c.configure_cse(pb::ConfigureCseRequest { kacls_url, key, allow_guests, privileged_users, migration_sources, owner_domain }).await?
            }
            CseCommand::Show => c.get_cse_configuration(pb::GetCseConfigurationRequest {}).await?,
            CseCommand::Issuer(IssuerCommand::Add { iss, token, audiences, jwks_file, jwks_url }) => {
                let jwks = match &jwks_file {
                    Some(file) => std::fs::read_to_string(file).map_err(|e| Error::Config(format!("--jwks-file {}: {e}", file.display())))?,
                    None => String::new(),
                };
                c.put_cse_issuer(pb::PutCseIssuerRequest { iss, token, audiences, jwks, jwks_url: jwks_url.unwrap_or_default() }).await?
            }
            CseCommand::Issuer(IssuerCommand::Remove { iss }) => c.remove_cse_issuer(pb::RemoveCseIssuerRequest { iss }).await?,
        }
        .into_inner();
        out.print(configuration_json(&r), || configuration_text(&r));
        Ok(())
    }
}
