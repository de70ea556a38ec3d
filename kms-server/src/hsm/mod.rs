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

    /// Whether the HSM refused wrapped material given to `Hsm::import`: wrapped under another
    /// key or changed (SoftHSM2 says CKR_GENERAL_ERROR, the standard CKR_WRAPPED_KEY_INVALID).
    pub fn refused_wrapped_material(&self) -> bool {
        matches!(self, HsmError::Refused { code: RvError::GeneralError | RvError::WrappedKeyInvalid | RvError::WrappedKeyLenRange, .. })
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

    /// Wraps `versions` with RSA-OAEP, inside the HSM, under the customer's public key that the
    /// security officer made trusted (`kms-server export-key`), then destroys that trusted
    /// object: one export per ceremony. `None` when the token holds no such trusted key.
    fn export(&self, customer: &RsaPublicKey, versions: &[KeyHandle]) -> Result<Option<Vec<Vec<u8>>>, HsmError>;

    /// Makes an import key pair labelled `label` (`templates::import_key_pair`) and returns its
    /// public half.
    fn new_import_key(&self, label: &str) -> Result<RsaPublicKey, HsmError>;

    /// The labels of the import key pairs on the token.
    fn import_keys(&self) -> Result<Vec<String>, HsmError>;

    /// Whether the token holds the private half of the import key pair labelled `label`.
    fn has_import_key(&self, label: &str) -> Result<bool, HsmError>;

    /// Destroys both halves of the import key pair labelled `label`.
    fn destroy_import_key(&self, label: &str) -> Result<(), HsmError>;

    /// Unwraps key versions (each RSA-OAEP under the import key pair labelled `label`) into
    /// token objects (`templates::key_version`). Nothing is left made when one fails. `None`
    /// when the token has no such import key.
    fn import(&self, label: &str, versions: &[(ObjectName, Vec<u8>)]) -> Result<Option<Vec<KeyHandle>>, HsmError>;

    /// Runs `op` with a user's RSA private key (a Gmail user's S/MIME key, handed over wrapped),
    /// inside the HSM: the key goes in as a sensitive, non-extractable session object
    /// (`templates::user_private_key`), serves this one operation and is destroyed.
    fn rsa_private(&self, key: &RsaPrivateKey, op: RsaPrivateOp<'_>) -> Result<SecretBytes, HsmError>;
}

/// An operation with a user's RSA private key (`Hsm::rsa_private`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaPrivateOp<'a> {
    /// RSAES-PKCS1-v1_5 decryption.
    DecryptPkcs1 { ciphertext: &'a [u8] },
    /// RSAES-OAEP decryption with `hash`, and `label`.
    DecryptOaep { hash: OaepHash, label: &'a [u8], ciphertext: &'a [u8] },
    /// RSASSA-PKCS1-v1_5 over a SHA-256 `digest` the caller made.
    SignPkcs1Sha256 { digest: &'a [u8] },
    /// RSASSA-PSS with SHA-256 and MGF1-SHA-256 over a SHA-256 `digest`, salt of `salt` bytes.
    SignPssSha256 { digest: &'a [u8], salt: usize },
}

/// The hashes of RSA-OAEP: the label's, and MGF1's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    Sha1,
    Sha256,
    /// SHA-256 for the label, MGF1 over SHA-1: what Java's `OAEPWithSHA-256AndMGF1Padding`
    /// means by default.
    Sha256Mgf1Sha1,
}

/// A user's RSA private key (PKCS#1 `RSAPrivateKey`), its secret parts wiped when dropped.
pub struct RsaPrivateKey {
    pub public: RsaPublicKey,
    /// The private exponent, the two primes, the two CRT exponents and the coefficient.
    pub(crate) secret: [zeroize::Zeroizing<Vec<u8>>; 6],
}

impl fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaPrivateKey").field("bits", &self.public.bits()).finish_non_exhaustive()
    }
}

impl RsaPrivateKey {
    /// Reads a two-prime PKCS#1 `RSAPrivateKey` (DER) of 2,048 to 4,096 bits.
    pub fn from_pkcs1_der(der: &[u8]) -> Result<RsaPrivateKey, String> {
        let key = RsaPrivateKey::parts(der).ok_or_else(|| "is not a two-prime PKCS#1 RSAPrivateKey".to_string())?;
        match key.public.bits() {
            2048..=4096 => Ok(key),
            bits => Err(format!("is a {bits}-bit RSA key; 2048 to 4096 bits are accepted")),
        }
    }

    /// The integers of a two-prime PKCS#1 `RSAPrivateKey`, all positive, whatever their size.
    fn parts(der: &[u8]) -> Option<RsaPrivateKey> {
        let parsed = yasna::parse_der(der, |r| {
            r.read_sequence(|r| {
                if r.next().read_u8()? != 0 {
                    return Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid));
                }
                let mut int = || match r.next().read_bigint_bytes()? {
                    (bytes, true) => Ok(zeroize::Zeroizing::new(bytes)),
                    (_, false) => Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid)),
                };
                let (modulus, exponent) = (int()?, int()?);
                let secret = [int()?, int()?, int()?, int()?, int()?, int()?];
                Ok((modulus, exponent, secret))
            })
        });
        let (modulus, exponent, secret) = parsed.ok()?;
        let public = RsaPublicKey { modulus: trim(&modulus), exponent: trim(&exponent) };
        let secret = secret.map(|part| zeroize::Zeroizing::new(trim(&part)));
        let empty = secret.iter().any(|part| part.is_empty()) || public.exponent.is_empty() || public.modulus.is_empty();
        (!empty).then_some(RsaPrivateKey { public, secret })
    }

    /// The key, and its PKCS#1 `RSAPrivateKey` (DER), in a PEM `RSA PRIVATE KEY`, a PEM
    /// `PRIVATE KEY` (PKCS#8, unencrypted) or bare DER of either: what `openssl genpkey` and
    /// the tools Gmail S/MIME keys come from write.
    pub fn from_text(text: &[u8]) -> Result<(zeroize::Zeroizing<Vec<u8>>, RsaPrivateKey), String> {
        let der = match x509_parser::pem::parse_x509_pem(text) {
            Ok((_, pem)) if pem.label == "RSA PRIVATE KEY" || pem.label == "PRIVATE KEY" => zeroize::Zeroizing::new(pem.contents),
            Ok((_, pem)) => return Err(format!("holds a {:?}, not an RSA PRIVATE KEY or an unencrypted PRIVATE KEY", pem.label)),
            Err(_) => zeroize::Zeroizing::new(text.to_vec()),
        };
        let pkcs1 = if RsaPrivateKey::parts(&der).is_some() { der } else { RsaPrivateKey::pkcs8_inner(&der)? };
        let key = RsaPrivateKey::from_pkcs1_der(&pkcs1)?;
        Ok((pkcs1, key))
    }

    /// The PKCS#1 key inside a PKCS#8 `PrivateKeyInfo` (DER) for rsaEncryption.
    fn pkcs8_inner(der: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        // PKCS#8 PrivateKeyInfo: version, rsaEncryption, the PKCS#1 key in an OCTET STRING,
        // then optional attributes (and, in version 1, the public key).
        yasna::parse_der(der, |r| {
            r.read_sequence(|r| {
                if r.next().read_u8()? > 1 {
                    return Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid));
                }
                let oid = r.next().read_sequence(|r| {
                    let oid = r.next().read_oid()?;
                    r.read_optional(|r| r.read_null())?;
                    Ok(oid)
                })?;
                if oid != yasna::models::ObjectIdentifier::from_slice(RSA_ENCRYPTION_OID) {
                    return Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid));
                }
                let key = zeroize::Zeroizing::new(r.next().read_bytes()?);
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok(key)
            })
        })
        .map_err(|_| "is not an RSA private key (PEM or DER, PKCS#1 or unencrypted PKCS#8)".to_string())
    }
}

/// A big-endian integer without its leading zeros.
fn trim(b: &[u8]) -> Vec<u8> {
    b.iter().position(|&x| x != 0).map_or_else(Vec::new, |i| b[i..].to_vec())
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

/// An RSA public key, as the token holds it (big-endian integers without leading zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
}

/// rsaEncryption (RFC 8017).
const RSA_ENCRYPTION_OID: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];

impl RsaPublicKey {
    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, what `openssl pkey -pubout` writes)
    /// holding an RSA key of 2,048 to 8,192 bits.
    pub fn from_pem(pem: &str) -> Result<RsaPublicKey, String> {
        use x509_parser::prelude::FromDer;
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| "is not PEM".to_string())?;
        if pem.label != "PUBLIC KEY" {
            return Err(format!("holds a {:?}, not a PUBLIC KEY (SubjectPublicKeyInfo: openssl pkey -pubout)", pem.label));
        }
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents).map_err(|_| "is not a SubjectPublicKeyInfo".to_string())?;
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err("is not an RSA public key".into());
        };
        let key = RsaPublicKey { modulus: trim(rsa.modulus), exponent: trim(rsa.exponent) };
        match key.bits() {
            2048..=8192 => Ok(key),
            bits => Err(format!("is a {bits}-bit RSA key; 2048 to 8192 bits are accepted")),
        }
    }

    /// The modulus's length in bits.
    pub fn bits(&self) -> usize {
        self.modulus.first().map_or(0, |b| self.modulus.len() * 8 - b.leading_zeros() as usize)
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        let rsa = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_bigint_bytes(&self.modulus, true);
                w.next().write_bigint_bytes(&self.exponent, true);
            })
        });
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(RSA_ENCRYPTION_OID));
                    w.next().write_null();
                });
                w.next().write_bitvec_bytes(&rsa, rsa.len() * 8);
            })
        })
    }

    /// The PEM `PUBLIC KEY`.
    pub fn to_pem(&self) -> String {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(self.spki_der());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// SHA-256 of the DER SubjectPublicKeyInfo, in hex: what
    /// `openssl pkey -pubin -in key.pem -outform DER | sha256sum` prints.
    pub fn fingerprint(&self) -> String {
        crate::domain::hex::sha256_hex(&self.spki_der())
    }

    /// SHA-256 of the DER SubjectPublicKeyInfo, in standard Base64: Gmail's `spki_hash`.
    pub fn spki_sha256_base64(&self) -> String {
        use base64::Engine;
        use sha2::Digest;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(self.spki_der()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PKCS#1 `RSAPrivateKey` of `version` whose integers are `ints` (not a real key: the
    /// parser checks the form, `ring` the arithmetic), with `extra` elements after them.
    fn pkcs1(version: u8, ints: &[(Vec<u8>, bool)], extra: usize) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_u8(version);
                for (bytes, positive) in ints {
                    w.next().write_bigint_bytes(bytes, *positive);
                }
                for _ in 0..extra {
                    w.next().write_u8(0);
                }
            })
        })
    }

    fn ints(bits: usize) -> Vec<(Vec<u8>, bool)> {
        let mut modulus = vec![0xc5; bits / 8];
        modulus[0] = 0xc5;
        let mut all = vec![(modulus, true), (vec![1, 0, 1], true)];
        all.extend((0..6).map(|i| (vec![0x40 + i; bits / 16], true)));
        all
    }

    fn pkcs8(oid: &[u64], inner: &[u8]) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_u8(0);
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(oid));
                    w.next().write_null();
                });
                w.next().write_bytes(inner);
            })
        })
    }

    #[test]
    fn a_pkcs1_or_pkcs8_rsa_key_is_read_and_anything_malformed_is_refused() {
        let good = pkcs1(0, &ints(2048), 0);
        let key = RsaPrivateKey::from_pkcs1_der(&good).unwrap();
        assert_eq!((key.public.bits(), key.public.exponent.clone()), (2048, vec![1, 0, 1]));
        assert!(!format!("{key:?}").contains("40"), "no secret part in Debug: {key:?}");
        for text in [good.clone(), pkcs8(RSA_ENCRYPTION_OID, &good)] {
            let (der, key) = RsaPrivateKey::from_text(&text).unwrap();
            assert_eq!((&der[..], key.public.bits()), (&good[..], 2048));
        }
        let mut negative = ints(2048);
        negative[2].1 = false;
        let mut zero = ints(2048);
        zero[3] = (vec![0], true);
        for (der, why) in [
            (pkcs1(1, &ints(2048), 0), "two-prime"),
            (pkcs1(0, &negative, 0), "two-prime"),
            (pkcs1(0, &zero, 0), "two-prime"),
            (pkcs1(0, &ints(2048), 1), "two-prime"),
            (pkcs1(0, &ints(2048)[..7], 0), "two-prime"),
            (pkcs1(0, &ints(1024), 0), "1024-bit"),
            (pkcs1(0, &ints(8192), 0), "8192-bit"),
        ] {
            assert!(RsaPrivateKey::from_pkcs1_der(&der).unwrap_err().contains(why), "{why}");
        }
        assert!(RsaPrivateKey::from_text(&pkcs8(&[1, 2, 840, 10045, 2, 1], &good)).unwrap_err().contains("is not an RSA private key"));
        assert!(RsaPrivateKey::from_text(&pkcs8(RSA_ENCRYPTION_OID, &pkcs1(0, &ints(1024), 0))).unwrap_err().contains("1024-bit"));
        assert!(RsaPrivateKey::from_text(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap_err().contains("PUBLIC KEY"));
        assert!(RsaPrivateKey::from_text(b"garbage").unwrap_err().contains("is not an RSA private key"));
    }
}
