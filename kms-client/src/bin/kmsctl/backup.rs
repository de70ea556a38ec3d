//! Backups: `kmsctl backup create` and `kmsctl backup verify`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::output::{create_fresh, hex};

#[derive(Subcommand)]
pub(crate) enum BackupCommand {
    /// Makes a backup and writes it to FILE (written beside it first, then renamed: a file
    /// that exists is complete).
    Create {
        #[arg(long = "out")]
        output: PathBuf,
    },
    /// Checks a backup file without restoring it: its structure and section hashes here, its
    /// MAC in the server's HSM. Exits non-zero, saying what failed, for a changed file.
    Verify { file: PathBuf },
}

impl BackupCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    pub(crate) fn changes(&self) -> bool {
        matches!(self, BackupCommand::Create { .. })
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            BackupCommand::Create { output } => {
                let io = |e: std::io::Error| Error::Config(format!("{}: {e}", output.display()));
                let mut partial = output.clone().into_os_string();
                partial.push(".partial");
                let partial = PathBuf::from(partial);
                let mut stream = c.create_backup(pb::CreateBackupRequest {}).await?.into_inner();
                if out.dry_run.answer().is_some() {
                    out.print(Value::Null, String::new);
                    return Ok(());
                }
                let mut file = BufWriter::new(create_fresh(&partial).map_err(io)?);
                let (mut manifest, mut written) = (None, 0u64);
                let received = loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            manifest = manifest.or(chunk.manifest);
                            if let Err(e) = file.write_all(&chunk.data) {
                                break Err(io(e));
                            }
                            written += chunk.data.len() as u64;
                        }
                        Ok(None) => break Ok(()),
                        Err(status) => break Err(Error::Status(status)),
                    }
                };
                let complete = received.and_then(|()| match &manifest {
                    Some(m) if m.file_bytes == written => Ok(()),
                    _ => Err(Error::Config(format!("the backup stream ended after {written} bytes, before the whole file"))),
                });
                let synced = complete.and_then(|()| file.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io));
                if let Err(e) = synced {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
                std::fs::rename(&partial, &output).map_err(io)?;
                let m = manifest.unwrap_or_default();
                out.print(json!({"file": output, "manifest": manifest_json(&m)}), || format!("{}: {}", output.display(), manifest_text(&m)));
                Ok(())
            }
            BackupCommand::Verify { file } => {
                let request = read_backup(&file)?;
                let r = c.verify_backup(request).await?.into_inner();
                let m = r.manifest.unwrap_or_default();
                out.print(json!({"ok": true, "manifest": manifest_json(&m)}), || format!("backup ok: {}", manifest_text(&m)));
                Ok(())
            }
        }
    }
}

/// The head of a backup file and the digests of its two sections (docs/file-format.md).
fn read_backup(path: &Path) -> Result<pb::VerifyBackupRequest, Error> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let bad = |what: String| Error::Config(format!("{}: not a valid backup file: {what}", path.display()));
    let mut r = BufReader::new(File::open(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| bad("shorter than its magic number".into()))?;
    if &magic != b"KMSBAK\x00\x01" {
        return Err(bad("wrong magic number".into()));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|_| bad("truncated".into()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 * 1024 {
        return Err(bad(format!("manifest length {len} is over 16 KiB")));
    }
    let mut manifest = vec![0u8; len];
    let mut mac = vec![0u8; 32];
    r.read_exact(&mut manifest).and_then(|()| r.read_exact(&mut mac)).map_err(|_| bad("truncated in its head".into()))?;
    let head: Value = serde_json::from_slice(&manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    let objects_len = head["objects"]["bytes"].as_u64().ok_or_else(|| bad("the manifest has no objects length".into()))?;
    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", path.display()));
    let mut digest = Sha256::new();
    let objects_bytes = std::io::copy(&mut (&mut r).take(objects_len), &mut digest).map_err(io)?;
    let objects_sha256 = hex(&digest.finalize_reset());
    let database_bytes = std::io::copy(&mut r, &mut digest).map_err(io)?;
    Ok(pb::VerifyBackupRequest { manifest, mac, objects_bytes, objects_sha256, database_bytes, database_sha256: hex(&digest.finalize()) })
}

fn manifest_json(m: &pb::BackupManifest) -> Value {
    json!({"creation_time": m.creation_time, "service_version": m.service_version, "token_label": m.token_label,
           "token_serial": m.token_serial, "backup_key_label": m.backup_key_label, "keys": m.keys, "live_versions": m.live_versions,
           "audit_checkpoint_seq": m.audit_checkpoint_seq, "objects": m.objects, "file_bytes": m.file_bytes})
}

fn manifest_text(m: &pb::BackupManifest) -> String {
    format!(
        "backup of {} by kms-server {} (token {:?}, serial {}): {} keys, {} live versions, {} wrapped objects under {:?}, audit through record {}, {} bytes",
        m.creation_time,
        m.service_version,
        m.token_label,
        m.token_serial,
        m.keys,
        m.live_versions,
        m.objects,
        m.backup_key_label,
        m.audit_checkpoint_seq,
        m.file_bytes
    )
}
