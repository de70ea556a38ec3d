//! The HSM, seen through a narrow trait in domain words.
//!
//! One implementation, [`pkcs11::Pkcs11Hsm`], talks to any PKCS#11 module (SoftHSM2 in
//! development and tests). The trait is synchronous: callers run it on the data workers or on
//! tokio's blocking pool, never on an async worker thread. Fault injection for tests happens *below* this trait, just
//! before each real PKCS#11 call (`faults.rs`, `test-hooks` builds only), so that the code under
//! test is the code that runs in production.

mod copies;
#[cfg(feature = "test-hooks")]
mod faults;
pub mod pkcs11;
mod raw;
pub mod templates;

use std::fmt;

use cryptoki::error::RvError;

use crate::domain::blob::Iv;
use crate::secret::SecretBytes;
pub use templates::{ObjectName, ServiceKey, Wrapped};

/// A handle to a key object, resolved once (at startup or creation) and cached: the hot path
/// never searches the token (`C_FindObjects` is linear in the number of objects).
///
/// An object handle carries the *generation* of the HSM link it came from. Handles may be
/// renumbered when the login is restored or the library initialised again (SoftHSM2 drops
/// private objects' handles at logout), so a handle of an older generation is refused as stale
/// rather than used: it could name another key now. The service's own keys are named, not
/// numbered: the HSM layer finds their objects itself, once per generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHandle {
    Object { object: cryptoki::object::ObjectHandle, generation: u64 },
    Service(ServiceKey),
}

/// What went wrong in the HSM, in the terms the service acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HsmError {
    /// The device, the token or the session failed or went away: the operation did not happen
    /// and may be retried later.
    Unavailable { function: &'static str, code: RvError },
    /// A ciphertext failed its authentication check. SoftHSM2 reports a forged tag as
    /// `CKR_GENERAL_ERROR`, like a device fault (SOFTHSM-NOTES.md); the caller sees one uniform
    /// error either way.
    DecryptFailed,
    /// The HSM refused the request (a template or mechanism it does not support): a
    /// configuration or programming error, not a transient fault.
    Refused { function: &'static str, code: RvError },
    /// The module could not be loaded, the token was not found, or the login failed.
    Setup { reason: String },
    /// The HSM refused a PIN (CKR_PIN_INCORRECT). Never retried: repeated wrong PINs lock tokens.
    PinIncorrect { who: &'static str },
}

impl fmt::Display for HsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HsmError::Unavailable { function, code } => {
                write!(f, "HSM unavailable: {function} returned {code:?}")
            }
            HsmError::DecryptFailed => f.write_str("ciphertext authentication failed"),
            HsmError::Refused { function, code } => {
                write!(f, "HSM refused the request: {function} returned {code:?}")
            }
            HsmError::Setup { reason } => write!(f, "HSM setup failed: {reason}"),
            HsmError::PinIncorrect { who } => write!(f, "the HSM refused the {who} PIN (CKR_PIN_INCORRECT)"),
        }
    }
}

impl std::error::Error for HsmError {}

impl HsmError {
    /// An operation whose output the service checked and found wrong (a decryption that does
    /// not give back what was encrypted): reported as the device failing, so that the caller
    /// retries.
    pub fn wrong_output(function: &'static str) -> HsmError {
        HsmError::Unavailable { function, code: RvError::GeneralError }
    }

    /// Whether the HSM refused an object handle: after a repaired link (a restored login, a
    /// re-initialised library) handles are renumbered, and the service must look its key objects
    /// up again (`Kms::repair_after`).
    pub fn stale_handle(&self) -> bool {
        matches!(self, HsmError::Unavailable { code: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, .. })
    }
}

/// How many failed calls `Hsm::recent_failures` keeps.
pub const RECENT_FAILURES: usize = 5;

/// Facts about the token, for status reports.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial_number: String,
}

/// A failed HSM call, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCall {
    /// Unix seconds.
    pub at: i64,
    pub function: &'static str,
    pub code: String,
}

/// The halves of the backup key pair found on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupKey {
    /// The trusted public key that wraps.
    pub wrap: Option<KeyHandle>,
    /// The private key that unwraps.
    pub unwrap: Option<KeyHandle>,
}

/// The session pool's use and the session copies it holds, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionUse {
    /// Sessions open (in use or idle).
    pub open: usize,
    /// Sessions checked out by a caller now.
    pub in_use: usize,
    /// The most the pool opens.
    pub size: usize,
    /// Session copies of key versions ready for use (`copies.rs`); `None` when they are off.
    pub copies: Option<usize>,
}

/// The operations the service needs from an HSM.
pub trait Hsm: Send + Sync {
    /// Creates the token object of a new key version (template in `templates::key_version`).
    fn generate_key(&self, name: &ObjectName) -> Result<KeyHandle, HsmError>;

    /// Every key object on the token that this service created (startup reconciliation only).
    fn find_keys(&self) -> Result<Vec<(ObjectName, KeyHandle)>, HsmError>;

    /// AES-GCM encryption inside the HSM; returns the ciphertext followed by the 16-byte tag.
    fn encrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError>;

    /// AES-GCM decryption inside the HSM of a ciphertext followed by its tag.
    fn decrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], ciphertext: &[u8]) -> Result<SecretBytes, HsmError>;

    /// Fills `out` from the HSM's random generator.
    fn random(&self, out: &mut [u8]) -> Result<(), HsmError>;

    /// Destroys a key object (`C_DestroyObject`), and its session copies first.
    fn destroy(&self, key: KeyHandle) -> Result<(), HsmError>;

    /// Destroys this process's session copies of a key object and makes no more: the object
    /// itself was destroyed, or its key compromised, by another node.
    fn drop_copies(&self, key: KeyHandle) -> Result<(), HsmError>;

    fn token_info(&self) -> Result<TokenInfo, HsmError>;

    fn sessions(&self) -> SessionUse;

    /// The most recent failed calls, newest first (at most `RECENT_FAILURES`).
    fn recent_failures(&self) -> Vec<FailedCall>;

    /// The link's generation: it rises each time the login is restored or the library
    /// initialised again, and every object handle of an older one is then stale.
    fn generation(&self) -> u64;

    /// One of the service's own keys, made on first use (startup only). The handle names the
    /// key, so it stays good across re-logins and re-initialisations.
    fn service_key(&self, which: ServiceKey) -> Result<KeyHandle, HsmError>;

    /// A service key if the token holds it, without making it (backup and restore only).
    fn find_service_key(&self, which: ServiceKey) -> Result<Option<KeyHandle>, HsmError>;

    /// The backup key pair's halves the token holds (`templates::backup_key_pair`).
    fn backup_key(&self) -> Result<BackupKey, HsmError>;

    /// Whether the token holds a private backup key without its `CKA_UNWRAP_TEMPLATE`
    /// (`templates::backup_unwrap_template`): a pair made before that was set lets the user PIN
    /// unwrap a readable copy of any key, and must be made again.
    fn backup_key_unguarded(&self) -> Result<bool, HsmError>;

    /// Wraps `key` under the trusted public backup key (RSA-OAEP). The HSM refuses any object
    /// that is not extractable under a trusted key.
    fn wrap(&self, wrapping_key: KeyHandle, key: KeyHandle) -> Result<Vec<u8>, HsmError>;

    /// Unwraps a backup's object with the private backup key, as a token object or a session
    /// object.
    fn unwrap(&self, unwrapping_key: KeyHandle, wrapped: &[u8], what: Wrapped, token: bool) -> Result<KeyHandle, HsmError>;

    /// HMAC-SHA-256 inside the HSM.
    fn mac(&self, key: KeyHandle, data: &[u8]) -> Result<Vec<u8>, HsmError>;

    /// Checks an HMAC-SHA-256 inside the HSM; `Ok(false)` for a wrong MAC.
    fn verify_mac(&self, key: KeyHandle, data: &[u8], mac: &[u8]) -> Result<bool, HsmError>;

    /// The protection attributes of a key object.
    fn key_protection(&self, key: KeyHandle) -> Result<KeyProtection, HsmError>;

    /// The public halves of the service's signing key pairs (`templates::signing_key_pair`),
    /// the pair made first if the token has none: what verifies the tokens the service signs.
    fn signing_keys(&self) -> Result<Vec<RsaPublicKey>, HsmError>;

    /// Signs `data` with RSASSA-PKCS1-v1_5 over SHA-256 (JWT's RS256), inside the HSM, with the
    /// private half of the signing key pair whose public half is `key`.
    fn sign(&self, key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>, HsmError>;
}

/// What the token says of a key object's protection (PKCS#11's attributes), for the evidence
/// report: whether its value can ever be read, and how it may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyProtection {
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub wrap_with_trusted: bool,
    /// Generated on the token (not imported).
    pub local: bool,
}

/// An RSA public key, as the token holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
}
