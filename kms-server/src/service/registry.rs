//! The in-memory view of every key, read by the data plane without touching the database.
//!
//! Entries are immutable snapshots behind `Arc`s: an admin change builds a new entry and swaps it
//! in while holding the write lock *across its database commit*, so no request that starts after
//! the commit can see the old state. Usage counters are shared between snapshots of a version.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::domain::budget::UsageLimits;
use crate::domain::ids::{AliasName, KeyId, KeyRef};
use crate::domain::policy::Grant;
use crate::error::{Error, Result};
use crate::hsm::KeyHandle;
use crate::store::{AliasRecord, KeyRecord, PrincipalRecord, Store, VersionRecord};

/// The AES-GCM invocation count of one version (see `domain::budget`).
#[derive(Debug)]
pub struct Usage {
    /// Invocations handed out since startup, on top of the count reserved at startup.
    used: AtomicU64,
    /// The count persisted in the database: `used` may not pass it without a new reservation.
    reserved: AtomicU64,
    /// Serialises reservations (one database write per block).
    reserving: Mutex<()>,
}

impl Usage {
    /// After a restart, every count reserved before is treated as used: the unused rest of the
    /// last block is lost rather than risk counting an encryption twice as "not done".
    pub fn new(reserved: u64) -> Self {
        Usage { used: AtomicU64::new(reserved), reserved: AtomicU64::new(reserved), reserving: Mutex::new(()) }
    }

    /// Encryptions counted so far: every invocation handed out since startup plus everything
    /// reserved before it, so at least the number performed, and never above the limit.
    pub fn used(&self, limits: &UsageLimits) -> u64 {
        self.used.load(Ordering::SeqCst).min(limits.encryption_limit)
    }

    /// Takes the number of the next invocation, reserving a new block in the store first when
    /// the current one is spent. Returns `None` when the limit is reached.
    pub fn take(&self, key_id: KeyId, version: u32, limits: &UsageLimits, store: &Store) -> Result<Option<u64>> {
        let n = self.used.fetch_add(1, Ordering::SeqCst) + 1;
        if n > limits.encryption_limit {
            return Ok(None);
        }
        if n <= self.reserved.load(Ordering::SeqCst) {
            return Ok(Some(n));
        }
        let _guard = self.reserving.lock().unwrap_or_else(|p| p.into_inner());
        let reserved = self.reserved.load(Ordering::SeqCst);
        if n <= reserved {
            return Ok(Some(n));
        }
        let Some(next) = limits.next_reservation(reserved, n) else { return Ok(None) };
        store.write(|tx| tx.reserve_usage(key_id, version, next))?;
        self.reserved.store(next, Ordering::SeqCst);
        Ok(Some(n))
    }
}

/// One version as the data plane sees it.
#[derive(Debug)]
pub struct VersionEntry {
    pub record: VersionRecord,
    /// `None` when the HSM object was missing at startup, or after destruction.
    pub handle: Option<KeyHandle>,
    pub usage: Arc<Usage>,
}

/// One key as the data plane sees it.
#[derive(Debug)]
pub struct KeyEntry {
    pub record: KeyRecord,
    pub versions: BTreeMap<u32, Arc<VersionEntry>>,
    pub aliases: Vec<AliasName>,
}

impl KeyEntry {
    pub fn primary(&self) -> Option<&Arc<VersionEntry>> {
        self.versions.get(&self.record.primary_version)
    }

    /// A live version whose HSM object could not be found.
    pub fn material_missing(&self) -> bool {
        self.versions.values().any(|v| v.record.state.has_material() && v.handle.is_none())
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub keys: HashMap<KeyId, Arc<KeyEntry>>,
    pub aliases: HashMap<AliasName, AliasRecord>,
    pub principals: HashMap<String, PrincipalRecord>,
    /// Live grants, by key.
    pub grants: HashMap<KeyId, Vec<Grant>>,
    /// The store's revocation epoch, as of the last change committed (see `Kms::revoked`).
    pub revocation_epoch: u64,
}

impl State {
    pub fn resolve(&self, key: &KeyRef) -> Result<&Arc<KeyEntry>> {
        let id = match key {
            KeyRef::Id(id) => *id,
            KeyRef::Alias(alias) => self.aliases.get(alias).ok_or_else(|| Error::NotFound { what: alias.to_string() })?.key_id,
        };
        self.keys.get(&id).ok_or_else(|| Error::NotFound { what: format!("key {id}") })
    }

    /// The grant with this id, wherever it is.
    pub fn grant(&self, grant_id: &str) -> Option<&Grant> {
        self.grants.values().flatten().find(|g| g.grant_id == grant_id)
    }

    /// Rebuilds a key's entry after its row, versions or aliases changed, keeping the handles
    /// and usage counters of the versions it already had.
    pub fn put(&mut self, record: KeyRecord, versions: Vec<(VersionRecord, Option<KeyHandle>)>) {
        let old = self.keys.get(&record.key_id).cloned();
        let versions = versions
            .into_iter()
            .map(|(v, handle)| {
                let usage = old
                    .as_ref()
                    .and_then(|o| o.versions.get(&v.version))
                    .map(|e| e.usage.clone())
                    .unwrap_or_else(|| Arc::new(Usage::new(v.reserved)));
                (v.version, Arc::new(VersionEntry { record: v, handle, usage }))
            })
            .collect();
        let aliases = self.aliases_of(record.key_id);
        self.keys.insert(record.key_id, Arc::new(KeyEntry { record, versions, aliases }));
    }

    /// Replaces a key's row, keeping its versions as they are.
    pub fn put_record(&mut self, record: KeyRecord) {
        let versions = self.versions_of(record.key_id);
        self.put(record, versions);
    }

    /// Replaces one version's row (and handle), keeping the rest.
    pub fn put_version(&mut self, version: VersionRecord, handle: Option<KeyHandle>) {
        let Some(entry) = self.keys.get(&version.key_id).cloned() else { return };
        let mut versions = self.versions_of(version.key_id);
        versions.retain(|(v, _)| v.version != version.version);
        versions.push((version, handle));
        versions.sort_by_key(|(v, _)| v.version);
        self.put(entry.record.clone(), versions);
    }

    pub fn versions_of(&self, key_id: KeyId) -> Vec<(VersionRecord, Option<KeyHandle>)> {
        self.keys.get(&key_id).map(|e| e.versions.values().map(|v| (v.record.clone(), v.handle)).collect()).unwrap_or_default()
    }

    fn aliases_of(&self, key_id: KeyId) -> Vec<AliasName> {
        let mut out: Vec<AliasName> = self.aliases.values().filter(|a| a.key_id == key_id).map(|a| a.alias.clone()).collect();
        out.sort();
        out
    }

    /// Refreshes the alias list shown in a key's entry.
    pub fn refresh_aliases(&mut self, key_id: KeyId) {
        if let Some(entry) = self.keys.get(&key_id).cloned() {
            let versions = self.versions_of(key_id);
            self.put(entry.record.clone(), versions);
        }
    }
}

/// The registry: the state behind one lock.
#[derive(Debug, Default)]
pub struct Registry(RwLock<State>);

impl Registry {
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        // Writers only swap whole entries, so a poisoned lock still holds a consistent map.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of a key, resolved from an id or alias.
    pub fn entry(&self, key: &KeyRef) -> Result<Arc<KeyEntry>> {
        self.read().resolve(key).cloned()
    }
}
