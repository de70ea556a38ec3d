//! The wall clock, in the unit every record of the service uses: whole seconds since the Unix
//! epoch. A module of its own, below everything that reads it (the service, the audit writer,
//! the store), so that none of them imports another for the time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 on a clock set before it).
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
