//! AWS external key stores: the service's side of the XKS facade (`facade::xks`).
//!
//! A key store is a principal, `xks:NAME`, with a URI path prefix and an AWS region: its grants
//! say which of our keys AWS may use through it, for Encrypt, Decrypt or both, and under which
//! request metadata (a grant's context pairs are matched against `awsPrincipalArn`,
//! `kmsOperation` and `kmsViaService`), so that an officer allows, narrows and revokes AWS's
//! use exactly as a workload's, with the same audit and the same immediate revocation.
//!
//! Its SigV4 credentials (at most two at once, so that a rotation needs no outage) are made
//! here from the HSM's generator, shown once, and kept sealed in the HSM like officers' TOTP
//! secrets, so that every node can check signatures and no file holds them in clear.
//!
//! The external key id AWS binds its KMS key to is our key id: it never changes, so an AWS key
//! can never be pointed at other material.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::admin::changed;
use super::{Caller, Kms, Sealed, decryption_version, now};
use crate::domain::blob::{IV_LEN, Iv};
use crate::domain::context::EncryptionContext;
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::lifecycle::KeyState;
use crate::domain::policy::{self, Authorized, Operation, PrincipalState};
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, SecretText};
use crate::store::{PrincipalRecord, XksCredentialRecord, XksKeyStoreRecord};

/// Key stores' principals are `xks:NAME`; no workload or officer can take such a name.
pub const PRINCIPAL_PREFIX: &str = "xks:";

/// Credentials a key store holds at once: the current one and the next, during a rotation.
pub const MAX_CREDENTIALS: usize = 2;

/// How a refusal for want of a grant naming the operation begins (XKS's
/// `InvalidKeyUsageException`, where other failed preconditions are `InvalidStateException`).
pub const KEY_USAGE_REFUSED: &str = "the key store may not";

pub fn principal(key_store: &str) -> String {
    format!("{PRINCIPAL_PREFIX}{key_store}")
}

/// A credential made now: the one time its secret leaves the service.
pub struct NewCredential {
    pub access_key_id: String,
    pub secret: SecretText,
}

impl std::fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCredential").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// The key stores and their credentials, as every XKS call reads them (part of the registry,
/// rebuilt with it).
#[derive(Debug, Default)]
pub struct Directory {
    stores: BTreeMap<String, XksKeyStoreRecord>,
    credentials: HashMap<String, Credential>,
}

#[derive(Debug)]
struct Credential {
    record: XksCredentialRecord,
    secret: SecretText,
}

impl Directory {
    /// The key store served at `uri_prefix` (the path before `/kms/xks/v1`).
    pub fn store_at(&self, uri_prefix: &str) -> Option<&XksKeyStoreRecord> {
        self.stores.values().find(|s| s.uri_prefix == uri_prefix)
    }

    /// The secret of `key_store`'s credential `access_key_id`, if it has one by that id.
    pub fn secret(&self, key_store: &str, access_key_id: &str) -> Option<SecretText> {
        self.credentials.get(access_key_id).filter(|c| c.record.key_store == key_store).map(|c| c.secret.clone_secret())
    }

    pub fn stores(&self) -> impl Iterator<Item = &XksKeyStoreRecord> {
        self.stores.values()
    }

    /// `key_store`'s credentials, oldest first (their secrets left out).
    pub fn credentials_of(&self, key_store: &str) -> Vec<&XksCredentialRecord> {
        let mut out: Vec<_> = self.credentials.values().map(|c| &c.record).filter(|r| r.key_store == key_store).collect();
        out.sort_by(|a, b| (a.created_at, &a.access_key_id).cmp(&(b.created_at, &b.access_key_id)));
        out
    }
}

/// What the HSM authenticates with a sealed credential secret: which credential of which store.
fn seal_aad(c: &XksCredentialRecord) -> Vec<u8> {
    format!("kms-xks-credential:{}:{}", c.key_store, c.access_key_id).into_bytes()
}

/// A key store's name: 1 to 64 of `a-z`, `0-9` and `-` (it is part of a principal's name).
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(Error::invalid("name", "must be 1 to 64 characters of a-z, 0-9 and -")) }
}

/// The URI path prefix: empty, or `/` and segments of `A-Z a-z 0-9 - _` separated by single
/// slashes; with `/kms/xks/v1` it must stay within the spec's 128 characters.
fn check_prefix(prefix: &str) -> Result<()> {
    const MAX: usize = 128 - "/kms/xks/v1".len();
    let segments_ok = prefix.is_empty()
        || (prefix.starts_with('/')
            && prefix[1..].split('/').all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')));
    if prefix.len() <= MAX && segments_ok {
        Ok(())
    } else {
        Err(Error::invalid("uri_prefix", format!("must be empty or /SEGMENT[/SEGMENT...] of A-Z, a-z, 0-9, - and _, at most {MAX} characters")))
    }
}

/// An AWS region name, such as `eu-west-3`.
fn check_region(region: &str) -> Result<()> {
    let ok = !region.is_empty() && region.len() <= 32 && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(Error::invalid("region", "must be an AWS region name such as eu-west-3")) }
}

/// The context a key store's grants are checked against: the request metadata an officer's
/// conditions can name.
pub fn metadata_context(aws_principal_arn: Option<&str>, kms_operation: Option<&str>, kms_via_service: Option<&str>) -> Result<EncryptionContext> {
    let pairs = [("awsPrincipalArn", aws_principal_arn), ("kmsOperation", kms_operation), ("kmsViaService", kms_via_service)];
    EncryptionContext::new(pairs.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?.to_string()))).collect())
        .map_err(|e| Error::invalid("requestMetadata", e))
}

/// What an XKS GetKeyMetadata reports of a key: whether it is enabled, and which of Encrypt
/// and Decrypt the key store's grants allow with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksKeyView {
    pub enabled: bool,
    pub encrypt: bool,
    pub decrypt: bool,
}

impl Kms {
    /// The key stores and credentials every XKS call authenticates against.
    pub fn xks_directory(&self) -> Arc<Directory> {
        self.registry.read().xks.clone()
    }

    /// The directory, first reloaded if `knows` says it lacks what a request names (a key store
    /// or credential made on another node a moment ago): one store read, shared by the calls
    /// that miss together and spaced out for a flood of them (`with_fresh_registry`).
    pub fn xks_directory_knowing(&self, knows: impl Fn(&Directory) -> bool) -> Arc<Directory> {
        let missing = || Error::NotFound { what: "a key store or credential".into() };
        let _ = self.with_fresh_registry(|| if knows(&self.xks_directory()) { Ok(()) } else { Err(missing()) });
        self.xks_directory()
    }

    /// A fresh credential of `key_store`, its secret sealed in the HSM: an access key id of 24
    /// characters of `A-Z2-7` and a secret of 44 Base64 characters (the spec's formats), from
    /// 120 and 256 random bits.
    fn new_credential(&self, key_store: &str) -> Result<(XksCredentialRecord, NewCredential)> {
        const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut random = SecretBytes::zeroed(24 + 32);
        self.hsm.random(random.expose_secret_mut())?;
        let (id_bytes, secret_bytes) = random.expose_secret().split_at(24);
        let access_key_id: String = id_bytes.iter().map(|b| BASE32[(*b & 31) as usize] as char).collect();
        let secret = SecretText::new(B64.encode(secret_bytes));
        let mut record = XksCredentialRecord {
            access_key_id: access_key_id.clone(),
            key_store: key_store.to_string(),
            sealed_secret: Vec::new(),
            created_at: now(),
        };
        record.sealed_secret = self.seal(&seal_aad(&record), secret.expose_secret().as_bytes())?;
        Ok((record, NewCredential { access_key_id, secret }))
    }

    fn unseal_credential(&self, record: &XksCredentialRecord) -> Result<SecretText> {
        let secret = self.unseal(&seal_aad(record), &record.sealed_secret)?;
        let text = std::str::from_utf8(secret.expose_secret())
            .map_err(|_| Error::precondition(format!("the secret of XKS credential {} is not text", record.access_key_id)))?;
        Ok(SecretText::new(text.to_string()))
    }

    /// The directory for `stores` and `credentials` as the store holds them, reusing the
    /// secrets `old` already unsealed (one HSM call for each new or changed credential only).
    pub(super) fn xks_directory_of(&self, old: &Directory, stores: Vec<XksKeyStoreRecord>, credentials: Vec<XksCredentialRecord>) -> Directory {
        let mut directory = Directory { stores: stores.into_iter().map(|s| (s.name.clone(), s)).collect(), credentials: HashMap::new() };
        for record in credentials {
            let secret = match old.credentials.get(&record.access_key_id) {
                Some(c) if c.record == record => c.secret.clone_secret(),
                _ => match self.unseal_credential(&record) {
                    Ok(secret) => secret,
                    // One credential that cannot be opened signs nothing; the rest still serve,
                    // and the registry (every key, grant and principal) still loads.
                    Err(e) => {
                        tracing::error!(access_key_id = %record.access_key_id, key_store = %record.key_store, error = %e, "an XKS credential cannot be unsealed; it is not usable");
                        continue;
                    }
                },
            };
            directory.credentials.insert(record.access_key_id.clone(), Credential { record, secret });
        }
        directory
    }

    /// Creates a key store, its principal `xks:NAME` (with no grant yet) and its first
    /// credential.
    pub fn create_xks_key_store(&self, caller: &Caller, name: &str, uri_prefix: &str, region: &str) -> Result<(XksKeyStoreRecord, NewCredential)> {
        check_name(name)?;
        check_prefix(uri_prefix)?;
        check_region(region)?;
        let _admin = self.admin_lock()?;
        let who = principal(name);
        {
            let state = self.registry.read();
            if state.xks.stores.contains_key(name) || state.principals.contains_key(&who) {
                return Err(Error::AlreadyExists { what: format!("key store {name}") });
            }
            if let Some(other) = state.xks.store_at(uri_prefix) {
                return Err(Error::AlreadyExists { what: format!("a key store at {uri_prefix:?} ({})", other.name) });
            }
        }
        caller.commit_point(|| format!("create key store {name} at {uri_prefix}/kms/xks/v1 for {region}, its principal {who} and a credential"))?;
        let record = XksKeyStoreRecord { name: name.to_string(), uri_prefix: uri_prefix.to_string(), region: region.to_string(), created_at: now() };
        let (credential, new) = self.new_credential(name)?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.insert_principal(&who, PrincipalState::Enabled, record.created_at)?;
            if !tx.insert_xks_key_store(&record)? {
                return Err(crate::store::StoreError::Corrupt {
                    table: "xks_key_stores",
                    detail: format!("{name} or {uri_prefix:?} appeared during the change"),
                });
            }
            tx.insert_xks_credential(&credential)?;
            let detail = format!("key store {name} at {uri_prefix:?} for {region}; credential {}", credential.access_key_id);
            tx.append_audit(&caller.audit("CreateXksKeyStore", None, None, detail), record.created_at)?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.principals.insert(who.clone(), PrincipalRecord { name: who, state: PrincipalState::Enabled, created_at: record.created_at });
        let directory = self.with_credential(&state.xks, Some(record.clone()), Some((credential, new.secret.clone_secret())), None);
        state.xks = Arc::new(directory);
        Ok((record, new))
    }

    /// Adds a credential to `key_store` (at most `MAX_CREDENTIALS` at once).
    pub fn add_xks_credential(&self, caller: &Caller, key_store: &str) -> Result<NewCredential> {
        let _admin = self.admin_lock()?;
        let held = {
            let state = self.registry.read();
            if !state.xks.stores.contains_key(key_store) {
                return Err(Error::NotFound { what: format!("key store {key_store}") });
            }
            state.xks.credentials_of(key_store).len()
        };
        if held >= MAX_CREDENTIALS {
            return Err(Error::precondition(format!("key store {key_store} holds {held} credentials already; remove one first")));
        }
        caller.commit_point(|| format!("add a credential to key store {key_store}"))?;
        let (credential, new) = self.new_credential(key_store)?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.insert_xks_credential(&credential)?;
            let detail = format!("key store {key_store}: credential {}", credential.access_key_id);
            tx.append_audit(&caller.audit("AddXksCredential", None, None, detail), credential.created_at)?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.xks = Arc::new(self.with_credential(&state.xks, None, Some((credential, new.secret.clone_secret())), None));
        Ok(new)
    }

    /// Removes a credential: a request signed with it is refused from now on, on every node.
    pub fn remove_xks_credential(&self, caller: &Caller, access_key_id: &str) -> Result<XksCredentialRecord> {
        let _admin = self.admin_lock()?;
        let record = self
            .registry
            .read()
            .xks
            .credentials
            .get(access_key_id)
            .map(|c| c.record.clone())
            .ok_or_else(|| Error::NotFound { what: format!("XKS credential {access_key_id}") })?;
        caller.commit_point(|| {
            format!("remove credential {access_key_id} of key store {}; requests signed with it are refused at once", record.key_store)
        })?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.delete_xks_credential(access_key_id)?;
            let detail = format!("key store {}: credential {access_key_id}", record.key_store);
            tx.append_audit(&caller.audit("RemoveXksCredential", None, None, detail), now())?;
            changed(tx, true)
        })?;
        state.note(marks);
        state.xks = Arc::new(self.with_credential(&state.xks, None, None, Some(access_key_id)));
        Ok(record)
    }

    /// A copy of `directory` with a store and a credential added, or a credential removed.
    fn with_credential(
        &self,
        directory: &Directory,
        store: Option<XksKeyStoreRecord>,
        added: Option<(XksCredentialRecord, SecretText)>,
        removed: Option<&str>,
    ) -> Directory {
        let mut out = Directory {
            stores: directory.stores.clone(),
            credentials: directory
                .credentials
                .iter()
                .filter(|(id, _)| Some(id.as_str()) != removed)
                .map(|(id, c)| (id.clone(), Credential { record: c.record.clone(), secret: c.secret.clone_secret() }))
                .collect(),
        };
        if let Some(store) = store {
            out.stores.insert(store.name.clone(), store);
        }
        if let Some((record, secret)) = added {
            out.credentials.insert(record.access_key_id.clone(), Credential { record, secret });
        }
        out
    }

    /// The policy check of an XKS call by `caller` (a key store's principal) on `key_id`, each
    /// refusal as XKS tells them apart: a disabled key store or key is a failed precondition
    /// (`InvalidStateException`); a key that does not exist, is destroyed or has no grant to the
    /// key store is not found (`KeyNotFoundException`); grants that do not name the operation
    /// are a failed precondition starting with `KEY_USAGE_REFUSED` (`InvalidKeyUsageException`);
    /// grants whose conditions the request metadata does not meet are a denial
    /// (`AccessDeniedException`).
    pub fn authorize_xks(&self, caller: &Caller, key_id: KeyId, operation: Operation, metadata: &EncryptionContext) -> Result<Authorized> {
        let proof = self.check_xks(caller, key_id, operation, metadata)?;
        self.uses.principal(&caller.principal, Some(proof.grant_id()));
        Ok(proof)
    }

    /// `authorize_xks` without counting a use of the grant (for what metadata reports).
    fn check_xks(&self, caller: &Caller, key_id: KeyId, operation: Operation, metadata: &EncryptionContext) -> Result<Authorized> {
        let not_found = || Error::NotFound { what: format!("key {key_id} in this key store") };
        self.with_fresh_registry(|| {
            self.check_key_store(caller)?;
            let state = self.registry.read();
            let principal_state = state.principals.get(&caller.principal).map(|p| p.state);
            let entry = state.resolve(&KeyRef::Id(key_id)).map_err(|_| not_found())?;
            if entry.record.state == KeyState::Destroyed {
                return Err(not_found());
            }
            let at = now();
            let live: Vec<_> = state
                .grants
                .get(&key_id)
                .into_iter()
                .flatten()
                .filter(|g| g.principal == caller.principal && g.expires_at.is_none_or(|t| t > at))
                .collect();
            if live.is_empty() {
                return Err(not_found());
            }
            if !live.iter().any(|g| g.operations.contains(&operation)) {
                return Err(Error::precondition(format!("{KEY_USAGE_REFUSED} {operation} with key {key_id}")));
            }
            policy::authorize(&caller.principal, principal_state, live, key_id, operation, metadata, at).map_err(|_| Error::PermissionDenied {
                reason: format!("no grant of {} allows {operation} on key {key_id} with this request metadata", caller.principal),
            })
        })
    }

    /// That `caller`'s key store exists and is enabled (a disabled one is a failed
    /// precondition: XKS's `InvalidStateException`, on every call, health included).
    pub fn check_key_store(&self, caller: &Caller) -> Result<()> {
        match self.registry.read().principals.get(&caller.principal).map(|p| p.state) {
            None => Err(Error::NotFound { what: format!("key store {}", caller.principal) }),
            Some(PrincipalState::Disabled) => Err(Error::precondition(format!("key store {} is disabled", caller.principal))),
            Some(PrincipalState::Enabled) => Ok(()),
        }
    }

    /// What GetKeyMetadata reports of `key_id` to `caller`'s key store.
    pub fn xks_key(&self, caller: &Caller, key_id: KeyId) -> Result<XksKeyView> {
        let may = |operation| match self.check_xks(caller, key_id, operation, &EncryptionContext::default()) {
            Ok(_) | Err(Error::PermissionDenied { .. }) => Ok(true),
            Err(Error::FailedPrecondition { reason }) if reason.starts_with(KEY_USAGE_REFUSED) => Ok(false),
            Err(e) => Err(e),
        };
        let (encrypt, decrypt) = (may(Operation::Encrypt)?, may(Operation::Decrypt)?);
        let enabled = self.registry.entry(&KeyRef::Id(key_id))?.record.state == KeyState::Enabled;
        Ok(XksKeyView { enabled, encrypt, decrypt })
    }

    /// Encrypts for AWS under the primary version of the key `proof` names, with the AAD
    /// `aad` makes for the version used (the facade's framing, which names the version). With
    /// `self_test`, decrypts the result back in the HSM and compares it with `plaintext` before
    /// answering (the spec's advice when AWS asks for an integrity value: corruption between
    /// the HSM and AWS is caught by the value, corruption in the HSM only by this).
    pub fn xks_encrypt(&self, proof: &Authorized, plaintext: &[u8], aad: &dyn Fn(u32) -> Vec<u8>, self_test: bool) -> Result<Sealed> {
        let sealed = self.encrypt_primary(proof, plaintext, None, &|version, _| aad(version))?;
        if self_test {
            let entry = self.registry.entry(&KeyRef::Id(proof.key_id()))?;
            let (_, handle) = decryption_version(&entry, sealed.version, Operation::Decrypt)?;
            let back = self.hsm.decrypt(handle, &sealed.iv, &aad(sealed.version), &sealed.ciphertext);
            if !back.is_ok_and(|b| b.expose_secret() == plaintext) {
                tracing::error!(key_id = %proof.key_id(), version = sealed.version, "an XKS encryption did not decrypt back to its plaintext");
                return Err(Error::Hsm(crate::hsm::HsmError::wrong_output("C_Decrypt (XKS self-test)")));
            }
        }
        Ok(sealed)
    }

    /// Decrypts for AWS with version `version` of the key `proof` names. Any failure of the
    /// ciphertext itself (a version that never was or is destroyed, a wrong IV, tag or AAD) is
    /// the uniform `DecryptFailed`.
    pub fn xks_decrypt(&self, proof: &Authorized, version: u32, iv: &[u8], aad: &[u8], ciphertext_and_tag: &[u8]) -> Result<SecretBytes> {
        let iv = Iv(<[u8; IV_LEN]>::try_from(iv).map_err(|_| Error::DecryptFailed)?);
        let entry = self.registry.entry(&KeyRef::Id(proof.key_id()))?;
        let (_, handle) = decryption_version(&entry, version, Operation::Decrypt)?;
        Ok(self.hsm.decrypt(handle, &iv, aad, ciphertext_and_tag)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_prefixes_and_regions_are_checked() {
        assert!(check_name("prod-aws-1").is_ok());
        for bad in ["", "Prod", "a b", "a/b", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["", "/p", "/tenant-a/xks_1"] {
            assert!(check_prefix(good).is_ok(), "{good:?}");
        }
        for bad in ["p", "/", "/a/", "//a", "/a//b", "/a b", "/a?b", &format!("/{}", "a".repeat(117))] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix(&format!("/{}", "a".repeat(116))).is_ok());
        assert!(check_region("eu-west-3").is_ok());
        assert!(check_region("EU").is_err() && check_region("").is_err());
    }
}
