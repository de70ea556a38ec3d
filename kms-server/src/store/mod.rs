//! The metadata and audit store: SQLite, one file, every SQL statement of the service.
//!
//! Durability: WAL with `synchronous=FULL`, so a transaction is on disk when `COMMIT` returns.
//! Every state change commits with its audit record in one transaction ([`Store::write`]).
//! Nothing outside this module knows the schema; the narrow interface below is what a future
//! PostgreSQL store for several nodes would implement.

mod schema;

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::audit::{AuditEvent, Checkpoint, GENESIS, StoredRecord};
use crate::domain::ids::{AliasName, KeyId};
use crate::domain::lifecycle::{KeyState, VersionState};
use crate::domain::officer::Role;
use crate::domain::policy::{Grant, Operation, PrincipalState};

/// A store failure. The detail is for the log; callers answer a generic error.
#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    /// A row that this version of the service cannot read (an unknown state name, a bad id).
    Corrupt {
        table: &'static str,
        detail: String,
    },
    /// A file beside the database (a backup's snapshot) could not be made, read or removed.
    Io {
        what: &'static str,
        source: String,
    },
    /// The database was written by a newer version of the service.
    TooNew {
        found: i64,
        supported: i64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "SQLite: {e}"),
            StoreError::Corrupt { table, detail } => write!(f, "unreadable row in {table}: {detail}"),
            StoreError::Io { what, source } => write!(f, "{what}: {source}"),
            StoreError::TooNew { found, supported } => write!(f, "database schema version {found} is newer than this build supports ({supported})"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl StoreError {
    pub fn io(what: &'static str, e: std::io::Error) -> StoreError {
        StoreError::Io { what, source: e.to_string() }
    }

    /// Whether the failure is the disk's (full, read-only, locked) rather than the data's.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if matches!(e.code, DiskFull | ReadOnly | DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure))
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// A key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub description: String,
    pub state: KeyState,
    /// Set once the key was marked compromised; never cleared.
    pub compromised: bool,
    pub created_at: i64,
    /// 0 for no automatic rotation.
    pub rotation_period_secs: u64,
    pub next_rotation_at: Option<i64>,
    pub destruction_at: Option<i64>,
    pub primary_version: u32,
}

/// A key version's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub key_id: KeyId,
    pub version: u32,
    pub state: VersionState,
    pub created_at: i64,
    /// Encryptions reserved (persisted before use): at least the number performed.
    pub reserved: u64,
    pub destruction_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRecord {
    pub name: String,
    pub state: PrincipalState,
    pub created_at: i64,
}

/// An officer's row. The passphrase hash and sealed TOTP secret are not secrets in clear, but
/// are still left out of `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct OfficerRecord {
    pub name: String,
    pub role: Role,
    pub enabled: bool,
    /// argon2id PHC string.
    pub passphrase_hash: String,
    /// IV and AES-GCM ciphertext of the TOTP secret under the HSM's officer-secrets key.
    pub sealed_totp: Vec<u8>,
    pub last_totp_step: u64,
    pub failed_attempts: u32,
    pub locked_until: Option<i64>,
    pub created_at: i64,
    pub last_login_at: Option<i64>,
}

impl fmt::Debug for OfficerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OfficerRecord").field("name", &self.name).field("role", &self.role).field("enabled", &self.enabled).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRecord {
    pub alias: AliasName,
    pub key_id: KeyId,
    pub created_at: i64,
}

/// What an interrupted multi-step HSM operation was doing (intent → HSM → commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentKind {
    /// A key version object is being created (CreateKey, RotateKey). Rolled back on recovery.
    Create,
    /// A key version object is being destroyed. Rolled forward on recovery.
    Destroy,
}

impl IntentKind {
    fn as_str(self) -> &'static str {
        match self {
            IntentKind::Create => "create",
            IntentKind::Destroy => "destroy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub id: i64,
    pub kind: IntentKind,
    pub key_id: KeyId,
    pub version: u32,
}

/// A principal's name or a grant's id, and when it was last used (never: `None`).
pub type LastUse = (String, Option<i64>);

/// The SQLite store. One connection behind a mutex: writes are serialised by SQLite anyway, and
/// the data plane never reads the database (it reads the in-memory registry).
pub struct Store {
    conn: Mutex<Connection>,
    path: std::path::PathBuf,
    /// The storage fault last applied to the connection (`test-hooks` builds only).
    fault: Mutex<Option<crate::hooks::StoreFault>>,
}

/// The database's file name in the data directory, and the journal files SQLite keeps beside it.
pub const DATABASE_FILES: [&str; 3] = ["kms.db", "kms.db-wal", "kms.db-shm"];

/// The suffix of the snapshot files backups are made from; one left by a crash is removed at
/// the next open.
const SNAPSHOT_SUFFIX: &str = ".snapshot";

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens the database, making it if missing. A new database file is made mode 0600 before
    /// SQLite opens it, and SQLite gives its WAL and shared-memory files the database file's
    /// mode, so none of the three is ever readable by other accounts (`files.rs`).
    pub fn open(path: &Path) -> Result<Store> {
        if !path.exists() {
            crate::files::create_new(path).map_err(|e| StoreError::io("creating the database file", e))?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        let stale = snapshot_path(path);
        if stale.exists() {
            tracing::warn!(path = %stale.display(), "removing the snapshot of an interrupted backup");
            std::fs::remove_file(&stale).map_err(|e| StoreError::io("removing a stale snapshot", e))?;
        }
        Ok(Store { conn: Mutex::new(conn), path: path.to_path_buf(), fault: Mutex::new(None) })
    }

    /// Applies the storage fault the tests asked for, or lifts it, when it changed.
    fn apply_fault(&self, conn: &Connection) -> Result<()> {
        use crate::hooks::StoreFault;
        let want = crate::hooks::store_fault();
        let mut applied = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if *applied != want {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let max_pages = if want == Some(StoreFault::DiskFull) { pages } else { 4_294_967_294 };
            conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| Ok(()))?;
            conn.pragma_update(None, "query_only", want == Some(StoreFault::ReadOnly))?;
            *applied = want;
        }
        Ok(())
    }

    /// Writes a consistent copy of the whole database to a new file beside it (`VACUUM INTO`
    /// on a connection of its own: in WAL mode the service goes on writing meanwhile), opens it
    /// and unlinks it, so that only the returned handle reaches it and nothing is left behind.
    pub fn snapshot(&self) -> Result<std::fs::File> {
        let dest = snapshot_path(&self.path);
        let _ = std::fs::remove_file(&dest);
        // `VACUUM INTO` writes into an empty file: made first, so that it is private from the start.
        crate::files::create_new(&dest).map_err(|e| StoreError::io("creating the snapshot", e))?;
        let conn = Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute("VACUUM INTO ?1", params![dest.to_string_lossy()])?;
        let file = std::fs::File::open(&dest).map_err(|e| StoreError::io("opening the snapshot", e))?;
        std::fs::remove_file(&dest).map_err(|e| StoreError::io("unlinking the snapshot", e))?;
        Ok(file)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // rusqlite rolls back an unfinished transaction when it is dropped during a panic, so
        // the connection is consistent even if the lock was poisoned.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in one immediate (write-locked) transaction; commits if it returns `Ok`.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        if crate::hooks::ENABLED {
            self.apply_fault(&conn)?;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&Tx(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in a read transaction (a consistent snapshot).
    pub fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&Tx(&tx))
    }
}

fn snapshot_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(SNAPSHOT_SUFFIX);
    name.into()
}

/// A transaction, with the service's queries as methods.
pub struct Tx<'a>(&'a rusqlite::Transaction<'a>);

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tx")
    }
}

fn corrupt(table: &'static str, detail: impl fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(StoreError::Corrupt { table, detail: detail.to_string() }))
}

fn key_id_col(row: &Row<'_>, idx: usize, table: &'static str) -> rusqlite::Result<KeyId> {
    let text: String = row.get(idx)?;
    text.parse().map_err(|_| corrupt(table, format!("bad key id {text:?}")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Tx<'_> {
    // ----- keys -----

    pub fn insert_key(&self, k: &KeyRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO keys (key_id, description, state, compromised, created_at,
                rotation_period_secs, next_rotation_at, destruction_at, primary_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                k.key_id.to_string(),
                k.description,
                k.state.as_str(),
                k.compromised,
                k.created_at,
                to_i64(k.rotation_period_secs),
                k.next_rotation_at,
                k.destruction_at,
                k.primary_version
            ],
        )?;
        Ok(())
    }

    pub fn update_key(&self, k: &KeyRecord) -> Result<()> {
        self.0.execute(
            "UPDATE keys SET description = ?2, state = ?3, compromised = ?4,
                rotation_period_secs = ?5, next_rotation_at = ?6, destruction_at = ?7,
                primary_version = ?8
             WHERE key_id = ?1",
            params![
                k.key_id.to_string(),
                k.description,
                k.state.as_str(),
                k.compromised,
                to_i64(k.rotation_period_secs),
                k.next_rotation_at,
                k.destruction_at,
                k.primary_version
            ],
        )?;
        Ok(())
    }

    pub fn keys(&self) -> Result<Vec<KeyRecord>> {
        let mut stmt = self.0.prepare(
            "SELECT key_id, description, state, compromised, created_at, rotation_period_secs,
                    next_rotation_at, destruction_at, primary_version
             FROM keys ORDER BY created_at, key_id",
        )?;
        let rows = stmt.query_map([], |row| {
            let state: String = row.get(2)?;
            Ok(KeyRecord {
                key_id: key_id_col(row, 0, "keys")?,
                description: row.get(1)?,
                state: KeyState::parse(&state).ok_or_else(|| corrupt("keys", format!("state {state:?}")))?,
                compromised: row.get(3)?,
                created_at: row.get(4)?,
                rotation_period_secs: to_u64(row.get(5)?),
                next_rotation_at: row.get(6)?,
                destruction_at: row.get(7)?,
                primary_version: row.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- versions -----

    pub fn insert_version(&self, v: &VersionRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO key_versions (key_id, version, state, created_at, reserved, destruction_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![v.key_id.to_string(), v.version, v.state.as_str(), v.created_at, to_i64(v.reserved), v.destruction_at],
        )?;
        Ok(())
    }

    pub fn update_version_state(&self, v: &VersionRecord) -> Result<()> {
        self.0.execute(
            "UPDATE key_versions SET state = ?3, destruction_at = ?4 WHERE key_id = ?1 AND version = ?2",
            params![v.key_id.to_string(), v.version, v.state.as_str(), v.destruction_at],
        )?;
        Ok(())
    }

    /// Raises a version's reserved count (never lowers it).
    pub fn reserve_usage(&self, key_id: KeyId, version: u32, reserved: u64) -> Result<()> {
        self.0.execute(
            "UPDATE key_versions SET reserved = MAX(reserved, ?3) WHERE key_id = ?1 AND version = ?2",
            params![key_id.to_string(), version, to_i64(reserved)],
        )?;
        Ok(())
    }

    pub fn versions(&self) -> Result<Vec<VersionRecord>> {
        let mut stmt = self.0.prepare(
            "SELECT key_id, version, state, created_at, reserved, destruction_at
             FROM key_versions ORDER BY key_id, version",
        )?;
        let rows = stmt.query_map([], |row| {
            let state: String = row.get(2)?;
            Ok(VersionRecord {
                key_id: key_id_col(row, 0, "key_versions")?,
                version: row.get(1)?,
                state: VersionState::parse(&state).ok_or_else(|| corrupt("key_versions", format!("state {state:?}")))?,
                created_at: row.get(3)?,
                reserved: to_u64(row.get(4)?),
                destruction_at: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- aliases -----

    /// Inserts an alias; `Ok(false)` if the name is taken.
    pub fn insert_alias(&self, a: &AliasRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO aliases (alias, key_id, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (alias) DO NOTHING",
            params![a.alias.name(), a.key_id.to_string(), a.created_at],
        )?;
        Ok(n == 1)
    }

    /// Deletes an alias; `Ok(false)` if there was none.
    pub fn delete_alias(&self, alias: &AliasName) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM aliases WHERE alias = ?1", params![alias.name()])? == 1)
    }

    pub fn aliases(&self) -> Result<Vec<AliasRecord>> {
        let mut stmt = self.0.prepare("SELECT alias, key_id, created_at FROM aliases ORDER BY alias")?;
        let rows = stmt.query_map([], |row| {
            let name: String = row.get(0)?;
            Ok(AliasRecord {
                alias: AliasName::parse(&name).map_err(|_| corrupt("aliases", format!("alias {name:?}")))?,
                key_id: key_id_col(row, 1, "aliases")?,
                created_at: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- principals and grants -----

    /// Inserts a principal; `Ok(false)` if the name is taken.
    pub fn insert_principal(&self, name: &str, state: PrincipalState, now: i64) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO principals (name, state, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
            params![name, state.as_str(), now],
        )?;
        Ok(n == 1)
    }

    pub fn set_principal_state(&self, name: &str, state: PrincipalState) -> Result<()> {
        self.0.execute("UPDATE principals SET state = ?2 WHERE name = ?1", params![name, state.as_str()])?;
        Ok(())
    }

    pub fn principals(&self) -> Result<Vec<PrincipalRecord>> {
        let mut stmt = self.0.prepare("SELECT name, state, created_at FROM principals ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            let state: String = r.get(1)?;
            Ok(PrincipalRecord {
                name: r.get(0)?,
                state: PrincipalState::parse(&state).ok_or_else(|| corrupt("principals", format!("state {state:?}")))?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn insert_grant(&self, g: &Grant) -> Result<()> {
        let ops: Vec<&str> = g.operations.iter().map(|o| o.as_str()).collect();
        self.0.execute(
            "INSERT INTO grants (grant_id, principal, key_id, operations, required_context,
                required_context_keys, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                g.grant_id,
                g.principal,
                g.key_id.to_string(),
                ops.join(","),
                serde_json::to_string(&g.required_pairs).unwrap_or_default(),
                serde_json::to_string(&g.required_keys).unwrap_or_default(),
                g.expires_at,
                g.created_at
            ],
        )?;
        Ok(())
    }

    /// Marks a grant revoked; `Ok(false)` if there was no live grant with that id.
    pub fn revoke_grant(&self, grant_id: &str, now: i64) -> Result<bool> {
        let n = self.0.execute("UPDATE grants SET revoked_at = ?2 WHERE grant_id = ?1 AND revoked_at IS NULL", params![grant_id, now])?;
        Ok(n == 1)
    }

    /// Every grant not revoked (expired ones included: they stay visible until revoked).
    pub fn grants(&self) -> Result<Vec<Grant>> {
        let mut stmt = self.0.prepare(
            "SELECT grant_id, principal, key_id, operations, required_context, required_context_keys,
                    expires_at, created_at
             FROM grants WHERE revoked_at IS NULL ORDER BY created_at, grant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            let ops: String = r.get(3)?;
            let operations = ops
                .split(',')
                .map(|o| Operation::parse(o).ok_or_else(|| corrupt("grants", format!("operation {o:?}"))))
                .collect::<rusqlite::Result<_>>()?;
            let pairs: String = r.get(4)?;
            let keys: String = r.get(5)?;
            Ok(Grant {
                grant_id: r.get(0)?,
                principal: r.get(1)?,
                key_id: key_id_col(r, 2, "grants")?,
                operations,
                required_pairs: serde_json::from_str(&pairs).map_err(|e| corrupt("grants", e))?,
                required_keys: serde_json::from_str(&keys).map_err(|e| corrupt("grants", e))?,
                expires_at: r.get(6)?,
                created_at: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- access review -----

    /// Records last-use times (never moving one backwards).
    pub fn record_use(&self, principals: &[(String, i64)], grants: &[(String, i64)]) -> Result<()> {
        let mut p = self.0.prepare_cached("UPDATE principals SET last_used_at = MAX(IFNULL(last_used_at, 0), ?2) WHERE name = ?1")?;
        for (name, at) in principals {
            p.execute(params![name, at])?;
        }
        let mut g = self.0.prepare_cached("UPDATE grants SET last_used_at = MAX(IFNULL(last_used_at, 0), ?2) WHERE grant_id = ?1")?;
        for (id, at) in grants {
            g.execute(params![id, at])?;
        }
        Ok(())
    }

    /// Last-use times of principals and (live) grants, by name and id.
    pub fn last_uses(&self) -> Result<(Vec<LastUse>, Vec<LastUse>)> {
        let principals = self
            .0
            .prepare("SELECT name, last_used_at FROM principals")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let grants = self
            .0
            .prepare("SELECT grant_id, last_used_at FROM grants WHERE revoked_at IS NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((principals, grants))
    }

    pub fn insert_signoff(&self, officer: &str, time: i64, note: &str) -> Result<()> {
        self.0.execute("INSERT INTO review_signoffs (officer, time, note) VALUES (?1, ?2, ?3)", params![officer, time, note])?;
        Ok(())
    }

    /// The last sign-off: who and when.
    pub fn last_signoff(&self) -> Result<Option<(String, i64)>> {
        Ok(self
            .0
            .query_row("SELECT officer, time FROM review_signoffs ORDER BY time DESC, id DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    // ----- officers and sessions -----

    pub fn insert_officer(&self, o: &OfficerRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO officers (name, role, state, passphrase_hash, totp_secret, last_totp_step,
                failed_attempts, locked_until, created_at, last_login_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (name) DO NOTHING",
            params![
                o.name,
                o.role.as_str(),
                if o.enabled { "Enabled" } else { "Disabled" },
                o.passphrase_hash,
                o.sealed_totp,
                to_i64(o.last_totp_step),
                o.failed_attempts,
                o.locked_until,
                o.created_at,
                o.last_login_at
            ],
        )?;
        Ok(n == 1)
    }

    /// Writes back everything that changes after creation.
    pub fn update_officer(&self, o: &OfficerRecord) -> Result<()> {
        self.0.execute(
            "UPDATE officers SET state = ?2, passphrase_hash = ?3, totp_secret = ?4, last_totp_step = ?5,
                failed_attempts = ?6, locked_until = ?7, last_login_at = ?8
             WHERE name = ?1",
            params![
                o.name,
                if o.enabled { "Enabled" } else { "Disabled" },
                o.passphrase_hash,
                o.sealed_totp,
                to_i64(o.last_totp_step),
                o.failed_attempts,
                o.locked_until,
                o.last_login_at
            ],
        )?;
        Ok(())
    }

    pub fn officers(&self) -> Result<Vec<OfficerRecord>> {
        let mut stmt = self.0.prepare(
            "SELECT name, role, state, passphrase_hash, totp_secret, last_totp_step, failed_attempts,
                    locked_until, created_at, last_login_at
             FROM officers ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let role: String = r.get(1)?;
            let state: String = r.get(2)?;
            Ok(OfficerRecord {
                name: r.get(0)?,
                role: Role::parse(&role).ok_or_else(|| corrupt("officers", format!("role {role:?}")))?,
                enabled: state == "Enabled",
                passphrase_hash: r.get(3)?,
                sealed_totp: r.get(4)?,
                last_totp_step: to_u64(r.get(5)?),
                failed_attempts: r.get(6)?,
                locked_until: r.get(7)?,
                created_at: r.get(8)?,
                last_login_at: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn officer(&self, name: &str) -> Result<Option<OfficerRecord>> {
        Ok(self.officers()?.into_iter().find(|o| o.name == name))
    }

    pub fn insert_session(&self, token_hash: &[u8], officer: &str, now: i64, expires_at: i64) -> Result<()> {
        self.0.execute(
            "INSERT INTO sessions (token_hash, officer, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![token_hash, officer, now, expires_at],
        )?;
        Ok(())
    }

    /// The officer and expiry of a session.
    pub fn session(&self, token_hash: &[u8]) -> Result<Option<(String, i64)>> {
        Ok(self
            .0
            .query_row("SELECT officer, expires_at FROM sessions WHERE token_hash = ?1", params![token_hash], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    pub fn delete_session(&self, token_hash: &[u8]) -> Result<()> {
        self.0.execute("DELETE FROM sessions WHERE token_hash = ?1", params![token_hash])?;
        Ok(())
    }

    /// Ends every session of an officer, and every expired one.
    pub fn delete_sessions(&self, officer: &str, now: i64) -> Result<()> {
        self.0.execute("DELETE FROM sessions WHERE officer = ?1 OR expires_at <= ?2", params![officer, now])?;
        Ok(())
    }

    /// Ends every officer session (a restored database must not honour tokens issued before).
    pub fn delete_all_sessions(&self) -> Result<()> {
        self.0.execute("DELETE FROM sessions", [])?;
        Ok(())
    }

    /// Raises every version's reserved encryptions to at least `at_least` (a restore: the
    /// encryptions made after the backup are unknown, so the restored versions encrypt no more).
    pub fn reserve_all_at_least(&self, at_least: u64) -> Result<()> {
        self.0.execute("UPDATE key_versions SET reserved = MAX(reserved, ?1)", params![to_i64(at_least)])?;
        Ok(())
    }

    // ----- intents -----

    pub fn insert_intent(&self, kind: IntentKind, key_id: KeyId, version: u32, now: i64) -> Result<i64> {
        self.0.execute(
            "INSERT INTO intents (kind, key_id, version, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![kind.as_str(), key_id.to_string(), version, now],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    pub fn delete_intent(&self, id: i64) -> Result<()> {
        self.0.execute("DELETE FROM intents WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn intents(&self) -> Result<Vec<Intent>> {
        let mut stmt = self.0.prepare("SELECT id, kind, key_id, version FROM intents ORDER BY id")?;
        let rows = stmt.query_map([], |row| {
            let kind: String = row.get(1)?;
            Ok(Intent {
                id: row.get(0)?,
                kind: match kind.as_str() {
                    "create" => IntentKind::Create,
                    "destroy" => IntentKind::Destroy,
                    other => return Err(corrupt("intents", format!("kind {other:?}"))),
                },
                key_id: key_id_col(row, 2, "intents")?,
                version: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- audit -----

    /// Appends one audit record, chained to the last one.
    pub fn append_audit(&self, event: &AuditEvent, now: i64) -> Result<()> {
        self.append_audits(std::iter::once(event), now).map(drop)
    }

    /// Appends audit records in order, each chained to the one before (a group commit writes a
    /// whole batch in one transaction); returns the last one's sequence number and hash (none
    /// when there were no records).
    pub fn append_audits<'e>(&self, events: impl IntoIterator<Item = &'e AuditEvent>, now: i64) -> Result<Option<(i64, Vec<u8>)>> {
        let (mut seq, mut prev) = match self.last_audit()? {
            Some((seq, hash)) => {
                let prev: [u8; 32] = hash.try_into().map_err(|_| StoreError::Corrupt { table: "audit", detail: "hash length".into() })?;
                (seq, prev)
            }
            None => (0, GENESIS),
        };
        let mut insert = self.0.prepare_cached(
            "INSERT INTO audit (seq, time, request_id, principal, operation, key_id, key_version,
                context, outcome, status, detail, hash, caller_context)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        let before = seq;
        for event in events {
            seq += 1;
            let record = StoredRecord {
                seq,
                time: now,
                request_id: event.request_id.clone(),
                principal: event.principal.clone(),
                operation: event.operation.to_string(),
                key_id: event.key_id.map(|k| k.to_string()),
                key_version: event.key_version.map(i64::from),
                context: event.context_json(),
                outcome: event.outcome.as_str().to_string(),
                status: event.status.to_string(),
                detail: event.detail.clone(),
                caller_context: event.caller_context.clone(),
            };
            let hash = record.chain_hash(&prev);
            insert.execute(params![
                record.seq,
                record.time,
                record.request_id,
                record.principal,
                record.operation,
                record.key_id,
                record.key_version,
                record.context,
                record.outcome,
                record.status,
                record.detail,
                hash.to_vec(),
                record.caller_context
            ])?;
            prev = hash;
        }
        Ok((seq > before).then(|| (seq, prev.to_vec())))
    }

    /// The last audit record's sequence number and hash.
    pub fn last_audit(&self) -> Result<Option<(i64, Vec<u8>)>> {
        let mut last = self.0.prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?;
        Ok(last.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional()?)
    }

    pub fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.0.execute("INSERT INTO audit_checkpoints (seq, time, hash, mac) VALUES (?1, ?2, ?3, ?4)", params![c.seq, c.time, c.hash, c.mac])?;
        Ok(())
    }

    /// The newest checkpoint's sequence number and time.
    pub fn last_checkpoint(&self) -> Result<Option<(i64, i64)>> {
        Ok(self.0.query_row("SELECT seq, time FROM audit_checkpoints ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?)
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let mut stmt = self.0.prepare("SELECT seq, time, hash, mac FROM audit_checkpoints ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok(Checkpoint { seq: r.get(0)?, time: r.get(1)?, hash: r.get(2)?, mac: r.get(3)? }))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The revocation epoch: it rises with every change that takes access away.
    pub fn revocation_epoch(&self) -> Result<u64> {
        Ok(to_u64(self.0.query_row("SELECT epoch FROM revocation", [], |r| r.get(0))?))
    }

    /// Raises the revocation epoch, in the transaction of the change that takes access away;
    /// returns the new one.
    pub fn bump_revocation_epoch(&self) -> Result<u64> {
        Ok(to_u64(self.0.query_row("UPDATE revocation SET epoch = epoch + 1 RETURNING epoch", [], |r| r.get(0))?))
    }

    /// The newest checkpoint that retention may prune through: its record and every record
    /// before it are no younger than `cutoff` (a checkpoint already pruned through has no record
    /// left, so it is not found again). The last record is never pruned: the chain continues
    /// from it.
    ///
    /// The candidate comes from the small checkpoint table (a checkpoint is signed after the
    /// records it covers, so its time bounds theirs); only when there is one are its records'
    /// times confirmed, by a range of the primary key, in case the clock ever went back. The
    /// sweeper calls this every minute: it never scans the whole trail by time.
    pub fn prunable_checkpoint(&self, cutoff: i64) -> Result<Option<Checkpoint>> {
        let candidate = self
            .0
            .query_row(
                "SELECT c.seq, c.time, c.hash, c.mac FROM audit_checkpoints c JOIN audit a ON a.seq = c.seq
                 WHERE c.time <= ?1 AND c.seq < (SELECT MAX(seq) FROM audit)
                 ORDER BY c.seq DESC LIMIT 1",
                params![cutoff],
                |r| Ok(Checkpoint { seq: r.get(0)?, time: r.get(1)?, hash: r.get(2)?, mac: r.get(3)? }),
            )
            .optional()?;
        let Some(candidate) = candidate else { return Ok(None) };
        let newest: i64 = self.0.query_row("SELECT MAX(time) FROM audit WHERE seq <= ?1", params![candidate.seq], |r| r.get(0))?;
        Ok((newest <= cutoff).then_some(candidate))
    }

    /// Removes the audit records up to and including `through`, and the checkpoints before it
    /// (the one at `through` stays: it anchors the records kept). Returns how many records went.
    pub fn prune_audit(&self, through: i64) -> Result<usize> {
        let removed = self.0.execute("DELETE FROM audit WHERE seq <= ?1", params![through])?;
        self.0.execute("DELETE FROM audit_checkpoints WHERE seq < ?1", params![through])?;
        Ok(removed)
    }

    /// The audit records in order, with their stored hashes.
    pub fn audit_records(&self) -> Result<Vec<(StoredRecord, Vec<u8>)>> {
        self.audit_page(0, i64::MAX)
    }

    /// The details of the kept records of one operation, in order (the verifier reads where
    /// retention cut the trail from its `AuditPrune` records).
    pub fn audit_details(&self, operation: &str) -> Result<Vec<String>> {
        let mut stmt = self.0.prepare_cached("SELECT detail FROM audit WHERE operation = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![operation], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many records are kept.
    pub fn audit_count(&self) -> Result<u64> {
        Ok(to_u64(self.0.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?))
    }

    /// The first kept record's sequence number.
    pub fn first_audit_seq(&self) -> Result<Option<i64>> {
        Ok(self.0.query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))?)
    }

    /// Up to `limit` audit records with a sequence number above `after`, in order.
    pub fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<(StoredRecord, Vec<u8>)>> {
        let mut stmt = self.0.prepare_cached(
            "SELECT seq, time, request_id, principal, operation, key_id, key_version, context,
                    outcome, status, detail, hash, caller_context
             FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((
                StoredRecord {
                    seq: r.get(0)?,
                    time: r.get(1)?,
                    request_id: r.get(2)?,
                    principal: r.get(3)?,
                    operation: r.get(4)?,
                    key_id: r.get(5)?,
                    key_version: r.get(6)?,
                    context: r.get(7)?,
                    outcome: r.get(8)?,
                    status: r.get(9)?,
                    detail: r.get(10)?,
                    caller_context: r.get(12)?,
                },
                r.get(11)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8) -> KeyRecord {
        KeyRecord {
            key_id: KeyId::from_bytes([id; 16]),
            description: "d".into(),
            state: KeyState::Enabled,
            compromised: false,
            created_at: 10,
            rotation_period_secs: 0,
            next_rotation_at: None,
            destruction_at: None,
            primary_version: 1,
        }
    }

    #[test]
    fn keys_versions_aliases_and_intents_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.db")).unwrap();
        let k = key(1);
        let v = VersionRecord { key_id: k.key_id, version: 1, state: VersionState::Enabled, created_at: 10, reserved: 0, destruction_at: None };
        let alias = AliasRecord { alias: AliasName::parse("app").unwrap(), key_id: k.key_id, created_at: 10 };
        let intent = store
            .write(|tx| {
                tx.insert_key(&k)?;
                tx.insert_version(&v)?;
                assert!(tx.insert_alias(&alias)?);
                assert!(!tx.insert_alias(&alias)?);
                tx.reserve_usage(k.key_id, 1, 4096)?;
                tx.reserve_usage(k.key_id, 1, 100)?;
                tx.insert_intent(IntentKind::Destroy, k.key_id, 1, 10)
            })
            .unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("kms.db")).unwrap();
        store
            .read(|tx| {
                assert_eq!(tx.keys()?, vec![k.clone()]);
                assert_eq!(tx.versions()?[0].reserved, 4096);
                assert_eq!(tx.aliases()?, vec![alias.clone()]);
                assert_eq!(tx.intents()?, vec![Intent { id: intent, kind: IntentKind::Destroy, key_id: k.key_id, version: 1 }]);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.db")).unwrap();
        let r: Result<()> = store.write(|tx| {
            tx.insert_key(&key(1))?;
            tx.insert_key(&key(1)) // duplicate primary key
        });
        assert!(r.is_err());
        assert!(store.read(|tx| tx.keys()).unwrap().is_empty());
    }

    #[test]
    fn audit_records_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.db")).unwrap();
        store
            .write(|tx| {
                for _ in 0..3 {
                    tx.append_audit(&AuditEvent::system("Test", None, None, "d".into()), 5)?;
                }
                Ok(())
            })
            .unwrap();
        let records = store.read(|tx| tx.audit_records()).unwrap();
        let mut prev = GENESIS;
        for (i, (rec, hash)) in records.iter().enumerate() {
            assert_eq!(rec.seq, i as i64 + 1);
            assert_eq!(rec.chain_hash(&prev).to_vec(), *hash);
            prev = rec.chain_hash(&prev);
        }
    }
}
