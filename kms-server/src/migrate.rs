//! `kms-server migrate --from-sqlite FILE --config F`: a single node's database moved into the
//! PostgreSQL database a cluster will share, offline (the node stopped), on the same HSM.
//!
//! 1. A consistent copy of FILE is made beside the configuration's data directory and brought
//!    to this build's schema; FILE itself is not changed, so the old node can start again on it
//!    if the move is abandoned.
//! 2. Every table is copied into PostgreSQL in one transaction (`Store::import`), refused when
//!    the database holds any key, officer, principal or audit record: keys, versions and their
//!    usage counters (the rest of the node's last reservation counts as spent), aliases,
//!    principals, grants, officers and their sessions, review sign-offs, and the audit trail
//!    with its hashes and signed checkpoints, row for row.
//! 3. The service opens on PostgreSQL (its recovery checks every version against the HSM), the
//!    whole audit trail is verified there, checkpoints' MACs included, and a `Migrate` record
//!    is chained to it: the trail goes on without a gap.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::audit::AuditEvent;
use crate::config::{Config, StoreBackend};
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::service::{Kms, Settings};
use crate::store::Store;

/// Moves the SQLite database at `from` into the configuration's PostgreSQL database; returns a
/// report for the operator.
pub fn migrate(config: &Config, from: &Path) -> anyhow::Result<String> {
    if config.store.backend != StoreBackend::Postgres {
        bail!("the configuration's [store] backend is sqlite: migrate moves a SQLite database into PostgreSQL (backend = \"postgres\")");
    }
    if !from.is_file() {
        bail!("{}: no such database file", from.display());
    }
    crate::files::create_dir(&config.data_dir)?;
    let copy = config.data_dir.join("kms.db.migrating");
    let _ = std::fs::remove_file(&copy);
    let moved = (|| -> anyhow::Result<String> {
        let target = Arc::new(Store::open_configured(config)?);
        if !target.is_empty()? {
            bail!("the PostgreSQL database already holds keys, officers, principals or audit records: migrate only into an empty one");
        }
        let source = Store::open_copy_of(from, &copy).with_context(|| format!("reading {}", from.display()))?;
        let copied = target.import(&source)?;
        let rows = copied.iter().map(|(table, n)| format!("{table} {n}")).collect::<Vec<_>>().join(", ");
        let hsm = Arc::new(Pkcs11Hsm::open(&config.hsm.module, &config.hsm.token_label, &config.pin()?, 1)?);
        let kms = Kms::open(hsm, target, Settings::of(config))?;
        let verified = kms.verify_audit()?;
        if let Some(broken) = verified.problem {
            bail!(
                "copied ({rows}), but the audit trail does not verify in PostgreSQL at record {}: {}. Start no node on this database: \
                 empty it (drop and create it again) once the source is understood",
                broken.index,
                broken.problem
            );
        }
        let detail = format!("moved from the SQLite database {} ({rows}); the trail verified through here", from.display());
        kms.record(&AuditEvent::system("Migrate", None, None, detail))?;
        Ok(format!(
            "migrated {} into PostgreSQL: {rows}\naudit trail verified: {} records, {} signed checkpoints, the last at record {}",
            from.display(),
            verified.records,
            verified.checkpoints,
            verified.last_checkpoint
        ))
    })();
    let _ = std::fs::remove_file(&copy);
    moved
}
