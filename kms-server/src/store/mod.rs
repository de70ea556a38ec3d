//! The metadata and audit store, and every SQL statement of the service.
//!
//! One interface, [`Store`], with its queries written once in [`Tx`] over a backend's
//! transaction (`sql.rs`): SQLite (`sqlite.rs`), one file, the embedded default for one machine;
//! PostgreSQL (`postgres.rs`), one database for several nodes.
//! Every state change commits with its audit record in one transaction ([`Store::write`]).
//! Nothing outside this module knows the schema.

mod copy;
mod postgres;
mod schema;
mod sql;
mod sqlite;

pub use postgres::{Conninfo, PgSettings, VERIFY_FULL};

/// Held while a change is made: nothing for one SQLite node (its own admin lock suffices); the
/// cluster's admin lock for PostgreSQL.
#[derive(Debug)]
pub struct AdminLease<'a>(#[allow(dead_code)] Option<postgres::AdminLease<'a>>);

use std::fmt;
use std::path::Path;

use sql::{Param, Row, Sql, first};

use crate::audit::{AuditEvent, Checkpoint, GENESIS, StoredRecord};
use crate::domain::ids::{AliasName, KeyId};
use crate::domain::lifecycle::{KeyOrigin, KeyState, VersionState};
use crate::domain::officer::Role;
use crate::domain::policy::{Grant, Operation, PrincipalState};

/// A store failure. The detail is for the log; callers answer a generic error.
#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    Postgres(tokio_postgres::Error),
    /// The store could not be set up (a bad connection string, an unreadable CA or password).
    Setup {
        reason: String,
    },
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
    /// A change's record made in a dry run reached the store: a change wrote before its commit
    /// point. Nothing is written (the transaction rolls back).
    DryRunWrite {
        operation: &'static str,
    },
    /// A migration's destination already holds data.
    NotEmpty,
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
            StoreError::Postgres(e) => write!(f, "PostgreSQL: {e}"),
            StoreError::Setup { reason } => f.write_str(reason),
            StoreError::Corrupt { table, detail } => write!(f, "unreadable row in {table}: {detail}"),
            StoreError::Io { what, source } => write!(f, "{what}: {source}"),
            StoreError::DryRunWrite { operation } => {
                write!(f, "a dry run of {operation} reached a write before its commit point; nothing was written")
            }
            StoreError::NotEmpty => f.write_str("the destination store is not empty (it holds keys, officers, principals or audit records)"),
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

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

impl StoreError {
    pub fn io(what: &'static str, e: std::io::Error) -> StoreError {
        StoreError::Io { what, source: e.to_string() }
    }

    /// Whether the failure is the storage's (a full, read-only or locked disk; a database server
    /// that cannot be reached, is shutting down, is a standby after a failover, or aborted the
    /// transaction to break a deadlock) rather than the data's: worth a retry later.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, DiskFull | ReadOnly | DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure)
            }
            StoreError::Postgres(e) => match e.as_db_error() {
                // No answer from a server: the connection failed or closed.
                None => true,
                Some(db) => {
                    let code = db.code().code();
                    // Connection exceptions, operator intervention (shutdown, cannot connect
                    // now), a read-only transaction (a standby), serialisation failures and
                    // deadlocks.
                    code.starts_with("08") || code.starts_with("57P") || ["25006", "40001", "40P01", "53300", "55P03"].contains(&code)
                }
            },
            _ => false,
        }
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
    pub origin: KeyOrigin,
}

impl KeyRecord {
    /// A new key's row and its version 1's: Enabled, version 1 primary, rotated every
    /// `rotation_period_secs` (0: never).
    pub fn new(key_id: KeyId, description: String, created_at: i64, rotation_period_secs: u64, origin: KeyOrigin) -> (KeyRecord, VersionRecord) {
        let record = KeyRecord {
            key_id,
            description,
            state: KeyState::Enabled,
            compromised: false,
            created_at,
            rotation_period_secs,
            next_rotation_at: (rotation_period_secs > 0).then(|| created_at + rotation_period_secs as i64),
            destruction_at: None,
            primary_version: 1,
            origin,
        };
        let version = VersionRecord { key_id, version: 1, state: VersionState::Enabled, created_at, reserved: 0, destruction_at: None };
        (record, version)
    }
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

/// An AWS external key store (the XKS facade): where AWS KMS reaches it (the URI path prefix
/// before `/kms/xks/v1`) and the region AWS signs for. Its principal, `xks:NAME`, holds its
/// grants: which keys it may use, for what, under which request metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksKeyStoreRecord {
    pub name: String,
    pub uri_prefix: String,
    pub region: String,
    pub created_at: i64,
}

/// One of a key store's SigV4 credentials; the secret sealed in the HSM (`Debug` leaves it out).
#[derive(Clone, PartialEq, Eq)]
pub struct XksCredentialRecord {
    pub access_key_id: String,
    pub key_store: String,
    pub sealed_secret: Vec<u8>,
    pub created_at: i64,
}

impl std::fmt::Debug for XksCredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksCredentialRecord")
            .field("access_key_id", &self.access_key_id)
            .field("key_store", &self.key_store)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Google Workspace client-side encryption's settings (the CSE facade): the KACLS URL Google is
/// given (its path is where the listener serves the API), the key new wraps use, whether
/// guests (`email_type` other than `google`) may unwrap, and the users who may call
/// `privilegedunwrap` (none: nobody), and the key services whose wrapped keys `rewrap` may
/// fetch and wrap again (Google's migration between key services).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CseSettingsRecord {
    pub kacls_url: String,
    pub key_id: KeyId,
    pub guests: bool,
    pub privileged_users: Vec<String>,
    pub migration_sources: Vec<String>,
    pub updated_at: i64,
    /// The Google Workspace domain that owns this key service: an authorization token naming
    /// another (`kacls_owner_domain`) is refused. `None`: not checked.
    pub owner_domain: Option<String>,
}

/// An issuer whose tokens the CSE facade trusts: for the `authentication` token (the customer's
/// identity provider) or the `authorization` token (Google's), the audiences its tokens may
/// name, and its key set (a JWKS document; fetched again from `jwks_url` when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CseIssuerRecord {
    pub iss: String,
    pub token: String,
    pub audiences: Vec<String>,
    pub jwks: String,
    pub jwks_url: Option<String>,
    pub updated_at: i64,
}

/// A quorum policy: `required` distinct officers must approve `operation` (on `key_id`, or on
/// every key when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumPolicyRecord {
    pub operation: String,
    pub key_id: Option<KeyId>,
    pub required: u32,
    pub updated_at: i64,
}

/// A covered call waiting for its approvals: what it is (`arguments`, the JSON it runs with,
/// fixed when it was made), who asked and why, how many must approve, and where it stands
/// (`pending`, `rejected`, `expired`, `approved` (running), `executed`, `failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequestRecord {
    pub id: String,
    pub operation: String,
    pub key_id: Option<KeyId>,
    pub arguments: String,
    pub summary: String,
    pub requester: String,
    pub reason: String,
    pub required: u32,
    pub state: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    /// What running it gave, once it ran (or why it was rejected).
    pub result: String,
}

/// One officer's approval or rejection of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteRecord {
    pub request_id: String,
    pub officer: String,
    pub approve: bool,
    pub time: i64,
}

/// A webhook subscription: where events at or above `min_severity` are POSTed, signed with a
/// secret sealed in the HSM, and how far into the audit trail it has delivered (`cursor`, the
/// last record's sequence number).
#[derive(Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub id: String,
    pub url: String,
    pub min_severity: String,
    pub sealed_secret: Vec<u8>,
    pub cursor: i64,
    pub delivered: i64,
    pub failures: i64,
    pub next_attempt_at: i64,
    pub last_error: String,
    pub created_at: i64,
}

impl fmt::Debug for SubscriptionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionRecord").field("id", &self.id).field("url", &self.url).field("cursor", &self.cursor).finish_non_exhaustive()
    }
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

/// The store's two counters of change (`Tx::marks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks {
    /// Rises with every change that takes access away: every data-plane answer carries it.
    pub epoch: u64,
    /// Rises with every change to what the registry holds.
    pub changes: u64,
}

/// The audit chain's head as an appender sees it, holding the head's lock.
#[derive(Debug, Clone, Copy)]
pub struct AuditHead {
    pub marks: Marks,
    /// The last record's sequence number and hash (0 and the genesis hash: none yet).
    pub last: (i64, [u8; 32]),
}

/// A principal's name or a grant's id, and when it was last used (never: `None`).
pub type LastUse = (String, Option<i64>);

/// The store: one interface, two backends. SQLite is the embedded default for one machine;
/// PostgreSQL serves several nodes. Every query is written once, in `Tx`, over the backend's
/// transaction (`sql::Sql`).
#[derive(Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(Box<postgres::PgStore>),
}

/// The database's file name in the data directory, and the journal files SQLite keeps beside it.
pub const DATABASE_FILES: [&str; 3] = ["kms.db", "kms.db-wal", "kms.db-shm"];

impl Store {
    /// Opens (or makes) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store { backend: Backend::Sqlite(sqlite::SqliteStore::open(path)?) })
    }

    /// Opens a copy, written to `copy` (a new file), of the SQLite database at `source`, which
    /// is left as it is: the copy is brought to this build's schema.
    pub fn open_copy_of(source: &Path, copy: &Path) -> Result<Store> {
        sqlite::copy_into(source, copy)?;
        Store::open(copy)
    }

    /// Opens the store the configuration names: `data_dir/kms.db`, or the PostgreSQL database.
    pub fn open_configured(config: &crate::config::Config) -> Result<Store> {
        let s = &config.store;
        match s.backend {
            crate::config::StoreBackend::Sqlite => Store::open(&config.data_dir.join(DATABASE_FILES[0])),
            crate::config::StoreBackend::Postgres => {
                let settings = PgSettings {
                    url: s.url.clone().unwrap_or_default(),
                    password_file: s.password_file.clone().unwrap_or_default(),
                    scratch_dir: config.data_dir.clone(),
                };
                Ok(Store { backend: Backend::Postgres(Box::new(postgres::PgStore::open(&settings)?)) })
            }
        }
    }

    /// Whether several nodes may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Takes the cluster's admin lock (nothing to take for SQLite), waiting at most `wait`.
    pub fn admin_lease(&self, wait: std::time::Duration) -> Result<AdminLease<'_>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(AdminLease(None)),
            Backend::Postgres(pg) => Ok(AdminLease(Some(pg.admin_lease(wait)?))),
        }
    }

    /// Whether this node runs the background jobs: always with SQLite; with PostgreSQL, the one
    /// node holding the leader's lock.
    pub fn leading(&self) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(true),
            Backend::Postgres(pg) => pg.leading(),
        }
    }

    /// Keeps this node counted in the fleet (several nodes only).
    pub fn keep_present(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(pg) => pg.keep_present(),
        }
    }

    /// How many nodes serve: one with SQLite; with PostgreSQL, the live nodes (this one kept
    /// counted first).
    pub fn fleet_size(&self) -> Result<u64> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(1),
            Backend::Postgres(pg) => pg.fleet_size(),
        }
    }

    /// Runs `f` in one write transaction; commits if it returns `Ok`.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(s) => s.write(|sql| f(&Tx(sql))),
            Backend::Postgres(s) => s.write(|sql| f(&Tx(sql))),
        }
    }

    /// Runs `f` in a read transaction (a consistent snapshot).
    pub fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(|sql| f(&Tx(sql))),
            Backend::Postgres(s) => s.read(|sql| f(&Tx(sql))),
        }
    }

    /// Runs `f` in a read-only transaction of its own, a consistent snapshot however long it
    /// reads, without holding up the service's writes (a verification of the whole trail).
    pub fn read_snapshot<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx<'_>) -> std::result::Result<T, E>) -> std::result::Result<T, E> {
        match &self.backend {
            Backend::Sqlite(s) => s.read_snapshot(|sql| f(&Tx(sql))),
            Backend::Postgres(s) => s.read_snapshot(|sql| f(&Tx(sql))),
        }
    }

    /// A consistent copy of the whole database as a SQLite file (the backup's database section,
    /// one format whichever the backend), already unlinked: only the returned handle reaches it.
    pub fn snapshot(&self) -> Result<std::fs::File> {
        match &self.backend {
            Backend::Sqlite(s) => s.snapshot(),
            Backend::Postgres(pg) => {
                let path = pg.scratch_file();
                let _ = std::fs::remove_file(&path);
                let exported =
                    self.export_sqlite(&path).and_then(|_| std::fs::File::open(&path).map_err(|e| StoreError::io("opening the snapshot", e)));
                let _ = std::fs::remove_file(&path);
                exported
            }
        }
    }

    /// Writes every table, as one consistent snapshot, into a new SQLite database at `path`
    /// (mode 0600); returns how many rows of each table it copied.
    pub fn export_sqlite(&self, path: &Path) -> Result<copy::Copied> {
        if path.exists() {
            return Err(StoreError::io("exporting the store", std::io::Error::new(std::io::ErrorKind::AlreadyExists, path.display().to_string())));
        }
        let dest = sqlite::SqliteStore::open(path)?;
        self.read_snapshot(|from| dest.write(|to| copy::copy(from, &Tx(to))))
    }

    /// Whether the store holds no key, officer, principal or audit record (a migration's or a
    /// restore's target).
    pub fn is_empty(&self) -> Result<bool> {
        self.read(copy::is_empty)
    }

    /// Copies every table of `source` into this store, in one transaction, refusing a store that
    /// holds keys, officers, principals or audit records already (`kms-server migrate`).
    pub fn import(&self, source: &Store) -> Result<copy::Copied> {
        source.read_snapshot(|from| {
            self.write(|to| {
                if !copy::is_empty(to)? {
                    return Err(StoreError::NotEmpty);
                }
                copy::copy(from, to)
            })
        })
    }
}

/// A transaction, with the service's queries as methods.
pub struct Tx<'a>(&'a dyn Sql);

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tx")
    }
}

fn corrupt(table: &'static str, detail: impl fmt::Display) -> StoreError {
    StoreError::Corrupt { table, detail: detail.to_string() }
}

fn key_id_col(row: &Row, idx: usize, table: &'static str) -> Result<KeyId> {
    let text = row.text(idx)?;
    text.parse().map_err(|_| corrupt(table, format!("bad key id {text:?}")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_u32(n: i64, table: &'static str) -> Result<u32> {
    u32::try_from(n).map_err(|_| corrupt(table, format!("{n} is not a version or count")))
}

fn enabled(state: bool) -> &'static str {
    if state { "Enabled" } else { "Disabled" }
}

/// How many audit records one INSERT carries (`AUDIT_COLUMNS` parameters each: within both
/// backends' limits, SQLite's 32,766 and PostgreSQL's 65,535 parameters a statement).
const AUDIT_ROWS_PER_INSERT: usize = 500;
const AUDIT_COLUMNS: usize = 13;

impl Tx<'_> {
    // ----- keys -----

    pub fn insert_key(&self, k: &KeyRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO keys (key_id, description, state, compromised, created_at,
                rotation_period_secs, next_rotation_at, destruction_at, primary_version, origin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            &[
                (&k.key_id.to_string()).into(),
                (&k.description).into(),
                k.state.as_str().into(),
                k.compromised.into(),
                k.created_at.into(),
                to_i64(k.rotation_period_secs).into(),
                k.next_rotation_at.into(),
                k.destruction_at.into(),
                k.primary_version.into(),
                k.origin.as_str().into(),
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
            &[
                (&k.key_id.to_string()).into(),
                (&k.description).into(),
                k.state.as_str().into(),
                k.compromised.into(),
                to_i64(k.rotation_period_secs).into(),
                k.next_rotation_at.into(),
                k.destruction_at.into(),
                k.primary_version.into(),
            ],
        )?;
        Ok(())
    }

    pub fn keys(&self) -> Result<Vec<KeyRecord>> {
        let rows = self.0.query(
            "SELECT key_id, description, state, compromised, created_at, rotation_period_secs,
                    next_rotation_at, destruction_at, primary_version, origin
             FROM keys ORDER BY created_at, key_id",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let (state, origin) = (row.text(2)?, row.text(9)?);
                Ok(KeyRecord {
                    key_id: key_id_col(row, 0, "keys")?,
                    description: row.text(1)?,
                    state: KeyState::parse(&state).ok_or_else(|| corrupt("keys", format!("state {state:?}")))?,
                    compromised: row.flag(3)?,
                    created_at: row.int(4)?,
                    rotation_period_secs: to_u64(row.int(5)?),
                    next_rotation_at: row.opt_int(6)?,
                    destruction_at: row.opt_int(7)?,
                    primary_version: to_u32(row.int(8)?, "keys")?,
                    origin: KeyOrigin::parse(&origin).ok_or_else(|| corrupt("keys", format!("origin {origin:?}")))?,
                })
            })
            .collect()
    }

    // ----- versions -----

    pub fn insert_version(&self, v: &VersionRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO key_versions (key_id, version, state, created_at, reserved, destruction_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[
                (&v.key_id.to_string()).into(),
                v.version.into(),
                v.state.as_str().into(),
                v.created_at.into(),
                to_i64(v.reserved).into(),
                v.destruction_at.into(),
            ],
        )?;
        Ok(())
    }

    pub fn update_version_state(&self, v: &VersionRecord) -> Result<()> {
        self.0.execute(
            "UPDATE key_versions SET state = ?3, destruction_at = ?4 WHERE key_id = ?1 AND version = ?2",
            &[(&v.key_id.to_string()).into(), v.version.into(), v.state.as_str().into(), v.destruction_at.into()],
        )?;
        Ok(())
    }

    /// A version's reserved count now.
    pub fn reserved(&self, key_id: KeyId, version: u32) -> Result<u64> {
        let row = first(
            self.0.query("SELECT reserved FROM key_versions WHERE key_id = ?1 AND version = ?2", &[(&key_id.to_string()).into(), version.into()])?,
        );
        Ok(to_u64(row.ok_or_else(|| corrupt("key_versions", format!("no version {version} of {key_id}")))?.int(0)?))
    }

    /// Moves a version's reserved count from `from` to `to` if nobody moved it since it was read
    /// (compare and swap: several nodes reserve blocks of the same version); whether it did.
    pub fn reserve_block(&self, key_id: KeyId, version: u32, from: u64, to: u64) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE key_versions SET reserved = ?4 WHERE key_id = ?1 AND version = ?2 AND reserved = ?3",
            &[(&key_id.to_string()).into(), version.into(), to_i64(from).into(), to_i64(to).into()],
        )?;
        Ok(n == 1)
    }

    pub fn versions(&self) -> Result<Vec<VersionRecord>> {
        let rows = self.0.query(
            "SELECT key_id, version, state, created_at, reserved, destruction_at
             FROM key_versions ORDER BY key_id, version",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let state = row.text(2)?;
                Ok(VersionRecord {
                    key_id: key_id_col(row, 0, "key_versions")?,
                    version: to_u32(row.int(1)?, "key_versions")?,
                    state: VersionState::parse(&state).ok_or_else(|| corrupt("key_versions", format!("state {state:?}")))?,
                    created_at: row.int(3)?,
                    reserved: to_u64(row.int(4)?),
                    destruction_at: row.opt_int(5)?,
                })
            })
            .collect()
    }

    // ----- aliases -----

    /// Inserts an alias; `Ok(false)` if the name is taken.
    pub fn insert_alias(&self, a: &AliasRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO aliases (alias, key_id, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (alias) DO NOTHING",
            &[a.alias.name().into(), (&a.key_id.to_string()).into(), a.created_at.into()],
        )?;
        Ok(n == 1)
    }

    /// Deletes an alias; `Ok(false)` if there was none.
    pub fn delete_alias(&self, alias: &AliasName) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM aliases WHERE alias = ?1", &[alias.name().into()])? == 1)
    }

    pub fn aliases(&self) -> Result<Vec<AliasRecord>> {
        let rows = self.0.query("SELECT alias, key_id, created_at FROM aliases ORDER BY alias", &[])?;
        rows.iter()
            .map(|row| {
                let name = row.text(0)?;
                Ok(AliasRecord {
                    alias: AliasName::parse(&name).map_err(|_| corrupt("aliases", format!("alias {name:?}")))?,
                    key_id: key_id_col(row, 1, "aliases")?,
                    created_at: row.int(2)?,
                })
            })
            .collect()
    }

    // ----- principals and grants -----

    /// Inserts a principal; `Ok(false)` if the name is taken.
    pub fn insert_principal(&self, name: &str, state: PrincipalState, now: i64) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO principals (name, state, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
            &[name.into(), state.as_str().into(), now.into()],
        )?;
        Ok(n == 1)
    }

    pub fn set_principal_state(&self, name: &str, state: PrincipalState) -> Result<()> {
        self.0.execute("UPDATE principals SET state = ?2 WHERE name = ?1", &[name.into(), state.as_str().into()])?;
        Ok(())
    }

    pub fn principals(&self) -> Result<Vec<PrincipalRecord>> {
        let rows = self.0.query("SELECT name, state, created_at FROM principals ORDER BY name", &[])?;
        rows.iter()
            .map(|r| {
                let state = r.text(1)?;
                Ok(PrincipalRecord {
                    name: r.text(0)?,
                    state: PrincipalState::parse(&state).ok_or_else(|| corrupt("principals", format!("state {state:?}")))?,
                    created_at: r.int(2)?,
                })
            })
            .collect()
    }

    // ----- external key stores (XKS) -----

    /// Inserts a key store; `Ok(false)` if its name or URI prefix is taken.
    pub fn insert_xks_key_store(&self, k: &XksKeyStoreRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO xks_key_stores (name, uri_prefix, region, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            &[k.name.as_str().into(), k.uri_prefix.as_str().into(), k.region.as_str().into(), k.created_at.into()],
        )?;
        Ok(n == 1)
    }

    pub fn xks_key_stores(&self) -> Result<Vec<XksKeyStoreRecord>> {
        let rows = self.0.query("SELECT name, uri_prefix, region, created_at FROM xks_key_stores ORDER BY name", &[])?;
        rows.iter().map(|r| Ok(XksKeyStoreRecord { name: r.text(0)?, uri_prefix: r.text(1)?, region: r.text(2)?, created_at: r.int(3)? })).collect()
    }

    pub fn insert_xks_credential(&self, c: &XksCredentialRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO xks_credentials (access_key_id, key_store, sealed_secret, created_at) VALUES (?1, ?2, ?3, ?4)",
            &[c.access_key_id.as_str().into(), c.key_store.as_str().into(), c.sealed_secret.as_slice().into(), c.created_at.into()],
        )?;
        Ok(())
    }

    /// Deletes a credential; `Ok(false)` if there was none by that id.
    pub fn delete_xks_credential(&self, access_key_id: &str) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM xks_credentials WHERE access_key_id = ?1", &[access_key_id.into()])? == 1)
    }

    pub fn xks_credentials(&self) -> Result<Vec<XksCredentialRecord>> {
        let rows =
            self.0.query("SELECT access_key_id, key_store, sealed_secret, created_at FROM xks_credentials ORDER BY key_store, created_at", &[])?;
        rows.iter()
            .map(|r| Ok(XksCredentialRecord { access_key_id: r.text(0)?, key_store: r.text(1)?, sealed_secret: r.blob(2)?, created_at: r.int(3)? }))
            .collect()
    }

    // ----- notifications -----

    const SUBSCRIPTION_COLUMNS: &'static str =
        "id, url, min_severity, sealed_secret, cursor, delivered, failures, next_attempt_at, last_error, created_at";

    pub fn insert_subscription(&self, s: &SubscriptionRecord) -> Result<()> {
        let sql = format!("INSERT INTO notification_subscriptions ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)", Self::SUBSCRIPTION_COLUMNS);
        self.0.execute_dynamic(
            &sql,
            &[
                s.id.as_str().into(),
                s.url.as_str().into(),
                s.min_severity.as_str().into(),
                s.sealed_secret.as_slice().into(),
                s.cursor.into(),
                s.delivered.into(),
                s.failures.into(),
                s.next_attempt_at.into(),
                s.last_error.as_str().into(),
                s.created_at.into(),
            ],
        )?;
        Ok(())
    }

    pub fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>> {
        let sql = format!("SELECT {} FROM notification_subscriptions ORDER BY created_at, id", Self::SUBSCRIPTION_COLUMNS);
        let rows = self.0.query_dynamic(&sql, &[])?;
        rows.iter()
            .map(|r| {
                Ok(SubscriptionRecord {
                    id: r.text(0)?,
                    url: r.text(1)?,
                    min_severity: r.text(2)?,
                    sealed_secret: r.blob(3)?,
                    cursor: r.int(4)?,
                    delivered: r.int(5)?,
                    failures: r.int(6)?,
                    next_attempt_at: r.int(7)?,
                    last_error: r.text(8)?,
                    created_at: r.int(9)?,
                })
            })
            .collect()
    }

    /// Deletes a subscription; `Ok(false)` if there was none by that id.
    pub fn delete_subscription(&self, id: &str) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM notification_subscriptions WHERE id = ?1", &[id.into()])? == 1)
    }

    /// A delivery's outcome: the cursor moved on (and events counted), or a failure noted.
    pub fn note_delivery(&self, s: &SubscriptionRecord) -> Result<()> {
        self.0.execute(
            "UPDATE notification_subscriptions SET cursor = ?2, delivered = ?3, failures = ?4, next_attempt_at = ?5, last_error = ?6 WHERE id = ?1",
            &[s.id.as_str().into(), s.cursor.into(), s.delivered.into(), s.failures.into(), s.next_attempt_at.into(), s.last_error.as_str().into()],
        )?;
        Ok(())
    }

    /// Sets the severity of an event kind (`None`: back to its default).
    pub fn put_event_severity(&self, kind: &str, severity: Option<&str>) -> Result<()> {
        match severity {
            None => self.0.execute("DELETE FROM event_severities WHERE kind = ?1", &[kind.into()])?,
            Some(severity) => self.0.execute(
                "INSERT INTO event_severities (kind, severity) VALUES (?1, ?2) ON CONFLICT (kind) DO UPDATE SET severity = excluded.severity",
                &[kind.into(), severity.into()],
            )?,
        };
        Ok(())
    }

    pub fn event_severities(&self) -> Result<Vec<(String, String)>> {
        let rows = self.0.query("SELECT kind, severity FROM event_severities ORDER BY kind", &[])?;
        rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?))).collect()
    }

    // ----- quorum approvals -----

    /// Sets a policy (`required` 1 removes it: one officer is the default).
    pub fn put_quorum_policy(&self, p: &QuorumPolicyRecord) -> Result<()> {
        let key = p.key_id.map(|k| k.to_string()).unwrap_or_default();
        if p.required <= 1 {
            self.0
                .execute("DELETE FROM quorum_policies WHERE operation = ?1 AND key_id = ?2", &[p.operation.as_str().into(), key.as_str().into()])?;
        } else {
            self.0.execute(
                "INSERT INTO quorum_policies (operation, key_id, required, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (operation, key_id) DO UPDATE SET required = excluded.required, updated_at = excluded.updated_at",
                &[p.operation.as_str().into(), key.as_str().into(), i64::from(p.required).into(), p.updated_at.into()],
            )?;
        }
        Ok(())
    }

    pub fn quorum_policies(&self) -> Result<Vec<QuorumPolicyRecord>> {
        let rows = self.0.query("SELECT operation, key_id, required, updated_at FROM quorum_policies ORDER BY operation, key_id", &[])?;
        rows.iter()
            .map(|r| {
                let key = r.text(1)?;
                Ok(QuorumPolicyRecord {
                    operation: r.text(0)?,
                    key_id: if key.is_empty() { None } else { Some(key.parse().map_err(|_| corrupt("quorum_policies", format!("key_id {key:?}")))?) },
                    required: u32::try_from(r.int(2)?).map_err(|_| corrupt("quorum_policies", "required"))?,
                    updated_at: r.int(3)?,
                })
            })
            .collect()
    }

    pub fn insert_approval_request(&self, a: &ApprovalRequestRecord) -> Result<()> {
        let key = a.key_id.map(|k| k.to_string()).unwrap_or_default();
        self.0.execute(
            "INSERT INTO approval_requests (id, operation, key_id, arguments, summary, requester, reason, required, state, created_at,
                 expires_at, decided_at, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            &[
                a.id.as_str().into(),
                a.operation.as_str().into(),
                key.as_str().into(),
                a.arguments.as_str().into(),
                a.summary.as_str().into(),
                a.requester.as_str().into(),
                a.reason.as_str().into(),
                i64::from(a.required).into(),
                a.state.as_str().into(),
                a.created_at.into(),
                a.expires_at.into(),
                a.decided_at.into(),
                a.result.as_str().into(),
            ],
        )?;
        Ok(())
    }

    const REQUEST_COLUMNS: &'static str =
        "id, operation, key_id, arguments, summary, requester, reason, required, state, created_at, expires_at, decided_at, result";

    fn request_of(r: &Row) -> Result<ApprovalRequestRecord> {
        let key = r.text(2)?;
        Ok(ApprovalRequestRecord {
            id: r.text(0)?,
            operation: r.text(1)?,
            key_id: if key.is_empty() { None } else { Some(key.parse().map_err(|_| corrupt("approval_requests", format!("key_id {key:?}")))?) },
            arguments: r.text(3)?,
            summary: r.text(4)?,
            requester: r.text(5)?,
            reason: r.text(6)?,
            required: u32::try_from(r.int(7)?).map_err(|_| corrupt("approval_requests", "required"))?,
            state: r.text(8)?,
            created_at: r.int(9)?,
            expires_at: r.int(10)?,
            decided_at: r.opt_int(11)?,
            result: r.text(12)?,
        })
    }

    pub fn approval_request(&self, id: &str) -> Result<Option<ApprovalRequestRecord>> {
        let sql = format!("SELECT {} FROM approval_requests WHERE id = ?1", Self::REQUEST_COLUMNS);
        let rows = self.0.query_dynamic(&sql, &[id.into()])?;
        rows.first().map(Self::request_of).transpose()
    }

    /// Requests in `state` (every state when `None`), newest first, at most `limit`.
    pub fn approval_requests(&self, state: Option<&str>, limit: i64) -> Result<Vec<ApprovalRequestRecord>> {
        let sql =
            format!("SELECT {} FROM approval_requests WHERE (?1 = '' OR state = ?1) ORDER BY created_at DESC, id LIMIT ?2", Self::REQUEST_COLUMNS);
        let rows = self.0.query_dynamic(&sql, &[state.unwrap_or_default().into(), limit.into()])?;
        rows.iter().map(Self::request_of).collect()
    }

    /// Moves a request from state `from` to `to`; `Ok(false)` if it was not in `from` (another
    /// node or call moved it first).
    pub fn move_request(&self, id: &str, from: &str, to: &str, at: i64, result: &str) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE approval_requests SET state = ?3, decided_at = ?4, result = ?5 WHERE id = ?1 AND state = ?2",
            &[id.into(), from.into(), to.into(), at.into(), result.into()],
        )?;
        Ok(n == 1)
    }

    /// Records a vote; `Ok(false)` if the officer voted on the request already.
    pub fn insert_vote(&self, v: &VoteRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO approval_votes (request_id, officer, approve, time) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            &[v.request_id.as_str().into(), v.officer.as_str().into(), i64::from(v.approve).into(), v.time.into()],
        )?;
        Ok(n == 1)
    }

    pub fn votes(&self, request_id: &str) -> Result<Vec<VoteRecord>> {
        let rows = self.0.query(
            "SELECT request_id, officer, approve, time FROM approval_votes WHERE request_id = ?1 ORDER BY time, officer",
            &[request_id.into()],
        )?;
        rows.iter().map(|r| Ok(VoteRecord { request_id: r.text(0)?, officer: r.text(1)?, approve: r.int(2)? != 0, time: r.int(3)? })).collect()
    }

    // ----- Google Workspace client-side encryption (CSE) -----

    pub fn put_cse_settings(&self, c: &CseSettingsRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO cse_settings (id, kacls_url, key_id, guests, privileged_users, migration_sources, updated_at, owner_domain)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET kacls_url = excluded.kacls_url, key_id = excluded.key_id, guests = excluded.guests,
                 privileged_users = excluded.privileged_users, migration_sources = excluded.migration_sources,
                 updated_at = excluded.updated_at, owner_domain = excluded.owner_domain",
            &[
                c.kacls_url.as_str().into(),
                (&c.key_id.to_string()).into(),
                i64::from(c.guests).into(),
                serde_json::to_string(&c.privileged_users).unwrap_or_default().as_str().into(),
                serde_json::to_string(&c.migration_sources).unwrap_or_default().as_str().into(),
                c.updated_at.into(),
                c.owner_domain.as_deref().into(),
            ],
        )?;
        Ok(())
    }

    pub fn cse_settings(&self) -> Result<Option<CseSettingsRecord>> {
        let rows =
            self.0.query("SELECT kacls_url, key_id, guests, privileged_users, migration_sources, updated_at, owner_domain FROM cse_settings", &[])?;
        rows.iter()
            .map(|r| {
                let (key_id, privileged, sources) = (r.text(1)?, r.text(3)?, r.text(4)?);
                Ok(CseSettingsRecord {
                    kacls_url: r.text(0)?,
                    key_id: key_id.parse().map_err(|_| corrupt("cse_settings", format!("key_id {key_id:?}")))?,
                    guests: r.int(2)? != 0,
                    privileged_users: serde_json::from_str(&privileged).map_err(|_| corrupt("cse_settings", "privileged_users"))?,
                    migration_sources: serde_json::from_str(&sources).map_err(|_| corrupt("cse_settings", "migration_sources"))?,
                    updated_at: r.int(5)?,
                    owner_domain: r.opt_text(6)?,
                })
            })
            .next()
            .transpose()
    }

    /// Adds an issuer or replaces the one with its `iss`.
    pub fn put_cse_issuer(&self, i: &CseIssuerRecord) -> Result<()> {
        let audiences = serde_json::to_string(&i.audiences).unwrap_or_default();
        self.0.execute(
            "INSERT INTO cse_issuers (iss, token, audiences, jwks, jwks_url, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (iss) DO UPDATE SET token = excluded.token, audiences = excluded.audiences, jwks = excluded.jwks,
                 jwks_url = excluded.jwks_url, updated_at = excluded.updated_at",
            &[
                i.iss.as_str().into(),
                i.token.as_str().into(),
                audiences.as_str().into(),
                i.jwks.as_str().into(),
                i.jwks_url.as_deref().into(),
                i.updated_at.into(),
            ],
        )?;
        Ok(())
    }

    /// Deletes an issuer; `Ok(false)` if there was none by that `iss`.
    pub fn delete_cse_issuer(&self, iss: &str) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM cse_issuers WHERE iss = ?1", &[iss.into()])? == 1)
    }

    pub fn cse_issuers(&self) -> Result<Vec<CseIssuerRecord>> {
        let rows = self.0.query("SELECT iss, token, audiences, jwks, jwks_url, updated_at FROM cse_issuers ORDER BY iss", &[])?;
        rows.iter()
            .map(|r| {
                let audiences = r.text(2)?;
                Ok(CseIssuerRecord {
                    iss: r.text(0)?,
                    token: r.text(1)?,
                    audiences: serde_json::from_str(&audiences).map_err(|_| corrupt("cse_issuers", format!("audiences {audiences:?}")))?,
                    jwks: r.text(3)?,
                    jwks_url: r.opt_text(4)?,
                    updated_at: r.int(5)?,
                })
            })
            .collect()
    }

    pub fn insert_grant(&self, g: &Grant) -> Result<()> {
        let ops: Vec<&str> = g.operations.iter().map(|o| o.as_str()).collect();
        let (ops, pairs, keys) = (
            ops.join(","),
            serde_json::to_string(&g.required_pairs).unwrap_or_default(),
            serde_json::to_string(&g.required_keys).unwrap_or_default(),
        );
        self.0.execute(
            "INSERT INTO grants (grant_id, principal, key_id, operations, required_context,
                required_context_keys, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            &[
                (&g.grant_id).into(),
                (&g.principal).into(),
                (&g.key_id.to_string()).into(),
                (&ops).into(),
                (&pairs).into(),
                (&keys).into(),
                g.expires_at.into(),
                g.created_at.into(),
            ],
        )?;
        Ok(())
    }

    /// Marks a grant revoked; `Ok(false)` if there was no live grant with that id.
    pub fn revoke_grant(&self, grant_id: &str, now: i64) -> Result<bool> {
        let n = self.0.execute("UPDATE grants SET revoked_at = ?2 WHERE grant_id = ?1 AND revoked_at IS NULL", &[grant_id.into(), now.into()])?;
        Ok(n == 1)
    }

    /// Every grant not revoked (expired ones included: they stay visible until revoked).
    pub fn grants(&self) -> Result<Vec<Grant>> {
        let rows = self.0.query(
            "SELECT grant_id, principal, key_id, operations, required_context, required_context_keys,
                    expires_at, created_at
             FROM grants WHERE revoked_at IS NULL ORDER BY created_at, grant_id",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let ops = r.text(3)?;
                let operations = ops
                    .split(',')
                    .map(|o| Operation::parse(o).ok_or_else(|| corrupt("grants", format!("operation {o:?}"))))
                    .collect::<Result<_>>()?;
                Ok(Grant {
                    grant_id: r.text(0)?,
                    principal: r.text(1)?,
                    key_id: key_id_col(r, 2, "grants")?,
                    operations,
                    required_pairs: serde_json::from_str(&r.text(4)?).map_err(|e| corrupt("grants", e))?,
                    required_keys: serde_json::from_str(&r.text(5)?).map_err(|e| corrupt("grants", e))?,
                    expires_at: r.opt_int(6)?,
                    created_at: r.int(7)?,
                })
            })
            .collect()
    }

    // ----- access review -----

    /// Records last-use times (never moving one backwards).
    pub fn record_use(&self, principals: &[(String, i64)], grants: &[(String, i64)]) -> Result<()> {
        for (name, at) in principals {
            self.0.execute(
                "UPDATE principals SET last_used_at = CASE WHEN COALESCE(last_used_at, 0) > ?2 THEN last_used_at ELSE ?2 END WHERE name = ?1",
                &[name.into(), (*at).into()],
            )?;
        }
        for (id, at) in grants {
            self.0.execute(
                "UPDATE grants SET last_used_at = CASE WHEN COALESCE(last_used_at, 0) > ?2 THEN last_used_at ELSE ?2 END WHERE grant_id = ?1",
                &[id.into(), (*at).into()],
            )?;
        }
        Ok(())
    }

    /// Last-use times of principals and (live) grants, by name and id.
    pub fn last_uses(&self) -> Result<(Vec<LastUse>, Vec<LastUse>)> {
        let pairs = |rows: Vec<Row>| rows.iter().map(|r| Ok((r.text(0)?, r.opt_int(1)?))).collect::<Result<Vec<_>>>();
        let principals = pairs(self.0.query("SELECT name, last_used_at FROM principals", &[])?)?;
        let grants = pairs(self.0.query("SELECT grant_id, last_used_at FROM grants WHERE revoked_at IS NULL", &[])?)?;
        Ok((principals, grants))
    }

    pub fn insert_signoff(&self, officer: &str, time: i64, note: &str) -> Result<()> {
        self.0.execute("INSERT INTO review_signoffs (officer, time, note) VALUES (?1, ?2, ?3)", &[officer.into(), time.into(), note.into()])?;
        Ok(())
    }

    /// The last sign-off: who and when.
    pub fn last_signoff(&self) -> Result<Option<(String, i64)>> {
        let row = first(self.0.query("SELECT officer, time FROM review_signoffs ORDER BY time DESC, id DESC LIMIT 1", &[])?);
        row.map(|r| Ok((r.text(0)?, r.int(1)?))).transpose()
    }

    // ----- officers and sessions -----

    pub fn insert_officer(&self, o: &OfficerRecord) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO officers (name, role, state, passphrase_hash, totp_secret, last_totp_step,
                failed_attempts, locked_until, created_at, last_login_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (name) DO NOTHING",
            &[
                (&o.name).into(),
                o.role.as_str().into(),
                enabled(o.enabled).into(),
                (&o.passphrase_hash).into(),
                (&o.sealed_totp).into(),
                to_i64(o.last_totp_step).into(),
                o.failed_attempts.into(),
                o.locked_until.into(),
                o.created_at.into(),
                o.last_login_at.into(),
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
            &[
                (&o.name).into(),
                enabled(o.enabled).into(),
                (&o.passphrase_hash).into(),
                (&o.sealed_totp).into(),
                to_i64(o.last_totp_step).into(),
                o.failed_attempts.into(),
                o.locked_until.into(),
                o.last_login_at.into(),
            ],
        )?;
        Ok(())
    }

    pub fn officers(&self) -> Result<Vec<OfficerRecord>> {
        let rows = self.0.query(
            "SELECT name, role, state, passphrase_hash, totp_secret, last_totp_step, failed_attempts,
                    locked_until, created_at, last_login_at
             FROM officers ORDER BY name",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let role = r.text(1)?;
                Ok(OfficerRecord {
                    name: r.text(0)?,
                    role: Role::parse(&role).ok_or_else(|| corrupt("officers", format!("role {role:?}")))?,
                    enabled: r.text(2)? == "Enabled",
                    passphrase_hash: r.text(3)?,
                    sealed_totp: r.blob(4)?,
                    last_totp_step: to_u64(r.int(5)?),
                    failed_attempts: to_u32(r.int(6)?, "officers")?,
                    locked_until: r.opt_int(7)?,
                    created_at: r.int(8)?,
                    last_login_at: r.opt_int(9)?,
                })
            })
            .collect()
    }

    pub fn officer(&self, name: &str) -> Result<Option<OfficerRecord>> {
        Ok(self.officers()?.into_iter().find(|o| o.name == name))
    }

    pub fn insert_session(&self, token_hash: &[u8], officer: &str, now: i64, expires_at: i64) -> Result<()> {
        self.0.execute(
            "INSERT INTO sessions (token_hash, officer, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            &[token_hash.into(), officer.into(), now.into(), expires_at.into()],
        )?;
        Ok(())
    }

    /// The officer and expiry of a session.
    pub fn session(&self, token_hash: &[u8]) -> Result<Option<(String, i64)>> {
        let row = first(self.0.query("SELECT officer, expires_at FROM sessions WHERE token_hash = ?1", &[token_hash.into()])?);
        row.map(|r| Ok((r.text(0)?, r.int(1)?))).transpose()
    }

    pub fn delete_session(&self, token_hash: &[u8]) -> Result<()> {
        self.0.execute("DELETE FROM sessions WHERE token_hash = ?1", &[token_hash.into()])?;
        Ok(())
    }

    /// Ends every session of an officer, and every expired one.
    pub fn delete_sessions(&self, officer: &str, now: i64) -> Result<()> {
        self.0.execute("DELETE FROM sessions WHERE officer = ?1 OR expires_at <= ?2", &[officer.into(), now.into()])?;
        Ok(())
    }

    /// Ends every officer session (a restored database must not honour tokens issued before).
    pub fn delete_all_sessions(&self) -> Result<()> {
        self.0.execute("DELETE FROM sessions", &[])?;
        Ok(())
    }

    /// Raises every version's reserved encryptions to at least `at_least` (a restore: the
    /// encryptions made after the backup are unknown, so the restored versions encrypt no more).
    pub fn reserve_all_at_least(&self, at_least: u64) -> Result<()> {
        self.0.execute("UPDATE key_versions SET reserved = CASE WHEN reserved > ?1 THEN reserved ELSE ?1 END", &[to_i64(at_least).into()])?;
        Ok(())
    }

    // ----- intents -----

    pub fn insert_intent(&self, kind: IntentKind, key_id: KeyId, version: u32, now: i64) -> Result<i64> {
        let row = first(self.0.query(
            "INSERT INTO intents (kind, key_id, version, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
            &[kind.as_str().into(), (&key_id.to_string()).into(), version.into(), now.into()],
        )?);
        row.ok_or_else(|| corrupt("intents", "no id returned"))?.int(0)
    }

    pub fn delete_intent(&self, id: i64) -> Result<()> {
        self.0.execute("DELETE FROM intents WHERE id = ?1", &[id.into()])?;
        Ok(())
    }

    pub fn intents(&self) -> Result<Vec<Intent>> {
        let rows = self.0.query("SELECT id, kind, key_id, version FROM intents ORDER BY id", &[])?;
        rows.iter()
            .map(|row| {
                Ok(Intent {
                    id: row.int(0)?,
                    kind: match row.text(1)?.as_str() {
                        "create" => IntentKind::Create,
                        "destroy" => IntentKind::Destroy,
                        other => return Err(corrupt("intents", format!("kind {other:?}"))),
                    },
                    key_id: key_id_col(row, 2, "intents")?,
                    version: to_u32(row.int(3)?, "intents")?,
                })
            })
            .collect()
    }

    // ----- audit -----

    /// Makes this transaction the only one appending to the audit chain until it ends, then
    /// reads the chain's head and the marks as they are once it is (one statement after the
    /// lock: the audit writer checks its batch against this epoch).
    pub fn audit_head(&self) -> Result<AuditHead> {
        self.0.lock_audit_head()?;
        let row = first(self.0.query(
            "SELECT r.epoch, r.changes, a.seq, a.hash
             FROM revocation r LEFT JOIN (SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1) a ON 1 = 1",
            &[],
        )?)
        .ok_or_else(|| corrupt("revocation", "no row"))?;
        let last = match row.opt_int(2)? {
            Some(seq) => (seq, row.blob(3)?.try_into().map_err(|_| corrupt("audit", "hash length"))?),
            None => (0, GENESIS),
        };
        Ok(AuditHead { marks: Marks { epoch: to_u64(row.int(0)?), changes: to_u64(row.int(1)?) }, last })
    }

    /// Appends one audit record, chained to the last one.
    pub fn append_audit(&self, event: &AuditEvent, now: i64) -> Result<()> {
        let head = self.audit_head()?;
        self.append_audits(&head, std::iter::once(event), now).map(drop)
    }

    /// Appends audit records in order after `head` (read in this transaction by `audit_head`),
    /// each chained to the one before (a group commit writes a whole batch in one transaction, a
    /// few hundred records to a statement); returns the last one's sequence number and hash
    /// (none when there were no records).
    pub fn append_audits<'e>(&self, head: &AuditHead, events: impl IntoIterator<Item = &'e AuditEvent>, now: i64) -> Result<Option<(i64, Vec<u8>)>> {
        let (mut seq, mut prev) = head.last;
        let before = seq;
        let mut rows: Vec<(StoredRecord, [u8; 32])> = Vec::new();
        for event in events {
            if event.in_dry_run {
                return Err(StoreError::DryRunWrite { operation: event.operation });
            }
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
            prev = record.chain_hash(&prev);
            rows.push((record, prev));
        }
        for chunk in rows.chunks(AUDIT_ROWS_PER_INSERT) {
            let mut params: Vec<Param<'_>> = Vec::with_capacity(chunk.len() * AUDIT_COLUMNS);
            for (r, hash) in chunk {
                params.extend([
                    r.seq.into(),
                    r.time.into(),
                    (&r.request_id).into(),
                    (&r.principal).into(),
                    (&r.operation).into(),
                    r.key_id.as_ref().into(),
                    r.key_version.into(),
                    r.context.as_ref().into(),
                    (&r.outcome).into(),
                    (&r.status).into(),
                    (&r.detail).into(),
                    Param::Blob(hash),
                    r.caller_context.as_ref().into(),
                ]);
            }
            self.0.insert_rows(
                "INSERT INTO audit (seq, time, request_id, principal, operation, key_id, key_version,
                    context, outcome, status, detail, hash, caller_context) VALUES ",
                AUDIT_COLUMNS,
                &params,
            )?;
        }
        Ok((seq > before).then(|| (seq, prev.to_vec())))
    }

    /// The last audit record's sequence number and hash.
    pub fn last_audit(&self) -> Result<Option<(i64, Vec<u8>)>> {
        let row = first(self.0.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?);
        row.map(|r| Ok((r.int(0)?, r.blob(1)?))).transpose()
    }

    pub fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.0.execute(
            "INSERT INTO audit_checkpoints (seq, time, hash, mac) VALUES (?1, ?2, ?3, ?4)",
            &[c.seq.into(), c.time.into(), (&c.hash).into(), (&c.mac).into()],
        )?;
        Ok(())
    }

    /// The newest checkpoint's sequence number and time.
    pub fn last_checkpoint(&self) -> Result<Option<(i64, i64)>> {
        let row = first(self.0.query("SELECT seq, time FROM audit_checkpoints ORDER BY seq DESC LIMIT 1", &[])?);
        row.map(|r| Ok((r.int(0)?, r.int(1)?))).transpose()
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows = self.0.query("SELECT seq, time, hash, mac FROM audit_checkpoints ORDER BY seq", &[])?;
        rows.iter().map(checkpoint).collect()
    }

    /// The revocation epoch (it rises with every change that takes access away) and the count
    /// of changes (it rises with every change to keys, versions, aliases, principals or grants).
    pub fn marks(&self) -> Result<Marks> {
        let row = first(self.0.query("SELECT epoch, changes FROM revocation", &[])?).ok_or_else(|| corrupt("revocation", "no row"))?;
        Ok(Marks { epoch: to_u64(row.int(0)?), changes: to_u64(row.int(1)?) })
    }

    /// Counts a change, in its own transaction, and raises the revocation epoch too when the
    /// change takes access away; returns both as they are now.
    pub fn bump_marks(&self, revokes: bool) -> Result<Marks> {
        let row = first(
            self.0.query("UPDATE revocation SET changes = changes + 1, epoch = epoch + ?1 RETURNING epoch, changes", &[i64::from(revokes).into()])?,
        )
        .ok_or_else(|| corrupt("revocation", "no row"))?;
        Ok(Marks { epoch: to_u64(row.int(0)?), changes: to_u64(row.int(1)?) })
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
        let candidate = first(self.0.query(
            "SELECT c.seq, c.time, c.hash, c.mac FROM audit_checkpoints c JOIN audit a ON a.seq = c.seq
             WHERE c.time <= ?1 AND c.seq < (SELECT MAX(seq) FROM audit)
             ORDER BY c.seq DESC LIMIT 1",
            &[cutoff.into()],
        )?);
        let Some(candidate) = candidate.as_ref().map(checkpoint).transpose()? else { return Ok(None) };
        let newest = first(self.0.query("SELECT MAX(time) FROM audit WHERE seq <= ?1", &[candidate.seq.into()])?);
        let newest = newest.ok_or_else(|| corrupt("audit", "no time"))?.int(0)?;
        Ok((newest <= cutoff).then_some(candidate))
    }

    /// Removes the audit records up to and including `through`, and the checkpoints before it
    /// (the one at `through` stays: it anchors the records kept). Returns how many records went.
    pub fn prune_audit(&self, through: i64) -> Result<usize> {
        let removed = self.0.execute("DELETE FROM audit WHERE seq <= ?1", &[through.into()])?;
        self.0.execute("DELETE FROM audit_checkpoints WHERE seq < ?1", &[through.into()])?;
        Ok(removed as usize)
    }

    /// The audit records in order, with their stored hashes.
    pub fn audit_records(&self) -> Result<Vec<(StoredRecord, Vec<u8>)>> {
        self.audit_page(0, i64::MAX)
    }

    /// The details of the kept records of one operation, in order (the verifier reads where
    /// retention cut the trail from its `AuditPrune` records).
    pub fn audit_details(&self, operation: &str) -> Result<Vec<String>> {
        let rows = self.0.query("SELECT detail FROM audit WHERE operation = ?1 ORDER BY seq", &[operation.into()])?;
        rows.iter().map(|r| r.text(0)).collect()
    }

    /// How many records are kept.
    pub fn audit_count(&self) -> Result<u64> {
        let row = first(self.0.query("SELECT COUNT(*) FROM audit", &[])?);
        Ok(to_u64(row.ok_or_else(|| corrupt("audit", "no count"))?.int(0)?))
    }

    /// The first kept record's sequence number.
    pub fn first_audit_seq(&self) -> Result<Option<i64>> {
        first(self.0.query("SELECT MIN(seq) FROM audit", &[])?).map_or(Ok(None), |r| r.opt_int(0))
    }

    /// The time of the first kept record.
    pub fn oldest_audit_time(&self) -> Result<Option<i64>> {
        first(self.0.query("SELECT time FROM audit WHERE seq = (SELECT MIN(seq) FROM audit)", &[])?).map_or(Ok(None), |r| r.opt_int(0))
    }

    /// The last allowed record of any of `operations`: its time and principal (a scan of the
    /// trail from its end: for reports, not for calls).
    pub fn last_allowed(&self, operations: &[&str]) -> Result<Option<(i64, String)>> {
        let marks: Vec<String> = (1..=operations.len()).map(|i| format!("?{i}")).collect();
        let sql =
            format!("SELECT time, principal FROM audit WHERE operation IN ({}) AND outcome = 'allowed' ORDER BY seq DESC LIMIT 1", marks.join(", "));
        let params: Vec<Param<'_>> = operations.iter().map(|o| (*o).into()).collect();
        let rows = self.0.query_dynamic(&sql, &params)?;
        first(rows).map(|r| Ok((r.int(0)?, r.text(1)?))).transpose()
    }

    /// For each key, each of `operations` allowed on it: how many times, and when last.
    pub fn key_histories(&self, operations: &[&str]) -> Result<Vec<(String, String, i64, i64)>> {
        let marks: Vec<String> = (1..=operations.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "SELECT key_id, operation, COUNT(*), MAX(time) FROM audit
             WHERE key_id IS NOT NULL AND operation IN ({}) AND outcome = 'allowed' GROUP BY key_id, operation ORDER BY key_id, operation",
            marks.join(", ")
        );
        let params: Vec<Param<'_>> = operations.iter().map(|o| (*o).into()).collect();
        let rows = self.0.query_dynamic(&sql, &params)?;
        rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?, r.int(2)?, r.int(3)?))).collect()
    }

    /// Up to `limit` audit records with a sequence number above `after`, in order.
    pub fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<(StoredRecord, Vec<u8>)>> {
        let rows = self.0.query(
            "SELECT seq, time, request_id, principal, operation, key_id, key_version, context,
                    outcome, status, detail, hash, caller_context
             FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            &[after.into(), limit.into()],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    StoredRecord {
                        seq: r.int(0)?,
                        time: r.int(1)?,
                        request_id: r.text(2)?,
                        principal: r.text(3)?,
                        operation: r.text(4)?,
                        key_id: r.opt_text(5)?,
                        key_version: r.opt_int(6)?,
                        context: r.opt_text(7)?,
                        outcome: r.text(8)?,
                        status: r.text(9)?,
                        detail: r.text(10)?,
                        caller_context: r.opt_text(12)?,
                    },
                    r.blob(11)?,
                ))
            })
            .collect()
    }
}

fn checkpoint(r: &Row) -> Result<Checkpoint> {
    Ok(Checkpoint { seq: r.int(0)?, time: r.int(1)?, hash: r.blob(2)?, mac: r.blob(3)? })
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
            origin: KeyOrigin::Hsm,
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
                assert!(tx.reserve_block(k.key_id, 1, 0, 4096)?);
                assert!(!tx.reserve_block(k.key_id, 1, 0, 8192)?, "a block from a count that moved on is refused");
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
    fn a_change_record_made_in_a_dry_run_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.db")).unwrap();
        let change = AuditEvent { in_dry_run: true, ..AuditEvent::system("DisableKey", None, None, String::new()) };
        let r = store.write(|tx| {
            tx.insert_key(&key(1))?;
            tx.append_audit(&change, 5)
        });
        assert!(matches!(r, Err(StoreError::DryRunWrite { operation: "DisableKey" })), "{r:?}");
        assert!(store.read(|tx| tx.keys()).unwrap().is_empty(), "the change's transaction rolled back");
        assert_eq!(store.read(|tx| tx.audit_count()).unwrap(), 0);
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
