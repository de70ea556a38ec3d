//! A data-key cache for [`crate::DataClient`], off by default, as the AWS Encryption SDK's
//! caching materials manager does it.
//!
//! Without it every envelope costs one call to the service; with it a data key is reused for
//! several envelopes under the same key and encryption context, within limits on its age, the
//! number of envelopes and the number of bytes it encrypts (each limit bounds how much data one
//! leaked data key exposes). Unwrapped data keys are cached likewise for decryption, by wrapped
//! key and context.
//!
//! Revocation: every answer of the service carries its revocation epoch, which rises with each
//! disable, compromise, destruction, revoked grant or disabled principal. When the client sees it
//! change, or when the service refuses a call (PERMISSION_DENIED, FAILED_PRECONDITION), the whole
//! cache is dropped, so a revocation is felt from the client's next call to the service on. A
//! cache hit makes no call: `max_age` bounds how long a revoked key can still be used from the
//! cache by a client that calls nothing else. Dropped entries are wiped (`DataKey` zeroizes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::DataKey;

/// How far a cached data key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// The longest a data key is kept after the service made or unwrapped it.
    pub max_age: Duration,
    /// The most envelopes one cached data key encrypts.
    pub max_messages: u64,
    /// The most plaintext bytes one cached data key encrypts.
    pub max_bytes: u64,
    /// The most entries kept (each kind); the oldest goes first.
    pub capacity: usize,
}

impl Default for CacheLimits {
    /// One minute, 1,000 envelopes, 1 GiB, 1,000 entries: a cut of the service's load by up to
    /// 1,000 with a short window of exposure. The AWS Encryption SDK leaves `max_age` to the
    /// caller and defaults the others to their maxima; a key manager built for revocation picks
    /// tighter ones.
    fn default() -> Self {
        CacheLimits { max_age: Duration::from_secs(60), max_messages: 1000, max_bytes: 1 << 30, capacity: 1000 }
    }
}

type Context = BTreeMap<String, String>;

#[derive(Debug)]
struct EncryptionEntry {
    key: Arc<DataKey>,
    wrapped: Vec<u8>,
    created: Instant,
    messages: u64,
    bytes: u64,
}

#[derive(Debug)]
struct DecryptionEntry {
    key: Arc<DataKey>,
    created: Instant,
}

/// The cache. `DataClient::with_cache` turns it on; it is shared by the clones of a client.
#[derive(Debug)]
pub struct DataKeyCache {
    limits: CacheLimits,
    /// The last revocation epoch the service answered with.
    epoch: Option<u64>,
    encryption: HashMap<(String, Context), EncryptionEntry>,
    decryption: HashMap<(Vec<u8>, Context), DecryptionEntry>,
}

impl DataKeyCache {
    /// An empty cache. A workload turns the cache on with `DataClient::with_cache`; the envelope
    /// helpers then use it. Directly:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Instant;
    /// use kms_client::{CacheLimits, DataKeyCache};
    /// # fn data_key() -> kms_client::DataKey { kms_client::DataKey::from_vec(vec![7; 32]) }
    /// let mut cache = DataKeyCache::new(CacheLimits { max_messages: 2, ..CacheLimits::default() });
    /// let ctx = [("tenant".to_string(), "acme".to_string())].into();
    /// let now = Instant::now();
    /// assert!(cache.for_encryption("alias/app", &ctx, 100, now).is_none());
    /// cache.put_for_encryption("alias/app", &ctx, Arc::new(data_key()), b"wrapped".to_vec(), 100, now);
    /// assert!(cache.for_encryption("alias/app", &ctx, 100, now).is_some(), "the second envelope reuses it");
    /// assert!(cache.for_encryption("alias/app", &ctx, 100, now).is_none(), "max_messages reached");
    ///
    /// cache.put_for_decryption(b"wrapped", &ctx, Arc::new(data_key()), now);
    /// cache.observe_epoch(1);
    /// assert!(!cache.is_empty());
    /// cache.observe_epoch(2); // the service revoked something: everything goes
    /// assert!(cache.is_empty());
    /// ```
    pub fn new(limits: CacheLimits) -> Self {
        DataKeyCache { limits, epoch: None, encryption: HashMap::new(), decryption: HashMap::new() }
    }

    /// Drops every entry (and so wipes every cached data key no caller still holds).
    pub fn purge(&mut self) {
        self.encryption.clear();
        self.decryption.clear();
    }

    /// Notes the revocation epoch of an answer; a change drops everything cached before it.
    pub fn observe_epoch(&mut self, epoch: u64) {
        if self.epoch.is_some_and(|seen| seen != epoch) {
            self.purge();
        }
        self.epoch = Some(epoch);
    }

    /// How many data keys are cached (for encryption, for decryption).
    pub fn len(&self) -> (usize, usize) {
        (self.encryption.len(), self.decryption.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    fn expire(&mut self, now: Instant) {
        let max_age = self.limits.max_age;
        self.encryption.retain(|_, e| now.duration_since(e.created) < max_age);
        self.decryption.retain(|_, e| now.duration_since(e.created) < max_age);
    }

    /// A cached data key for one more envelope of `bytes` bytes under `key_id` and `context`,
    /// counted against its limits; `None` when there is none left to use.
    pub fn for_encryption(&mut self, key_id: &str, context: &Context, bytes: u64, now: Instant) -> Option<(Arc<DataKey>, Vec<u8>)> {
        self.expire(now);
        let limits = self.limits;
        let slot = (key_id.to_string(), context.clone());
        let entry = self.encryption.get_mut(&slot)?;
        if entry.messages >= limits.max_messages || entry.bytes.saturating_add(bytes) > limits.max_bytes {
            self.encryption.remove(&slot);
            return None;
        }
        entry.messages += 1;
        entry.bytes += bytes;
        Some((entry.key.clone(), entry.wrapped.clone()))
    }

    /// Counts `bytes` more against a cached entry, dropping it once past the byte limit.
    pub fn count_bytes(&mut self, key_id: &str, context: &Context, bytes: u64) {
        let slot = (key_id.to_string(), context.clone());
        if let Some(entry) = self.encryption.get_mut(&slot) {
            entry.bytes = entry.bytes.saturating_add(bytes);
            if entry.bytes >= self.limits.max_bytes {
                self.encryption.remove(&slot);
            }
        }
    }

    /// Keeps a data key the service just made, already used for one envelope of `bytes` bytes.
    pub fn put_for_encryption(&mut self, key_id: &str, context: &Context, key: Arc<DataKey>, wrapped: Vec<u8>, bytes: u64, now: Instant) {
        if self.limits.max_messages <= 1 || bytes >= self.limits.max_bytes {
            return;
        }
        if self.encryption.len() >= self.limits.capacity
            && let Some(oldest) = self.encryption.iter().min_by_key(|(_, e)| e.created).map(|(k, _)| k.clone())
        {
            self.encryption.remove(&oldest);
        }
        self.encryption.insert((key_id.to_string(), context.clone()), EncryptionEntry { key, wrapped, created: now, messages: 1, bytes });
    }

    /// A cached unwrapped data key for `wrapped` under `context`.
    pub fn for_decryption(&mut self, wrapped: &[u8], context: &Context, now: Instant) -> Option<Arc<DataKey>> {
        self.expire(now);
        self.decryption.get(&(wrapped.to_vec(), context.clone())).map(|e| e.key.clone())
    }

    pub fn put_for_decryption(&mut self, wrapped: &[u8], context: &Context, key: Arc<DataKey>, now: Instant) {
        if self.decryption.len() >= self.limits.capacity
            && let Some(oldest) = self.decryption.iter().min_by_key(|(_, e)| e.created).map(|(k, _)| k.clone())
        {
            self.decryption.remove(&oldest);
        }
        self.decryption.insert((wrapped.to_vec(), context.clone()), DecryptionEntry { key, created: now });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Arc<DataKey> {
        Arc::new(DataKey(zeroize::Zeroizing::new(vec![byte; 32])))
    }

    fn ctx(v: &str) -> Context {
        [("tenant".to_string(), v.to_string())].into()
    }

    #[test]
    fn a_data_key_is_reused_within_its_limits_only() {
        let limits = CacheLimits { max_age: Duration::from_secs(10), max_messages: 3, max_bytes: 100, capacity: 10 };
        let mut cache = DataKeyCache::new(limits);
        let t0 = Instant::now();
        cache.put_for_encryption("k", &ctx("a"), key(1), b"w".to_vec(), 10, t0);
        // Another key or another context is another entry.
        assert!(cache.for_encryption("other", &ctx("a"), 10, t0).is_none());
        assert!(cache.for_encryption("k", &ctx("b"), 10, t0).is_none());
        // Messages: the first envelope was counted at put; two more are allowed.
        assert_eq!(cache.for_encryption("k", &ctx("a"), 10, t0).unwrap().1, b"w");
        assert!(cache.for_encryption("k", &ctx("a"), 10, t0).is_some());
        assert!(cache.for_encryption("k", &ctx("a"), 10, t0).is_none(), "a fourth envelope is one too many");
        assert_eq!(cache.len(), (0, 0), "a spent entry is dropped");
        // Bytes.
        cache.put_for_encryption("k", &ctx("a"), key(2), b"w".to_vec(), 60, t0);
        assert!(cache.for_encryption("k", &ctx("a"), 41, t0).is_none(), "60 + 41 > 100");
        // Age.
        cache.put_for_encryption("k", &ctx("a"), key(3), b"w".to_vec(), 1, t0);
        assert!(cache.for_encryption("k", &ctx("a"), 1, t0 + Duration::from_secs(9)).is_some());
        assert!(cache.for_encryption("k", &ctx("a"), 1, t0 + Duration::from_secs(10)).is_none());
        cache.put_for_decryption(b"w", &ctx("a"), key(4), t0);
        assert!(cache.for_decryption(b"w", &ctx("a"), t0).is_some());
        assert!(cache.for_decryption(b"w", &ctx("b"), t0).is_none());
        assert!(cache.for_decryption(b"w", &ctx("a"), t0 + Duration::from_secs(11)).is_none());
    }

    #[test]
    fn a_new_revocation_epoch_drops_everything() {
        let mut cache = DataKeyCache::new(CacheLimits::default());
        let t0 = Instant::now();
        cache.observe_epoch(5);
        cache.put_for_encryption("k", &ctx("a"), key(1), b"w".to_vec(), 1, t0);
        cache.put_for_decryption(b"w", &ctx("a"), key(1), t0);
        cache.observe_epoch(5);
        assert_eq!(cache.len(), (1, 1));
        cache.observe_epoch(6);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_oldest_entry_makes_room() {
        let mut cache = DataKeyCache::new(CacheLimits { capacity: 2, ..CacheLimits::default() });
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            cache.put_for_encryption(id, &ctx("x"), key(1), b"w".to_vec(), 1, t0 + Duration::from_millis(i as u64));
        }
        assert!(cache.for_encryption("a", &ctx("x"), 1, t0).is_none());
        assert!(cache.for_encryption("c", &ctx("x"), 1, t0).is_some());
        assert_eq!(cache.len().0, 2);
    }
}
