//! Hooks for the end-to-end tests, compiled in only with the `test-hooks` feature.
//!
//! The workspace's test crate turns the feature on, so the binaries `cargo xtask test` and
//! `cargo xtask dev` build have it; a build of the server alone (`cargo build --release -p
//! kms-server`, the Debian package) does not, and there every hook is a constant. The server logs
//! a warning at startup when it was built with them.

/// Whether this build carries the test hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// Seconds added to the clock that audit retention reads, so that a test can see records of
/// "100 days ago" pruned without waiting (`KMS_TEST_RETENTION_CLOCK_OFFSET`). Only retention
/// reads it: sessions, TOTP, grants and destruction windows keep the real clock.
#[cfg(feature = "test-hooks")]
pub fn retention_clock_offset() -> i64 {
    std::env::var("KMS_TEST_RETENTION_CLOCK_OFFSET").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[cfg(not(feature = "test-hooks"))]
pub fn retention_clock_offset() -> i64 {
    0
}
