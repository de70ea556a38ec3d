//! Startup reconciliation of the store with the HSM, in both directions.
//!
//! 1. Intents left by an interrupted operation are settled: an interrupted *create* (CreateKey,
//!    RotateKey) is rolled back — its object, if the HSM made one, is destroyed — so the
//!    operation is wholly absent; an interrupted *destroy* is rolled forward — the object is
//!    destroyed if still there and the version recorded as Destroyed — because destruction was
//!    already decided.
//! 2. Every live version row is matched with its object. A missing object is reported (log and
//!    audit) and the version marked unusable in memory, never silently dropped: the HSM may be
//!    the wrong one and come back.
//! 3. An object of a version recorded as Destroyed is destroyed. Objects in our namespace with no
//!    row and no intent are reported and left alone: destroying key material we cannot explain
//!    is not a decision to take automatically.

use std::collections::HashMap;

use super::Kms;
use crate::audit::AuditEvent;
use crate::clock::now;
use crate::domain::lifecycle::VersionState;
use crate::error::{Error, Result};
use crate::hsm::{KeyHandle, ObjectName};
use crate::store::{IntentKind, VersionRecord};

impl Kms {
    /// Startup: settles the intents of interrupted operations, matches rows and objects, and
    /// loads the registry. Under the cluster's admin lock, so that no live node is in the middle
    /// of the operation an intent belongs to.
    pub(super) fn recover(&self) -> Result<()> {
        let _cluster = self.store.admin_lease(std::time::Duration::from_secs(60))?;
        self.handles_generation.store(self.hsm.generation(), std::sync::atomic::Ordering::Release);
        let mut objects: HashMap<ObjectName, KeyHandle> = self.hsm.find_keys()?.into_iter().collect();
        self.settle_intents(&mut objects)?;

        let versions = self.store.read(|tx| tx.versions())?;
        for v in versions {
            let name = ObjectName { key_id: v.key_id, version: v.version };
            match (v.state.has_material(), objects.get(&name).copied()) {
                (true, None) => {
                    let detail = "HSM object missing: version unusable until the HSM is repaired".to_string();
                    tracing::error!(key_id = %v.key_id, version = v.version, "recovery: {detail}");
                    self.record(&AuditEvent::system("Recovery", Some(v.key_id), Some(v.version), detail))?;
                }
                (false, Some(handle)) => {
                    self.hsm.destroy(handle)?;
                    objects.remove(&name);
                    let detail = "object of a destroyed version found and destroyed".to_string();
                    tracing::warn!(key_id = %v.key_id, version = v.version, "recovery: {detail}");
                    self.record(&AuditEvent::system("Recovery", Some(v.key_id), Some(v.version), detail))?;
                }
                _ => {}
            }
        }
        let known: std::collections::HashSet<ObjectName> =
            self.store.read(|tx| tx.versions())?.into_iter().map(|v| ObjectName { key_id: v.key_id, version: v.version }).collect();
        for name in objects.keys().filter(|n| !known.contains(n)) {
            tracing::warn!(label = %name.label(), "recovery: HSM object with no row and no intent left in place");
        }
        self.reload_registry(Some(objects))?;
        tracing::info!(keys = self.registry.read().keys.len(), "registry loaded");
        Ok(())
    }

    /// Settles every intent in the store: an interrupted create rolled back, an interrupted
    /// destroy rolled forward (`objects` loses what is destroyed). The caller holds the cluster's
    /// admin lock, so each intent belongs to a node that died (or to this one, before it
    /// started): the leader settles a dead node's intents on its sweeps, each node its own at
    /// startup.
    pub(super) fn settle_intents(&self, objects: &mut HashMap<ObjectName, KeyHandle>) -> Result<usize> {
        let intents = self.store.read(|tx| tx.intents())?;
        let settled = intents.len();
        for intent in intents {
            let name = ObjectName { key_id: intent.key_id, version: intent.version };
            let row = self.version_row(&name)?;
            let detail = match intent.kind {
                IntentKind::Create if row.is_some() => "create intent of a committed version removed".to_string(),
                IntentKind::Create => {
                    if let Some(handle) = objects.remove(&name) {
                        self.hsm.destroy(handle)?;
                        "interrupted creation rolled back: HSM object destroyed".to_string()
                    } else {
                        "interrupted creation rolled back: no HSM object had been made".to_string()
                    }
                }
                IntentKind::Destroy => {
                    if let Some(handle) = objects.remove(&name) {
                        self.hsm.destroy(handle)?;
                    }
                    "interrupted destruction completed".to_string()
                }
            };
            let at = now();
            self.store.write(|tx| {
                if let (IntentKind::Destroy, Some(mut v)) = (intent.kind, row.clone())
                    && v.state.has_material()
                {
                    v.state = VersionState::Destroyed;
                    v.destruction_at = Some(at);
                    tx.update_version_state(&v)?;
                }
                tx.delete_intent(intent.id)?;
                tx.append_audit(&AuditEvent::system("Recovery", Some(name.key_id), Some(name.version), detail.clone()), at)?;
                super::admin::changed(tx, intent.kind == IntentKind::Destroy).map(drop)
            })?;
            tracing::warn!(key_id = %name.key_id, version = name.version, "recovery: {detail}");
        }

        Ok(settled)
    }

    /// Loads keys, versions, aliases, principals, grants, the facades' settings and the store's
    /// marks into a new state of the registry, swapped in at once. Versions already known keep
    /// their handles and usage counters; a new version (made by another node) gets its object from `objects`, or from
    /// one search of the HSM when not given. A version that lost its material since (destroyed,
    /// or its key compromised, on another node) has this process's session copies destroyed.
    /// The caller holds the local admin lock.
    pub(super) fn reload_registry(&self, objects: Option<HashMap<ObjectName, KeyHandle>>) -> Result<()> {
        let (keys, versions, aliases, principals, grants, marks, (xks_stores, xks_credentials), (cse_settings, cse_issuers)) =
            self.store.read(|tx| {
                let facades = ((tx.xks_key_stores()?, tx.xks_credentials()?), (tx.cse_settings()?, tx.cse_issuers()?));
                Ok((tx.keys()?, tx.versions()?, tx.aliases()?, tx.principals()?, tx.grants()?, tx.marks()?, facades.0, facades.1))
            })?;
        let xks = self.xks_directory_of(&self.registry.read().xks, xks_stores, xks_credentials);
        let old = self.registry.read().keys.clone();
        let known = |key_id, version| old.get(&key_id).and_then(|e| e.versions.get(&version).cloned());
        let compromised: std::collections::HashSet<_> = keys.iter().filter(|k| k.compromised).map(|k| k.key_id).collect();
        // This process's copies of versions that lost their material, or whose key was compromised.
        for v in &versions {
            if let Some(entry) = known(v.key_id, v.version)
                && let Some(handle) = entry.handle
            {
                let lost = entry.record.state.has_material() && !v.state.has_material();
                let was_compromised = old.get(&v.key_id).is_some_and(|e| e.record.compromised);
                if lost || (compromised.contains(&v.key_id) && !was_compromised) {
                    self.drop_copies(v.key_id, v.version, handle);
                }
            }
        }
        let missing = versions.iter().any(|v| v.state.has_material() && known(v.key_id, v.version).is_none_or(|e| e.handle.is_none()));
        let objects = match objects {
            Some(objects) => objects,
            None if missing => self.hsm.find_keys()?.into_iter().collect(),
            None => HashMap::new(),
        };
        let mut by_key: HashMap<_, Vec<(VersionRecord, Option<KeyHandle>)>> = HashMap::new();
        for v in versions {
            let name = ObjectName { key_id: v.key_id, version: v.version };
            let handle = match v.state.has_material() {
                false => None,
                true => known(v.key_id, v.version).and_then(|e| e.handle).or_else(|| objects.get(&name).copied()),
            };
            by_key.entry(v.key_id).or_default().push((v, handle));
        }
        let mut state = self.registry.write();
        // Entries are rebuilt on the old ones, so that usage counters carry over.
        let mut fresh = super::registry::State {
            keys: std::mem::take(&mut state.keys),
            revocation_epoch: marks.epoch,
            changes: marks.changes,
            xks: std::sync::Arc::new(xks),
            cse: std::sync::Arc::new(super::cse::Config::new(cse_settings, cse_issuers)),
            ..Default::default()
        };
        for a in aliases {
            fresh.aliases.insert(a.alias.clone(), a);
        }
        for p in principals {
            fresh.principals.insert(p.name.clone(), p);
        }
        for g in grants {
            fresh.grants.entry(g.key_id).or_default().push(g);
        }
        for k in keys {
            let versions = by_key.remove(&k.key_id).unwrap_or_default();
            fresh.put(k, versions);
        }
        *state = fresh;
        Ok(())
    }

    /// Reloads the registry if the store counts changes it does not reflect (another node's).
    /// The caller holds the local admin lock.
    pub(super) fn reload_if_changed(&self) -> Result<bool> {
        let marks = self.store.read(|tx| tx.marks())?;
        if marks.changes == self.registry.read().changes {
            return Ok(false);
        }
        self.reload_registry(None)?;
        tracing::debug!(changes = marks.changes, "registry reloaded: another node changed the store");
        Ok(true)
    }

    /// After a call failed with `error`: if the HSM refused a handle as stale, looks the key
    /// objects up again (`repair_if_stale`), so that the next call finds them.
    pub fn repair_after(&self, error: &Error) {
        if let Error::Hsm(e) = error
            && e.stale_handle()
            && let Err(e) = self.repair_if_stale()
        {
            tracing::warn!(error = %e, "looking the key objects up again failed");
        }
    }

    /// Looks the key objects up again after the HSM link was repaired (its handles are then
    /// stale, and refused), at most once per repair; every call that failed on a stale handle
    /// asks for it.
    pub fn repair_if_stale(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.hsm.generation() == self.handles_generation.load(Ordering::Acquire) {
            return Ok(());
        }
        self.repair_handles()
    }

    /// Looks every key object up again and replaces the cached handles. The registry keeps its
    /// states and usage counters; a version whose object is gone becomes `material_missing`.
    /// The lookup is applied only if the canary works after it: a token that does not answer,
    /// or a session that lost its login, sees none of the private key objects, and taking that
    /// for "every key is gone" would turn an outage into missing material.
    pub(super) fn repair_handles(&self) -> Result<()> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.hsm.generation();
        let objects: HashMap<ObjectName, KeyHandle> = self.hsm.find_keys()?.into_iter().collect();
        self.probe_once()?;
        self.handles_generation.store(generation, std::sync::atomic::Ordering::Release);
        let mut state = self.registry.write();
        let entries: Vec<_> = state.keys.values().cloned().collect();
        for entry in entries {
            let versions = entry
                .versions
                .values()
                .map(|v| {
                    let name = ObjectName { key_id: v.record.key_id, version: v.record.version };
                    let handle = if v.record.state.has_material() { objects.get(&name).copied() } else { None };
                    (v.record.clone(), handle)
                })
                .collect();
            state.put(entry.record.clone(), versions);
        }
        tracing::info!(objects = objects.len(), "key object handles looked up again");
        Ok(())
    }

    fn version_row(&self, name: &ObjectName) -> Result<Option<VersionRecord>> {
        // Startup only: a full read is fine, and keeps the store's interface small.
        let versions = self.store.read(|tx| tx.versions())?;
        Ok(versions.into_iter().find(|v| v.key_id == name.key_id && v.version == name.version))
    }
}
