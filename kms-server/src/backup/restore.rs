//! `kms-server restore FILE`: offline, on the server's host, into an empty token that holds the
//! same backup key, and a data directory with no database (or, with PostgreSQL, an empty
//! database: the backup's database section is the same SQLite snapshot for both backends).
//!
//! 1. The file is read and checked before anything is written: the objects section against its
//!    hash, the audit key unwrapped as a *session* object (gone with its session) to check the
//!    manifest's MAC, then the database streamed to `kms.db.restoring` against its hash.
//! 2. Every object is unwrapped into the token under the backup key, with the template it was
//!    made with (`Wrapped::unwrap_template`), except the versions of keys the operator says were
//!    destroyed after the backup.
//! 3. In the restored database, in one transaction: every version's encryption count is raised
//!    to the usage limit (the encryptions made after the backup are unknown, so no restored
//!    version encrypts again: the first encryption under each key rotates it), officers'
//!    sessions are ended, the keys destroyed since are recorded as destroyed, the revocation
//!    epoch is raised, and a `Restore` record is chained to the audit trail.
//! 4. `kms.db.restoring` is renamed to `kms.db`, or with PostgreSQL copied into the database in
//!    one transaction: the commit point.
//!
//! A restore interrupted before step 4 is run again with the same file: it finds
//! `kms.db.restoring` and the marker beside it naming this backup (its manifest's SHA-256),
//! destroys the objects it had unwrapped (the token was empty when it began; any object the
//! backup does not hold stops it) and starts over. A leftover of another backup's restore is
//! refused, never cleaned up.

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, Write};
use std::path::Path;

use anyhow::{Context, bail};

use sha2::{Digest, Sha256};

use super::{Header, SERVICE_KEYS, WrappedObject, copy_checked, expect_end, hex, mac_message, parse_objects};
use crate::audit::AuditEvent;
use crate::clock::now;
use crate::config::{Config, StoreBackend};
use crate::domain::ids::KeyId;
use crate::domain::lifecycle::{KeyState, VersionState};
use crate::hooks::{Step, crash_point};
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::hsm::{Hsm, ServiceKey, Wrapped};
use crate::store::Store;

/// Reads a list of key ids, one per line; blank lines and `#` comments are skipped.
pub fn read_key_list(path: &Path) -> anyhow::Result<Vec<KeyId>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| line.parse().map_err(|e| anyhow::anyhow!("{}:{}: {line:?} is not a key id: {e}", path.display(), n + 1)))
        .collect()
}

/// Restores `file`; returns a report for the operator.
pub fn restore(config: &Config, file: &Path, destroyed: &[KeyId]) -> anyhow::Result<String> {
    let db_path = config.data_dir.join("kms.db");
    // With PostgreSQL, the database the restored one is copied into at the commit point.
    let shared = match config.store.backend {
        StoreBackend::Sqlite => None,
        StoreBackend::Postgres => Some(Store::open_configured(config)?),
    };
    match &shared {
        None if db_path.exists() => bail!("{} already exists: restore only into a data directory without a database", db_path.display()),
        Some(store) if !store.is_empty()? => {
            bail!("the PostgreSQL database already holds keys, officers, principals or audit records: restore only into an empty one")
        }
        _ => {}
    }
    crate::files::create_dir(&config.data_dir)?;
    let restoring = config.data_dir.join("kms.db.restoring");
    let hsm = Pkcs11Hsm::open(&config.hsm.module, &config.hsm.token_label, &config.pin()?, 2)?;
    let backup_key = hsm.backup_key()?.unwrap.with_context(|| {
        format!(
            "token {:?} holds no private backup key: restore needs the key pair the backup was made under (docs/operations.md)",
            config.hsm.token_label
        )
    })?;

    // 1. Read and check everything before writing anything.
    let mut reader = BufReader::new(fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
    let head = Header::read(&mut reader)?;
    let manifest = &head.manifest;
    let mut section = Vec::new();
    copy_checked(&mut reader, &manifest.objects, "objects section", &mut section)?;
    let objects = parse_objects(&section, manifest.objects.count)?;

    // The token must hold none of this service's objects, unless an interrupted restore of this
    // very backup made them (its marker names the backup by its manifest's hash): then those,
    // and only those, are destroyed and the restore starts over.
    let marker = config.data_dir.join("kms.db.restoring.backup");
    let this_backup = hex(&Sha256::digest(&head.manifest_bytes));
    let labels: HashSet<String> = objects.iter().map(WrappedObject::label).collect();
    let mut present: Vec<(String, crate::hsm::KeyHandle)> = hsm.find_keys()?.into_iter().map(|(name, h)| (name.label(), h)).collect();
    for which in SERVICE_KEYS {
        present.extend(hsm.find_service_key(which)?.map(|h| (which.label().to_string(), h)));
    }
    if restoring.exists() {
        if fs::read_to_string(&marker).ok().as_deref() != Some(this_backup.as_str()) {
            bail!("{} is left by an interrupted restore of another backup: finish that one, or remove it and empty the token", restoring.display());
        }
        if let Some((label, _)) = present.iter().find(|(label, _)| !labels.contains(label)) {
            bail!("token {:?} holds {label}, which this backup does not: restore only into an empty token", config.hsm.token_label);
        }
        for (_, handle) in &present {
            hsm.destroy(*handle)?;
        }
        fs::remove_file(&restoring)?;
        tracing::warn!(objects = present.len(), "an interrupted restore of this backup was found: its objects are destroyed and it starts over");
    } else if !present.is_empty() {
        bail!("token {:?} already holds {} of this service's objects: restore only into an empty token", config.hsm.token_label, present.len());
    }

    let audit_key = objects
        .iter()
        .find(|o| o.what == Wrapped::Service(ServiceKey::AuditMac))
        .context("the backup holds no audit key, so its MAC cannot be checked")?;
    let session_audit_key = hsm
        .unwrap(backup_key, &audit_key.wrapped, audit_key.what, false)
        .map_err(|e| anyhow::anyhow!("the backup key on this token does not open the backup ({e}): it was made under another backup key"))?;
    let mac_ok = hsm.verify_mac(session_audit_key, &mac_message(&head.manifest_bytes), &head.mac);
    hsm.destroy(session_audit_key)?;
    if !mac_ok? {
        bail!("the backup's MAC does not verify: the file was changed");
    }
    crate::files::write(&marker, this_backup.as_bytes())?;
    let written = (|| -> anyhow::Result<()> {
        let mut out = crate::files::create_new(&restoring)?;
        copy_checked(&mut reader, &manifest.database, "database", &mut out)?;
        expect_end(&mut reader)?;
        out.flush()?;
        out.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&restoring);
        return Err(e);
    }
    crash_point("Restore", Step::AfterIntent);

    // 2. The objects, except those of keys destroyed since the backup.
    let forgotten: HashSet<KeyId> = destroyed.iter().copied().collect();
    let mut unwrapped = 0;
    for WrappedObject { what, wrapped } in &objects {
        if let Wrapped::Version(name) = what
            && forgotten.contains(&name.key_id)
        {
            continue;
        }
        hsm.unwrap(backup_key, wrapped, *what, true)?;
        unwrapped += 1;
    }
    crash_point("Restore", Step::AfterHsm);

    // 3. The restored database's own changes, in one transaction.
    let limit = config.keys.limits().encryption_limit;
    let store = Store::open(&restoring)?;
    let (keys, versions) = store.read(|tx| Ok((tx.keys()?, tx.versions()?)))?;
    let known: HashSet<KeyId> = keys.iter().map(|k| k.key_id).collect();
    let unknown: Vec<String> = destroyed.iter().filter(|k| !known.contains(k)).map(ToString::to_string).collect();
    let at = now();
    let mut report = format!(
        "restored backup of {} (service {}, token {:?}): {} keys, {} live versions, {unwrapped} objects unwrapped",
        manifest.created_at, manifest.service_version, manifest.token_label, manifest.keys, manifest.live_versions
    );
    store.write(|tx| {
        tx.reserve_all_at_least(limit)?;
        tx.delete_all_sessions()?;
        for mut key in keys.iter().filter(|k| forgotten.contains(&k.key_id)).cloned() {
            key.state = KeyState::Destroyed;
            key.destruction_at = Some(at);
            tx.update_key(&key)?;
            for mut v in versions.iter().filter(|v| v.key_id == key.key_id && v.state.has_material()).cloned() {
                v.state = VersionState::Destroyed;
                v.destruction_at = Some(at);
                tx.update_version_state(&v)?;
            }
            let detail = "destroyed after the backup was made (restore --destroyed-since); its material was not restored".to_string();
            tx.append_audit(&AuditEvent::system("DestroyKey", Some(key.key_id), None, detail), at)?;
        }
        tx.bump_marks(true)?;
        let detail = format!(
            "{report}; {} keys recorded destroyed since; every restored version retired from encryption (usage unknown after the backup)",
            forgotten.len() - unknown.len()
        );
        tx.append_audit(&AuditEvent::system("Restore", None, None, detail), at)
    })?;

    // 4. The commit point: the file renamed into place, or copied into PostgreSQL in one
    //    transaction (then a run after an interruption finds the database no longer empty).
    match &shared {
        None => {
            drop(store);
            fs::rename(&restoring, &db_path)?;
            fs::File::open(&config.data_dir)?.sync_all()?;
        }
        Some(shared) => {
            shared.import(&store)?;
            drop(store);
            fs::remove_file(&restoring)?;
        }
    }
    let _ = fs::remove_file(&marker);
    crash_point("Restore", Step::AfterCommit);
    if !unknown.is_empty() {
        report.push_str(&format!("\nnot in the backup, so nothing to do: {}", unknown.join(", ")));
    }
    report.push_str("\nevery restored key rotates on its first encryption; officers log in again");
    Ok(report)
}
