//! The AES-GCM usage budget of a key version.
//!
//! NIST SP 800-38D section 8.3: with random 96-bit IVs, "the total number of invocations of the
//! authenticated encryption function shall not exceed 2^32" for one key, which keeps the chance of
//! an IV collision below 2^-32. We stay well inside it: a key rotates automatically when its
//! primary version reaches `rotation_threshold` encryptions, and a version refuses to encrypt past
//! `encryption_limit`.
//!
//! Counts are *reserved* in blocks and persisted before the IVs they cover are used, so the
//! persisted count is always at least the number of encryptions performed, even across a crash
//! (the unused rest of a block is simply lost), and there is no database write per request.

use std::fmt;

/// 2^30: the default primary-version count that triggers an automatic rotation, a quarter of
/// the NIST bound so that a busy key has a long margin before the hard limit.
pub const DEFAULT_ROTATION_THRESHOLD: u64 = 1 << 30;

/// 0.9 · 2^32 = 3,865,470,566 (rounded down): the default hard limit, 10% under NIST SP 800-38D's
/// 2^32 invocations per key with random IVs.
pub const DEFAULT_ENCRYPTION_LIMIT: u64 = 3_865_470_566;

/// The NIST SP 800-38D bound itself; no configuration may exceed it.
pub const NIST_LIMIT: u64 = 1 << 32;

/// How many encryptions one database write reserves. 4,096 keeps the write rate under ten per
/// second at 40,000 encryptions per second, and loses at most 4,095 counts per crash.
pub const DEFAULT_RESERVATION_BLOCK: u64 = 4096;

/// The usage limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    pub rotation_threshold: u64,
    pub encryption_limit: u64,
    pub reservation_block: u64,
}

impl Default for UsageLimits {
    fn default() -> Self {
        UsageLimits {
            rotation_threshold: DEFAULT_ROTATION_THRESHOLD,
            encryption_limit: DEFAULT_ENCRYPTION_LIMIT,
            reservation_block: DEFAULT_RESERVATION_BLOCK,
        }
    }
}

/// Why a set of limits was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsError(pub &'static str);

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl UsageLimits {
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.encryption_limit == 0 || self.encryption_limit > DEFAULT_ENCRYPTION_LIMIT {
            return Err(LimitsError("encryption_limit must be between 1 and 3865470566 (0.9 * 2^32, NIST SP 800-38D)"));
        }
        if self.rotation_threshold == 0 || self.rotation_threshold > self.encryption_limit {
            return Err(LimitsError("rotation_threshold must be between 1 and encryption_limit"));
        }
        if self.reservation_block == 0 {
            return Err(LimitsError("usage_reservation_block must be at least 1"));
        }
        Ok(())
    }

    /// The end of the next block to reserve after `reserved` (the store's count): one block
    /// more, never beyond the limit. `None` when the limit is reached.
    pub fn next_block(&self, reserved: u64) -> Option<u64> {
        (reserved < self.encryption_limit).then(|| reserved.saturating_add(self.reservation_block).min(self.encryption_limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_numbers() {
        let d = UsageLimits::default();
        assert_eq!(d.rotation_threshold, 1_073_741_824);
        assert_eq!(d.encryption_limit, (NIST_LIMIT as f64 * 0.9) as u64);
        assert!(d.validate().is_ok());
    }

    #[test]
    fn reservations_grow_by_blocks_and_stop_at_the_limit() {
        let l = UsageLimits { rotation_threshold: 800, encryption_limit: 1000, reservation_block: 300 };
        assert_eq!(l.next_block(0), Some(300));
        assert_eq!(l.next_block(900), Some(1000));
        assert_eq!(l.next_block(1000), None);
    }

    #[test]
    fn unsafe_limits_are_refused() {
        let l = UsageLimits { encryption_limit: NIST_LIMIT, ..UsageLimits::default() };
        assert!(l.validate().is_err());
        let l = UsageLimits { rotation_threshold: 10, encryption_limit: 5, reservation_block: 1 };
        assert!(l.validate().is_err());
    }
}
