//! Every table from one store into another, whatever their backends: a SQLite database moved
//! into PostgreSQL (`kms-server migrate --from-sqlite`), and a PostgreSQL store written out as
//! a SQLite file (the backup's database section, which stays one format for both backends).
//!
//! Rows are copied as they are, keys, states, usage counters and the audit chain with its
//! hashes and checkpoints included, so that the chain verifies on the other side unchanged.

use super::sql::{Param, Row, Value};
use super::{Result, StoreError, Tx};

/// Each table with its columns (the same in both schemas) and the column it is read in order
/// of; tables that others reference come before them.
const TABLES: &[(&str, &str, &str)] = &[
    (
        "keys",
        "key_id, description, state, compromised, created_at, rotation_period_secs, next_rotation_at, destruction_at, primary_version, origin",
        "key_id",
    ),
    ("key_versions", "key_id, version, state, created_at, reserved, destruction_at", "key_id, version"),
    ("aliases", "alias, key_id, created_at", "alias"),
    ("intents", "id, kind, key_id, version, created_at", "id"),
    ("principals", "name, state, created_at, last_used_at", "name"),
    (
        "grants",
        "grant_id, principal, key_id, operations, required_context, required_context_keys, expires_at, created_at, revoked_at, last_used_at",
        "grant_id",
    ),
    ("audit_checkpoints", "seq, time, hash, mac", "seq"),
    ("officers", "name, role, state, passphrase_hash, totp_secret, last_totp_step, failed_attempts, locked_until, created_at, last_login_at", "name"),
    ("sessions", "token_hash, officer, created_at, expires_at", "token_hash"),
    ("review_signoffs", "id, officer, time, note", "id"),
    ("revocation", "epoch, changes", "epoch"),
    ("xks_key_stores", "name, uri_prefix, region, created_at", "name"),
    ("xks_credentials", "access_key_id, key_store, sealed_secret, created_at", "access_key_id"),
    ("cse_settings", "id, kacls_url, key_id, guests, privileged_users, migration_sources, updated_at, owner_domain", "id"),
    ("cse_issuers", "iss, token, audiences, jwks, jwks_url, updated_at", "iss"),
    ("quorum_policies", "operation, key_id, required, updated_at", "operation, key_id"),
    (
        "approval_requests",
        "id, operation, key_id, arguments, summary, requester, reason, required, state, created_at, expires_at, decided_at, result",
        "id",
    ),
    ("approval_votes", "request_id, officer, approve, time", "request_id, officer"),
    (
        "notification_subscriptions",
        "id, url, min_severity, sealed_secret, cursor, delivered, failures, next_attempt_at, last_error, created_at",
        "id",
    ),
    ("event_severities", "kind, severity", "kind"),
];

/// The audit trail's columns, copied a page at a time (it is the one table that grows large).
const AUDIT: &str = "seq, time, request_id, principal, operation, key_id, key_version, context, outcome, status, detail, hash, caller_context";
const AUDIT_PAGE: i64 = 5_000;

/// How many rows of each table were copied.
pub type Copied = Vec<(&'static str, u64)>;

fn param(v: &Value) -> Param<'_> {
    match v {
        Value::Null => Param::Null,
        Value::Int(n) => Param::Int(*n),
        Value::Text(s) => Param::Text(s),
        Value::Blob(b) => Param::Blob(b),
    }
}

/// Inserts `rows` into `table`, a few hundred to a statement.
fn insert(to: &Tx<'_>, table: &str, columns: &str, rows: &[Row]) -> Result<()> {
    let width = columns.split(',').count();
    for chunk in rows.chunks((4_000 / width).max(1)) {
        let mut params = Vec::with_capacity(chunk.len() * width);
        for row in chunk {
            if row.0.len() != width {
                return Err(StoreError::Corrupt { table: "copy", detail: format!("{table}: a row of {} columns", row.0.len()) });
            }
            params.extend(row.0.iter().map(param));
        }
        to.0.insert_rows(&format!("INSERT INTO {table} ({columns}) VALUES "), width, &params)?;
    }
    Ok(())
}

/// Copies every table of `from` into `to`, which must hold no keys, officers or audit records
/// (its schema's own row of `revocation` is replaced).
pub fn copy(from: &Tx<'_>, to: &Tx<'_>) -> Result<Copied> {
    let mut copied = Vec::new();
    for (table, columns, order) in TABLES {
        let rows = from.0.query_dynamic(&format!("SELECT {columns} FROM {table} ORDER BY {order}"), &[])?;
        if *table == "revocation" {
            to.0.execute("DELETE FROM revocation", &[])?;
        }
        insert(to, table, columns, &rows)?;
        copied.push((*table, rows.len() as u64));
    }
    let (mut after, mut records) = (i64::MIN, 0u64);
    loop {
        let page =
            from.0.query_dynamic(&format!("SELECT {AUDIT} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"), &[after.into(), AUDIT_PAGE.into()])?;
        let Some(last) = page.last() else { break };
        after = last.int(0)?;
        insert(to, "audit", AUDIT, &page)?;
        records += page.len() as u64;
    }
    copied.push(("audit", records));
    to.0.after_copy()?;
    Ok(copied)
}

/// Whether a store holds anything a migration would overwrite.
pub fn is_empty(tx: &Tx<'_>) -> Result<bool> {
    for table in ["keys", "officers", "principals", "audit"] {
        let rows = tx.0.query_dynamic(&format!("SELECT COUNT(*) FROM {table}"), &[])?;
        if rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0) > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}
