//! The data plane from the command line: `kmsctl data-key generate`, `encrypt` and `decrypt`,
//! and the encryption context they (and `explain`) take.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use kms_client::{DataClient, Error, pb};
use serde_json::json;

use crate::Context;
use crate::output::{open_input, parse_pair, write_atomically};

#[derive(Subcommand)]
pub(crate) enum DataKeyCommand {
    /// Generates a data key: prints it (base64) and its wrapped blob (base64).
    Generate {
        #[arg(long)]
        key: String,
        /// 16 (AES-128) or 32 (AES-256).
        #[arg(long, default_value_t = 32)]
        bytes: u32,
        /// Return only the wrapped blob.
        #[arg(long)]
        without_plaintext: bool,
        #[command(flatten)]
        context: ContextArgs,
    },
}

impl DataKeyCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`): none here do.
    pub(crate) fn changes(&self) -> bool {
        false
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let DataKeyCommand::Generate { key, bytes, without_plaintext, context } = self;
        let encryption_context = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
        let mut c = DataClient::connect(&ctx.data_endpoint, &ctx.tls).await?;
        let map = encryption_context.into_iter().collect();
        if without_plaintext {
            let r = c
                .raw
                .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                    key_id: key,
                    key_spec: 0,
                    number_of_bytes: bytes,
                    encryption_context: map,
                    caller_context: None,
                })
                .await?
                .into_inner();
            let blob = B64.encode(&r.ciphertext_blob);
            out.print(json!({"key_id": r.key_id, "key_version": r.key_version, "ciphertext_blob": blob}), || {
                format!("key {} version {}\nciphertext_blob {blob}", r.key_id, r.key_version)
            });
        } else {
            let mut r = c
                .raw
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key_id: key,
                    key_spec: 0,
                    number_of_bytes: bytes,
                    encryption_context: map,
                    caller_context: None,
                })
                .await?
                .into_inner();
            let plaintext = zeroize::Zeroizing::new(B64.encode(std::mem::take(&mut r.plaintext)));
            let blob = B64.encode(&r.ciphertext_blob);
            out.print(json!({"key_id": r.key_id, "key_version": r.key_version, "plaintext": plaintext.as_str(), "ciphertext_blob": blob}), || {
                format!("key {} version {}\nplaintext {}\nciphertext_blob {blob}", r.key_id, r.key_version, plaintext.as_str())
            });
        }
        Ok(())
    }
}

// The arguments of `kmsctl encrypt`. No doc comment: clap would take it for the command's help
// text, which `Command::Encrypt` gives.
#[derive(Args)]
pub(crate) struct EncryptArgs {
    #[arg(long)]
    key: String,
    #[arg(long = "in")]
    input: PathBuf,
    #[arg(long = "out")]
    output: PathBuf,
    #[command(flatten)]
    context: ContextArgs,
}

impl EncryptArgs {
    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let EncryptArgs { key, input, output, context } = self;
        let encryption_context = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
        let mut client = DataClient::connect(&ctx.data_endpoint, &ctx.tls).await?;
        let n = write_atomically(&output, async |w| client.encrypt_stream(&key, &encryption_context, &mut open_input(&input)?, w).await).await?;
        out.print(json!({"bytes": n, "out": output}), || format!("encrypted {n} bytes to {}", output.display()));
        Ok(())
    }
}

// The arguments of `kmsctl decrypt`. No doc comment: clap would take it for the command's help
// text, which `Command::Decrypt` gives.
#[derive(Args)]
pub(crate) struct DecryptArgs {
    #[arg(long = "in")]
    input: PathBuf,
    #[arg(long = "out")]
    output: PathBuf,
    /// Pairs the envelope's context must contain.
    #[command(flatten)]
    context: ContextArgs,
}

impl DecryptArgs {
    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let DecryptArgs { input, output, context } = self;
        let encryption_context = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
        let mut client = DataClient::connect(&ctx.data_endpoint, &ctx.tls).await?;
        let n = write_atomically(&output, async |w| client.decrypt_stream(&encryption_context, &mut open_input(&input)?, w).await).await?;
        out.print(json!({"bytes": n, "out": output}), || format!("decrypted {n} bytes to {}", output.display()));
        Ok(())
    }
}

#[derive(Args)]
pub(crate) struct ContextArgs {
    /// An encryption context pair, KEY=VALUE; repeat for more.
    #[arg(long = "context", value_parser = parse_pair)]
    pub(crate) pairs: Vec<(String, String)>,
}

impl ContextArgs {
    pub(crate) fn map(&self) -> Result<BTreeMap<String, String>, String> {
        let mut map = BTreeMap::new();
        for (k, v) in &self.pairs {
            if map.insert(k.clone(), v.clone()).is_some() {
                return Err(format!("--context: the key {k:?} is given twice"));
            }
        }
        Ok(map)
    }
}
