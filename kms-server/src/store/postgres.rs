//! The backend for several nodes: one PostgreSQL database (a primary with a synchronous standby
//! in production), reached over TLS with the server's certificate and host name verified.
//!
//! The connection string is libpq's `key=value` form, and may name several hosts
//! (`host=pg1,pg2 target_session_attrs=read-write`): a node reconnects by itself to whichever is
//! the primary after a failover. `sslmode=verify-full` and `sslrootcert=FILE` are required (the
//! driver is `tokio-postgres` through its synchronous wrapper, with rustls doing the
//! verification); the password comes from a file only the service's user can read, never from
//! the string.
//!
//! Every store call already runs on a blocking thread (a data worker, the audit writer, tokio's
//! blocking pool): each connection is `tokio-postgres`'s client driven by a small runtime of its
//! own, on the calling thread, as its synchronous wrapper does; unlike the wrapper, it lets a
//! transaction pipeline its statements (`PgTx`). Connections are pooled, each with its prepared
//! statements; one that fails is dropped and the next call opens another.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::sql::{Param, Row, Sql, Value};
use super::{Result, StoreError};

/// The `sslmode` the service requires outside development: TLS, the server's certificate checked
/// against `sslrootcert`, and its name against the host connected to (libpq's `verify-full`).
pub const VERIFY_FULL: &str = "verify-full";

/// What the connection string says, split into what the driver reads and what the service
/// handles itself (TLS verification, which the driver leaves to its TLS connector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conninfo {
    /// Every pair but `sslmode` and `sslrootcert`, for the driver.
    pub driver: Vec<(String, String)>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
}

impl Conninfo {
    /// Parses libpq's `key=value` form: pairs separated by spaces, a value single-quoted when it
    /// holds spaces (`\'` and `\\` escaped inside). A password in the string is refused: it comes
    /// from `store.password_file`.
    pub fn parse(text: &str) -> std::result::Result<Conninfo, String> {
        let mut info = Conninfo { driver: Vec::new(), sslmode: None, sslrootcert: None };
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let Some(&first) = chars.peek() else { break };
            if first == '=' {
                return Err("a pair without a key".into());
            }
            let mut key = String::new();
            while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
                key.push(c);
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next() != Some('=') {
                return Err(format!("{key} has no value (key=value)"));
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'\'').is_some() {
                loop {
                    match chars.next() {
                        None => return Err(format!("the value of {key} has no closing quote")),
                        Some('\'') => break,
                        Some('\\') => value.push(chars.next().ok_or_else(|| format!("the value of {key} ends in a backslash"))?),
                        Some(c) => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    value.push(c);
                }
            }
            match key.as_str() {
                "password" => return Err("holds a password: put it in store.password_file instead".into()),
                "sslmode" => info.sslmode = Some(value),
                "sslrootcert" => info.sslrootcert = Some(PathBuf::from(value)),
                "sslcert" | "sslkey" | "passfile" | "sslpassword" => return Err(format!("{key} is not supported")),
                _ => info.driver.push((key, value)),
            }
        }
        Ok(info)
    }

    /// The driver's configuration: its pairs, TLS required (verified by the connector), and the
    /// password.
    fn driver_config(&self, password: &str) -> std::result::Result<tokio_postgres::Config, String> {
        let mut text = String::new();
        for (k, v) in &self.driver {
            text.push_str(&format!("{k}='{}' ", v.replace('\\', "\\\\").replace('\'', "\\'")));
        }
        let mut config: tokio_postgres::Config = text.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        config.password(password);
        if config.get_application_name().is_none() {
            config.application_name("kms-server");
        }
        Ok(config)
    }
}

/// A pooled connection: the client, the runtime that drives its connection (only while a call
/// waits on it, on the caller's thread), and the statements it prepared.
pub(super) struct Conn {
    runtime: tokio::runtime::Runtime,
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    /// Waits for `f`, driving the connection meanwhile.
    fn block_on<T>(&self, f: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>) -> Result<T> {
        Ok(self.runtime.block_on(f)?)
    }

    /// Runs statements without parameters (the simple protocol, one round trip).
    pub(super) fn simple(&self, sql: &str) -> Result<()> {
        self.block_on(self.client.batch_execute(sql))
    }

    /// The integer in the first column of a query's first row, if any.
    pub(super) fn int(&self, sql: &str) -> Result<Option<i64>> {
        Ok(self.block_on(self.client.query_opt(sql, &[]))?.map(|r| r.get(0)))
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    config: tokio_postgres::Config,
    scratch_dir: PathBuf,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    idle: Mutex<Vec<Conn>>,
    /// The connection holding the leader's lock, while this node leads.
    leader: Mutex<Option<Conn>>,
    /// The connection holding this node's share of `PRESENCE_LOCK`.
    presence: Mutex<Option<Conn>>,
}

/// The advisory lock every change takes, on every node, from its intent to its commit: changes
/// are serialised across the cluster (as the local admin lock serialises them in a node), so
/// that each is decided on the current state, and an intent in the store while one holds it
/// belongs to a node that died. A node that dies loses its connection and with it the lock.
const ADMIN_LOCK: i64 = 0x6b6d_735f_6164_6d6e; // "kms_admn"
/// The advisory lock of the one node that runs the background jobs (destruction and rotation
/// sweeps, retention, settling a dead node's intents), held as long as its connection lives.
const LEADER_LOCK: i64 = 0x6b6d_735f_6c65_6164; // "kms_lead"
/// The advisory lock every live node holds shared, as long as its connection lives: how many
/// hold it is the size of the fleet (a killed node's connection, and its share, go with it).
const PRESENCE_LOCK: i64 = 0x6b6d_735f_6e6f_6465; // "kms_node"

/// The cluster's admin lock, held until dropped.
pub struct AdminLease<'a> {
    store: &'a PgStore,
    conn: Option<Conn>,
}

impl fmt::Debug for AdminLease<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminLease")
    }
}

impl Drop for AdminLease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // A connection that cannot unlock is dropped: closing it releases the lock.
            if conn.simple(&format!("SELECT pg_advisory_unlock({ADMIN_LOCK})")).is_ok() {
                self.store.checkin(conn);
            }
        }
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("hosts", &self.config.get_hosts().len()).finish_non_exhaustive()
    }
}

/// The settings of `[store]` for PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub url: String,
    pub password_file: PathBuf,
    /// Where a backup's SQLite snapshot is written before it is streamed (`data_dir`).
    pub scratch_dir: PathBuf,
}

/// The TLS client: the roots of `sslrootcert` only (never the system's), ring's cryptography.
fn tls(ca: &Path) -> std::result::Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(crate::tls::client_config(ca)?))
}

impl PgStore {
    /// Connects (a first connection proves the settings) and brings the schema up to date.
    pub fn open(settings: &PgSettings) -> Result<PgStore> {
        let setup = |e: String| StoreError::Setup { reason: e };
        let info = Conninfo::parse(&settings.url).map_err(|e| setup(format!("store.url {e}")))?;
        let ca = info
            .sslrootcert
            .clone()
            .ok_or_else(|| setup("store.url needs sslrootcert=FILE (the CA of the PostgreSQL server's certificate)".into()))?;
        let password = crate::config::read_secret_file(&settings.password_file).map_err(|e| setup(e.to_string()))?;
        let config = info.driver_config(password.expose_secret()).map_err(|e| setup(format!("store.url: {e}")))?;
        let store = PgStore {
            config,
            scratch_dir: settings.scratch_dir.clone(),
            tls: tls(&ca).map_err(setup)?,
            idle: Mutex::new(Vec::new()),
            leader: Mutex::new(None),
            presence: Mutex::new(None),
        };
        let conn = store.connect()?;
        super::schema::migrate_postgres(&conn)?;
        store.checkin(conn);
        Ok(store)
    }

    /// Takes the cluster's admin lock, waiting at most `wait` for another node's change to end
    /// (then a retryable error).
    pub fn admin_lease(&self, wait: std::time::Duration) -> Result<AdminLease<'_>> {
        let conn = self.checkout()?;
        conn.simple(&format!("SET lock_timeout = {}; SELECT pg_advisory_lock({ADMIN_LOCK}); SET lock_timeout = 0", wait.as_millis().max(1)))?;
        Ok(AdminLease { store: self, conn: Some(conn) })
    }

    /// Whether this node leads (holds the leader's lock), taking the lock when nobody does. A
    /// leader whose connection failed leads no more; another node takes over at its next try.
    pub fn leading(&self) -> Result<bool> {
        let mut leader = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = leader.as_ref() {
            if conn.simple("SELECT 1").is_ok() {
                return Ok(true);
            }
            *leader = None;
        }
        let conn = self.connect()?;
        let taken = conn.int(&format!("SELECT pg_try_advisory_lock({LEADER_LOCK})::int::int8"))? == Some(1);
        if taken {
            *leader = Some(conn);
        }
        Ok(taken)
    }

    /// Keeps this node counted in the fleet: holds its share of the presence lock on a
    /// connection of its own, made again if it failed.
    pub fn keep_present(&self) -> Result<()> {
        let mut presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        if presence.as_ref().is_some_and(|conn| conn.simple("SELECT 1").is_ok()) {
            return Ok(());
        }
        *presence = None;
        let conn = self.connect()?;
        conn.simple(&format!("SELECT pg_advisory_lock_shared({PRESENCE_LOCK})"))?;
        *presence = Some(conn);
        Ok(())
    }

    /// How many nodes are live: the sessions holding a share of the presence lock (this node's
    /// taken first, or again if its connection failed).
    pub fn fleet_size(&self) -> Result<u64> {
        self.keep_present()?;
        // A bigint advisory key shows in pg_locks as its high and low halves, objsubid 1, in
        // this database (advisory locks are per database; the server may hold others).
        let (high, low) = ((PRESENCE_LOCK as u64) >> 32, (PRESENCE_LOCK as u64) & 0xffff_ffff);
        let sql = format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = {high} AND objid = {low} AND objsubid = 1 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        );
        let n = self.read(|db| db.query_dynamic(&sql, &[]))?.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
        Ok(n.max(1) as u64)
    }

    /// Where a backup's snapshot is written (and removed once opened).
    pub fn scratch_file(&self) -> PathBuf {
        self.scratch_dir.join("kms.db.snapshot")
    }

    fn connect(&self) -> Result<Conn> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| StoreError::io("the PostgreSQL client's runtime", e))?;
        let (client, connection) = runtime.block_on(self.config.connect(self.tls.clone()))?;
        // Driven whenever the thread waits on a call; it ends (and the client reports itself
        // closed) when the connection fails.
        runtime.spawn(connection);
        Ok(Conn { runtime, client, statements: HashMap::new() })
    }

    fn checkout(&self) -> Result<Conn> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(conn) if !conn.client.is_closed() => Ok(conn),
            _ => self.connect(),
        }
    }

    fn checkin(&self, conn: Conn) {
        if !conn.client.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        }
    }

    /// Runs `f` in a transaction on a pooled connection; commits if it returns `Ok`, rolls back
    /// otherwise. A connection that failed, or could not roll back, is not returned to the pool.
    fn transaction<T, E: From<StoreError>>(&self, kind: &str, f: impl FnOnce(&dyn Sql) -> std::result::Result<T, E>) -> std::result::Result<T, E> {
        let mut conn = self.checkout()?;
        let begin = match kind {
            "read" => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            _ => "BEGIN ISOLATION LEVEL READ COMMITTED",
        };
        let pg = PgTx {
            conn: std::cell::RefCell::new(&mut conn),
            ahead: std::cell::RefCell::new(Ahead { simple: begin.to_string(), last: None }),
            begun: std::cell::Cell::new(false),
            head_locked: std::cell::Cell::new(false),
        };
        let out = f(&pg);
        let ended = match (&out, pg.begun.get()) {
            (_, false) => Ok(()),
            (Ok(_), true) => pg.commit(),
            (Err(_), true) => pg.conn.borrow().simple("ROLLBACK"),
        };
        match ended {
            Ok(()) => {
                self.checkin(conn);
                out
            }
            // The connection goes, with its transaction if it was still open.
            Err(e) => out.and(Err(e.into())),
        }
    }

    pub fn write<T>(&self, f: impl FnOnce(&dyn Sql) -> Result<T>) -> Result<T> {
        self.transaction("write", f)
    }

    /// A consistent snapshot (repeatable read, read only).
    pub fn read<T>(&self, f: impl FnOnce(&dyn Sql) -> Result<T>) -> Result<T> {
        self.transaction("read", f)
    }

    /// The same: every read here is a snapshot on a pooled connection, beside the writes.
    pub fn read_snapshot<T, E: From<StoreError>>(&self, f: impl FnOnce(&dyn Sql) -> std::result::Result<T, E>) -> std::result::Result<T, E> {
        self.transaction("read", f)
    }
}

impl Drop for PgStore {
    /// Each client of the pool owns a small runtime of its own, which may not be dropped inside
    /// an async context (where the service drops its store at shutdown): they go on a thread.
    fn drop(&mut self) {
        let mut conns = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        conns.extend(self.leader.lock().unwrap_or_else(|p| p.into_inner()).take());
        conns.extend(self.presence.lock().unwrap_or_else(|p| p.into_inner()).take());
        if !conns.is_empty() {
            let _ = std::thread::spawn(move || drop(conns)).join();
        }
    }
}

/// A PostgreSQL transaction, as the queries see one. Its statements are pipelined where the
/// answer allows: `BEGIN` (and the audit head's lock) go in the round trip of the first
/// statement, and a transaction's last insert (`Sql::insert_rows`) in the round trip of the
/// `COMMIT`. The audit writer's transaction is so two round trips: the lock with the head's read,
/// then the records with the commit (one more per 500 records past the first 500). The lock is
/// held from the head's read to the commit's flush.
struct PgTx<'a> {
    conn: std::cell::RefCell<&'a mut Conn>,
    ahead: std::cell::RefCell<Ahead>,
    /// Whether `BEGIN` was sent, or a statement queued behind it: the transaction must end.
    begun: std::cell::Cell<bool>,
    /// Whether this transaction holds (or has asked for) the audit head's lock.
    head_locked: std::cell::Cell<bool>,
}

/// What goes to the server before the next statement, in its round trip.
#[derive(Default)]
struct Ahead {
    /// Statements without parameters (`BEGIN`, a lock), or nothing.
    simple: String,
    /// A statement whose answer nobody waits for.
    last: Option<(Statement, Vec<Owned>)>,
}

/// A parameter kept until its statement is sent.
#[derive(Debug)]
enum Owned {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Owned {
    fn of(p: &Param<'_>) -> Owned {
        match *p {
            Param::Null => Owned::Null,
            Param::Int(n) => Owned::Int(n),
            Param::Text(s) => Owned::Text(s.to_string()),
            Param::Blob(b) => Owned::Blob(b.to_vec()),
        }
    }

    fn param(&self) -> Param<'_> {
        match self {
            Owned::Null => Param::Null,
            Owned::Int(n) => Param::Int(*n),
            Owned::Text(s) => Param::Text(s),
            Owned::Blob(b) => Param::Blob(b),
        }
    }
}

/// How many prepared statements a connection keeps at most: the service's statements and the
/// multi-row audit insert of every length up to 500 rows, so that a writer holding the audit
/// head's lock seldom prepares (past this the cache starts again).
const MAX_STATEMENTS: usize = 1024;

/// Sends what was put ahead, in order, without waiting between them. (Each request is queued
/// when its future is first polled; `biased` polls in the order written, here and at every
/// `try_join!` below, so the first failure reported is the first statement's.)
async fn send_ahead(client: &Client, ahead: Ahead) -> std::result::Result<(), tokio_postgres::Error> {
    let simple = async { if ahead.simple.is_empty() { Ok(()) } else { client.batch_execute(&ahead.simple).await } };
    let last = async {
        match &ahead.last {
            Some((statement, owned)) => {
                let params: Vec<Param<'_>> = owned.iter().map(Owned::param).collect();
                client.execute(statement, &refs(&params)).await.map(drop)
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(biased; simple, last).map(drop)
}

fn refs<'p>(params: &'p [Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl PgTx<'_> {
    /// The statement for `sql` (its `?N` placeholders as `$N`), prepared once per connection.
    fn statement(&self, sql: &str) -> Result<Statement> {
        let mut conn = self.conn.borrow_mut();
        if let Some(s) = conn.statements.get(sql) {
            return Ok(s.clone());
        }
        if conn.statements.len() >= MAX_STATEMENTS {
            conn.statements.clear();
        }
        let prepared = conn.block_on(conn.client.prepare(&dollar_placeholders(sql)))?;
        conn.statements.insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    /// What goes before the next statement (the transaction has begun once it is sent).
    fn take_ahead(&self) -> Ahead {
        self.begun.set(true);
        std::mem::take(&mut *self.ahead.borrow_mut())
    }

    fn rows(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        let ahead = self.take_ahead();
        let conn = self.conn.borrow();
        let client = &conn.client;
        let params = refs(params);
        let (_, rows) = conn.block_on(async { tokio::try_join!(biased; send_ahead(client, ahead), client.query(&statement, &params)) })?;
        rows.iter().map(row).collect()
    }

    fn run(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        let statement = self.statement(sql)?;
        let ahead = self.take_ahead();
        let conn = self.conn.borrow();
        let client = &conn.client;
        let params = refs(params);
        let (_, changed) = conn.block_on(async { tokio::try_join!(biased; send_ahead(client, ahead), client.execute(&statement, &params)) })?;
        Ok(changed)
    }

    /// Sends a statement put off by `insert_rows` now (one waits at a time), with what is ahead
    /// of it.
    fn send_waiting(&self) -> Result<()> {
        if self.ahead.borrow().last.is_some() {
            let ahead = self.take_ahead();
            let conn = self.conn.borrow();
            conn.block_on(send_ahead(&conn.client, ahead))?;
        }
        Ok(())
    }

    /// Sends what is ahead with the `COMMIT`, in one round trip.
    fn commit(&self) -> Result<()> {
        let ahead = self.take_ahead();
        let conn = self.conn.borrow();
        let client = &conn.client;
        conn.block_on(async { tokio::try_join!(biased; send_ahead(client, ahead), client.batch_execute("COMMIT")) }).map(drop)
    }
}

impl Sql for PgTx<'_> {
    fn execute(&self, sql: &'static str, params: &[Param<'_>]) -> Result<u64> {
        self.run(sql, params)
    }

    fn execute_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        self.run(sql, params)
    }

    fn query(&self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        self.rows(sql, params)
    }

    fn query_dynamic(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        self.rows(sql, params)
    }

    fn insert_rows(&self, insert: &str, width: usize, params: &[Param<'_>]) -> Result<()> {
        let statement = self.statement(&crate::store::sql::multi_row(insert, width, params.len()))?;
        self.send_waiting()?;
        self.ahead.borrow_mut().last = Some((statement, params.iter().map(Owned::of).collect()));
        self.begun.set(true);
        Ok(())
    }

    fn after_copy(&self) -> Result<()> {
        for table in ["intents", "review_signoffs"] {
            self.rows(&format!("SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}"), &[])?;
        }
        Ok(())
    }

    fn lock_audit_head(&self) -> Result<()> {
        // Held to the transaction's end: one appender at a time across every node, so that the
        // chain is one sequence. Taken once (a second request would cost a round trip), with
        // the `BEGIN` when it is the transaction's first statement.
        if !self.head_locked.replace(true) {
            // After a waiting statement, not before it.
            self.send_waiting()?;
            let mut ahead = self.ahead.borrow_mut();
            let sep = if ahead.simple.is_empty() { "" } else { "; " };
            ahead.simple.push_str(&format!("{sep}SELECT pg_advisory_xact_lock({AUDIT_HEAD_LOCK})"));
        }
        Ok(())
    }
}

/// The advisory lock that serialises appends to the audit chain.
const AUDIT_HEAD_LOCK: i64 = 0x6b6d_7361_7564_6974; // "kmsaudit"

fn row(r: &tokio_postgres::Row) -> Result<Row> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?.map(|n| Value::Int(i64::from(n)))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            return Err(StoreError::Corrupt { table: "row", detail: format!("column {} of type {ty}", column.name()) });
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(n) if *ty == Type::INT4 => i32::try_from(n)?.to_sql(ty, out),
            Param::Int(n) => n.to_sql(ty, out),
            Param::Text(s) => s.to_sql(ty, out),
            Param::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::INT4, Type::TEXT, Type::VARCHAR, Type::BYTEA].contains(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// `?N` placeholders rewritten as `$N` (PostgreSQL's), outside quoted strings.
pub fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_outside_quotes_only() {
        assert_eq!(
            dollar_placeholders("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }

    #[test]
    fn connection_strings_parse_as_libpq_reads_them() {
        let info = Conninfo::parse(
            "host=pg1,pg2 port=5432  dbname = kms user=kms target_session_attrs=read-write sslmode=verify-full sslrootcert='/etc/kms/pg ca.pem'",
        )
        .unwrap();
        assert_eq!(info.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(info.sslrootcert.as_deref(), Some(Path::new("/etc/kms/pg ca.pem")));
        assert_eq!(
            info.driver,
            [("host", "pg1,pg2"), ("port", "5432"), ("dbname", "kms"), ("user", "kms"), ("target_session_attrs", "read-write")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let config = info.driver_config("secret").unwrap();
        assert_eq!(config.get_hosts().len(), 2);
        assert_eq!(config.get_dbname(), Some("kms"));
        assert!(Conninfo::parse("host=x password=hunter2").unwrap_err().contains("password_file"));
        assert!(Conninfo::parse("host='x").unwrap_err().contains("closing quote"));
        assert!(Conninfo::parse("host").unwrap_err().contains("no value"));
        assert!(Conninfo::parse("sslkey=/k").unwrap_err().contains("not supported"));
        assert!(Conninfo { driver: vec![("colour".into(), "blue".into())], sslmode: None, sslrootcert: None }.driver_config("p").is_err());
    }
}
