//! Every PKCS#11 attribute template the service uses, in one place (STYLE.md habit 4).
//!
//! A customer key version is an AES-256 token object that:
//! * is private and sensitive: its value can never be read (`CKA_PRIVATE`, `CKA_SENSITIVE`);
//! * encrypts and decrypts with AES-GCM only (`CKA_ALLOWED_MECHANISMS`), and can neither wrap,
//!   unwrap, sign, verify nor derive — so no object can both wrap and decrypt, or unwrap and
//!   encrypt;
//! * can leave the HSM only wrapped under a key the security officer marked trusted
//!   (`CKA_EXTRACTABLE` with `CKA_WRAP_WITH_TRUSTED`), for backups. SoftHSM2 and the standard
//!   refuse any other wrapping (`CKR_KEY_NOT_WRAPPABLE`). `CKA_EXTRACTABLE` can only ever go from
//!   true to false, so a key made non-extractable could never be backed up: the template is
//!   decided with backups in mind from the first key (SOFTHSM-NOTES.md);
//! * cannot be modified (`CKA_MODIFIABLE=false`), so none of the above can be switched off.
//!
//! Objects are named `kms:<key id>:<version>` (`CKA_LABEL`) with `CKA_ID` = the key id's 16 bytes
//! and the version as a big-endian u32, so that startup reconciliation can map every object back
//! to its row without a database lookup.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};

use crate::domain::ids::KeyId;

/// The prefix of every object label this service creates. Objects without it (a backup key, the
/// audit HMAC key, other applications' keys) are never touched by reconciliation.
pub const LABEL_PREFIX: &str = "kms:";

/// The HSM object of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName {
    pub key_id: KeyId,
    pub version: u32,
}

impl ObjectName {
    pub fn label(&self) -> String {
        format!("{LABEL_PREFIX}{}:{}", self.key_id, self.version)
    }

    pub fn id(&self) -> [u8; 20] {
        let mut id = [0u8; 20];
        id[..16].copy_from_slice(self.key_id.as_bytes());
        id[16..].copy_from_slice(&self.version.to_be_bytes());
        id
    }

    /// Reads a label back; `None` for objects that are not ours.
    pub fn from_label(label: &str) -> Option<ObjectName> {
        let rest = label.strip_prefix(LABEL_PREFIX)?;
        let (id, version) = rest.split_once(':')?;
        Some(ObjectName { key_id: id.parse().ok()?, version: version.parse().ok()? })
    }
}

/// AES-256: 32 bytes.
const AES_256_LEN: u64 = 32;

/// The template of a new key version (`C_GenerateKey` with `CKM_AES_KEY_GEN`).
pub fn key_version(name: &ObjectName) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(AES_256_LEN.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Modifiable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        Attribute::Label(name.label().into_bytes()),
        Attribute::Id(name.id().to_vec()),
    ]
}

/// The service's own keys, each found by its label or made on first use. Their labels do not
/// start with `LABEL_PREFIX`, so reconciliation never touches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKey {
    /// Encrypts a fixed probe for the health check, so health is a real operation on a real key
    /// object (as AWS's external key store health check is). Encrypt-only, never extractable.
    Canary,
    /// Signs audit checkpoints (HMAC-SHA-256).
    AuditMac,
    /// Seals officers' TOTP secrets in the database (AES-GCM).
    OfficerSecrets,
}

impl ServiceKey {
    pub fn label(self) -> &'static str {
        match self {
            ServiceKey::Canary => "kms-health-canary",
            ServiceKey::AuditMac => "kms-audit-hmac",
            ServiceKey::OfficerSecrets => "kms-officer-secrets",
        }
    }

    /// The key generation mechanism and template. The audit and officer keys are extractable
    /// only under a trusted wrapping key, like key versions, so that backups carry them and a
    /// restored service still verifies its audit trail and logs its officers in.
    pub fn template(self) -> (Mechanism<'static>, Vec<Attribute>) {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::ValueLen(AES_256_LEN.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Modifiable(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(self.label().as_bytes().to_vec()),
        ];
        let (mechanism, specific) = match self {
            ServiceKey::Canary => (
                Mechanism::AesKeyGen,
                vec![
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
                ],
            ),
            ServiceKey::AuditMac => (
                Mechanism::GenericSecretKeyGen,
                vec![
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Extractable(true),
                    Attribute::WrapWithTrusted(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                    Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
                ],
            ),
            ServiceKey::OfficerSecrets => (
                Mechanism::AesKeyGen,
                vec![
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Extractable(true),
                    Attribute::WrapWithTrusted(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
                ],
            ),
        };
        t.extend(specific);
        (mechanism, t)
    }
}

/// The labels of the backup key pair, made at provisioning (`kms-server backup-key`).
pub const BACKUP_WRAP_LABEL: &str = "kms-backup-wrap";
pub const BACKUP_UNWRAP_LABEL: &str = "kms-backup-unwrap";
/// RSA-3072 (NIST SP 800-57: 128-bit security, like AES-256 data keys' 2^32 budget allows).
const BACKUP_RSA_BITS: u64 = 3072;

/// The backup key is an RSA key pair, so that neither half needs what the other has:
/// * the **wrapping** half is the public key, marked trusted (`CKA_TRUSTED`, which only the
///   security officer can set, and only on a public object): it is what lets `C_WrapKey` export
///   a key made `CKA_WRAP_WITH_TRUSTED`, and it holds no secret;
/// * the **unwrapping** half is the private key: a private, sensitive, never-extractable token
///   object that only the logged-in user can use, and only to unwrap. A backup file is of no use
///   without it and the user's login; a second HSM gets it by the HSM's own replication or
///   cloning (docs/operations.md), never as a value.
///
/// This returns the key pair generation's (public, private) templates. The public half is made
/// as a session object, read back, and re-created by the security officer as a trusted token
/// object ([`trusted_wrap_key`]).
pub fn backup_key_pair() -> (Vec<Attribute>, Vec<Attribute>) {
    let public = vec![
        Attribute::Token(false),
        Attribute::ModulusBits(BACKUP_RSA_BITS.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Wrap(true),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        Attribute::Label(BACKUP_UNWRAP_LABEL.as_bytes().to_vec()),
    ];
    (public, private)
}

/// `CKA_UNWRAP_TEMPLATE` of the private backup key: what every key it unwraps must be. Without
/// it, anyone holding the user PIN could wrap a key version under the trusted public half and
/// unwrap it with the private half into a readable object. With it, an unwrapped key is
/// sensitive, extractable only under a trusted key, and can neither wrap, unwrap nor derive,
/// exactly as the objects backups carry (`Wrapped::unwrap_template` includes all of these).
pub fn backup_unwrap_template() -> Vec<Attribute> {
    vec![Attribute::Sensitive(true), Attribute::WrapWithTrusted(true), Attribute::Wrap(false), Attribute::Unwrap(false), Attribute::Derive(false)]
}

/// A key version's *session copy* (`copies.rs`), unwrapped with the private backup key: the
/// version's capabilities (AES-GCM encryption and decryption only) in a session object of this
/// process, with no label, that can never leave the HSM (`CKA_EXTRACTABLE=false`, so not even
/// under a trusted key), cannot be copied, and disappears with the anchor session it is made
/// on. It satisfies [`backup_unwrap_template`], as every unwrap must. `CKA_MODIFIABLE=false`
/// goes last (see `Wrapped::unwrap_template`).
///
/// It is **not private** (`CKA_PRIVATE=false`). A session object is visible only to the
/// sessions of the process that made it, so all `CKA_PRIVATE` would add is to hide it from
/// them while the process is logged out; the service repairs a lost login within a second
/// and closes the anchor, and the copies with it (`pkcs11.rs`). What it would cost: SoftHSM2
/// keeps a private object's value encrypted under the token key and decrypts it, under a
/// token-wide lock, at every `C_EncryptInit` and `C_DecryptInit`. Under load that was a fifth
/// of an XKS Encrypt's CPU, and the service ran 25–40% faster without it (ARCHITECTURE.md).
/// The token objects, the versions themselves, stay private.
pub fn session_copy() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        Attribute::Copyable(false),
        Attribute::Modifiable(false),
    ]
}

/// The label of a throwaway key (`throwaway`). It is not under `LABEL_PREFIX`, so the service
/// never takes it for one of its own.
pub const THROWAWAY_LABEL: &str = "kms-load:throwaway";

/// A throwaway AES-256 key to measure the HSM's raw rate with (`kms-load`), so that a
/// measurement spends no key version's usage budget: a session copy's attributes, with a
/// length and a label to generate it by, on the token or not. A session object (`on_token =
/// false`: gone with the anchor) runs as fast as a session copy; a token object as a version's
/// own object.
pub fn throwaway(on_token: bool) -> Vec<Attribute> {
    let mut template: Vec<Attribute> =
        session_copy().into_iter().map(|a| if let Attribute::Token(_) = a { Attribute::Token(on_token) } else { a }).collect();
    // CKA_MODIFIABLE=false stays last.
    let last = template.len() - 1;
    template.splice(last..last, [Attribute::ValueLen(AES_256_LEN.into()), Attribute::Label(THROWAWAY_LABEL.as_bytes().to_vec())]);
    template
}

/// A trusted public wrapping key, as the security officer creates it from a modulus and
/// exponent: the backup key pair's public half, or a customer's key for an export. It wraps
/// (RSA-OAEP) and does nothing else, and holds no secret.
pub fn trusted_wrap_key(modulus: Vec<u8>, public_exponent: Vec<u8>, label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Modulus(modulus),
        Attribute::PublicExponent(public_exponent),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Modifiable(false),
        Attribute::Wrap(true),
        Attribute::Encrypt(false),
        Attribute::Verify(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Finds a trusted public key by its label and modulus: an untrusted object of the same label
/// (any session can make public objects) is never taken for it.
pub fn trusted_public_key(label: &str, modulus: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(true),
        Attribute::Trusted(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Modulus(modulus.to_vec()),
    ]
}

/// The label of the service's signing key pair (both halves), for the tokens it signs: Google
/// CSE's KACLS-to-KACLS migration tokens, verified by the other key service with the public
/// halves this one publishes (`certs`).
pub const SIGNING_LABEL: &str = "kms-token-signing";
/// RSA-2048 with SHA-256: RS256, which every JWT library verifies.
const SIGNING_RSA_BITS: u64 = 2048;

/// The signing key pair's (public, private) templates: both on the token; the private half
/// private, sensitive, never extractable, and for RS256 signatures only.
pub fn signing_key_pair() -> (Vec<Attribute>, Vec<Attribute>) {
    let label = || Attribute::Label(SIGNING_LABEL.as_bytes().to_vec());
    let public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::ModulusBits(SIGNING_RSA_BITS.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        label(),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_RSA_PKCS]),
        label(),
    ];
    (public, private)
}

/// The label of a user's RSA private key while it serves one operation.
pub const USER_KEY_LABEL: &str = "kms-cse-user-key";

/// A user's RSA private key as a session object for one operation (`Hsm::rsa_private`):
/// private, sensitive, never extractable, for decryption or for signatures alone (`sign`),
/// with the mechanisms of that use only. Its secret attributes are wiped by
/// [`wipe`] once the object is made.
pub fn user_private_key(key: &super::RsaPrivateKey, sign: bool) -> Vec<Attribute> {
    let [d, p, q, dp, dq, qinv] = &key.secret;
    let mechanisms =
        if sign { [MechanismType::RSA_PKCS, MechanismType::RSA_PKCS_PSS] } else { [MechanismType::RSA_PKCS, MechanismType::RSA_PKCS_OAEP] };
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(sign),
        Attribute::Decrypt(!sign),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(mechanisms.to_vec()),
        Attribute::Label(USER_KEY_LABEL.as_bytes().to_vec()),
        Attribute::Modulus(key.public.modulus.clone()),
        Attribute::PublicExponent(key.public.exponent.clone()),
        Attribute::PrivateExponent(d.to_vec()),
        Attribute::Prime1(p.to_vec()),
        Attribute::Prime2(q.to_vec()),
        Attribute::Exponent1(dp.to_vec()),
        Attribute::Exponent2(dq.to_vec()),
        Attribute::Coefficient(qinv.to_vec()),
    ]
}

/// Wipes the secret values of a template (a user's private key's parts) before it is dropped.
pub fn wipe(template: &mut [Attribute]) {
    use zeroize::Zeroize;
    for a in template {
        if let Attribute::PrivateExponent(v)
        | Attribute::Prime1(v)
        | Attribute::Prime2(v)
        | Attribute::Exponent1(v)
        | Attribute::Exponent2(v)
        | Attribute::Coefficient(v) = a
        {
            v.zeroize();
        }
    }
}

/// A half of the backup or signing key pair, as found on a token.
pub fn backup_half(label: &str, class: ObjectClass) -> Vec<Attribute> {
    vec![Attribute::Class(class), Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())]
}

/// What a wrapped object in a backup is, and so the template it is unwrapped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapped {
    Version(ObjectName),
    Service(ServiceKey),
}

impl Wrapped {
    /// The template `C_UnwrapKey` recreates the object with: its generation template without
    /// the length (the wrapped value carries it), as a token object, or as a session object
    /// that disappears with its session (to check a MAC before restoring anything).
    /// `CKA_MODIFIABLE=false` goes last: SoftHSM2 applies an unwrap template in order and
    /// refuses every attribute after it (`CKR_ATTRIBUTE_READ_ONLY`).
    pub fn unwrap_template(self, token: bool) -> Vec<Attribute> {
        let template = match self {
            Wrapped::Version(name) => key_version(&name),
            Wrapped::Service(which) => which.template().1,
        };
        let mut t: Vec<Attribute> = template
            .into_iter()
            .filter(|a| !matches!(a, Attribute::ValueLen(_) | Attribute::Modifiable(_)))
            .map(|a| if matches!(a, Attribute::Token(_)) { Attribute::Token(token) } else { a })
            .collect();
        t.push(Attribute::Modifiable(false));
        t
    }
}

/// The label prefix of a customer's RSA public key the security officer makes trusted for one
/// reversibility export (`kms-server export-key`): `kms-export:<fingerprint>`.
pub const EXPORT_LABEL: &str = "kms-export:";

/// The label prefix of import key pairs (`kmsctl key import-parameters`): the rest of the label
/// is the import token, `<expiry in Unix seconds>-<16 random hex digits>`.
pub const IMPORT_LABEL: &str = "kms-import:";
/// RSA-3072, as AWS KMS's import parameters.
const IMPORT_RSA_BITS: u64 = 3072;

/// An import key pair's (public, private) templates: both on the token, so that every node
/// finds them. The private half is private, sensitive, never extractable and only unwraps
/// (RSA-OAEP), into objects [`backup_unwrap_template`] constrains: as protected as key versions.
pub fn import_key_pair(label: &str) -> (Vec<Attribute>, Vec<Attribute>) {
    let label = || Attribute::Label(label.as_bytes().to_vec());
    let public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::ModulusBits(IMPORT_RSA_BITS.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Verify(false),
        label(),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        label(),
    ];
    (public, private)
}

/// Finds a token object by its label (startup only). Searches name `CKA_TOKEN=true`: a session
/// object of the same label (one another part of the process made) is never taken for a key.
pub fn by_label(label: &str) -> Vec<Attribute> {
    vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())]
}

/// The template that finds every AES secret key on the token (at startup only: `C_FindObjects`
/// is linear in the number of objects and touches the disk for each, SOFTHSM-NOTES.md).
pub fn all_aes_keys() -> Vec<Attribute> {
    vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES), Attribute::Token(true)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_foreign_labels_are_ignored() {
        let name = ObjectName { key_id: KeyId::from_bytes([1; 16]), version: 12 };
        assert_eq!(ObjectName::from_label(&name.label()), Some(name));
        for foreign in ["backup-key", "kms:", "kms:abc:1", "kms:01010101-0101-0101-0101-010101010101:x"] {
            assert_eq!(ObjectName::from_label(foreign), None, "{foreign}");
        }
        assert_eq!(&name.id()[16..], &[0, 0, 0, 12]);
    }

    /// The HSM refuses an unwrap whose template lacks any attribute of the backup key's unwrap
    /// template, so a restore must carry every one of them for every kind of object.
    #[test]
    fn every_restore_template_satisfies_the_backup_unwrap_template() {
        let version = Wrapped::Version(ObjectName { key_id: KeyId::from_bytes([2; 16]), version: 1 });
        for what in [version, Wrapped::Service(ServiceKey::AuditMac), Wrapped::Service(ServiceKey::OfficerSecrets)] {
            for token in [true, false] {
                let template = what.unwrap_template(token);
                for forced in backup_unwrap_template() {
                    assert!(template.contains(&forced), "{what:?} (token {token}) lacks {forced:?}");
                }
            }
        }
        let copy = session_copy();
        for forced in backup_unwrap_template() {
            assert!(copy.contains(&forced), "a session copy lacks {forced:?}");
        }
        assert_eq!(copy.last(), Some(&Attribute::Modifiable(false)));
    }

    #[test]
    fn a_throwaway_key_is_a_labelled_session_copy_on_the_token_or_not() {
        for on_token in [false, true] {
            let template = throwaway(on_token);
            assert!(template.contains(&Attribute::Token(on_token)) && !template.contains(&Attribute::Token(!on_token)));
            assert!(template.contains(&Attribute::Label(THROWAWAY_LABEL.as_bytes().to_vec())));
            assert!(template.contains(&Attribute::ValueLen(AES_256_LEN.into())));
            for a in session_copy().into_iter().filter(|a| !matches!(a, Attribute::Token(_))) {
                assert!(template.contains(&a), "a throwaway key lacks {a:?}");
            }
            assert_eq!(template.last(), Some(&Attribute::Modifiable(false)));
            assert!(!THROWAWAY_LABEL.starts_with(LABEL_PREFIX), "the service would take it for its own");
        }
    }
}
