//! The embedded backend: one SQLite file, the default for one machine and for `kms-server dev`.
//!
//! Durability: WAL with `synchronous=FULL`, so a transaction is on disk when `COMMIT` returns.
//! One connection behind a mutex: writes are serialised by SQLite anyway, and the data plane
//! never reads the database (it reads the in-memory registry).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use super::schema;
use super::sql::{Param, Row, Sql, Value};
use super::{Result, StoreError};

/// The suffix of the snapshot files backups are made from; one left by a crash is removed at
/// the next open.
const SNAPSHOT_SUFFIX: &str = ".snapshot";

pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The storage fault last applied to the connection (`test-hooks` builds only).
    fault: Mutex<Option<crate::hooks::StoreFault>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Prepared statements kept per connection (SQLite's are a few KiB each).
const STATEMENT_CACHE: usize = 256;

impl SqliteStore {
    /// Opens the database, making it if missing. A new database file is made mode 0600 before
    /// SQLite opens it, and SQLite gives its WAL and shared-memory files the database file's
    /// mode, so none of the three is ever readable by other accounts (`files.rs`).
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if !path.exists() {
            crate::files::create_new(path).map_err(|e| StoreError::io("creating the database file", e))?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Room for every statement the service runs, so that none is parsed twice.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        schema::migrate_sqlite(&mut conn)?;
        let stale = snapshot_path(path);
        if stale.exists() {
            tracing::warn!(path = %stale.display(), "removing the snapshot of an interrupted backup");
            std::fs::remove_file(&stale).map_err(|e| StoreError::io("removing a stale snapshot", e))?;
        }
        Ok(SqliteStore { conn: Mutex::new(conn), path: path.to_path_buf(), fault: Mutex::new(None) })
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
        copy_into(&self.path, &dest)?;
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
    pub fn write<T>(&self, f: impl FnOnce(&dyn Sql) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        if crate::hooks::ENABLED {
            self.apply_fault(&conn)?;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&SqliteTx(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in a read transaction on a connection of its own: a consistent snapshot however
    /// long `f` reads (WAL), while the service goes on writing.
    pub fn read_snapshot<T, E: From<StoreError>>(&self, f: impl FnOnce(&dyn Sql) -> std::result::Result<T, E>) -> std::result::Result<T, E> {
        let mut conn = Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(StoreError::from)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(StoreError::from)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(StoreError::from)?;
        f(&SqliteTx(&tx))
    }

    /// Runs `f` in a read transaction (a consistent snapshot).
    pub fn read<T>(&self, f: impl FnOnce(&dyn Sql) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&SqliteTx(&tx))
    }
}

/// Writes one consistent copy of the database at `source` into `dest`, a new private file,
/// through a read-only connection: the source is not changed, not even brought to this build's
/// schema (a backup's snapshot; the copy `kms-server migrate` moves).
pub fn copy_into(source: &Path, dest: &Path) -> Result<()> {
    // `VACUUM INTO` writes into an empty file: made first, so that it is private from the start.
    crate::files::create_new(dest).map_err(|e| StoreError::io("creating the copy", e))?;
    let conn = Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
    Ok(())
}

fn snapshot_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(SNAPSHOT_SUFFIX);
    name.into()
}

/// A SQLite transaction, as the queries see one.
struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Param::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            Param::Int(n) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(n)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn value(v: ValueRef<'_>) -> Result<Value> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Text(t) => {
            Value::Text(String::from_utf8(t.to_vec()).map_err(|_| StoreError::Corrupt { table: "row", detail: "text is not UTF-8".into() })?)
        }
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        ValueRef::Real(_) => return Err(StoreError::Corrupt { table: "row", detail: "a floating-point value".into() }),
    })
}

impl Sql for SqliteTx<'_> {
    fn execute(&self, sql: &'static str, params: &[Param<'_>]) -> Result<u64> {
        Ok(self.0.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params.iter()))? as u64)
    }

    fn execute_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        // Not cached: its text varies with the number of rows.
        Ok(self.0.prepare(sql)?.execute(rusqlite::params_from_iter(params.iter()))? as u64)
    }

    fn query(&self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        rows(&mut *self.0.prepare_cached(sql)?, params)
    }

    fn insert_rows(&self, insert: &str, width: usize, params: &[Param<'_>]) -> Result<()> {
        // In-process, a row costs no round trip: one cached statement, never parsed again.
        let mut statement = self.0.prepare_cached(&crate::store::sql::multi_row(insert, width, width))?;
        for row in params.chunks(width) {
            statement.execute(rusqlite::params_from_iter(row.iter()))?;
        }
        Ok(())
    }

    fn query_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        rows(&mut self.0.prepare(sql)?, params)
    }
}

/// Runs a prepared query and reads every row it returns.
fn rows(stmt: &mut rusqlite::Statement<'_>, params: &[Param<'_>]) -> Result<Vec<Row>> {
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(Row((0..columns).map(|i| value(row.get_ref(i)?)).collect::<Result<_>>()?));
    }
    Ok(out)
}
