//! Making and checking backups on the running service (the file format is in `crate::backup`;
//! the restore runs offline, in `crate::backup::restore`).

use std::io::Seek;

use sha2::{Digest, Sha256};

use super::{Caller, Kms};
use crate::backup::{self, Header, Manifest, Section, WrappedObject};
use crate::clock::now;
use crate::error::{Error, Result};
use crate::hooks::{Step, crash_point};
use crate::hsm::{
    ObjectName, ServiceKey, Wrapped,
    templates::{BACKUP_UNWRAP_LABEL, BACKUP_WRAP_LABEL},
};

/// A backup ready to send: the head of the file (magic, manifest, MAC, objects) and the
/// database snapshot that follows it (an unlinked file: nothing is left on disk).
#[derive(Debug)]
pub struct BackupFile {
    pub manifest: Manifest,
    pub head: Vec<u8>,
    pub database: std::fs::File,
}

/// The digests a client computed over a file's two sections (`kmsctl backup verify` reads the
/// file where it is; only its head and these travel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionDigests {
    pub objects_bytes: u64,
    pub objects_sha256: String,
    pub database_bytes: u64,
    pub database_sha256: String,
}

impl Kms {
    /// Looks at the backup key pair (at startup, and after each backup: the pair changes only
    /// when the key ceremony runs) and returns what to tell the operator when it was made
    /// without its unwrap template. A failed look keeps what was known.
    pub fn check_backup_key(&self) -> Option<&'static str> {
        match self.hsm.backup_key_unguarded() {
            Ok(unguarded) => self.backup_key_unguarded.store(unguarded, std::sync::atomic::Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "could not check the backup key pair's unwrap template"),
        }
        self.backup_key_warning()
    }

    /// The warning for an unguarded backup key pair, as last checked (`kmsctl status`).
    pub fn backup_key_warning(&self) -> Option<&'static str> {
        self.backup_key_unguarded.load(std::sync::atomic::Ordering::Relaxed).then_some(crate::hsm::pkcs11::UNGUARDED_BACKUP_KEY)
    }

    /// The trusted public half of the backup key pair, which backups are wrapped under.
    fn backup_wrap_key(&self) -> Result<crate::hsm::KeyHandle> {
        self.hsm.backup_key()?.wrap.ok_or_else(|| {
            Error::precondition(format!(
                "the token holds no trusted backup key ({BACKUP_WRAP_LABEL:?}): make it with `kms-server backup-key` (docs/operations.md)"
            ))
        })
    }

    /// Makes a backup: under the admin lock (so no key is created, rotated or destroyed while
    /// it runs), signs an audit checkpoint over the last record, wraps every live version's
    /// object and the service keys under the backup key, snapshots the database, and signs the
    /// manifest. The backup is audited before it is returned.
    pub fn create_backup(&self, caller: &Caller) -> Result<BackupFile> {
        let backup_key = self.backup_wrap_key()?;
        let _admin = self.admin_lock()?;
        let (mut objects, keys) = {
            let state = self.registry.read();
            let mut live = Vec::new();
            for entry in state.keys.values() {
                for v in entry.versions.values().filter(|v| v.record.state.has_material()) {
                    let name = ObjectName { key_id: v.record.key_id, version: v.record.version };
                    let handle = v.handle.ok_or_else(|| {
                        Error::precondition(format!("{} has no HSM object (material missing): repair the HSM before backing up", name.label()))
                    })?;
                    live.push((Wrapped::Version(name), handle));
                }
            }
            (live, state.keys.len() as u64)
        };
        let live_versions = objects.len() as u64;
        caller.commit_point(|| format!("back up {keys} keys and {live_versions} live key versions, wrapped under the HSM's backup key"))?;
        let at = now();
        let checkpoint_seq = self.checkpointer(1, 0).sign_now(&self.store, at)?;
        objects.push((Wrapped::Service(ServiceKey::AuditMac), self.audit_mac));
        objects.push((Wrapped::Service(ServiceKey::OfficerSecrets), self.officer_secrets));
        let mut section = Vec::new();
        for (what, handle) in &objects {
            WrappedObject { what: *what, wrapped: self.hsm.wrap(backup_key, *handle)? }.encode(&mut section);
        }
        crash_point("CreateBackup", Step::AfterHsm);

        let mut database = self.store.snapshot()?;
        let io = |e| Error::Store(crate::store::StoreError::io("reading the snapshot", e));
        let mut digest = Sha256::new();
        let database_bytes = std::io::copy(&mut database, &mut digest).map_err(io)?;
        database.rewind().map_err(io)?;
        let token = self.hsm.token_info()?;
        let manifest = Manifest {
            format: 1,
            created_at: at,
            service_version: env!("CARGO_PKG_VERSION").into(),
            token_label: token.label,
            token_serial: token.serial_number,
            backup_key_label: BACKUP_WRAP_LABEL.into(),
            keys,
            live_versions,
            audit_checkpoint_seq: checkpoint_seq,
            objects: Section::of(objects.len() as u64, section.len() as u64, Sha256::new_with_prefix(&section)),
            database: Section::of(1, database_bytes, digest),
        };
        let json = serde_json::to_vec(&manifest).map_err(|e| Error::precondition(format!("manifest: {e}")))?;
        let mac = self.hsm.mac(self.audit_mac, &backup::mac_message(&json))?;
        let mut head = Header::encode(&json, &mac);
        head.extend_from_slice(&section);

        let detail = format!("{keys} keys, {live_versions} live versions, audit through checkpoint {checkpoint_seq}");
        self.store.write(|tx| tx.append_audit(&caller.audit("CreateBackup", None, None, detail.clone()), now()))?;
        crash_point("CreateBackup", Step::AfterCommit);
        tracing::info!(keys, live_versions, "backup made");
        // An operator replacing an unguarded pair takes a backup next: see whether it is done.
        self.check_backup_key();
        Ok(BackupFile { manifest, head, database })
    }

    /// Checks a backup's head without restoring it: the MAC in the HSM (so the file is intact
    /// and this service's keys made it), the sections' digests against the manifest, and that
    /// this token holds the private backup key that unwraps its objects.
    pub fn verify_backup(&self, manifest_bytes: &[u8], mac: &[u8], digests: &SectionDigests) -> Result<Manifest> {
        let manifest = Header::parse_manifest(manifest_bytes).map_err(|e| Error::invalid("manifest", format!("is not valid: {}", e.0)))?;
        if !self.hsm.verify_mac(self.audit_mac, &backup::mac_message(manifest_bytes), mac)? {
            return Err(Error::invalid("mac", "does not verify: the file was changed, or another service's keys made it"));
        }
        for (field, section, bytes, sha256) in [
            ("objects_sha256", &manifest.objects, digests.objects_bytes, &digests.objects_sha256),
            ("database_sha256", &manifest.database, digests.database_bytes, &digests.database_sha256),
        ] {
            if section.bytes != bytes || section.sha256 != *sha256 {
                return Err(Error::invalid(field, "does not match the manifest: the file was changed"));
            }
        }
        if self.hsm.backup_key()?.unwrap.is_none() {
            return Err(Error::precondition(format!(
                "the token holds no private backup key ({BACKUP_UNWRAP_LABEL:?}), so it could not restore this backup"
            )));
        }
        Ok(manifest)
    }
}
