//! The service: the data-plane operations, the key lifecycle, startup recovery and background
//! work, over the HSM trait, the store and the in-memory registry.
//!
//! Every method here is synchronous and may block on the HSM or SQLite: the gRPC layer calls it
//! from the data workers (`workers.rs`) or tokio's blocking pool.

mod admin;
mod audit;
mod backup;
pub mod cse;
pub mod events;
pub mod explain;
pub mod export;
pub mod officers;
pub mod quorum;
mod recovery;
pub mod registry;
pub mod report;
pub mod review;
pub mod status;
pub mod xks;

use std::sync::{Arc, Mutex};

use crate::clock::now;
use crate::domain::blob::{Blob, BlobHeader, IV_LEN, Iv, MAX_PLAINTEXT};
use crate::domain::budget::UsageLimits;
use crate::domain::context::EncryptionContext;
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::lifecycle::{KeyState, Use, VersionState, key_allows};
use crate::domain::policy::{self, Authorized, Denied, Operation, PrincipalState};
use crate::error::{Error, Result};
use crate::hsm::{Hsm, KeyHandle, ServiceKey};
use crate::secret::SecretBytes;
use crate::store::Store;
pub use admin::{KeyView, VersionView};
pub use audit::{AuditCheck, AuditHealth, AuditVerification};
pub use backup::{BackupFile, SectionDigests};
use registry::{KeyEntry, Registry, VersionEntry};

/// Who is calling: the request id and the authenticated principal (a workload identity or an
/// officer's name), for the audit.
#[derive(Debug, Clone)]
pub struct Caller {
    pub request_id: String,
    pub principal: String,
    /// When the caller stops waiting (`hsm.deadline_ms` after the call began); `None` for the
    /// service's own work. A change whose HSM step returns after it is rolled back, so that a
    /// caller told DEADLINE_EXCEEDED finds nothing changed.
    pub deadline: Option<(std::time::Instant, std::time::Duration)>,
    /// A dry run: the change is checked as far as its first write (`commit_point`), and no
    /// further.
    pub dry_run: bool,
}

impl Caller {
    /// The service's own work (sweeps, recovery, bootstrap), with no deadline.
    pub fn internal(principal: &str) -> Caller {
        Caller { request_id: String::new(), principal: principal.to_string(), deadline: None, dry_run: false }
    }

    /// Where a change has checked everything against the live state and the caller's rights
    /// and is about to write (the intent, the HSM object, the row): a dry run stops here with
    /// what the change `would` do (`Error::DryRun`); a real call goes on.
    pub fn commit_point(&self, would: impl FnOnce() -> String) -> Result<()> {
        if self.dry_run { Err(Error::DryRun { would: would() }) } else { Ok(()) }
    }

    /// `Err(Deadline)` once the caller has stopped waiting.
    pub fn check_deadline(&self) -> Result<()> {
        match self.deadline {
            Some((at, after)) if std::time::Instant::now() >= at => Err(Error::Deadline { after }),
            _ => Ok(()),
        }
    }

    /// The audit record of a change this caller made, written in the change's own transaction.
    pub fn audit(&self, operation: &'static str, key_id: Option<KeyId>, key_version: Option<u32>, detail: String) -> crate::audit::AuditEvent {
        crate::audit::AuditEvent {
            request_id: self.request_id.clone(),
            principal: self.principal.clone(),
            operation,
            key_id,
            key_version,
            context: None,
            outcome: crate::audit::Outcome::Allowed,
            status: "OK",
            detail,
            caller_context: None,
            in_dry_run: self.dry_run,
        }
    }
}

/// The result of an encryption: which key and version, and the blob.
#[derive(Debug)]
pub struct Encrypted {
    pub key_id: KeyId,
    pub key_version: u32,
    pub blob: Vec<u8>,
}

/// What the HSM made of one encryption: the version used, the IV, the ciphertext with its tag.
#[derive(Debug)]
pub struct Sealed {
    pub version: u32,
    pub iv: Iv,
    pub ciphertext: Vec<u8>,
}

/// The longest data key GenerateDataKey makes (AES-256).
pub const MAX_DATA_KEY_LEN: usize = 32;

/// Bytes from the HSM's generator, drawn in one call and handed out front to back, each byte
/// once: the data keys and IVs of a whole batch come from one `C_GenerateRandom`, and the
/// service's pool of IVs (`Kms::ivs`) is one. Nothing is
/// drawn before the first `take`, so a request refused before it needs random bytes costs no
/// HSM call. Wiped when dropped.
#[derive(Debug)]
pub struct RandomDraw {
    bytes: SecretBytes,
    used: usize,
    size: usize,
}

impl RandomDraw {
    /// Room for `count` data keys of up to `MAX_DATA_KEY_LEN` bytes, each with its IV.
    pub fn for_data_keys(count: usize) -> RandomDraw {
        RandomDraw { bytes: SecretBytes::zeroed(0), used: 0, size: count * (MAX_DATA_KEY_LEN + IV_LEN) }
    }

    /// The next `n` bytes, drawing afresh when too few are left.
    fn take(&mut self, hsm: &dyn Hsm, n: usize) -> Result<&[u8]> {
        if self.bytes.len() - self.used < n {
            let mut bytes = SecretBytes::zeroed(self.size.max(n));
            hsm.random(bytes.expose_secret_mut())?;
            (self.bytes, self.used) = (bytes, 0);
        }
        let start = self.used;
        self.used += n;
        Ok(&self.bytes.expose_secret()[start..self.used])
    }
}

/// How many IVs one draw of `Kms::ivs` holds (4,092 bytes).
const IV_DRAW: usize = 341;

/// The result of a decryption.
#[derive(Debug)]
pub struct Decrypted {
    pub key_id: KeyId,
    pub key_version: u32,
    pub plaintext: SecretBytes,
}

/// Tunables of the service, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: UsageLimits,
    /// How long an officer's session lasts.
    pub session_seconds: i64,
    /// Audit records older than this many days are removed by the sweeper (0: never).
    pub audit_retention_days: u32,
    /// How fast each principal may call.
    pub rate_limit: crate::domain::rate::RateLimit,
}

impl Settings {
    /// The service's settings in a configuration.
    pub fn of(config: &crate::config::Config) -> Settings {
        Settings {
            limits: config.keys.limits(),
            session_seconds: config.officers.session_minutes * 60,
            audit_retention_days: config.audit.retention_days,
            rate_limit: config.limits.rate_limit(),
        }
    }
}

pub struct Kms {
    hsm: Arc<dyn Hsm>,
    /// The audit checkpoint key (`ServiceKey::AuditMac`).
    audit_mac: crate::hsm::KeyHandle,
    /// The key sealing officers' TOTP secrets (`ServiceKey::OfficerSecrets`).
    officer_secrets: crate::hsm::KeyHandle,
    /// The health canary (`ServiceKey::Canary`).
    canary: crate::hsm::KeyHandle,
    /// The HSM link generation the registry's object handles were looked up in
    /// (`Hsm::generation`); behind it, `repair_if_stale` looks them up again.
    handles_generation: std::sync::atomic::AtomicU64,
    store: Arc<Store>,
    registry: Registry,
    settings: Settings,
    /// Serialises lifecycle changes (they are rare; the data plane never takes it).
    admin: Mutex<()>,
    /// Last uses of principals and grants, for the access review.
    uses: review::Uses,
    /// When the service started (Unix seconds), for its status.
    started_at: i64,
    /// What the last health probe found.
    last_probe: status::LastProbe,
    /// Whether the probe running now is past the HSM, reading the store (a probe that does not
    /// come back is the HSM's fault only if it is not).
    probing_store: std::sync::atomic::AtomicBool,
    /// What the cloud facades answered in the last hour.
    facade_activity: status::FacadeActivity,
    /// Per-principal rate limits; `None` when they are off, so that no call takes a lock for them.
    limiter: Option<Mutex<crate::domain::rate::RateLimiter>>,
    /// IVs from the HSM's generator for the encryptions not given one (Encrypt, the facades'),
    /// `IV_DRAW` of them to a `C_GenerateRandom`: such an encryption costs one HSM call instead
    /// of two, a round trip less with a network HSM. IVs are public (each blob carries its
    /// own), so holding the next ones gives nothing away; each is handed out once.
    ivs: Mutex<RandomDraw>,
    /// What the service's own checks of the audit trail found.
    audit_watch: audit::AuditWatch,
    /// The store's count of changes as the audit writer last saw it at a commit: above the
    /// registry's, another node changed something.
    changes_seen: Arc<std::sync::atomic::AtomicU64>,
    /// How often a refused call may ask the store whether another node just made what it
    /// missed: a flood of refused calls must not become a flood of reads.
    miss_checks: MissChecks,
    /// Whether this node ran the background jobs at its last sweep (the leader).
    leading: std::sync::atomic::AtomicBool,
    /// The live nodes as the follow loop last counted them (1 over SQLite).
    fleet: std::sync::atomic::AtomicU64,
    /// Whether the token's backup key pair lacks its unwrap template, as last looked at
    /// (`check_backup_key`: at startup and after each backup, not on every status or scrape).
    backup_key_unguarded: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Whose a facade's principal name is (`xks:…`, `cse:…`), if it is one: such names are the
/// facades' own, never a workload's or an officer-made principal's.
pub fn facade_principal(name: &str) -> Option<&'static str> {
    if name.starts_with(xks::PRINCIPAL_PREFIX) {
        Some("AWS external key stores'")
    } else if name.starts_with(cse::PRINCIPAL_PREFIX) {
        Some("Google Workspace CSE's")
    } else {
        None
    }
}

impl Kms {
    /// Opens the service: reconciles the store with the HSM (see `recovery`) and loads the
    /// registry.
    pub fn open(hsm: Arc<dyn Hsm>, store: Arc<Store>, settings: Settings) -> Result<Kms> {
        let canary = hsm.service_key(ServiceKey::Canary)?;
        let audit_mac = hsm.service_key(ServiceKey::AuditMac)?;
        let officer_secrets = hsm.service_key(ServiceKey::OfficerSecrets)?;
        let kms = Kms {
            hsm,
            audit_mac,
            officer_secrets,
            canary,
            handles_generation: std::sync::atomic::AtomicU64::new(0),
            uses: review::Uses::default(),
            started_at: now(),
            last_probe: status::LastProbe::default(),
            probing_store: std::sync::atomic::AtomicBool::new(false),
            facade_activity: status::FacadeActivity::default(),
            limiter: (settings.rate_limit.per_second > 0.0).then(|| Mutex::new(crate::domain::rate::RateLimiter::new(settings.rate_limit))),
            ivs: Mutex::new(RandomDraw { bytes: SecretBytes::zeroed(0), used: 0, size: IV_DRAW * IV_LEN }),
            store,
            registry: Registry::default(),
            settings,
            admin: Mutex::new(()),
            backup_key_unguarded: std::sync::atomic::AtomicBool::new(false),
            audit_watch: audit::AuditWatch::default(),
            changes_seen: Arc::default(),
            miss_checks: MissChecks::default(),
            leading: std::sync::atomic::AtomicBool::new(false),
            fleet: std::sync::atomic::AtomicU64::new(1),
        };
        kms.recover()?;
        kms.store.keep_present()?;
        kms.fleet.store(kms.store.fleet_size()?, std::sync::atomic::Ordering::Relaxed);
        kms.leading.store(kms.store.leading()?, std::sync::atomic::Ordering::SeqCst);
        Ok(kms)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn hsm(&self) -> &dyn Hsm {
        &*self.hsm
    }

    /// Officer login, sessions and management.
    pub fn officers(&self) -> officers::Officers<'_> {
        officers::Officers { hsm: &*self.hsm, store: &self.store, secrets: self.officer_secrets, session_seconds: self.settings.session_seconds }
    }

    /// What the audit writer needs to sign checkpoints.
    pub fn checkpointer(&self, every_records: i64, every_seconds: i64) -> crate::audit::writer::Checkpointer {
        crate::audit::writer::Checkpointer { hsm: self.hsm.clone(), key: self.audit_mac, every_records, every_seconds }
    }

    /// The health probe: one real AES-GCM encryption under the canary key, through the same
    /// session pool as every request. When it fails, the object handles may have gone stale (an
    /// HSM that restarted or reloaded its objects hands out new ones): they are looked up again
    /// and the probe tried once more.
    pub fn probe_hsm(&self) -> Result<()> {
        self.probing_store.store(false, std::sync::atomic::Ordering::Release);
        let result = self
            .probe_once()
            .or_else(|first| {
                tracing::warn!(error = %first, "HSM probe failed; looking the key objects up again");
                self.repair_handles()
            })
            // And the store: without it no call can be audited, so none is answered.
            .and_then(|()| {
                self.probing_store.store(true, std::sync::atomic::Ordering::Release);
                self.store.read(|tx| tx.marks()).map(drop).map_err(Error::from)
            });
        self.last_probe.set(result.as_ref().err().map(ToString::to_string));
        result
    }

    /// One AES-GCM encryption under the canary: proof that the token answers and the service is
    /// logged in (the canary is a private object).
    fn probe_once(&self) -> Result<()> {
        let mut iv = [0u8; IV_LEN];
        self.hsm.random(&mut iv)?;
        self.hsm.encrypt(self.canary, &Iv(iv), b"kms-health-probe", &[0u8; 16])?;
        Ok(())
    }

    /// Destroys this process's session copies of a version's object and makes no more: its
    /// material was destroyed, or its key compromised, here or on another node. The data plane
    /// uses the token object from now on; a copy that could not be destroyed goes with it.
    fn drop_copies(&self, key_id: KeyId, version: u32, handle: KeyHandle) {
        if let Err(e) = self.hsm.drop_copies(handle) {
            tracing::warn!(%key_id, version, error = %e, "a session copy could not be destroyed; retried with the version");
        }
    }

    /// How many nodes serve (1 over SQLite), as counted within the last second or so: the XKS
    /// health's fleet size.
    pub fn fleet_size(&self) -> u64 {
        self.fleet.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this node ran the background jobs at its last sweep.
    pub fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Where the audit writer tells the store's count of changes at each commit.
    pub fn changes_seen(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.changes_seen.clone()
    }

    /// Keeps the registry up with the other nodes' changes (several nodes only): reloads it when
    /// the audit writer saw the store count more changes than it reflects, or, with
    /// `ask_store`, when the store does now (a node that writes nothing still follows).
    pub fn follow_other_nodes(&self, ask_store: bool) -> Result<()> {
        if !self.store.is_shared() {
            return Ok(());
        }
        if ask_store {
            match self.store.fleet_size() {
                Ok(n) => self.fleet.store(n, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "could not hold this node's place in the fleet or count it; will retry"),
            }
        }
        let seen = self.changes_seen.load(std::sync::atomic::Ordering::SeqCst);
        if !ask_store && seen <= self.registry.read().changes {
            return Ok(());
        }
        let _local = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        self.reload_if_changed().map(drop)
    }

    /// Runs `f`; if it failed for want of a key, alias or principal this node does not know yet
    /// (made on another node a moment ago), reloads the registry (or waits for the reload
    /// another call started) and runs it once more. Waits at most `MISS_WAIT` for this node's
    /// admin lock (held by the follow loop's reload, or a local change).
    fn with_fresh_registry<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        let seen = self.registry.read().changes;
        let first = f();
        if !matches!(first, Err(Error::NotFound { .. } | Error::PermissionDenied { .. } | Error::DecryptFailed)) || !self.store.is_shared() {
            return first;
        }
        let moved = || self.registry.read().changes != seen;
        if moved() || self.miss_checks.run_or_join(|| self.reload_after_miss()) || moved() {
            return f();
        }
        first
    }

    /// `reload_if_changed` under this node's admin lock, if it is free within `MISS_WAIT`.
    fn reload_after_miss(&self) -> bool {
        let deadline = std::time::Instant::now() + MISS_WAIT;
        loop {
            if let Ok(_local) = self.admin.try_lock() {
                return self.reload_if_changed().unwrap_or(false);
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The revocation epoch every data-plane answer carries: it rises with every change that
    /// takes access away, and a client caching data keys drops them all when it sees it change.
    pub fn revocation_epoch(&self) -> u64 {
        self.registry.read().revocation_epoch
    }

    /// Lets an authenticated principal's call through, or refuses it with a retry hint when the
    /// principal is over its rate limit.
    pub fn admit(&self, principal: &str) -> Result<()> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let mut limiter = limiter.lock().unwrap_or_else(|p| p.into_inner());
        limiter.take(principal, std::time::Instant::now()).map_err(|retry_after| Error::RateLimited { principal: principal.to_string(), retry_after })
    }

    /// How long `principal`'s next call would be refused for by its rate limit, without taking
    /// from it (`None`: it would be let through).
    pub fn throttled(&self, principal: &str) -> Option<std::time::Duration> {
        let limiter = self.limiter.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        limiter.would_refuse(principal, std::time::Instant::now())
    }

    /// Counts a call a cloud facade answered, refused with `refusal` if it was.
    pub fn facade_answered(&self, facade: &'static str, refusal: Option<&str>) {
        self.facade_activity.record(facade, now(), refusal);
    }

    /// Seals a secret the service keeps in its store (an XKS credential's, a webhook's) under
    /// the HSM's officer-secrets key, bound to `aad` (what it is the secret of): IV ‖ AES-GCM.
    pub(crate) fn seal(&self, aad: &[u8], secret: &[u8]) -> Result<Vec<u8>> {
        let mut iv = Iv([0u8; IV_LEN]);
        self.hsm.random(&mut iv.0)?;
        let mut sealed = iv.0.to_vec();
        sealed.extend(self.hsm.encrypt(self.officer_secrets, &iv, aad, secret)?);
        Ok(sealed)
    }

    /// The secret `seal` sealed with `aad`.
    pub(crate) fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes> {
        if sealed.len() < IV_LEN {
            return Err(Error::precondition("a sealed secret is truncated"));
        }
        let mut iv = Iv([0u8; IV_LEN]);
        iv.0.copy_from_slice(&sealed[..IV_LEN]);
        Ok(self.hsm.decrypt(self.officer_secrets, &iv, aad, &sealed[IV_LEN..])?)
    }

    /// Whether the probe running now has got past the HSM (to the store).
    pub fn probing_store(&self) -> bool {
        self.probing_store.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that a probe did not come back within the deadline (it is still stuck in the HSM).
    pub fn probe_stalled(&self, why: &str) {
        self.last_probe.set(Some(why.to_string()));
    }

    /// The id a key reference names now, if any (for audit records of refused calls).
    pub fn key_id_of(&self, key: &KeyRef) -> Option<KeyId> {
        self.registry.entry(key).ok().map(|e| e.record.key_id)
    }

    // ----- data plane -----

    /// The policy check: is `caller` allowed to do `operation` on `key` with `context`, now?
    /// An unknown key is refused exactly like a key without a grant.
    pub fn authorize(&self, caller: &Caller, key: &KeyRef, operation: Operation, context: &EncryptionContext) -> Result<Authorized> {
        self.with_fresh_registry(|| self.authorize_now(caller, key, operation, context))
    }

    fn authorize_now(&self, caller: &Caller, key: &KeyRef, operation: Operation, context: &EncryptionContext) -> Result<Authorized> {
        let state = self.registry.read();
        let principal_state = state.principals.get(&caller.principal).map(|p| p.state);
        let denied = |why: Denied| {
            let reason = match why {
                Denied::UnknownPrincipal => format!("principal {} is not registered", caller.principal),
                Denied::DisabledPrincipal => format!("principal {} is disabled", caller.principal),
                Denied::NoGrant => format!("principal {} has no grant for {operation} on {key} with this encryption context", caller.principal),
            };
            Error::PermissionDenied { reason }
        };
        let Ok(entry) = state.resolve(key) else {
            return Err(denied(policy::principal_may_call(principal_state).err().unwrap_or(Denied::NoGrant)));
        };
        let key_id = entry.record.key_id;
        let grants = state.grants.get(&key_id).into_iter().flatten();
        let proof = policy::authorize(&caller.principal, principal_state, grants, key_id, operation, context, now()).map_err(denied)?;
        self.uses.principal(&caller.principal, Some(proof.grant_id()));
        Ok(proof)
    }

    /// A fresh data key of `len` bytes from the HSM's generator, and its blob. The data key and
    /// the IV it is encrypted under are taken from `draw` (one HSM call for all the data keys of
    /// a batch, and one fewer for a single data key than drawing them apart).
    pub fn generate_data_key(
        &self,
        proof: &Authorized,
        len: usize,
        context: &EncryptionContext,
        draw: &mut RandomDraw,
    ) -> Result<(Encrypted, SecretBytes)> {
        let fresh = draw.take(self.hsm.as_ref(), len + IV_LEN)?;
        let data_key = SecretBytes::new(fresh[..len].to_vec());
        let mut iv = Iv([0; IV_LEN]);
        iv.0.copy_from_slice(&fresh[len..]);
        let encrypted = self.encrypt_under(proof, data_key.expose_secret(), context, Some(iv))?;
        Ok((encrypted, data_key))
    }

    /// Encrypts under the primary version of the key the proof names.
    pub fn encrypt(&self, proof: &Authorized, plaintext: &[u8], context: &EncryptionContext) -> Result<Encrypted> {
        self.encrypt_under(proof, plaintext, context, None)
    }

    /// `encrypt`, with an IV already drawn from the HSM's generator or (`None`) drawing one.
    fn encrypt_under(&self, proof: &Authorized, plaintext: &[u8], context: &EncryptionContext, iv: Option<Iv>) -> Result<Encrypted> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::invalid("plaintext", format!("is {} bytes; at most {MAX_PLAINTEXT} are allowed", plaintext.len())));
        }
        let key_id = proof.key_id();
        let sealed = self.encrypt_primary(proof, plaintext, iv, &|version, iv| BlobHeader { key_id, version, iv: *iv }.aad(context))?;
        let header = BlobHeader { key_id, version: sealed.version, iv: sealed.iv };
        Ok(Encrypted { key_id, key_version: sealed.version, blob: Blob::encode(&header, &sealed.ciphertext) })
    }

    /// Encrypts `plaintext` in the HSM under the primary version of the key `proof` names,
    /// counting the use against the version's budget (and rotating first if the primary is
    /// spent), under `iv` or a fresh one and the AAD `aad` makes for the version and IV used.
    /// Every encryption under a customer key goes through here: the gRPC blobs and the
    /// facades' own formats.
    fn encrypt_primary(&self, proof: &Authorized, plaintext: &[u8], iv: Option<Iv>, aad: &dyn Fn(u32, &Iv) -> Vec<u8>) -> Result<Sealed> {
        let key = KeyRef::Id(proof.key_id());
        let entry = self.registry.entry(&key)?;
        match self.encrypt_with(&entry, plaintext, iv, aad) {
            Err(Error::UsageExhausted { key_id, version }) => {
                // The primary is spent: rotate now (if nobody did yet) and try once more. The IV
                // was not used: the budget is checked before anything is encrypted.
                self.rotate_exhausted(key_id, version)?;
                let entry = self.registry.entry(&key)?;
                self.encrypt_with(&entry, plaintext, iv, aad)
            }
            other => other,
        }
    }

    fn encrypt_with(&self, entry: &KeyEntry, plaintext: &[u8], iv: Option<Iv>, aad: &dyn Fn(u32, &Iv) -> Vec<u8>) -> Result<Sealed> {
        let key_id = entry.record.key_id;
        let (version, handle) = encryption_version(entry)?;
        let limits = &self.settings.limits;
        let n = version
            .usage
            .take(key_id, version.record.version, limits, &self.store)?
            .ok_or(Error::UsageExhausted { key_id, version: version.record.version })?;
        if n == limits.rotation_threshold {
            // This request crossed the threshold: rotate now, so that later requests use a
            // fresh version long before the hard limit. A failure here does not fail the
            // request (its own encryption is within the limit); the next request at the limit
            // retries.
            if let Err(e) = self.rotate_exhausted(key_id, version.record.version) {
                tracing::error!(key_id = %key_id, error = %e, "automatic rotation at the usage threshold failed");
            }
        }
        let iv = match iv {
            Some(iv) => iv,
            None => {
                let mut iv = Iv([0; IV_LEN]);
                iv.0.copy_from_slice(self.ivs.lock().unwrap_or_else(|p| p.into_inner()).take(self.hsm.as_ref(), IV_LEN)?);
                iv
            }
        };
        let ciphertext = self.hsm.encrypt(handle, &iv, &aad(version.record.version, &iv), plaintext)?;
        Ok(Sealed { version: version.record.version, iv, ciphertext })
    }

    /// Decrypts a blob with exactly the version it names, if `caller` holds a Decrypt grant on
    /// its key.
    pub fn decrypt(&self, caller: &Caller, blob: &[u8], context: &EncryptionContext, expected: Option<&KeyRef>) -> Result<Decrypted> {
        self.decrypt_for(caller, blob, context, expected, Operation::Decrypt)
    }

    fn decrypt_for(
        &self,
        caller: &Caller,
        blob: &[u8],
        context: &EncryptionContext,
        expected: Option<&KeyRef>,
        operation: Operation,
    ) -> Result<Decrypted> {
        let parsed = Blob::parse(blob).map_err(|reason| {
            tracing::debug!(%reason, "blob refused");
            Error::DecryptFailed
        })?;
        let key_id = parsed.header.key_id;
        if let Some(expected) = expected
            && self.key_id_of(expected) != Some(key_id)
        {
            return Err(Error::DecryptFailed);
        }
        // A blob naming no live key gets the uniform answer, like any other bad blob (R3); only
        // for a key that exists does a missing grant show as PERMISSION_DENIED.
        let entry = self.with_fresh_registry(|| self.registry.entry(&KeyRef::Id(key_id)).map_err(|_| Error::DecryptFailed))?;
        if entry.record.state == KeyState::Destroyed {
            return Err(Error::DecryptFailed);
        }
        let _proof = self.authorize(caller, &KeyRef::Id(key_id), operation, context)?;
        let (_, handle) = decryption_version(&entry, parsed.header.version, operation)?;
        let plaintext = self.hsm.decrypt(handle, &parsed.header.iv, &parsed.header.aad(context), parsed.ciphertext)?;
        Ok(Decrypted { key_id, key_version: parsed.header.version, plaintext })
    }

    /// Decrypts under the source key and encrypts under the destination, the plaintext never
    /// leaving the service. Needs ReEncryptFrom on the source and ReEncryptTo on the destination;
    /// works from a Compromised source key.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        blob: &[u8],
        source_context: &EncryptionContext,
        source_key: Option<&KeyRef>,
        destination: &KeyRef,
        destination_context: &EncryptionContext,
    ) -> Result<(Decrypted, Encrypted)> {
        // Check the destination first, so that a refused destination costs no HSM decryption.
        let to = self.authorize(caller, destination, Operation::ReEncryptTo, destination_context)?;
        let dest = self.registry.entry(&KeyRef::Id(to.key_id()))?;
        key_allows(dest.record.state, Use::Encrypt).map_err(|s| state_error(dest.record.key_id, s))?;
        let decrypted = self.decrypt_for(caller, blob, source_context, source_key, Operation::ReEncryptFrom)?;
        let encrypted = self.encrypt(&to, decrypted.plaintext.expose_secret(), destination_context)?;
        Ok((decrypted, encrypted))
    }

    /// Random bytes for any enabled principal (no key is involved).
    pub fn generate_random(&self, caller: &Caller, len: usize) -> Result<SecretBytes> {
        match self.registry.read().principals.get(&caller.principal).map(|p| p.state) {
            Some(PrincipalState::Enabled) => {}
            Some(PrincipalState::Disabled) => {
                return Err(Error::PermissionDenied { reason: format!("principal {} is disabled", caller.principal) });
            }
            None => {
                return Err(Error::PermissionDenied { reason: format!("principal {} is not registered", caller.principal) });
            }
        }
        self.uses.principal(&caller.principal, None);
        let mut out = SecretBytes::zeroed(len);
        self.hsm.random(out.expose_secret_mut())?;
        Ok(out)
    }
}

/// The version a new encryption under `entry` uses, and its object: what the key's state
/// allows, its primary version, that version's material. The data plane (`encrypt_with`) and
/// `explain_access` both ask it.
fn encryption_version(entry: &KeyEntry) -> Result<(&Arc<VersionEntry>, crate::hsm::KeyHandle)> {
    let key_id = entry.record.key_id;
    key_allows(entry.record.state, Use::Encrypt).map_err(|s| state_error(key_id, s))?;
    let version = entry.primary().ok_or_else(|| Error::precondition(format!("key {key_id} has no primary version")))?;
    Ok((version, usable_handle(key_id, version)?))
}

/// Version `n` of `entry` when it decrypts for `operation`, and its object: what the key's state
/// allows the operation, the version's state, its material. A destroyed key or version, or one
/// that never was, is the uniform `DecryptFailed`. The data plane (`decrypt_for`) and
/// `explain_access` both ask it.
fn decryption_version(entry: &KeyEntry, n: u32, operation: Operation) -> Result<(&Arc<VersionEntry>, crate::hsm::KeyHandle)> {
    let key_id = entry.record.key_id;
    match key_allows(entry.record.state, operation.key_use()) {
        Ok(()) => {}
        // A destroyed key is indistinguishable from an unknown one.
        Err(KeyState::Destroyed) => return Err(Error::DecryptFailed),
        Err(state) => return Err(state_error(key_id, state)),
    }
    let version = entry.versions.get(&n).ok_or(Error::DecryptFailed)?;
    match version.record.state {
        VersionState::Enabled => {}
        VersionState::Destroyed => return Err(Error::DecryptFailed),
        state => return Err(Error::precondition(format!("version {n} of key {key_id} is {state}"))),
    }
    Ok((version, usable_handle(key_id, version)?))
}

/// How long a call that missed waits for this node's admin lock before it is refused: a reload
/// by the follow loop takes milliseconds; a local change may take longer, and is not waited for.
const MISS_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The store reads of calls that missed a key, alias, grant or principal: one at a time, and at
/// most one that finds nothing in `EVERY`. A call that misses while a read runs waits for that
/// read and shares its result, so that a burst of calls on a key just made on another node all
/// see it; a flood of refused calls becomes at most one read per `EVERY`, and none waits.
#[derive(Debug, Default)]
struct MissChecks {
    state: Mutex<MissCheck>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct MissCheck {
    /// When the last read that found nothing new started.
    last_empty: Option<std::time::Instant>,
    running: bool,
    /// Reads finished so far, and whether the last one found (and loaded) a change.
    rounds: u64,
    last_found: bool,
}

impl MissChecks {
    /// 50 ms: a refused call after a read that found nothing is refused without another read
    /// within this (a key made on another node in that window waits for the next read).
    const EVERY: std::time::Duration = std::time::Duration::from_millis(50);

    /// Whether a change was loaded, by `read` run here or by the call already running it;
    /// `false` without a read when the last one found nothing less than `EVERY` ago.
    fn run_or_join(&self, read: impl FnOnce() -> bool) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.running {
            let round = state.rounds;
            let state = self.done.wait_while(state, |s| s.running && s.rounds == round).unwrap_or_else(|p| p.into_inner());
            return state.rounds > round && state.last_found;
        }
        let now = std::time::Instant::now();
        if state.last_empty.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
            return false;
        }
        state.running = true;
        drop(state);
        // Whatever `read` does (a panic included), the waiters are let go.
        struct Finish<'a>(&'a MissChecks, std::time::Instant, bool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
                state.running = false;
                state.rounds += 1;
                state.last_found = self.2;
                if !self.2 {
                    state.last_empty = Some(self.1);
                }
                self.0.done.notify_all();
            }
        }
        let mut finish = Finish(self, now, false);
        finish.2 = read();
        finish.2
    }
}

fn state_error(key_id: KeyId, state: KeyState) -> Error {
    Error::precondition(format!("key {key_id} is {state}"))
}

fn usable_handle(key_id: KeyId, version: &VersionEntry) -> Result<crate::hsm::KeyHandle> {
    version.handle.ok_or_else(|| {
        Error::precondition(format!("the HSM object of version {} of key {key_id} is missing; see the server log", version.record.version))
    })
}
