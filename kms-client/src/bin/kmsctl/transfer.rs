//! Reversibility and BYOK: `kmsctl export`, `kmsctl import`, `kmsctl key import-parameters`
//! and `kmsctl key import`. A bundle is a directory (docs/export-format.md):
//!
//! ```text
//! manifest.json               the keys, their versions and states, the wrapping, the audit summary
//! versions/KEY_ID.VERSION.bin each version under the customer's RSA key (RSA-OAEP, SHA-1)
//! audit.jsonl                 the whole audit trail, as `kmsctl audit export` writes it
//! ```

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use clap::Args;
use kms_client::pb::audit_log_client::AuditLogClient;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::json;

use crate::Context;
use crate::admin::admin_channel;
use crate::output::{create_private, local_time, write_private};

/// An export's reply holds every version: let it be larger than gRPC's 4 MiB default.
const MAX_BUNDLE: usize = 256 * 1024 * 1024;

/// `kmsctl export`: every live key version, wrapped in the HSM for the customer.
#[derive(Args)]
pub(crate) struct ExportArgs {
    /// The customer's RSA public key (PEM, `openssl pkey -pubout`), which the HSM's security
    /// officer made trusted with `kms-server export-key`.
    #[arg(long)]
    to_public_key: PathBuf,
    /// The bundle directory to make (it must not exist).
    #[arg(long = "out")]
    output: PathBuf,
}

/// `kmsctl import`: a bundle another instance exported under this one's import parameters.
#[derive(Args)]
pub(crate) struct ImportArgs {
    /// The import token (`kmsctl key import-parameters`).
    #[arg(long)]
    token: String,
    /// The bundle directory (`kmsctl export --out`).
    #[arg(long)]
    bundle: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Config(format!("{}: {e}", path.display()))
}

fn version_file(dir: &Path, key_id: &str, version: u32) -> PathBuf {
    dir.join("versions").join(format!("{key_id}.{version}.bin"))
}

impl ExportArgs {
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let pem = std::fs::read_to_string(&self.to_public_key).map_err(io(&self.to_public_key))?;
        if self.output.exists() {
            return Err(Error::Config(format!("{}: exists already; name a new directory", self.output.display())));
        }
        let channel = admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?;
        let mut c = KeyManagementClient::new(channel.clone()).max_decoding_message_size(MAX_BUNDLE);
        let r = c.export_keys(pb::ExportKeysRequest { public_key_pem: pem }).await?.into_inner();
        if out.dry_run.answer().is_some() {
            out.print(serde_json::Value::Null, String::new);
            return Ok(());
        }
        // Made beside the destination and renamed when complete: a bundle that exists is whole.
        let mut partial = self.output.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let _ = std::fs::remove_dir_all(&partial);
        {
            use std::os::unix::fs::DirBuilderExt;
            // Private, whatever the umask, as every directory kmsctl makes.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(partial.join("versions")).map_err(io(&partial))?;
        }
        let write = |path: PathBuf, bytes: &[u8]| write_private(&path, bytes);
        write(partial.join("manifest.json"), &r.manifest)?;
        for v in &r.versions {
            write(version_file(&partial, &v.key_id, v.version), &v.wrapped)?;
        }
        let audit_path = partial.join("audit.jsonl");
        let mut sink = BufWriter::new(create_private(&audit_path).map_err(io(&audit_path))?);
        let records = crate::audit::write_records(&mut AuditLogClient::new(channel), 0, 0, &mut sink).await?;
        drop(sink);
        std::fs::rename(&partial, &self.output).map_err(io(&self.output))?;
        let keys = serde_json::from_slice::<serde_json::Value>(&r.manifest).ok().and_then(|m| m["keys"].as_array().map(Vec::len)).unwrap_or(0);
        out.print(json!({"bundle": self.output, "keys": keys, "versions": r.versions.len(), "audit_records": records}), || {
            format!(
                "exported {keys} keys, {} versions and {records} audit records to {} (unwrap with OpenSSL: docs/export-format.md)",
                r.versions.len(),
                self.output.display()
            )
        });
        Ok(())
    }
}

impl ImportArgs {
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let dir = &self.bundle;
        let read = |path: PathBuf| std::fs::read(&path).map_err(|e| Error::Config(format!("{}: {e}", path.display())));
        let manifest = read(dir.join("manifest.json"))?;
        let listed: serde_json::Value =
            serde_json::from_slice(&manifest).map_err(|e| Error::Config(format!("{}: {e}", dir.join("manifest.json").display())))?;
        let mut versions = Vec::new();
        for key in listed["keys"].as_array().into_iter().flatten() {
            let key_id = key["key_id"].as_str().unwrap_or_default();
            // A key id names a file here: nothing but the id's own characters.
            if key_id.is_empty() || !key_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(Error::Config(format!("{}: key id {key_id:?} is not one", dir.join("manifest.json").display())));
            }
            for v in key["versions"].as_array().into_iter().flatten() {
                let version = v["version"].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
                let wrapped = read(version_file(dir, key_id, version))?;
                versions.push(pb::WrappedKeyVersion { key_id: key_id.to_string(), version, wrapped });
            }
        }
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let r = c.import_keys(tokio_stream::iter(chunks(self.token, &manifest, versions))).await?.into_inner();
        out.print(json!({"key_ids": r.key_ids, "versions": r.versions}), || {
            format!("imported {} keys and {} versions:\n{}", r.key_ids.len(), r.versions, r.key_ids.join("\n"))
        });
        Ok(())
    }
}

/// The most bytes of one chunk of an import: well within the admin plane's 64 KiB per message.
const CHUNK: usize = 48 * 1024;

/// An import's chunks: the token first, then the manifest in pieces, then the versions in
/// batches, each chunk at most about `CHUNK` bytes.
fn chunks(token: String, manifest: &[u8], versions: Vec<pb::WrappedKeyVersion>) -> Vec<pb::ImportKeysChunk> {
    let mut chunks: Vec<pb::ImportKeysChunk> =
        manifest.chunks(CHUNK).map(|piece| pb::ImportKeysChunk { manifest: piece.to_vec(), ..Default::default() }).collect();
    let mut batch = pb::ImportKeysChunk::default();
    let mut size = 0;
    for v in versions {
        let this = v.wrapped.len() + v.key_id.len() + 16;
        if size + this > CHUNK && !batch.versions.is_empty() {
            chunks.push(std::mem::take(&mut batch));
            size = 0;
        }
        size += this;
        batch.versions.push(v);
    }
    if !batch.versions.is_empty() || chunks.is_empty() {
        chunks.push(batch);
    }
    chunks[0].import_token = token;
    chunks
}

/// `kmsctl key import-parameters`.
pub(crate) async fn import_parameters(ctx: &Context, public_key_out: &Path) -> Result<(), Error> {
    let out = &ctx.out;
    let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
    let r = c.get_import_parameters(pb::GetImportParametersRequest {}).await?.into_inner();
    if out.dry_run.answer().is_none() {
        write_private(public_key_out, r.public_key_pem.as_bytes())?;
    }
    out.print(json!({"import_token": r.import_token, "public_key": public_key_out, "expires_at": r.expires_at}), || {
        format!(
            "import token {}\nwrap the key material under {} (RSA-3072, RSAES_OAEP_SHA_1) before {}; the parameters serve one import",
            r.import_token,
            public_key_out.display(),
            local_time(r.expires_at)
        )
    });
    Ok(())
}

/// `kmsctl key import`.
pub(crate) async fn import_material(
    ctx: &Context,
    token: String,
    material: &Path,
    wrapping_algorithm: String,
    description: String,
    alias: Option<String>,
) -> Result<Option<pb::KeyMetadata>, Error> {
    let out = &ctx.out;
    let wrapped_key_material = std::fs::read(material).map_err(io(material))?;
    let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
    let r = c
        .import_key_material(pb::ImportKeyMaterialRequest {
            import_token: token,
            wrapping_algorithm,
            wrapped_key_material,
            description,
            alias: alias.unwrap_or_default(),
        })
        .await?;
    Ok(r.into_inner().key)
}
