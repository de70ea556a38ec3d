//! Hooks for the end-to-end tests, compiled in only with the `test-hooks` feature.
//!
//! No crate of the workspace turns the feature on, so no workspace build (`cargo build
//! --workspace`, `--release`, `cargo xtask dev`, the Debian package) has it, and there every hook
//! is a constant. The end-to-end harness builds a binary of its own with them,
//! `kms-server-test-hooks` (`cargo build -p kms-server --features test-hooks --bin
//! kms-server-test-hooks`, which `cargo xtask test` runs), and that binary refuses to start
//! unless the harness started it ([`HARNESS`]). Its `--version` and its first log line say what
//! it is.

/// Whether this build carries the test hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// The variable the end-to-end harness sets on every process it starts; a build with the hooks
/// refuses to run without it, so that it cannot be deployed by mistake.
pub const HARNESS: &str = "KMS_TEST_HARNESS";

/// In a build with the hooks, refuses to go on unless the end-to-end harness started this
/// process; nothing in a build without them.
pub fn refuse_outside_the_harness() -> anyhow::Result<()> {
    if ENABLED && std::env::var_os(HARNESS).is_none_or(|v| v != "1") {
        anyhow::bail!(
            "this kms-server was built with the end-to-end test hooks (its storage, clocks and HSM calls can be moved by environment variables) \
             and runs only under the test harness ({HARNESS}=1); build kms-server without --features test-hooks"
        );
    }
    Ok(())
}

/// Seconds added to the clock that audit retention reads, so that a test can see records of
/// "100 days ago" pruned without waiting (`KMS_TEST_RETENTION_CLOCK_OFFSET`). Only retention
/// reads it: sessions, TOTP, grants and destruction windows keep the real clock.
#[cfg(feature = "test-hooks")]
pub fn retention_clock_offset() -> i64 {
    clock_offset("KMS_TEST_RETENTION_CLOCK_OFFSET")
}

/// Seconds added to the clock that the destruction and rotation sweep reads, so that a test sees
/// a version destroyed while the server runs, its session copy with it
/// (`KMS_TEST_SWEEP_CLOCK_OFFSET`); expiries (approval requests, import parameters) read it too.
/// Scheduling keeps the real clock.
#[cfg(feature = "test-hooks")]
pub fn sweep_clock_offset() -> i64 {
    clock_offset("KMS_TEST_SWEEP_CLOCK_OFFSET")
}

#[cfg(feature = "test-hooks")]
fn clock_offset(variable: &str) -> i64 {
    std::env::var(variable).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

// Without the hooks, neither the clocks nor the names of their variables are in the binary.
#[cfg(not(feature = "test-hooks"))]
pub fn retention_clock_offset() -> i64 {
    0
}

#[cfg(not(feature = "test-hooks"))]
pub fn sweep_clock_offset() -> i64 {
    0
}

/// How often the session copies' idle pass runs: `default`, or `KMS_TEST_SESSION_COPY_IDLE_MS`
/// so that a test sees an unused copy evicted and destroyed within seconds.
#[cfg(feature = "test-hooks")]
pub fn session_copy_idle_pass(default: std::time::Duration) -> std::time::Duration {
    std::env::var("KMS_TEST_SESSION_COPY_IDLE_MS").ok().and_then(|v| v.parse().ok()).map_or(default, std::time::Duration::from_millis)
}

#[cfg(not(feature = "test-hooks"))]
pub fn session_copy_idle_pass(default: std::time::Duration) -> std::time::Duration {
    default
}

/// A storage fault the disk-full and read-only tests turn on and off while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// The database may not grow (`PRAGMA max_page_count` at its size): SQLite answers
    /// `SQLITE_FULL`, as it does when the disk is full.
    DiskFull,
    /// The connection may not write (`PRAGMA query_only`): SQLite answers `SQLITE_READONLY`, as
    /// for a database file or file system made read-only.
    ReadOnly,
}

/// The storage fault the file named by `KMS_TEST_STORE_FAULTS` holds now (`disk-full` or
/// `read-only`; no file: none). Read before every write transaction.
#[cfg(feature = "test-hooks")]
pub fn store_fault() -> Option<StoreFault> {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| std::env::var_os("KMS_TEST_STORE_FAULTS").filter(|p| !p.is_empty()).map(Into::into)).as_ref()?;
    match std::fs::read_to_string(path).ok()?.trim() {
        "disk-full" => Some(StoreFault::DiskFull),
        "read-only" => Some(StoreFault::ReadOnly),
        _ => None,
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn store_fault() -> Option<StoreFault> {
    None
}

/// A step of a multi-step operation where the crash test may kill the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The intent row is committed; the HSM has not been called.
    AfterIntent,
    /// The HSM call is done; the database does not show it yet.
    AfterHsm,
    /// The change and its audit record are committed.
    AfterCommit,
    /// Everything is done and audited; the caller has no answer yet.
    BeforeReply,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::AfterIntent => "after_intent",
            Step::AfterHsm => "after_hsm",
            Step::AfterCommit => "after_commit",
            Step::BeforeReply => "before_reply",
        }
    }
}

/// Every crash point, as (operation, step): the one list the crash-recovery test (TESTPLAN R2)
/// walks, one point per run. Operations that touch the HSM have all four steps; state-only
/// changes have the two after their single transaction.
pub const CRASH_POINTS: &[(&str, Step)] = &[
    ("CreateKey", Step::AfterIntent),
    ("CreateKey", Step::AfterHsm),
    ("CreateKey", Step::AfterCommit),
    ("CreateKey", Step::BeforeReply),
    ("RotateKey", Step::AfterIntent),
    ("RotateKey", Step::AfterHsm),
    ("RotateKey", Step::AfterCommit),
    ("RotateKey", Step::BeforeReply),
    ("DisableKey", Step::AfterCommit),
    ("DisableKey", Step::BeforeReply),
    ("ScheduleKeyDestruction", Step::AfterCommit),
    ("ScheduleKeyDestruction", Step::BeforeReply),
    ("DestroyKey", Step::AfterIntent),
    ("DestroyKey", Step::AfterHsm),
    ("DestroyKey", Step::AfterCommit),
    ("CreateBackup", Step::AfterHsm),
    ("CreateBackup", Step::AfterCommit),
    ("CreateBackup", Step::BeforeReply),
    ("Restore", Step::AfterIntent),
    ("Restore", Step::AfterHsm),
    ("Restore", Step::AfterCommit),
];

/// Aborts the process (no unwinding, no cleanup: like `kill -9`) when `KMS_TEST_CRASH_AT` names
/// this point as `Operation/step`, e.g. `RotateKey/after_hsm`; waits there for three seconds
/// when `KMS_TEST_PAUSE_AT` names it (a node in the middle of a change, for the cluster tests). A
/// constant no-op without the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub fn crash_point(operation: &str, step: Step) {
    static AT: std::sync::OnceLock<(Option<String>, Option<String>)> = std::sync::OnceLock::new();
    let (crash, pause) = AT.get_or_init(|| (std::env::var("KMS_TEST_CRASH_AT").ok(), std::env::var("KMS_TEST_PAUSE_AT").ok()));
    let here = |at: &Option<String>| at.as_deref().is_some_and(|at| at.split_once('/') == Some((operation, step.as_str())));
    if here(crash) {
        eprintln!("test hook: crashing at {operation}/{}", step.as_str());
        std::process::abort();
    }
    if here(pause) {
        eprintln!("test hook: pausing at {operation}/{}", step.as_str());
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_point(_operation: &str, _step: Step) {}
