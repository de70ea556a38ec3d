//! The key state machine (NIST SP 800-57 part 1 section 7, KMIP 2.1 section 3.22 "State").
//!
//! ```text
//!            DisableKey                 MarkKeyCompromised
//!  Enabled ─────────────► Disabled ───────────────────────► Compromised
//!     ▲  ◄───────────────    │                                   │
//!     │     EnableKey        │ ScheduleKeyDestruction            │
//!     │                      ▼                                   ▼
//!     │               PendingDestruction ◄───────────────────────┘
//!     │                 │          │ CancelKeyDestruction → Disabled (or Compromised)
//!     │                 ▼ (window ends, sweeper)
//!     │              Destroyed (tombstone)
//! ```
//! Enabled can also go straight to Compromised or PendingDestruction. Versions have their own,
//! smaller machine: Enabled ⇄ Disabled → PendingDestruction → Destroyed, and the primary version
//! can be neither disabled nor destroyed alone.

use std::fmt;

/// The state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Enabled,
    Disabled,
    Compromised,
    PendingDestruction,
    Destroyed,
}

impl KeyState {
    pub const ALL: [KeyState; 5] = [KeyState::Enabled, KeyState::Disabled, KeyState::Compromised, KeyState::PendingDestruction, KeyState::Destroyed];

    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::Compromised => "Compromised",
            KeyState::PendingDestruction => "PendingDestruction",
            KeyState::Destroyed => "Destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<KeyState> {
        KeyState::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a key's material came from: made in this service's HSM, or brought in (BYOK, a
/// reversibility bundle from another instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyOrigin {
    Hsm,
    External,
}

impl KeyOrigin {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Hsm => "hsm",
            KeyOrigin::External => "external",
        }
    }

    pub fn parse(s: &str) -> Option<KeyOrigin> {
        [KeyOrigin::Hsm, KeyOrigin::External].into_iter().find(|o| o.as_str() == s)
    }
}

/// The state of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionState {
    Enabled,
    Disabled,
    PendingDestruction,
    Destroyed,
}

impl VersionState {
    pub const ALL: [VersionState; 4] = [VersionState::Enabled, VersionState::Disabled, VersionState::PendingDestruction, VersionState::Destroyed];

    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Enabled => "Enabled",
            VersionState::Disabled => "Disabled",
            VersionState::PendingDestruction => "PendingDestruction",
            VersionState::Destroyed => "Destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<VersionState> {
        VersionState::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the version's HSM object should still exist.
    pub fn has_material(self) -> bool {
        self != VersionState::Destroyed
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key-level lifecycle operation requested by an officer (or the sweeper, for `Destroy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTransition {
    Enable,
    Disable,
    Compromise,
    ScheduleDestruction,
    CancelDestruction,
    Destroy,
    Rotate,
}

/// A transition that the key's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IllegalTransition {
    pub transition: KeyTransition,
    pub state: KeyState,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.transition {
            KeyTransition::Enable => "enabled",
            KeyTransition::Disable => "disabled",
            KeyTransition::Compromise => "marked compromised",
            KeyTransition::ScheduleDestruction => "scheduled for destruction",
            KeyTransition::CancelDestruction => "have its destruction cancelled",
            KeyTransition::Destroy => "destroyed",
            KeyTransition::Rotate => "rotated",
        };
        write!(f, "a key in state {} cannot be {what}", self.state)
    }
}

/// The state a key moves to. `was_compromised` tells where a cancelled destruction returns to,
/// so that cancelling cannot launder a compromised key back into a usable one.
pub fn next_key_state(state: KeyState, transition: KeyTransition, was_compromised: bool) -> Result<KeyState, IllegalTransition> {
    use KeyState::*;
    use KeyTransition as T;
    let next = match (transition, state) {
        // Enabling an enabled key and disabling a disabled one change nothing, as in AWS KMS.
        (T::Enable, Enabled | Disabled) => Enabled,
        (T::Disable, Enabled | Disabled) => Disabled,
        (T::Compromise, Enabled | Disabled) => Compromised,
        (T::ScheduleDestruction, Enabled | Disabled | Compromised) => PendingDestruction,
        (T::CancelDestruction, PendingDestruction) if was_compromised => Compromised,
        (T::CancelDestruction, PendingDestruction) => Disabled,
        (T::Destroy, PendingDestruction) => Destroyed,
        (T::Rotate, Enabled) => Enabled,
        _ => return Err(IllegalTransition { transition, state }),
    };
    Ok(next)
}

/// A version-level operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionTransition {
    Enable,
    Disable,
    ScheduleDestruction,
    CancelDestruction,
    Destroy,
}

/// Why a version transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionTransitionError {
    Illegal { transition: VersionTransition, state: VersionState },
    Primary,
    KeyState(KeyState),
}

impl fmt::Display for VersionTransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionTransitionError::Illegal { transition, state } => {
                write!(
                    f,
                    "a key version in state {state} cannot be {}",
                    match transition {
                        VersionTransition::Enable => "enabled",
                        VersionTransition::Disable => "disabled",
                        VersionTransition::ScheduleDestruction => "scheduled for destruction",
                        VersionTransition::CancelDestruction => "have its destruction cancelled",
                        VersionTransition::Destroy => "destroyed",
                    }
                )
            }
            VersionTransitionError::Primary => f.write_str("the primary version cannot be disabled or destroyed; rotate the key first"),
            VersionTransitionError::KeyState(s) => {
                write!(f, "the versions of a key in state {s} cannot be changed")
            }
        }
    }
}

pub fn next_version_state(
    key_state: KeyState,
    state: VersionState,
    is_primary: bool,
    transition: VersionTransition,
) -> Result<VersionState, VersionTransitionError> {
    use VersionState::*;
    use VersionTransition as T;
    if matches!(key_state, KeyState::PendingDestruction | KeyState::Destroyed) && transition != T::Destroy {
        return Err(VersionTransitionError::KeyState(key_state));
    }
    if is_primary && matches!(transition, T::Disable | T::ScheduleDestruction) {
        return Err(VersionTransitionError::Primary);
    }
    let next = match (transition, state) {
        (T::Enable, Enabled | Disabled) => Enabled,
        (T::Disable, Enabled | Disabled) => Disabled,
        (T::ScheduleDestruction, Enabled | Disabled) => PendingDestruction,
        (T::CancelDestruction, PendingDestruction) => Disabled,
        (T::Destroy, PendingDestruction) => Destroyed,
        _ => return Err(VersionTransitionError::Illegal { transition, state }),
    };
    Ok(next)
}

/// The pending-destruction window, in days: 7 to 30, default 30 — the AWS KMS convention for
/// `ScheduleKeyDeletion` (`PendingWindowInDays`), also the range the brief asks for.
pub const MIN_PENDING_DAYS: u32 = 7;
pub const MAX_PENDING_DAYS: u32 = 30;
pub const DEFAULT_PENDING_DAYS: u32 = 30;

/// What a data-plane operation needs from a key and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A new encryption under the primary version (GenerateDataKey, Encrypt, ReEncrypt's target).
    Encrypt,
    /// Decrypt of a blob the caller will receive in clear.
    Decrypt,
    /// Decrypt of a blob whose plaintext stays inside the service, to be re-encrypted elsewhere:
    /// the only use a Compromised key still allows.
    DecryptForReEncrypt,
}

/// Whether a key in `state` allows `use_`; `Err` carries the state to name in the error.
pub fn key_allows(state: KeyState, use_: Use) -> Result<(), KeyState> {
    match (state, use_) {
        (KeyState::Enabled, _) => Ok(()),
        (KeyState::Compromised, Use::DecryptForReEncrypt) => Ok(()),
        _ => Err(state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyState::*;
    use KeyTransition as T;

    #[test]
    fn key_transition_table() {
        // Every (transition, state) pair, with the expected outcome; None = illegal.
        let table: &[(KeyTransition, [Option<KeyState>; 5])] = &[
            //                          Enabled, Disabled, Compromised, PendingDestruction, Destroyed
            (T::Enable, [Some(Enabled), Some(Enabled), None, None, None]),
            (T::Disable, [Some(Disabled), Some(Disabled), None, None, None]),
            (T::Compromise, [Some(Compromised), Some(Compromised), None, None, None]),
            (T::ScheduleDestruction, [Some(PendingDestruction), Some(PendingDestruction), Some(PendingDestruction), None, None]),
            (T::CancelDestruction, [None, None, None, Some(Disabled), None]),
            (T::Destroy, [None, None, None, Some(Destroyed), None]),
            (T::Rotate, [Some(Enabled), None, None, None, None]),
        ];
        for (transition, outcomes) in table {
            for (state, want) in KeyState::ALL.iter().zip(outcomes) {
                let got = next_key_state(*state, *transition, false).ok();
                assert_eq!(got, *want, "{transition:?} from {state}");
            }
        }
    }

    #[test]
    fn cancelling_destruction_keeps_a_compromised_key_compromised() {
        assert_eq!(next_key_state(PendingDestruction, T::CancelDestruction, true), Ok(Compromised));
    }

    #[test]
    fn primary_version_cannot_be_disabled_or_destroyed() {
        for t in [VersionTransition::Disable, VersionTransition::ScheduleDestruction] {
            assert_eq!(next_version_state(Enabled, VersionState::Enabled, true, t), Err(VersionTransitionError::Primary));
        }
        assert_eq!(next_version_state(Enabled, VersionState::Enabled, false, VersionTransition::Disable), Ok(VersionState::Disabled));
        assert_eq!(
            next_version_state(Enabled, VersionState::Destroyed, false, VersionTransition::Enable),
            Err(VersionTransitionError::Illegal { transition: VersionTransition::Enable, state: VersionState::Destroyed })
        );
    }

    #[test]
    fn compromised_keys_only_decrypt_for_reencryption() {
        assert_eq!(key_allows(Compromised, Use::Encrypt), Err(Compromised));
        assert_eq!(key_allows(Compromised, Use::Decrypt), Err(Compromised));
        assert_eq!(key_allows(Compromised, Use::DecryptForReEncrypt), Ok(()));
        for s in [Disabled, PendingDestruction, Destroyed] {
            assert_eq!(key_allows(s, Use::DecryptForReEncrypt), Err(s));
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in KeyState::ALL {
            assert_eq!(KeyState::parse(s.as_str()), Some(s));
        }
        for s in VersionState::ALL {
            assert_eq!(VersionState::parse(s.as_str()), Some(s));
        }
    }
}
