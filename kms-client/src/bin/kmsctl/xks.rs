//! AWS external key stores (the XKS facade, docs/facades.md): key stores and their SigV4
//! credentials, and which keys AWS may use through each (grants to its principal `xks:NAME`).

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::access::{grant_json, grant_text};
use crate::admin::admin_channel;

#[derive(Subcommand)]
pub(crate) enum XksCommand {
    /// Creates a key store and its first credential, and prints the proxy configuration file the
    /// AWS console imports: the only time the credential's secret is shown.
    Create {
        /// 1 to 64 of a-z, 0-9 and -; the key store's principal is xks:NAME.
        name: String,
        /// The URI path before /kms/xks/v1: empty, or /SEGMENT[/SEGMENT...].
        #[arg(long, default_value = "")]
        uri_prefix: String,
        /// The AWS region whose KMS calls the key store, such as eu-west-3.
        #[arg(long)]
        region: String,
        /// The XKS listener as AWS reaches it, such as https://xks.example.com (port 443).
        #[arg(long)]
        xks_url: String,
    },
    /// The key stores, their URI paths, regions and credentials (secrets are never shown again).
    List,
    /// A key store's credentials: at most two at once, for a rotation without an outage.
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Allows the key store to use a key (a grant to xks:NAME); the key's id is the external key
    /// id for AWS KMS's CreateKey.
    Allow {
        name: String,
        #[arg(long)]
        key: String,
        /// encrypt, decrypt or both, comma-separated (AWS's CreateKey needs both).
        #[arg(long, value_delimiter = ',', default_value = "encrypt,decrypt")]
        operations: Vec<String>,
        /// Only for this AWS principal (the request metadata's awsPrincipalArn).
        #[arg(long)]
        aws_principal: Option<String>,
        /// Only through this AWS service (kmsViaService, such as s3 or ebs).
        #[arg(long)]
        via_service: Option<String>,
    },
    /// Stops the key store using a key: revokes every grant of xks:NAME on it (AWS then gets
    /// KeyNotFoundException for it, from the next call, on every node).
    Remove {
        name: String,
        #[arg(long)]
        key: String,
    },
    /// The keys the key store may use: its grants.
    Keys { name: String },
}

#[derive(Subcommand)]
pub(crate) enum CredentialCommand {
    /// Adds a credential and prints it (the only time its secret is shown).
    Add {
        name: String,
        /// With the XKS listener's URL: print the whole proxy configuration file.
        #[arg(long)]
        xks_url: Option<String>,
    },
    /// Removes a credential: requests signed with it are refused from now on, on every node.
    Remove { access_key_id: String },
}

/// The proxy configuration file the AWS console imports for an external key store.
fn console_file(xks_url: &str, key_store: &pb::XksKeyStore, access_key_id: &str, secret: &str) -> Value {
    json!({
        "XksProxyUriEndpoint": xks_url.trim_end_matches('/'),
        "XksProxyUriPath": format!("{}/kms/xks/v1", key_store.uri_prefix),
        "XksProxyAuthenticationCredential": {"AccessKeyId": access_key_id, "RawSecretAccessKey": secret},
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
    })
}

fn key_store_json(k: &pb::XksKeyStore) -> Value {
    json!({
        "name": k.name, "principal": format!("xks:{}", k.name), "uri_path": format!("{}/kms/xks/v1", k.uri_prefix),
        "region": k.region, "creation_time": k.creation_time,
        "credentials": k.credentials.iter().map(|c| json!({"access_key_id": c.access_key_id, "creation_time": c.creation_time})).collect::<Vec<_>>(),
    })
}

fn key_store_text(k: &pb::XksKeyStore) -> String {
    let ids: Vec<&str> = k.credentials.iter().map(|c| c.access_key_id.as_str()).collect();
    format!("{}  {}/kms/xks/v1  {}  credentials: {}", k.name, k.uri_prefix, k.region, ids.join(", "))
}

/// A key store operation's name for a grant.
fn operation(name: &str) -> Result<&'static str, Error> {
    match name.trim().to_ascii_lowercase().as_str() {
        "encrypt" => Ok("Encrypt"),
        "decrypt" => Ok("Decrypt"),
        other => Err(Error::Config(format!("--operations: {other:?} is not encrypt or decrypt"))),
    }
}

impl XksCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, XksCommand::List | XksCommand::Keys { .. })
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            XksCommand::Create { name, uri_prefix, region, xks_url } => {
                let mut r = c.create_xks_key_store(pb::CreateXksKeyStoreRequest { name, uri_prefix, region }).await?.into_inner();
                let store = r.key_store.take().unwrap_or_default();
                let file = console_file(&xks_url, &store, &r.access_key_id, &r.secret_access_key);
                if !out.json && out.dry_run.answer().is_none() {
                    eprintln!("import this file in the AWS console (Create external key store); the secret is not shown again");
                }
                out.print(json!({"key_store": key_store_json(&store), "proxy_configuration": file}), || {
                    serde_json::to_string_pretty(&file).unwrap_or_default()
                });
                Ok(())
            }
            XksCommand::List => {
                let r = c.list_xks_key_stores(pb::ListXksKeyStoresRequest {}).await?.into_inner();
                out.print(Value::Array(r.key_stores.iter().map(key_store_json).collect()), || {
                    r.key_stores.iter().map(key_store_text).collect::<Vec<_>>().join("\n")
                });
                Ok(())
            }
            XksCommand::Credential(CredentialCommand::Add { name, xks_url }) => {
                let mut r = c.add_xks_credential(pb::AddXksCredentialRequest { key_store: name }).await?.into_inner();
                let store = r.key_store.take().unwrap_or_default();
                let credential = json!({"AccessKeyId": r.access_key_id, "RawSecretAccessKey": r.secret_access_key});
                let shown = match &xks_url {
                    Some(url) => console_file(url, &store, &r.access_key_id, &r.secret_access_key),
                    None => credential,
                };
                out.print(json!({"key_store": key_store_json(&store), "credential": shown}), || {
                    serde_json::to_string_pretty(&shown).unwrap_or_default()
                });
                Ok(())
            }
            XksCommand::Credential(CredentialCommand::Remove { access_key_id }) => {
                let r = c.remove_xks_credential(pb::RemoveXksCredentialRequest { access_key_id: access_key_id.clone() }).await?.into_inner();
                let store = r.key_store.unwrap_or_default();
                out.print(json!({"removed": access_key_id, "key_store": key_store_json(&store)}), || {
                    format!("removed {access_key_id}\n{}", key_store_text(&store))
                });
                Ok(())
            }
            XksCommand::Allow { name, key, operations, aws_principal, via_service } => {
                let operations = operations.iter().map(|o| operation(o).map(str::to_string)).collect::<Result<Vec<_>, _>>()?;
                let mut required = std::collections::HashMap::new();
                if let Some(arn) = aws_principal {
                    required.insert("awsPrincipalArn".to_string(), arn);
                }
                if let Some(service) = via_service {
                    required.insert("kmsViaService".to_string(), service);
                }
                let r = c
                    .create_grant(pb::CreateGrantRequest {
                        principal: format!("xks:{name}"),
                        key_id: key,
                        operations,
                        required_encryption_context: required,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let g = r.grant.unwrap_or_default();
                out.print(json!({"grant": grant_json(&g), "external_key_id": g.key_id}), || {
                    format!("{}\nexternal key id (AWS KMS CreateKey): {}", grant_text(&g), g.key_id)
                });
                Ok(())
            }
            XksCommand::Remove { name, key } => {
                let grants =
                    c.list_grants(pb::ListGrantsRequest { key_id: key.clone(), principal: format!("xks:{name}") }).await?.into_inner().grants;
                if grants.is_empty() {
                    return Err(Error::Config(format!("key store {name} may not use {key}: nothing to remove")));
                }
                for g in &grants {
                    c.revoke_grant(pb::RevokeGrantRequest { grant_id: g.grant_id.clone() }).await?;
                }
                let ids: Vec<&str> = grants.iter().map(|g| g.grant_id.as_str()).collect();
                out.print(json!({"revoked": ids}), || format!("revoked {}", ids.join(", ")));
                Ok(())
            }
            XksCommand::Keys { name } => {
                let r = c.list_grants(pb::ListGrantsRequest { key_id: String::new(), principal: format!("xks:{name}") }).await?.into_inner();
                out.print(Value::Array(r.grants.iter().map(grant_json).collect()), || r.grants.iter().map(grant_text).collect::<Vec<_>>().join("\n"));
                Ok(())
            }
        }
    }
}
