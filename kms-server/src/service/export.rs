//! Reversibility and BYOK: every live key version exported for the customer (wrapped in the HSM
//! under the customer's own RSA key), and keys imported under import parameters the HSM makes.
//!
//! An export wraps each version with RSA-OAEP (SHA-1, as SoftHSM2 2.6 implements it) under
//! the customer's public key, which the HSM's security officer made trusted for this export
//! (`kms-server export-key`): `C_WrapKey` calls only, so no key value is ever in this process's
//! memory, and the trusted key is destroyed once used. docs/export-format.md describes the
//! bundle and how to unwrap it with OpenSSL alone. (`CKM_RSA_AES_KEY_WRAP`, which SoftHSM2 2.6
//! lacks, done in two steps would need an unwrapping key that can unwrap into anything on the
//! import side; a 32-byte key fits in one RSA-OAEP block, so none is needed.)
//!
//! An import is the other way: `GetImportParameters` makes an RSA-3072 key pair in the HSM,
//! valid 24 hours and for one import, whose public half the material is wrapped under
//! (RSAES-OAEP); the versions are unwrapped into token objects with the key versions' template,
//! the import key's `CKA_UNWRAP_TEMPLATE` forcing it. A bundle exported under another instance's import
//! key brings every key back there with its id, versions, states and usage counts, so that the
//! first instance's blobs decrypt on the second.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::admin::changed;
use super::{Caller, Kms, now};
use crate::domain::hex::{hex, sha256_hex};
use crate::domain::ids::{AliasName, KeyId};
use crate::domain::lifecycle::{KeyOrigin, KeyState, VersionState};
use crate::error::{Error, Result};
use crate::hooks::{Step, crash_point};
use crate::hsm::templates::IMPORT_LABEL;
use crate::hsm::{KeyHandle, ObjectName, RsaPublicKey};
use crate::store::{AliasRecord, IntentKind, KeyRecord, VersionRecord};

/// How long import parameters can be used.
pub const IMPORT_VALIDITY_SECONDS: i64 = 24 * 3600;
/// The bundle format this service writes and reads.
const FORMAT: u32 = 1;
/// The wrapping scheme of every version, as AWS KMS names it for ImportKeyMaterial.
pub const SCHEME: &str = "RSAES_OAEP_SHA_1";
/// The largest RSA-OAEP block (an 8,192-bit key).
pub const MAX_WRAPPED: usize = 1024;
/// The most key versions one import takes.
pub const MAX_IMPORT_VERSIONS: usize = 100_000;

/// A bundle's manifest: what it holds, never a key value nor an encryption context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub format: u32,
    /// Unix seconds.
    pub created_at: i64,
    pub service_version: String,
    pub token_label: String,
    pub token_serial: String,
    pub scheme: String,
    /// `RsaPublicKey::fingerprint` of the key every version is wrapped under.
    pub public_key_sha256: String,
    pub public_key_bits: usize,
    pub keys: Vec<BundleKey>,
    /// The audit trail as verified at the export.
    pub audit: BundleAudit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleKey {
    pub key_id: String,
    pub description: String,
    pub state: String,
    pub compromised: bool,
    pub created_at: i64,
    pub rotation_period_secs: u64,
    pub next_rotation_at: Option<i64>,
    pub destruction_at: Option<i64>,
    pub primary_version: u32,
    pub aliases: Vec<String>,
    pub versions: Vec<BundleVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleVersion {
    pub version: u32,
    pub state: String,
    pub created_at: i64,
    /// Encryptions counted against the version's AES-GCM budget (at least those made).
    pub encryptions: u64,
    pub destruction_at: Option<i64>,
    /// SHA-256 of the wrapped version.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleAudit {
    pub verified: bool,
    pub records: u64,
    pub pruned_through_seq: u64,
    pub checkpoints: u64,
    pub last_checkpoint_seq: u64,
}

/// One wrapped key version, as it travels.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedVersion {
    pub key_id: KeyId,
    pub version: u32,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for WrappedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedVersion").field("key_id", &self.key_id).field("version", &self.version).finish_non_exhaustive()
    }
}

/// An export: the manifest (JSON) and the wrapped versions.
#[derive(Debug, Clone)]
pub struct Export {
    pub manifest: Vec<u8>,
    pub versions: Vec<WrappedVersion>,
    pub keys: usize,
    pub fingerprint: String,
}

/// Import parameters: the token that names them, the public key to wrap under, the expiry.
#[derive(Debug, Clone)]
pub struct ImportParameters {
    pub token: String,
    pub public_key_pem: String,
    pub expires_at: i64,
}

/// What an import brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub keys: Vec<KeyId>,
    pub versions: usize,
}

/// An import token: `<expiry in Unix seconds>-<16 hex digits>`, the rest of its key pair's label.
fn parse_token(token: &str) -> Result<i64> {
    let bad = || Error::invalid("import_token", "is not an import token (kmsctl key import-parameters prints one)");
    let (expires, id) = token.split_once('-').ok_or_else(bad)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(bad());
    }
    expires.parse::<i64>().map_err(|_| bad())
}

/// What an import of a bundle is checked for before anything else (an approval asked, the HSM):
/// a well-formed token and a manifest this service reads.
pub fn check_bundle(token: &str, manifest: &[u8]) -> Result<BundleManifest> {
    parse_token(token)?;
    let manifest: BundleManifest =
        serde_json::from_slice(manifest).map_err(|e| Error::invalid("manifest", format!("is not a bundle manifest: {e}")))?;
    if manifest.format != FORMAT || manifest.scheme != SCHEME {
        return Err(Error::invalid(
            "manifest",
            format!("is format {} with scheme {}; this service reads format {FORMAT}, {SCHEME}", manifest.format, manifest.scheme),
        ));
    }
    Ok(manifest)
}

/// What an import of one key's material is checked for before anything else: a well-formed
/// token, the scheme this service takes, an RSA-3072 OAEP block.
pub fn check_material(token: &str, scheme: &str, material: &[u8]) -> Result<()> {
    parse_token(token)?;
    if scheme != SCHEME {
        return Err(Error::invalid(
            "wrapping_algorithm",
            format!(
                "is {scheme:?}; this service takes {SCHEME} (RSA_AES_KEY_WRAP needs CKM_RSA_AES_KEY_WRAP, which this HSM lacks: \
                 done in two steps, its AES key could unwrap anything into a readable object)"
            ),
        ));
    }
    // RSA-3072's OAEP block.
    if material.len() != 384 {
        return Err(Error::invalid("wrapped_key_material", format!("is {} bytes; {SCHEME} under RSA-3072 is 384", material.len())));
    }
    Ok(())
}

fn no_such_parameters() -> Error {
    Error::invalid("import_token", "names no import parameters on this HSM (never issued, already used, or expired and removed)")
}

/// A key and its versions to import, with their wrapped material.
struct ToImport {
    record: KeyRecord,
    aliases: Vec<AliasName>,
    versions: Vec<(VersionRecord, Vec<u8>)>,
}

impl Kms {
    /// Exports every live key version for the customer whose public key is `customer` (a
    /// reversibility bundle), under the admin lock so that no key changes meanwhile. The export
    /// is audited, with the manifest's SHA-256, before anything is returned.
    pub fn export_keys(&self, caller: &Caller, customer: &RsaPublicKey) -> Result<Export> {
        let fingerprint = customer.fingerprint();
        let _admin = self.admin_lock()?;
        // The rows from the store, for the usage counts every node has reserved there (a node's
        // registry knows its own); the handles from the registry.
        let (stored_keys, stored_versions, stored_aliases) = self.store.read(|tx| Ok((tx.keys()?, tx.versions()?, tx.aliases()?)))?;
        let handles = {
            let state = self.registry.read();
            let mut handles = std::collections::HashMap::new();
            for entry in state.keys.values() {
                for v in entry.versions.values().filter(|v| v.record.state.has_material()) {
                    let name = ObjectName { key_id: v.record.key_id, version: v.record.version };
                    let handle = v.handle.ok_or_else(|| {
                        Error::precondition(format!("{} has no HSM object (material missing): repair the HSM before exporting", name.label()))
                    })?;
                    handles.insert(name, handle);
                }
            }
            handles
        };
        let mut versions_of: std::collections::HashMap<KeyId, Vec<&VersionRecord>> = std::collections::HashMap::new();
        for v in stored_versions.iter().filter(|v| v.state.has_material()) {
            versions_of.entry(v.key_id).or_default().push(v);
        }
        let mut aliases_of: std::collections::HashMap<KeyId, Vec<String>> = std::collections::HashMap::new();
        for a in &stored_aliases {
            aliases_of.entry(a.key_id).or_default().push(a.alias.to_string());
        }
        let mut keys = Vec::new();
        let mut order: Vec<(ObjectName, KeyHandle)> = Vec::new();
        for k in stored_keys.iter().filter(|k| k.state != KeyState::Destroyed) {
            let mut versions = Vec::new();
            for v in versions_of.remove(&k.key_id).unwrap_or_default() {
                let name = ObjectName { key_id: k.key_id, version: v.version };
                let handle =
                    *handles.get(&name).ok_or_else(|| Error::precondition(format!("{} is not loaded on this node yet; try again", name.label())))?;
                order.push((name, handle));
                versions.push(BundleVersion {
                    version: v.version,
                    state: v.state.as_str().into(),
                    created_at: v.created_at,
                    encryptions: v.reserved,
                    destruction_at: v.destruction_at,
                    sha256: String::new(),
                });
            }
            if versions.is_empty() {
                continue;
            }
            keys.push(BundleKey {
                key_id: k.key_id.to_string(),
                description: k.description.clone(),
                state: k.state.as_str().into(),
                compromised: k.compromised,
                created_at: k.created_at,
                rotation_period_secs: k.rotation_period_secs,
                next_rotation_at: k.next_rotation_at,
                destruction_at: k.destruction_at,
                primary_version: k.primary_version,
                aliases: aliases_of.remove(&k.key_id).unwrap_or_default(),
                versions,
            });
        }
        if order.len() > MAX_IMPORT_VERSIONS {
            return Err(Error::precondition(format!(
                "{} live key versions: a bundle holds at most {MAX_IMPORT_VERSIONS}, as many as an import takes",
                order.len()
            )));
        }
        caller.commit_point(|| {
            format!("export {} keys and {} live key versions, wrapped in the HSM for the customer key {fingerprint}", keys.len(), order.len())
        })?;
        let audit = self.verify_audit()?;
        let handles: Vec<KeyHandle> = order.iter().map(|(_, h)| *h).collect();
        let exported = self.hsm.export(customer, &handles)?.ok_or_else(|| {
            Error::precondition(format!(
                "the HSM does not trust the customer key {fingerprint} for an export: the HSM's security officer runs \
                 `kms-server export-key --public-key FILE` first, once per export (docs/export-format.md)"
            ))
        })?;
        crash_point("ExportKeys", Step::AfterHsm);
        if exported.len() != order.len() {
            return Err(crate::hsm::HsmError::wrong_output("C_WrapKey").into());
        }
        // `order` lists the versions key by key, as `keys` does.
        let versions: Vec<WrappedVersion> =
            order.iter().zip(exported).map(|((name, _), wrapped)| WrappedVersion { key_id: name.key_id, version: name.version, wrapped }).collect();
        for (v, w) in keys.iter_mut().flat_map(|k| k.versions.iter_mut()).zip(&versions) {
            v.sha256 = sha256_hex(&w.wrapped);
        }
        let token = self.hsm.token_info()?;
        let at = now();
        let manifest = BundleManifest {
            format: FORMAT,
            created_at: at,
            service_version: env!("CARGO_PKG_VERSION").into(),
            token_label: token.label,
            token_serial: token.serial_number,
            scheme: SCHEME.into(),
            public_key_sha256: fingerprint.clone(),
            public_key_bits: customer.bits(),
            keys,
            audit: BundleAudit {
                verified: audit.problem.is_none(),
                records: audit.records,
                pruned_through_seq: audit.pruned_through,
                checkpoints: audit.checkpoints,
                last_checkpoint_seq: audit.last_checkpoint,
            },
        };
        let json = serde_json::to_vec(&manifest).map_err(|e| Error::precondition(format!("manifest: {e}")))?;
        let detail = format!(
            "{} keys, {} versions for the customer key {fingerprint}; manifest sha256 {}",
            manifest.keys.len(),
            versions.len(),
            sha256_hex(&json)
        );
        self.store.write(|tx| tx.append_audit(&caller.audit("ExportKeys", None, None, detail.clone()), at))?;
        crash_point("ExportKeys", Step::AfterCommit);
        tracing::info!(keys = manifest.keys.len(), versions = versions.len(), "keys exported");
        Ok(Export { keys: manifest.keys.len(), manifest: json, versions, fingerprint })
    }

    /// Makes import parameters: an RSA-3072 key pair in the HSM for one import within 24 hours.
    /// Expired pairs are removed first.
    pub fn import_parameters(&self, caller: &Caller) -> Result<ImportParameters> {
        caller.commit_point(|| "make an RSA-3072 import key pair in the HSM, valid 24 hours".to_string())?;
        self.remove_expired_import_keys(now() + crate::hooks::sweep_clock_offset());
        let mut id = [0u8; 8];
        self.hsm.random(&mut id)?;
        let expires_at = now() + IMPORT_VALIDITY_SECONDS;
        let token = format!("{expires_at}-{}", hex(&id));
        let public = self.hsm.new_import_key(&format!("{IMPORT_LABEL}{token}"))?;
        let detail = format!("import parameters {token} (RSA-3072 {}), valid until {expires_at}", public.fingerprint());
        self.store.write(|tx| tx.append_audit(&caller.audit("GetImportParameters", None, None, detail.clone()), now()))?;
        Ok(ImportParameters { token, public_key_pem: public.to_pem(), expires_at })
    }

    /// Destroys the import key pairs whose time is up (a failure is logged: an expired pair is
    /// refused anyway).
    fn remove_expired_import_keys(&self, at: i64) {
        let labels = match self.hsm.import_keys() {
            Ok(labels) => labels,
            Err(e) => return tracing::warn!(error = %e, "could not list the import key pairs"),
        };
        for label in labels {
            let expired = label.strip_prefix(IMPORT_LABEL).and_then(|t| parse_token(t).ok()).is_none_or(|expires| expires <= at);
            if expired && let Err(e) = self.hsm.destroy_import_key(&label) {
                tracing::warn!(error = %e, label, "could not destroy an expired import key pair");
            }
        }
    }

    /// The label of the import key pair `token` names, if it has not expired and is on the
    /// token.
    fn import_label(&self, token: &str) -> Result<String> {
        let expires = parse_token(token)?;
        if expires <= now() + crate::hooks::sweep_clock_offset() {
            return Err(Error::precondition(format!("the import parameters {token} expired at {expires}: ask for new ones")));
        }
        let label = format!("{IMPORT_LABEL}{token}");
        if !self.hsm.has_import_key(&label)? {
            return Err(no_such_parameters());
        }
        Ok(label)
    }

    /// Imports a bundle (`export_keys` on another instance, under this one's import parameters):
    /// every key comes back with its id, aliases, states, versions and usage counts. Refused
    /// whole if any key id or alias exists here already, or if the bundle was changed.
    /// `manifest` is the one `check_bundle` read.
    pub fn import_bundle(&self, caller: &Caller, token: &str, manifest: BundleManifest, wrapped: Vec<WrappedVersion>) -> Result<Imported> {
        let label = self.import_label(token)?;
        if wrapped.len() > MAX_IMPORT_VERSIONS || wrapped.iter().any(|w| w.wrapped.is_empty() || w.wrapped.len() > MAX_WRAPPED || w.version == 0) {
            return Err(Error::invalid(
                "versions",
                format!("must be 1 to {MAX_IMPORT_VERSIONS} versions numbered from 1, each at most {MAX_WRAPPED} bytes"),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut blobs: std::collections::HashMap<(KeyId, u32), Vec<u8>> = std::collections::HashMap::new();
        for w in wrapped {
            if blobs.insert((w.key_id, w.version), w.wrapped).is_some() {
                return Err(Error::invalid("versions", format!("hold version {} of key {} twice", w.version, w.key_id)));
            }
        }
        let mut keys = Vec::new();
        for k in &manifest.keys {
            let key_id: KeyId = k.key_id.parse().map_err(|e| Error::invalid("manifest", format!("key id {:?}: {e}", k.key_id)))?;
            if !seen.insert(key_id) {
                return Err(Error::invalid("manifest", format!("lists key {key_id} twice")));
            }
            if i64::try_from(k.rotation_period_secs).is_err() || k.versions.iter().any(|v| i64::try_from(v.encryptions).is_err()) {
                return Err(Error::invalid("manifest", format!("key {key_id}: a rotation period or usage count out of range")));
            }
            let state = KeyState::parse(&k.state)
                .filter(|s| *s != KeyState::Destroyed)
                .ok_or_else(|| Error::invalid("manifest", format!("key {key_id}: state {:?}", k.state)))?;
            let mut versions = Vec::new();
            for v in &k.versions {
                let vstate = VersionState::parse(&v.state)
                    .filter(|s| s.has_material())
                    .ok_or_else(|| Error::invalid("manifest", format!("version {} of key {key_id}: state {:?}", v.version, v.state)))?;
                let blob = blobs
                    .remove(&(key_id, v.version))
                    .ok_or_else(|| Error::invalid("versions", format!("lack version {} of key {key_id}", v.version)))?;
                if sha256_hex(&blob) != v.sha256 {
                    return Err(Error::invalid("versions", format!("version {} of key {key_id} does not match the manifest's sha256", v.version)));
                }
                let record = VersionRecord {
                    key_id,
                    version: v.version,
                    state: vstate,
                    created_at: v.created_at,
                    reserved: v.encryptions,
                    destruction_at: v.destruction_at,
                };
                versions.push((record, blob));
            }
            if !versions.iter().any(|(v, _)| v.version == k.primary_version) {
                return Err(Error::invalid("manifest", format!("key {key_id}: its primary version {} is not in the bundle", k.primary_version)));
            }
            let aliases = k
                .aliases
                .iter()
                .map(|a| AliasName::parse(a).map_err(|e| Error::invalid("manifest", format!("alias {a:?}: {e}"))))
                .collect::<Result<_>>()?;
            let record = KeyRecord {
                key_id,
                description: k.description.clone(),
                state,
                compromised: k.compromised,
                created_at: k.created_at,
                rotation_period_secs: k.rotation_period_secs,
                next_rotation_at: k.next_rotation_at,
                destruction_at: k.destruction_at,
                primary_version: k.primary_version,
                origin: KeyOrigin::External,
            };
            keys.push(ToImport { record, aliases, versions });
        }
        if let Some((key_id, version)) = blobs.keys().next() {
            return Err(Error::invalid("versions", format!("hold version {version} of key {key_id}, which the manifest does not list")));
        }
        let detail = format!("from the export of token {} made at {}", manifest.token_serial, manifest.created_at);
        self.import_keys(caller, &label, keys, &detail)
    }

    /// Imports one key's material (32 bytes, RSAES-OAEP SHA-1 under the import parameters'
    /// public key) as version 1 of a new key.
    pub fn import_key_material(
        &self,
        caller: &Caller,
        token: &str,
        scheme: &str,
        material: &[u8],
        description: String,
        alias: Option<AliasName>,
    ) -> Result<KeyId> {
        check_material(token, scheme, material)?;
        let label = self.import_label(token)?;
        let mut id = [0u8; 16];
        self.hsm.random(&mut id)?;
        let key_id = KeyId::from_random(id);
        let created_at = now();
        let (record, version) = KeyRecord::new(key_id, description, created_at, 0, KeyOrigin::External);
        let key = ToImport { record, aliases: alias.into_iter().collect(), versions: vec![(version, material.to_vec())] };
        self.import_keys(caller, &label, vec![key], &format!("{scheme} key material"))?;
        Ok(key_id)
    }

    /// Unwraps `keys`' versions with the import key pair `label` and records them, each step
    /// under a create intent (a crash leaves no object without its row), then destroys the
    /// import key pair: parameters serve one import.
    fn import_keys(&self, caller: &Caller, label: &str, keys: Vec<ToImport>, detail: &str) -> Result<Imported> {
        let _admin = self.admin_lock()?;
        {
            let state = self.registry.read();
            let mut aliases = BTreeSet::new();
            for k in &keys {
                if state.keys.contains_key(&k.record.key_id) {
                    return Err(Error::AlreadyExists { what: format!("key {}", k.record.key_id) });
                }
                for a in &k.aliases {
                    if state.aliases.contains_key(a) || !aliases.insert(a.clone()) {
                        return Err(Error::AlreadyExists { what: a.to_string() });
                    }
                }
            }
        }
        let count: usize = keys.iter().map(|k| k.versions.len()).sum();
        if count == 0 || count > MAX_IMPORT_VERSIONS {
            return Err(Error::invalid("versions", format!("hold {count} key versions; an import takes 1 to {MAX_IMPORT_VERSIONS}")));
        }
        caller.commit_point(|| format!("import {} keys and {count} key versions into the HSM as non-readable token objects", keys.len()))?;
        let at = now();
        let intents = self.store.write(|tx| {
            keys.iter()
                .flat_map(|k| k.versions.iter())
                .map(|(v, _)| tx.insert_intent(IntentKind::Create, v.key_id, v.version, at))
                .collect::<std::result::Result<Vec<_>, _>>()
        })?;
        let drop_intents = |intents: &[i64]| {
            if let Err(e) = self.store.write(|tx| intents.iter().try_for_each(|i| tx.delete_intent(*i))) {
                tracing::warn!(error = %e, "could not remove create intents; recovery will");
            }
        };
        let objects: Vec<(ObjectName, Vec<u8>)> = keys
            .iter()
            .flat_map(|k| k.versions.iter())
            .map(|(v, blob)| (ObjectName { key_id: v.key_id, version: v.version }, blob.clone()))
            .collect();
        let handles = match self.hsm.import(label, &objects) {
            Ok(Some(handles)) => handles,
            Ok(None) => {
                drop_intents(&intents);
                return Err(no_such_parameters());
            }
            // The HSM refused the material and left nothing made.
            Err(e) if e.refused_wrapped_material() => {
                drop_intents(&intents);
                return Err(Error::invalid(
                    "wrapped key material",
                    "does not unwrap under these import parameters (wrapped under another key, with another scheme, or changed)",
                ));
            }
            // Anything else may have left objects made: the intents stay for recovery to undo.
            Err(e) => return Err(e.into()),
        };
        crash_point("ImportKeys", Step::AfterHsm);
        let mut handles = handles.into_iter();
        let mut state = self.registry.write();
        let committed = self.store.write(|tx| {
            for k in &keys {
                tx.insert_key(&k.record)?;
                for (v, _) in &k.versions {
                    tx.insert_version(v)?;
                }
                for a in &k.aliases {
                    tx.insert_alias(&AliasRecord { alias: a.clone(), key_id: k.record.key_id, created_at: at })?;
                }
                let versions = k.versions.iter().map(|(v, _)| v.version.to_string()).collect::<Vec<_>>().join(",");
                let what = format!("imported {} with versions {versions} (origin external): {detail}", k.record.state);
                tx.append_audit(&caller.audit("ImportKey", Some(k.record.key_id), None, what), at)?;
            }
            for i in &intents {
                tx.delete_intent(*i)?;
            }
            changed(tx, false)
        });
        let marks = match committed {
            Ok(marks) => marks,
            Err(e) => {
                drop(state);
                for handle in handles {
                    if let Err(e) = self.hsm.destroy(handle) {
                        tracing::error!(error = %e, "could not undo an imported object; recovery will on restart");
                    }
                }
                drop_intents(&intents);
                return Err(e.into());
            }
        };
        crash_point("ImportKeys", Step::AfterCommit);
        state.note(marks);
        let mut imported = Vec::new();
        for k in keys {
            for alias in k.aliases {
                state.aliases.insert(alias.clone(), AliasRecord { alias, key_id: k.record.key_id, created_at: at });
            }
            imported.push(k.record.key_id);
            let versions = k.versions.into_iter().map(|(v, _)| (v, handles.next())).collect();
            state.put(k.record, versions);
        }
        drop(state);
        if let Err(e) = self.hsm.destroy_import_key(label) {
            tracing::warn!(error = %e, "could not destroy a used import key pair; it expires within 24 hours");
        }
        tracing::info!(keys = imported.len(), versions = count, "keys imported");
        Ok(Imported { keys: imported, versions: count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_tokens_are_an_expiry_and_sixteen_hex_digits() {
        assert_eq!(parse_token("1765000000-0123456789abcdef").ok(), Some(1_765_000_000));
        for bad in ["", "1765000000", "1765000000-0123456789ABCDEF", "x-0123456789abcdef", "1765000000-0123", "1765000000-0123456789abcdef0"] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
    }
}
