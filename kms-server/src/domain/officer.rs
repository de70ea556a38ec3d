//! Officers and auditors: roles, passphrases (argon2id) and the TOTP second factor (RFC 6238).
//!
//! Passphrases are stored only as argon2id PHC strings with a fresh random salt and parameters
//! at OWASP's minimum for argon2id (Password Storage Cheat Sheet: m = 19 MiB, t = 2, p = 1).
//! TOTP follows RFC 6238 as authenticator apps implement it: HMAC-SHA-1, 30-second steps,
//! six digits, accepting one step of clock drift either way, and never the same step twice; the
//! codes and base32 secrets are `totp-rs`'s.

use std::fmt;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

/// OWASP's argon2id minimum: 19 MiB of memory (in KiB), 2 iterations, 1 lane.
pub const ARGON2_MEMORY_KIB: u32 = 19_456;
pub const ARGON2_ITERATIONS: u32 = 2;
pub const ARGON2_LANES: u32 = 1;

/// RFC 6238's default time step, and the digits every authenticator app shows.
pub const TOTP_STEP_SECONDS: i64 = 30;
pub const TOTP_DIGITS: u32 = 6;
/// Bytes of a TOTP secret: 160 bits, RFC 4226's recommendation for HMAC-SHA-1.
pub const TOTP_SECRET_LEN: usize = 20;

/// Shortest passphrase accepted (NIST SP 800-63B section 5.1.1.2 asks for at least 8; an
/// officer's passphrase guards every key, so we ask for more).
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// What an officer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Manages keys, grants, principals and officers.
    Officer,
    /// Reads: describe, list, audit read and verify.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Officer => "officer",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "officer" => Some(Role::Officer),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    /// Whether this role may make a call that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == Role::Officer || needed == Role::Auditor
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A passphrase in clear, for the time of one request.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    pub fn new(text: String) -> Self {
        Passphrase(Zeroizing::new(text))
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Refuses passphrases too short to guard keys.
    pub fn acceptable(&self) -> bool {
        self.0.chars().count() >= MIN_PASSPHRASE_CHARS
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

fn argon2() -> Argon2<'static> {
    // The parameters are constants within argon2's bounds, so `new` cannot fail; fall back to
    // the crate's defaults (which are the same OWASP values) rather than panic.
    let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The PHC string of a passphrase: `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
pub fn hash_passphrase(passphrase: &Passphrase) -> Option<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2().hash_password(passphrase.expose_secret().as_bytes(), &salt).ok().map(|h| h.to_string())
}

/// Checks a passphrase against its PHC string (the parameters come from the string).
pub fn verify_passphrase(passphrase: &Passphrase, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| argon2().verify_password(passphrase.expose_secret().as_bytes(), &h).is_ok())
}

/// The TOTP parameters every authenticator app implements (RFC 6238: HMAC-SHA-1, 30-second
/// steps, six digits), one step of drift accepted either way (RFC 6238 section 5.2); `None` for a
/// secret shorter than RFC 4226's 128 bits.
fn totp(secret: &[u8]) -> Option<totp_rs::Totp> {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(TOTP_DIGITS as u8)
        .with_step_duration(TOTP_STEP_SECONDS as u64)
        .with_skew(1)
        .with_secret(secret.to_vec())
        .build()
        .ok()
}

/// Checks a six-digit code at `now`, allowing one step of drift either way. Returns the step it
/// matched, which must be later than `last_used` (a code is good once).
pub fn verify_totp(secret: &[u8], code: &str, now: i64, last_used: u64) -> Option<u64> {
    if code.len() != TOTP_DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = totp(secret)?.check(code, u64::try_from(now).ok()?)?;
    (step > last_used).then_some(step)
}

/// RFC 4648 base32 without padding, as `otpauth://` URIs carry secrets.
pub fn base32(bytes: &[u8]) -> String {
    totp_rs::Secret::from(bytes.to_vec()).to_base32()
}

/// Decodes RFC 4648 base32 without padding, as `base32` writes it.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    totp_rs::Secret::try_from_base32(text).ok().map(|s| s.as_bytes().to_vec())
}

/// The enrolment URI an authenticator app scans (Google Authenticator's key URI format).
pub fn otpauth_uri(officer: &str, secret: &[u8]) -> String {
    let label: String = officer
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect();
    format!("otpauth://totp/KMS:{label}?secret={}&issuer=KMS&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP_SECONDS}", base32(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, the SHA-1 rows (8 digits there; the last six are ours), each
    /// accepted at its time as the step that time falls in.
    #[test]
    fn rfc_6238_vectors() {
        let secret = b"12345678901234567890";
        for (time, eight) in [
            (59i64, 94287082u32),
            (1_111_111_109, 7081804),
            (1_111_111_111, 14050471),
            (1_234_567_890, 89005924),
            (2_000_000_000, 69279037),
            (20_000_000_000, 65353130),
        ] {
            let code = format!("{:06}", eight % 1_000_000);
            assert_eq!(verify_totp(secret, &code, time, 0), Some((time / 30) as u64), "T = {time}");
        }
    }

    fn code_at(secret: &[u8], time: i64) -> String {
        totp(secret).unwrap().generate(time as u64).to_string()
    }

    #[test]
    fn codes_are_good_once_within_one_step_of_drift() {
        let secret = [7u8; 20];
        let now = 1_800_000_000;
        let code = code_at(&secret, now);
        let step = verify_totp(&secret, &code, now, 0).unwrap();
        assert_eq!(verify_totp(&secret, &code, now, step), None, "replayed");
        let late = code_at(&secret, now - 30);
        assert!(verify_totp(&secret, &late, now, 0).is_some(), "one step late");
        let stale = code_at(&secret, now - 60);
        assert_eq!(verify_totp(&secret, &stale, now, 0), None, "two steps late");
        assert_eq!(verify_totp(&[7u8; 15], &code, now, 0), None, "a secret under 128 bits");
        for bad in ["", "12345", "1234567", "12345a"] {
            assert_eq!(verify_totp(&secret, bad, now, 0), None);
        }
    }

    #[test]
    fn passphrases_are_argon2id_phc_strings_with_owasp_parameters() {
        let p = Passphrase::new("correct horse battery staple".into());
        let phc = hash_passphrase(&p).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_passphrase(&p, &phc));
        assert!(!verify_passphrase(&Passphrase::new("wrong horse battery staple".into()), &phc));
        assert_ne!(hash_passphrase(&p).unwrap(), phc, "a fresh salt every time");
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
        assert!(!Passphrase::new("short".into()).acceptable());
    }

    #[test]
    fn base32_round_trips_and_matches_rfc_4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32_decode("MZXW6YTBOI").unwrap(), b"foobar");
        let secret = [0xA5u8; 20];
        assert_eq!(base32_decode(&base32(&secret)).unwrap(), secret);
        assert!(otpauth_uri("ana lyst", &secret).starts_with("otpauth://totp/KMS:ana%20lyst?secret="));
    }

    #[test]
    fn roles() {
        assert!(Role::Officer.allows(Role::Officer) && Role::Officer.allows(Role::Auditor));
        assert!(Role::Auditor.allows(Role::Auditor) && !Role::Auditor.allows(Role::Officer));
    }
}
