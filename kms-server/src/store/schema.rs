//! Schema and migrations: SQLite's, versioned with its `user_version`, and PostgreSQL's, versioned
//! in a one-row table. The two describe the same tables and columns in each engine's types
//! (every integer 64-bit, bytes as BLOB or BYTEA), so that `Tx`'s queries run on both.
//!
//! Each migration runs once, in a transaction that also records the new version. A database
//! newer than this build is refused rather than guessed at. A new migration is added to both
//! lists.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: keys, versions, aliases, intents, audit.
    "CREATE TABLE keys (
        key_id               TEXT PRIMARY KEY,
        description          TEXT NOT NULL,
        state                TEXT NOT NULL,
        compromised          INTEGER NOT NULL,
        created_at           INTEGER NOT NULL,
        rotation_period_secs INTEGER NOT NULL,
        next_rotation_at     INTEGER,
        destruction_at       INTEGER,
        primary_version      INTEGER NOT NULL
    );
    CREATE TABLE key_versions (
        key_id         TEXT NOT NULL REFERENCES keys (key_id),
        version        INTEGER NOT NULL,
        state          TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        reserved       INTEGER NOT NULL,
        destruction_at INTEGER,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE aliases (
        alias      TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL REFERENCES keys (key_id),
        created_at INTEGER NOT NULL
    );
    CREATE TABLE intents (
        id         INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        version    INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY,
        time        INTEGER NOT NULL,
        request_id  TEXT NOT NULL,
        principal   TEXT NOT NULL,
        operation   TEXT NOT NULL,
        key_id      TEXT,
        key_version INTEGER,
        context     TEXT,
        outcome     TEXT NOT NULL,
        status      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        hash        BLOB NOT NULL
    );",
    // 2: workload principals and grants.
    "CREATE TABLE principals (
        name       TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE grants (
        grant_id              TEXT PRIMARY KEY,
        principal             TEXT NOT NULL REFERENCES principals (name),
        key_id                TEXT NOT NULL REFERENCES keys (key_id),
        operations            TEXT NOT NULL,
        required_context      TEXT NOT NULL,
        required_context_keys TEXT NOT NULL,
        expires_at            INTEGER,
        created_at            INTEGER NOT NULL,
        revoked_at            INTEGER
    );",
    // 3: signed audit checkpoints.
    "CREATE TABLE audit_checkpoints (
        seq  INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        hash BLOB NOT NULL,
        mac  BLOB NOT NULL
    );",
    // 4: officers (argon2id passphrase, sealed TOTP secret) and their sessions.
    "CREATE TABLE officers (
        name            TEXT PRIMARY KEY,
        role            TEXT NOT NULL,
        state           TEXT NOT NULL,
        passphrase_hash TEXT NOT NULL,
        totp_secret     BLOB NOT NULL,
        last_totp_step  INTEGER NOT NULL,
        failed_attempts INTEGER NOT NULL,
        locked_until    INTEGER,
        created_at      INTEGER NOT NULL,
        last_login_at   INTEGER
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        officer    TEXT NOT NULL REFERENCES officers (name),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );",
    // 5: the access review: when principals and grants were last used, and the sign-offs.
    "ALTER TABLE principals ADD COLUMN last_used_at INTEGER;
    ALTER TABLE grants ADD COLUMN last_used_at INTEGER;
    CREATE TABLE review_signoffs (
        id      INTEGER PRIMARY KEY,
        officer TEXT NOT NULL,
        time    INTEGER NOT NULL,
        note    TEXT NOT NULL
    );",
    // 6: the caller context of data-plane calls, in the audit.
    "ALTER TABLE audit ADD COLUMN caller_context TEXT;",
    // 7: the revocation epoch that clients caching data keys watch (one row).
    "CREATE TABLE revocation (epoch INTEGER NOT NULL);
    INSERT INTO revocation (epoch) VALUES (1);",
    // 8: a count of every change to keys, versions, aliases, principals and grants, which each
    // node watches to reload its registry (several nodes over PostgreSQL).
    "ALTER TABLE revocation ADD COLUMN changes INTEGER NOT NULL DEFAULT 0;",
    // 9: AWS external key stores (the XKS facade) and their SigV4 credentials, the secrets
    // sealed in the HSM.
    "CREATE TABLE xks_key_stores (
        name       TEXT PRIMARY KEY,
        uri_prefix TEXT NOT NULL UNIQUE,
        region     TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE xks_credentials (
        access_key_id TEXT PRIMARY KEY,
        key_store     TEXT NOT NULL REFERENCES xks_key_stores (name),
        sealed_secret BLOB NOT NULL,
        created_at    INTEGER NOT NULL
    );",
    // 10: Google Workspace client-side encryption (the CSE facade): its settings (one row) and
    // the issuers whose tokens it trusts, with their key sets.
    "CREATE TABLE cse_settings (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        kacls_url  TEXT NOT NULL,
        key_id     TEXT NOT NULL REFERENCES keys (key_id),
        guests     INTEGER NOT NULL,
        privileged_users TEXT NOT NULL,
        migration_sources TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE cse_issuers (
        iss        TEXT PRIMARY KEY,
        token      TEXT NOT NULL,
        audiences  TEXT NOT NULL,
        jwks       TEXT NOT NULL,
        jwks_url   TEXT,
        updated_at INTEGER NOT NULL
    );",
    // 11: quorum (M-of-N) approvals: the policies, the requests they make of covered calls, and
    // each officer's approval or rejection.
    "CREATE TABLE quorum_policies (
        operation  TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        required   INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (operation, key_id)
    );
    CREATE TABLE approval_requests (
        id         TEXT PRIMARY KEY,
        operation  TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        arguments  TEXT NOT NULL,
        summary    TEXT NOT NULL,
        requester  TEXT NOT NULL,
        reason     TEXT NOT NULL,
        required   INTEGER NOT NULL,
        state      TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        decided_at INTEGER,
        result     TEXT NOT NULL
    );
    CREATE TABLE approval_votes (
        request_id TEXT NOT NULL REFERENCES approval_requests (id),
        officer    TEXT NOT NULL,
        approve    INTEGER NOT NULL,
        time       INTEGER NOT NULL,
        PRIMARY KEY (request_id, officer)
    );",
    // 12: notifications: webhook subscriptions with their delivery state (how far into the
    // audit trail each has delivered), and the officers' severities of event kinds.
    "CREATE TABLE notification_subscriptions (
        id              TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        min_severity    TEXT NOT NULL,
        sealed_secret   BLOB NOT NULL,
        cursor          INTEGER NOT NULL,
        delivered       INTEGER NOT NULL,
        failures        INTEGER NOT NULL,
        next_attempt_at INTEGER NOT NULL,
        last_error      TEXT NOT NULL,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE event_severities (
        kind     TEXT PRIMARY KEY,
        severity TEXT NOT NULL
    );",
    // 13: where each key's material came from (BYOK and bundle imports are 'external').
    "ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'hsm';",
    // 14: the Google Workspace domain that owns the CSE key service (none: not checked).
    "ALTER TABLE cse_settings ADD COLUMN owner_domain TEXT;",
];

pub fn migrate_sqlite(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::TooNew { found: current, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// PostgreSQL's schema. Its version 1 is SQLite's version 7, and each after it SQLite's next.
const POSTGRES: &[&str] = &[
    // 1: everything SQLite's migrations 1 to 7 made.
    "CREATE TABLE keys (
        key_id               TEXT PRIMARY KEY,
        description          TEXT NOT NULL,
        state                TEXT NOT NULL,
        compromised          BIGINT NOT NULL,
        created_at           BIGINT NOT NULL,
        rotation_period_secs BIGINT NOT NULL,
        next_rotation_at     BIGINT,
        destruction_at       BIGINT,
        primary_version      BIGINT NOT NULL
    );
    CREATE TABLE key_versions (
        key_id         TEXT NOT NULL REFERENCES keys (key_id),
        version        BIGINT NOT NULL,
        state          TEXT NOT NULL,
        created_at     BIGINT NOT NULL,
        reserved       BIGINT NOT NULL,
        destruction_at BIGINT,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE aliases (
        alias      TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL REFERENCES keys (key_id),
        created_at BIGINT NOT NULL
    );
    CREATE TABLE intents (
        id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        kind       TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        version    BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE audit (
        seq            BIGINT PRIMARY KEY,
        time           BIGINT NOT NULL,
        request_id     TEXT NOT NULL,
        principal      TEXT NOT NULL,
        operation      TEXT NOT NULL,
        key_id         TEXT,
        key_version    BIGINT,
        context        TEXT,
        outcome        TEXT NOT NULL,
        status         TEXT NOT NULL,
        detail         TEXT NOT NULL,
        hash           BYTEA NOT NULL,
        caller_context TEXT
    );
    CREATE TABLE principals (
        name         TEXT PRIMARY KEY,
        state        TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        last_used_at BIGINT
    );
    CREATE TABLE grants (
        grant_id              TEXT PRIMARY KEY,
        principal             TEXT NOT NULL REFERENCES principals (name),
        key_id                TEXT NOT NULL REFERENCES keys (key_id),
        operations            TEXT NOT NULL,
        required_context      TEXT NOT NULL,
        required_context_keys TEXT NOT NULL,
        expires_at            BIGINT,
        created_at            BIGINT NOT NULL,
        revoked_at            BIGINT,
        last_used_at          BIGINT
    );
    CREATE TABLE audit_checkpoints (
        seq  BIGINT PRIMARY KEY,
        time BIGINT NOT NULL,
        hash BYTEA NOT NULL,
        mac  BYTEA NOT NULL
    );
    CREATE TABLE officers (
        name            TEXT PRIMARY KEY,
        role            TEXT NOT NULL,
        state           TEXT NOT NULL,
        passphrase_hash TEXT NOT NULL,
        totp_secret     BYTEA NOT NULL,
        last_totp_step  BIGINT NOT NULL,
        failed_attempts BIGINT NOT NULL,
        locked_until    BIGINT,
        created_at      BIGINT NOT NULL,
        last_login_at   BIGINT
    );
    CREATE TABLE sessions (
        token_hash BYTEA PRIMARY KEY,
        officer    TEXT NOT NULL REFERENCES officers (name),
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE TABLE review_signoffs (
        id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        officer TEXT NOT NULL,
        time    BIGINT NOT NULL,
        note    TEXT NOT NULL
    );
    CREATE TABLE revocation (epoch BIGINT NOT NULL);
    INSERT INTO revocation (epoch) VALUES (1);",
    // 2: SQLite's 8.
    "ALTER TABLE revocation ADD COLUMN changes BIGINT NOT NULL DEFAULT 0;",
    // 3: SQLite's 9.
    "CREATE TABLE xks_key_stores (
        name       TEXT PRIMARY KEY,
        uri_prefix TEXT NOT NULL UNIQUE,
        region     TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE xks_credentials (
        access_key_id TEXT PRIMARY KEY,
        key_store     TEXT NOT NULL REFERENCES xks_key_stores (name),
        sealed_secret BYTEA NOT NULL,
        created_at    BIGINT NOT NULL
    );",
    // 4: SQLite's 10.
    "CREATE TABLE cse_settings (
        id         BIGINT PRIMARY KEY CHECK (id = 1),
        kacls_url  TEXT NOT NULL,
        key_id     TEXT NOT NULL REFERENCES keys (key_id),
        guests     BIGINT NOT NULL,
        privileged_users TEXT NOT NULL,
        migration_sources TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE cse_issuers (
        iss        TEXT PRIMARY KEY,
        token      TEXT NOT NULL,
        audiences  TEXT NOT NULL,
        jwks       TEXT NOT NULL,
        jwks_url   TEXT,
        updated_at BIGINT NOT NULL
    );",
    // 5: SQLite's 11.
    "CREATE TABLE quorum_policies (
        operation  TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        required   BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (operation, key_id)
    );
    CREATE TABLE approval_requests (
        id         TEXT PRIMARY KEY,
        operation  TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        arguments  TEXT NOT NULL,
        summary    TEXT NOT NULL,
        requester  TEXT NOT NULL,
        reason     TEXT NOT NULL,
        required   BIGINT NOT NULL,
        state      TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        decided_at BIGINT,
        result     TEXT NOT NULL
    );
    CREATE TABLE approval_votes (
        request_id TEXT NOT NULL REFERENCES approval_requests (id),
        officer    TEXT NOT NULL,
        approve    BIGINT NOT NULL,
        time       BIGINT NOT NULL,
        PRIMARY KEY (request_id, officer)
    );",
    // 6: SQLite's 12.
    "CREATE TABLE notification_subscriptions (
        id              TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        min_severity    TEXT NOT NULL,
        sealed_secret   BYTEA NOT NULL,
        cursor          BIGINT NOT NULL,
        delivered       BIGINT NOT NULL,
        failures        BIGINT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        last_error      TEXT NOT NULL,
        created_at      BIGINT NOT NULL
    );
    CREATE TABLE event_severities (
        kind     TEXT PRIMARY KEY,
        severity TEXT NOT NULL
    );",
    // 7: SQLite's 13.
    "ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'hsm';",
    // 8: SQLite's 14.
    "ALTER TABLE cse_settings ADD COLUMN owner_domain TEXT;",
];

/// The advisory lock held while the schema migrates: nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6b6d_735f_6d69_6772; // "kms_migr"

pub(super) fn migrate_postgres(conn: &super::postgres::Conn) -> Result<(), StoreError> {
    conn.simple(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
    let migrated = (|| {
        conn.simple("CREATE TABLE IF NOT EXISTS kms_schema (version BIGINT NOT NULL)")?;
        let current = conn.int("SELECT version FROM kms_schema")?.unwrap_or(0);
        let supported = POSTGRES.len() as i64;
        if current > supported {
            return Err(StoreError::TooNew { found: current, supported });
        }
        for (i, sql) in POSTGRES.iter().enumerate().skip(current as usize) {
            // One transaction for each step, with its new version.
            conn.simple(&format!("BEGIN; {sql}; DELETE FROM kms_schema; INSERT INTO kms_schema (version) VALUES ({}); COMMIT", i + 1))?;
        }
        Ok(())
    })();
    if migrated.is_err() {
        // A step that failed left its transaction open.
        let _ = conn.simple("ROLLBACK");
    }
    conn.simple(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
    migrated
}
