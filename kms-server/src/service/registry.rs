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

/// The AES-GCM invocation count of one version (see `domain::budget`), as this node hands it
/// out.
///
/// Numbers come from blocks this node reserved in the store: a block moves the store's
/// `reserved` count from what was read to one block more, by compare and swap, so that with
/// several nodes each block is one node's, and the store's count is always at least the number
/// of encryptions done anywhere (the rest of a block a node did not finish is lost, as after a
/// crash). Each number is handed out once in the whole cluster: the one equal to the rotation
/// threshold triggers the rotation on the node that got it.
#[derive(Debug)]
pub struct Usage {
    /// The block being handed out: the last number handed out, and the block's end.
    block: Mutex<(u64, u64)>,
    /// The highest count this node knows of (its last number, or the store's count at its last
    /// reservation), for status: exact with one node, a lower bound of the store's with several.
    seen: AtomicU64,
}

impl Usage {
    /// After a restart, every count reserved before is treated as used: the unused rest of the
    /// last block is lost rather than risk counting an encryption twice as "not done".
    pub fn new(reserved: u64) -> Self {
        Usage { block: Mutex::new((reserved, reserved)), seen: AtomicU64::new(reserved) }
    }

    /// Encryptions counted so far, as this node knows them; never above the limit.
    pub fn used(&self, limits: &UsageLimits) -> u64 {
        self.seen.load(Ordering::SeqCst).min(limits.encryption_limit)
    }

    /// Takes the number of the next invocation, reserving a new block in the store first when
    /// the current one is spent. Returns `None` when the limit is reached.
    pub fn take(&self, key_id: KeyId, version: u32, limits: &UsageLimits, store: &Store) -> Result<Option<u64>> {
        let mut block = self.block.lock().unwrap_or_else(|p| p.into_inner());
        if block.0 >= block.1 {
            *block = loop {
                let reserved = store.read(|tx| tx.reserved(key_id, version))?;
                let Some(end) = limits.next_block(reserved) else {
                    self.seen.fetch_max(limits.encryption_limit, Ordering::SeqCst);
                    return Ok(None);
                };
                // Another node may have moved the count since it was read: then read again.
                if store.write(|tx| tx.reserve_block(key_id, version, reserved, end))? {
                    break (reserved, end);
                }
            };
        }
        block.0 += 1;
        self.seen.fetch_max(block.0, Ordering::SeqCst);
        Ok(Some(block.0))
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
    /// The store's revocation epoch, as of the last change committed or loaded.
    pub revocation_epoch: u64,
    /// The store's count of changes this state reflects: when the store's is higher, another
    /// node changed something, and the registry is reloaded (`Kms::reload_registry`).
    pub changes: u64,
    /// AWS external key stores and their credentials (`service::xks`).
    pub xks: Arc<super::xks::Directory>,
    /// Google Workspace CSE's settings and trusted issuers (`service::cse`).
    pub cse: Arc<super::cse::Config>,
}

impl State {
    /// After this node committed a change whose transaction left the store at `marks`: the
    /// epoch is taken; the count too when this change was the only one since (otherwise another
    /// node's change came between, and the next reload picks both up).
    pub fn note(&mut self, marks: crate::store::Marks) {
        self.revocation_epoch = self.revocation_epoch.max(marks.epoch);
        if marks.changes == self.changes + 1 {
            self.changes = marks.changes;
        }
    }

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
