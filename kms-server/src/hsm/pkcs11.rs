//! The PKCS#11 implementation of [`Hsm`], through `cryptoki`.
//!
//! * One library initialisation, with `CKF_OS_LOCKING_OK`: without it SoftHSM2 disables all its
//!   locking (SOFTHSM-NOTES.md).
//! * One *anchor* session kept open: login is token-wide for the process, and closing the last
//!   session logs the token out, so the anchor keeps every other session logged in without a
//!   login (~1 ms) per request.
//! * A bounded pool of worker sessions. `cryptoki::Session` is `Send` but not `Sync`: a session
//!   belongs to one caller at a time. A session that fails with a session-level error is thrown
//!   away and replaced on the next checkout.
//! * **Healing.** The library, the anchor and the pool make one [`Link`]. When a call fails in a
//!   way that may mean the login or the device was lost, the link is checked for real (the
//!   token's info, the anchor's session state): a lost login is restored on a new anchor; a
//!   library or token that no longer answers is finalised and initialised again, with a new
//!   link, while calls in flight finish on the old one. Failed repairs are spaced by a backoff
//!   (2 s, doubling to 60 s while they fail), and a PIN the HSM refuses is never tried again:
//!   repeated wrong PINs lock the token.
//! * **Session copies** (`copies.rs`, once [`Pkcs11Hsm::start_session_copies`] is called): a
//!   thread of their own makes, in the background, a session copy of each key version used, on
//!   the anchor so that it lives as long as the anchor; AES-GCM uses the copy once it is ready and
//!   the token object until then. Copies are not private objects, so a lost login does not stop
//!   them: the same thread looks at the login every second (the repair's own check, within
//!   its backoff), and a repair closes the anchor that holds them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::copies::Copies;
use super::{
    BackupKey, FailedCall, Hsm, HsmError, KeyHandle, KeyProtection, ObjectName, RECENT_FAILURES, RsaPublicKey, ServiceKey, SessionUse, TokenInfo,
    Wrapped, templates,
};
use crate::domain::blob::{Iv, TAG_LEN};
use crate::secret::{Pin, SecretBytes};

/// The tag length, in bits, of every AES-GCM operation (NIST SP 800-38D allows shorter tags;
/// we never use them).
const TAG_BITS: u64 = (TAG_LEN * 8) as u64;

/// How often the session copies' idle pass runs: a copy unused for one to two periods is evicted,
/// and destroyed one period later (`copies.rs`).
const COPY_IDLE_PASS: Duration = Duration::from_secs(300);
/// How often the session copies' thread looks at the login (two cheap calls): the longest a
/// lost login goes unrepaired while every call runs on copies.
const LOGIN_CHECK: Duration = Duration::from_secs(1);

/// The first wait between two healing attempts, and the longest.
const HEAL_BACKOFF: Duration = Duration::from_secs(1);
const HEAL_BACKOFF_MAX: Duration = Duration::from_secs(60);

pub struct Pkcs11Hsm {
    module: PathBuf,
    token_label: String,
    /// Kept for logging in again after the HSM lost the login (wiped on drop).
    pin: Pin,
    sessions: usize,
    link: RwLock<Arc<Link>>,
    healing: Mutex<Healing>,
    /// See [`KeyHandle`]: raised by every repair of the link.
    generation: AtomicU64,
    /// The service keys' objects, found by label once per generation.
    service_objects: Mutex<(u64, HashMap<ServiceKey, ObjectHandle>)>,
    /// The last failed calls, oldest first (touched on failures only).
    failures: Mutex<std::collections::VecDeque<FailedCall>>,
    copies: Copies<ObjectHandle>,
}

/// The library context, the token's slot, the anchor session and the pool, as one unit that
/// healing replaces whole.
struct Link {
    ctx: Pkcs11,
    slot: Slot,
    /// Held so that the login persists; never used for operations. An `Option` only so that a
    /// retired link can forget it on drop.
    anchor: Mutex<Option<Session>>,
    pool: SessionPool,
    /// Set when the library was finalised under this link: its sessions' handles mean nothing
    /// now (and may be reused by the new link's sessions), so they are forgotten, never closed.
    retired: AtomicBool,
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            let idle = std::mem::take(&mut self.pool.lock().idle);
            idle.into_iter().for_each(std::mem::forget);
            if let Some(anchor) = self.anchor.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
                std::mem::forget(anchor);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Healing {
    next_attempt: Option<Instant>,
    failures: u32,
    /// The HSM refused the PIN: never tried again (the service needs a restart with the right
    /// one).
    pin_refused: bool,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm").field("module", &self.module).field("token_label", &self.token_label).finish_non_exhaustive()
    }
}

fn setup(what: &str, e: CkError) -> HsmError {
    HsmError::Setup { reason: format!("{what}: {e}") }
}

/// Logs `who` (the user or the security officer) in on `session`; a wrong PIN is reported as
/// such (and never retried: repeated wrong PINs lock the token).
fn login(session: &Session, user: UserType, pin: &Pin, who: &'static str) -> Result<(), HsmError> {
    #[cfg(feature = "test-hooks")]
    let attempt = super::faults::inject("C_Login").and_then(|()| session.login(user, Some(&AuthPin::from(pin.expose_secret()))));
    #[cfg(not(feature = "test-hooks"))]
    let attempt = session.login(user, Some(&AuthPin::from(pin.expose_secret())));
    match attempt {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(HsmError::PinIncorrect { who }),
        Err(e) => Err(setup(&format!("C_Login as {who}"), e)),
    }
}

impl Link {
    /// Initialises the library (already loaded as `ctx`), finds the token, opens the anchor and
    /// logs in.
    fn open(ctx: Pkcs11, token_label: &str, pin: &Pin, sessions: usize) -> Result<Link, HsmError> {
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(|e| setup("C_Initialize", e))?;
        let slot = find_slot(&ctx, token_label)?;
        let anchor = ctx.open_rw_session(slot).map_err(|e| setup("opening the anchor session", e))?;
        login(&anchor, UserType::User, pin, "user")?;
        release_freed_memory();
        Ok(Link { ctx, slot, anchor: Mutex::new(Some(anchor)), pool: SessionPool::new(sessions.max(1)), retired: AtomicBool::new(false) })
    }

    /// What a real look at the link finds: `Ok(true)` when it works and is logged in,
    /// `Ok(false)` when it works but the login was lost, `Err` when the library or token no
    /// longer answers.
    fn check(&self) -> Result<bool, CkError> {
        self.ctx.get_token_info(self.slot)?;
        let anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        let Some(anchor) = anchor.as_ref() else { return Err(CkError::Pkcs11(RvError::SessionClosed, cryptoki::context::Function::GetSessionInfo)) };
        let state = anchor.get_session_info()?.session_state();
        Ok(matches!(state, SessionState::RwUser | SessionState::RoUser))
    }

    /// The fault a test injected before `function` (`faults.rs`; `test-hooks` builds only).
    fn inject(&self, function: &'static str) -> Result<(), CkError> {
        #[cfg(feature = "test-hooks")]
        return super::faults::inject_into(function, &self.ctx, &self.anchor);
        #[cfg(not(feature = "test-hooks"))]
        {
            let _ = function;
            Ok(())
        }
    }

    /// Logs the user in again on a new anchor session, then closes the old anchor, and with it
    /// every session object made on it: the session copies, which are not private
    /// (`templates::session_copy`) and so outlive a lost login. `swapped` runs with the anchor
    /// locked, as the new one takes the old one's place (the generation moves on then: see
    /// `make_copy`).
    fn login_again(&self, pin: &Pin, swapped: impl FnOnce()) -> Result<(), HsmError> {
        let fresh = self.ctx.open_rw_session(self.slot).map_err(|e| setup("opening a new anchor session", e))?;
        login(&fresh, UserType::User, pin, "user")?;
        let old = {
            let mut anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
            let old = anchor.replace(fresh);
            swapped();
            old
        };
        drop(old);
        Ok(())
    }
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label, logs in and opens the session pool.
    /// Any failure stops the service: there is no fallback.
    pub fn open(module: &Path, token_label: &str, pin: &Pin, sessions: usize) -> Result<Self, HsmError> {
        let ctx = Pkcs11::new(module).map_err(|e| setup(&format!("loading PKCS#11 module {}", module.display()), e))?;
        let link = Link::open(ctx, token_label, pin, sessions)?;
        Ok(Pkcs11Hsm {
            module: module.to_path_buf(),
            token_label: token_label.to_string(),
            pin: pin.clone_secret(),
            sessions,
            link: RwLock::new(Arc::new(link)),
            healing: Mutex::new(Healing::default()),
            generation: AtomicU64::new(1),
            service_objects: Mutex::new((0, HashMap::new())),
            failures: Mutex::new(std::collections::VecDeque::new()),
            copies: Copies::default(),
        })
    }

    /// Starts making session copies of the key versions used, at most `limit` of them (each
    /// costs SoftHSM2 about 10 KiB); copies unused for a while give their place to others. They
    /// are made with the backup key pair (`templates::session_copy`), so without one this does
    /// nothing and returns `false`: every call then uses the version's token object.
    pub fn start_session_copies(self: &Arc<Self>, limit: usize) -> Result<bool, HsmError> {
        if limit == 0 {
            return Ok(false);
        }
        let backup = self.backup_key()?;
        if backup.wrap.is_none() || backup.unwrap.is_none() {
            return Ok(false);
        }
        self.copies.enable(limit);
        let hsm = Arc::downgrade(self);
        let idle_pass = crate::hooks::session_copy_idle_pass(COPY_IDLE_PASS);
        std::thread::Builder::new()
            .name("hsm-session-copies".into())
            .spawn(move || {
                let mut backup = backup;
                let (mut last_pass, mut last_login_check) = (Instant::now(), Instant::now());
                // Ends once the HSM is dropped: the strong reference is held only while working.
                while let Some(hsm) = hsm.upgrade() {
                    if let Some((object, generation)) = hsm.copies.next_wanted(idle_pass.min(Duration::from_secs(1))) {
                        hsm.make_copy(&mut backup, object, generation);
                    }
                    if last_login_check.elapsed() >= LOGIN_CHECK {
                        last_login_check = Instant::now();
                        hsm.check_login();
                    }
                    if last_pass.elapsed() >= idle_pass {
                        last_pass = Instant::now();
                        for copy in hsm.copies.evict_idle(hsm.generation()) {
                            if let Err(e) = hsm.with_session("C_DestroyObject", |s| s.destroy_object(copy)) {
                                tracing::warn!(error = %e, "an evicted session copy could not be destroyed; it goes with the anchor session");
                            }
                        }
                    }
                }
            })
            .map_err(|e| HsmError::Setup { reason: format!("starting the session copies' thread: {e}") })?;
        Ok(true)
    }

    /// Makes a throwaway key to measure with (`templates::throwaway`): a session object on the
    /// anchor, so that it lives as long as the login and goes with the process, or a token
    /// object, which the caller destroys. A token object a killed run left behind is destroyed
    /// first.
    pub fn generate_throwaway_key(&self, on_token: bool) -> Result<KeyHandle, HsmError> {
        let generation = self.generation();
        for left in self.with_session("C_FindObjects", |s| s.find_objects(&templates::by_label(templates::THROWAWAY_LABEL)))? {
            self.with_session("C_DestroyObject", |s| s.destroy_object(left))?;
        }
        let template = templates::throwaway(on_token);
        let generate = |s: &Session| s.generate_key(&Mechanism::AesKeyGen, &template);
        let made = if on_token { self.with_session("C_GenerateKey", generate) } else { self.with_anchor("C_GenerateKey", generate) }?;
        Ok(Self::tag(made, generation))
    }

    /// Repairs a lost login now. The calls that would notice it (`heal_after`) may all run on
    /// session copies, which keep working without the login: this bounds how long they can.
    fn check_login(&self) {
        self.heal(&"the periodic login check");
    }

    /// Makes the session copy of one version's token object: wrapped under the trusted public
    /// backup key (any pooled session), unwrapped with the private one on the anchor.
    fn make_copy(&self, backup: &mut BackupKey, object: ObjectHandle, generation: u64) {
        if generation != self.generation() {
            return;
        }
        let made = (|| {
            if !matches!(backup.wrap, Some(KeyHandle::Object { generation: of, .. }) if of == generation) {
                *backup = self.backup_key()?;
            }
            let (Some(wrap), Some(unwrap)) = (backup.wrap, backup.unwrap) else {
                return Err(HsmError::Refused { function: "C_FindObjects", code: RvError::KeyHandleInvalid });
            };
            let wrapped = self.wrap(wrap, Self::tag(object, generation))?;
            let template = templates::session_copy();
            self.with_anchor("C_UnwrapKey", |s| {
                // Checked with the anchor locked: a repair moves the generation on as it
                // replaces the anchor, so a copy of this generation is always made on this
                // generation's anchor or link, and goes with it (never left behind, untracked).
                if self.generation() != generation {
                    return Ok(None);
                }
                s.unwrap_key(&backup_mechanism(), self.resolve(s, unwrap)?, &wrapped, &template).map(Some)
            })
        })();
        match made {
            // A repair came first: the version is asked for again in the new generation.
            Ok(None) => {}
            Ok(Some(copy)) => {
                if !self.copies.finish(object, generation, copy) && self.generation() == generation {
                    // Its version was destroyed meanwhile: so is the copy.
                    let _ = self.with_session("C_DestroyObject", |s| s.destroy_object(copy));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a session copy of a key version could not be made: its token object is used");
                self.copies.failed(object, generation, matches!(e, HsmError::Unavailable { .. }));
            }
        }
    }

    /// Runs `op` on the anchor session, as `with_session` does on a pooled one.
    fn with_anchor<T>(&self, function: &'static str, op: impl FnOnce(&Session) -> Result<T, CkError>) -> Result<T, HsmError> {
        let started = Instant::now();
        let link = self.link();
        let result = link.inject(function).and_then(|()| match link.anchor.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(anchor) => op(anchor),
            None => Err(CkError::Pkcs11(RvError::SessionClosed, Function::OpenSession)),
        });
        self.settle(function, started, result)
    }

    /// The end of every call: its metrics, and for a failure its record and, if it may mean a
    /// lost login or device, healing; the error in the service's terms.
    fn settle<T>(&self, function: &'static str, started: Instant, result: Result<T, CkError>) -> Result<T, HsmError> {
        crate::metrics::metrics().hsm_call(function, if result.is_ok() { "ok" } else { "error" }, started.elapsed());
        if let Some(e) = result.as_ref().err().filter(|e| !callers_fault(e)) {
            self.record_failure(function, e);
            self.heal_after(e);
        }
        result.map_err(|e| classify(function, e))
    }

    /// Runs an AES-GCM operation under a key version's session copy when it has one, under the
    /// key itself otherwise. A copy that fails as if it were gone is forgotten (and made again).
    fn with_key<T>(
        &self,
        function: &'static str,
        key: KeyHandle,
        op: impl FnOnce(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, HsmError> {
        let copy = match key {
            KeyHandle::Object { object, generation } => self.copies.get(object, generation).map(|copy| (object, generation, copy)),
            KeyHandle::Service(_) => None,
        };
        let Some((object, generation, copy)) = copy else {
            return self.with_session(function, |s| op(s, self.resolve(s, key)?));
        };
        let result = self.with_session(function, |s| op(s, copy));
        if let Err(HsmError::Unavailable { code: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, .. }) = &result {
            self.copies.forget(object, generation, copy);
        }
        result
    }

    /// A handle of the current generation (read *before* the call that found the object, so
    /// that a repair meanwhile makes it stale, never wrongly current).
    fn tag(object: ObjectHandle, generation: u64) -> KeyHandle {
        KeyHandle::Object { object, generation }
    }

    /// The object a handle names now, or CKR_OBJECT_HANDLE_INVALID for a stale one.
    fn resolve(&self, s: &Session, key: KeyHandle) -> Result<ObjectHandle, CkError> {
        let generation = self.generation.load(Ordering::Acquire);
        match key {
            KeyHandle::Object { object, generation: of } if of == generation => Ok(object),
            KeyHandle::Object { .. } => Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, Function::GetFunctionList)),
            KeyHandle::Service(which) => {
                let mut cache = self.service_objects.lock().unwrap_or_else(|p| p.into_inner());
                if cache.0 != generation {
                    *cache = (generation, HashMap::new());
                }
                if let Some(object) = cache.1.get(&which) {
                    return Ok(*object);
                }
                let object = s
                    .find_objects(&templates::by_label(which.label()))?
                    .first()
                    .copied()
                    .ok_or(CkError::Pkcs11(RvError::KeyHandleInvalid, Function::FindObjects))?;
                cache.1.insert(which, object);
                Ok(object)
            }
        }
    }

    fn link(&self) -> Arc<Link> {
        self.link.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `op` on a pooled session. Session-level failures retire the session; failures that
    /// may mean a lost login or device start healing.
    fn with_session<T>(&self, function: &'static str, op: impl FnOnce(&Session) -> Result<T, CkError>) -> Result<T, HsmError> {
        let started = Instant::now();
        let link = self.link();
        let session = link
            .pool
            .checkout(|| {
                #[cfg(feature = "test-hooks")]
                super::faults::inject("C_OpenSession")?;
                link.ctx.open_rw_session(link.slot)
            })
            .map_err(|e| {
                self.record_failure("C_OpenSession", &e);
                self.heal_after(&e);
                retired_means_unavailable(&link, classify(function, e))
            })?;
        let result = link.inject(function).and_then(|()| op(&session));
        let broken = matches!(
            &result,
            Err(CkError::Pkcs11(
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::DeviceError
                    | RvError::TokenNotPresent
                    | RvError::CryptokiNotInitialized,
                _
            ))
        );
        let back = if link.retired.load(Ordering::Acquire) {
            Checkin::Forget
        } else if broken {
            Checkin::Close
        } else {
            Checkin::Keep
        };
        link.pool.checkin(session, back);
        self.settle(function, started, result).map_err(|e| retired_means_unavailable(&link, e))
    }

    fn record_failure(&self, function: &'static str, e: &CkError) {
        let code = match e {
            CkError::Pkcs11(code, _) => format!("{code:?}"),
            other => other.to_string(),
        };
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() == RECENT_FAILURES {
            failures.pop_front();
        }
        failures.push_back(FailedCall { at: crate::clock::now(), function, code });
    }

    /// After a failure that may mean the login or the device was lost: checks the link and
    /// repairs it, at most once per backoff interval.
    fn heal_after(&self, e: &CkError) {
        let suspect = matches!(
            e,
            CkError::Pkcs11(
                RvError::UserNotLoggedIn
                    // A private object is invisible once the login is gone.
                    | RvError::KeyHandleInvalid
                    | RvError::ObjectHandleInvalid
                    | RvError::DeviceError
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::CryptokiNotInitialized
                    | RvError::SessionHandleInvalid
                    | RvError::SessionClosed,
                _
            )
        );
        if !suspect {
            return;
        }
        // The service keys' objects are looked up again on their next use: the token may have
        // reloaded them under new handles.
        self.service_objects.lock().unwrap_or_else(|p| p.into_inner()).1.clear();
        self.heal(e);
    }

    /// Checks the link and repairs it (`after`: what made us look), at most once per backoff
    /// interval.
    fn heal(&self, after: &dyn std::fmt::Display) {
        // One repair at a time; calls that fail meanwhile do not queue behind it.
        let mut healing = match self.healing.try_lock() {
            Ok(healing) => healing,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if healing.pin_refused || healing.next_attempt.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let link = self.link();
        let checked = link.check();
        tracing::debug!(?checked, after = %after, "HSM link checked");
        let outcome = match checked {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!("the HSM lost the login: logging in again");
                link.login_again(&self.pin, || self.next_generation())
            }
            Err(why) => {
                tracing::warn!(error = %why, "the PKCS#11 library or token stopped answering: initialising it again");
                self.reinitialise(&link)
            }
        };
        match outcome {
            // The check is cheap (two calls): after a success the next suspect failure checks again
            // at once; only failed repairs wait.
            Ok(()) => *healing = Healing::default(),
            Err(e) => {
                healing.failures += 1;
                healing.pin_refused = matches!(e, HsmError::PinIncorrect { .. });
                let wait = HEAL_BACKOFF.saturating_mul(1 << healing.failures.min(6)).min(HEAL_BACKOFF_MAX);
                healing.next_attempt = Some(Instant::now() + wait);
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, pin_refused = healing.pin_refused, "the HSM link could not be repaired");
            }
        }
    }

    fn next_generation(&self) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(generation, "HSM link repaired: object handles from before are stale and looked up again");
    }

    /// Finalises the library and opens a new link. Calls in flight on the old link fail, and
    /// its sessions are forgotten rather than closed (their handles may be reused by the new
    /// link's).
    fn reinitialise(&self, old: &Arc<Link>) -> Result<(), HsmError> {
        old.retired.store(true, Ordering::Release);
        {
            // With the old anchor locked, so that no copy's unwrap runs across the change (the
            // old anchor's handle may name the new link's anchor): one that ran before went
            // with the library, one after sees the new generation (`make_copy`).
            let _anchor = old.anchor.lock().unwrap_or_else(|p| p.into_inner());
            self.next_generation();
            let _ = old.ctx.clone().finalize();
        }
        let link = Link::open(old.ctx.clone(), &self.token_label, &self.pin, self.sessions)?;
        *self.link.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(link);
        tracing::info!("PKCS#11 library initialised again and logged in");
        Ok(())
    }
}

/// Hands back to the kernel the memory the process has freed. A library that loads every token
/// object when it initialises (SoftHSM2: ~10 KiB an object) frees all of them when it is
/// finalised, but glibc keeps what was freed in the arena of the thread that allocated it: with
/// 10,000 keys, the finalised provisioning step of `kms-server dev` or the link before a repair
/// left ~95 MiB resident for the life of the process.
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointer and only returns free pages to the kernel.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The DER DigestInfo prefix of a SHA-256 digest (RFC 8017, 9.2 note 1).
const SHA256_DIGEST_INFO: &[u8] = &[0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];

/// RSA-OAEP as SoftHSM2 2.6 implements it for wrapping (SHA-1 with MGF1-SHA-1 only; OAEP's
/// security does not rest on SHA-1's collision resistance).
fn backup_mechanism() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty()))
}

/// What is wrong with a backup key pair made without its unwrap template, and what to do.
pub const UNGUARDED_BACKUP_KEY: &str = "the token's backup key pair was made without CKA_UNWRAP_TEMPLATE (before 2026-11-30): \
     anyone with the user PIN can unwrap a readable copy of any key with it. Delete both halves (labels kms-backup-wrap and \
     kms-backup-unwrap) with the HSM's tools, run kms-server backup-key again and take a new backup";

/// Whether `create_backup_key` made the key pair or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKeyOutcome {
    Created,
    AlreadyPresent,
}

/// The provisioning step that needs both the user and the security officer, in a process of
/// its own before the service opens the token (the two cannot be logged in at once): the user
/// generates the backup key pair (the private half stays, private and never extractable, and
/// unwraps only into objects as protected as the ones backups carry:
/// `templates::backup_unwrap_template`); the security officer re-creates its public half as a
/// trusted token object (`templates::backup_key_pair`). A no-op when the token holds both halves.
pub fn create_backup_key(module: &Path, token_label: &str, user_pin: &Pin, so_pin: &Pin) -> Result<BackupKeyOutcome, HsmError> {
    let session = ceremony_session(module, token_label)?;
    let find = |label, class| session.find_objects(&templates::backup_half(label, class)).map_err(|e| setup("C_FindObjects", e));

    login(&session, UserType::User, user_pin, "user")?;
    let private = find(templates::BACKUP_UNWRAP_LABEL, ObjectClass::PRIVATE_KEY)?;
    let public = find(templates::BACKUP_WRAP_LABEL, ObjectClass::PUBLIC_KEY)?;
    if let (Some(private), Some(_)) = (private.first(), public.first()) {
        if !super::raw::has_unwrap_template(module, &session, *private).map_err(|e| setup("C_GetAttributeValue (CKA_UNWRAP_TEMPLATE)", e))? {
            return Err(HsmError::Setup { reason: UNGUARDED_BACKUP_KEY.into() });
        }
        return Ok(BackupKeyOutcome::AlreadyPresent);
    }
    if !private.is_empty() || !public.is_empty() {
        return Err(HsmError::Setup { reason: "the token holds only one half of the backup key pair: remove it by hand and run this again".into() });
    }
    let (public_template, private_template) = templates::backup_key_pair();
    let public = super::raw::generate_rsa_pair_with_unwrap_template(
        module,
        &session,
        &public_template,
        &private_template,
        &templates::backup_unwrap_template(),
    )
    .map_err(|e| setup("C_GenerateKeyPair (backup key)", e))?;
    let attrs =
        session.get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent]).map_err(|e| setup("C_GetAttributeValue", e))?;
    let (mut modulus, mut exponent) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::Modulus(m) => modulus = m,
            Attribute::PublicExponent(e) => exponent = e,
            _ => {}
        }
    }
    session.logout().map_err(|e| setup("C_Logout", e))?;

    login(&session, UserType::So, so_pin, "security officer")?;
    session
        .create_object(&templates::trusted_wrap_key(modulus, exponent, templates::BACKUP_WRAP_LABEL))
        .map_err(|e| setup("C_CreateObject (trusted backup wrapping key)", e))?;
    session.logout().map_err(|e| setup("C_Logout", e))?;
    Ok(BackupKeyOutcome::Created)
}

/// The security officer's ceremony before a reversibility export: makes the customer's RSA
/// public key a trusted token object (`templates::trusted_wrap_key`), labelled with its
/// fingerprint; the export that uses it destroys it. Returns whether it was there already. A
/// public object: the security officer alone, in a process of its own, with the service
/// running or not.
pub fn create_export_key(module: &Path, token_label: &str, so_pin: &Pin, customer: &RsaPublicKey) -> Result<bool, HsmError> {
    let session = ceremony_session(module, token_label)?;
    let label = export_label(customer);
    login(&session, UserType::So, so_pin, "security officer")?;
    let there = !session.find_objects(&templates::trusted_public_key(&label, &customer.modulus)).map_err(|e| setup("C_FindObjects", e))?.is_empty();
    if !there {
        session
            .create_object(&templates::trusted_wrap_key(customer.modulus.clone(), customer.exponent.clone(), &label))
            .map_err(|e| setup("C_CreateObject (trusted customer key)", e))?;
    }
    session.logout().map_err(|e| setup("C_Logout", e))?;
    Ok(there)
}

/// A read-write session on the token, in a process of its own (the key ceremonies).
fn ceremony_session(module: &Path, token_label: &str) -> Result<Session, HsmError> {
    let ctx = Pkcs11::new(module).map_err(|e| setup(&format!("loading PKCS#11 module {}", module.display()), e))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(|e| setup("C_Initialize", e))?;
    let slot = find_slot(&ctx, token_label)?;
    ctx.open_rw_session(slot).map_err(|e| setup("C_OpenSession", e))
}

/// The label of a customer's trusted key.
fn export_label(customer: &RsaPublicKey) -> String {
    format!("{}{}", templates::EXPORT_LABEL, customer.fingerprint())
}

/// The modulus and public exponent of an RSA key object (public, or private: neither is
/// sensitive).
fn rsa_public(s: &Session, object: ObjectHandle) -> Result<RsaPublicKey, CkError> {
    let mut key = RsaPublicKey { modulus: Vec::new(), exponent: Vec::new() };
    for a in s.get_attributes(object, &[AttributeType::Modulus, AttributeType::PublicExponent])? {
        match a {
            Attribute::Modulus(m) => key.modulus = m,
            Attribute::PublicExponent(e) => key.exponent = e,
            _ => {}
        }
    }
    Ok(key)
}

fn find_slot(ctx: &Pkcs11, token_label: &str) -> Result<Slot, HsmError> {
    ctx.get_slots_with_initialized_token()
        .map_err(|e| HsmError::Setup { reason: format!("listing slots: {e}") })?
        .into_iter()
        .find(|slot| ctx.get_token_info(*slot).is_ok_and(|t| t.label() == token_label))
        .ok_or_else(|| HsmError::Setup { reason: format!("no initialised token labelled {token_label:?}") })
}

/// A call that failed on a link a repair retired (its library finalised under it, whatever
/// code that made the library answer) failed because of the repair: the caller retries.
fn retired_means_unavailable(link: &Link, e: HsmError) -> HsmError {
    match e {
        HsmError::Refused { function, code } if link.retired.load(Ordering::Acquire) => HsmError::Unavailable { function, code },
        HsmError::Setup { .. } if link.retired.load(Ordering::Acquire) => {
            HsmError::Unavailable { function: "C_Initialize", code: RvError::CryptokiNotInitialized }
        }
        e => e,
    }
}

/// A decryption's failure in the standard's words: SoftHSM2 reports a forged AES-GCM tag, and
/// bad RSA padding, as CKR_GENERAL_ERROR (SOFTHSM-NOTES.md), where the standard says
/// CKR_ENCRYPTED_DATA_INVALID. Called on the decryption's own result only, never on a session's
/// or an object's failure.
fn opened<T>(result: Result<T, CkError>) -> Result<T, CkError> {
    match result {
        Err(CkError::Pkcs11(RvError::GeneralError, function)) => Err(CkError::Pkcs11(RvError::EncryptedDataInvalid, function)),
        other => other,
    }
}

/// Whether a failure says the request was wrong rather than the HSM: a ciphertext that does not
/// open, data or mechanism parameters the token refuses. Counted in the metrics as errors, but
/// not kept among the recent failures that make the health DEGRADED, nor taken as a sign the
/// link needs repair: a caller's tampered ciphertext says nothing of the HSM.
fn callers_fault(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid
                | RvError::DataLenRange
                | RvError::ArgumentsBad
                | RvError::MechanismParamInvalid,
            _
        )
    )
}

/// Maps a cryptoki error to what the service does about it.
fn classify(function: &'static str, e: CkError) -> HsmError {
    match e {
        CkError::Pkcs11(code, _) => match code {
            RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SessionCount
            | RvError::UserNotLoggedIn
            // A handle that went stale (the token was reset or its objects reloaded): the object
            // may still exist under a new handle; `Kms::repair_handles` finds it again.
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::HostMemory
            | RvError::CryptokiNotInitialized => HsmError::Unavailable { function, code },
            code => HsmError::Refused { function, code },
        },
        // Errors raised by cryptoki itself (a length that does not fit a CK_ULONG, a missing
        // function in the module) are programming or setup errors.
        other => HsmError::Setup { reason: format!("{function}: {other}") },
    }
}

impl Hsm for Pkcs11Hsm {
    fn generate_key(&self, name: &ObjectName) -> Result<KeyHandle, HsmError> {
        let template = templates::key_version(name);
        let generation = self.generation();
        self.with_session("C_GenerateKey", |s| s.generate_key(&Mechanism::AesKeyGen, &template)).map(|o| Self::tag(o, generation))
    }

    fn find_keys(&self) -> Result<Vec<(ObjectName, KeyHandle)>, HsmError> {
        let generation = self.generation();
        self.with_session("C_FindObjects", |s| {
            let mut found = Vec::new();
            for handle in s.find_objects(&templates::all_aes_keys())? {
                let attrs = s.get_attributes(handle, &[AttributeType::Label])?;
                let label = attrs.iter().find_map(|a| match a {
                    Attribute::Label(bytes) => std::str::from_utf8(bytes).ok(),
                    _ => None,
                });
                if let Some(name) = label.and_then(ObjectName::from_label) {
                    found.push((name, Self::tag(handle, generation)));
                }
            }
            Ok(found)
        })
    }

    fn encrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut iv = iv.0;
        self.with_key("C_Encrypt", key, |s, object| {
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
            s.encrypt(&Mechanism::AesGcm(params), object, plaintext)
        })
    }

    fn decrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], ciphertext: &[u8]) -> Result<SecretBytes, HsmError> {
        let mut iv = iv.0;
        let result = self.with_key("C_Decrypt", key, |s, object| {
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
            opened(s.decrypt(&Mechanism::AesGcm(params), object, ciphertext)).map(SecretBytes::new)
        });
        match result {
            // A device that says CKR_GENERAL_ERROR on C_Decrypt (before the decryption, as the
            // fault tests inject it) gets the uniform refusal too: it is what SoftHSM2 says of
            // a forged tag.
            Err(HsmError::Unavailable { code: RvError::GeneralError, .. })
            | Err(HsmError::Refused { code: RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, .. }) => Err(HsmError::DecryptFailed),
            other => other,
        }
    }

    fn random(&self, out: &mut [u8]) -> Result<(), HsmError> {
        self.with_session("C_GenerateRandom", |s| s.generate_random_slice(out))
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), HsmError> {
        // Its session copies first: no copy of a version may outlive it, nor be made after.
        self.drop_copies(key)?;
        self.with_session("C_DestroyObject", |s| s.destroy_object(self.resolve(s, key)?))
    }

    fn drop_copies(&self, key: KeyHandle) -> Result<(), HsmError> {
        if let KeyHandle::Object { object, generation } = key {
            let copies = self.copies.take_for_destroy(object, generation);
            for (n, copy) in copies.iter().enumerate() {
                match self.with_session("C_DestroyObject", |s| s.destroy_object(*copy)) {
                    Ok(()) | Err(HsmError::Unavailable { code: RvError::ObjectHandleInvalid, .. }) => {}
                    Err(e) => {
                        self.copies.destroy_later(object, generation, &copies[n..]);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn service_key(&self, which: ServiceKey) -> Result<KeyHandle, HsmError> {
        self.with_session("C_FindObjects", |s| {
            if s.find_objects(&templates::by_label(which.label()))?.is_empty() {
                let (mechanism, template) = which.template();
                s.generate_key(&mechanism, &template)?;
            }
            Ok(KeyHandle::Service(which))
        })
    }

    fn find_service_key(&self, which: ServiceKey) -> Result<Option<KeyHandle>, HsmError> {
        let generation = self.generation();
        self.with_session("C_FindObjects", |s| Ok(s.find_objects(&templates::by_label(which.label()))?.first().map(|o| Self::tag(*o, generation))))
    }

    fn backup_key(&self) -> Result<BackupKey, HsmError> {
        let generation = self.generation();
        self.with_session("C_FindObjects", |s| {
            let find =
                |label, class| s.find_objects(&templates::backup_half(label, class)).map(|found| found.first().map(|o| Self::tag(*o, generation)));
            Ok(BackupKey {
                wrap: find(templates::BACKUP_WRAP_LABEL, ObjectClass::PUBLIC_KEY)?,
                unwrap: find(templates::BACKUP_UNWRAP_LABEL, ObjectClass::PRIVATE_KEY)?,
            })
        })
    }

    fn backup_key_unguarded(&self) -> Result<bool, HsmError> {
        self.with_session("C_FindObjects", |s| {
            match s.find_objects(&templates::backup_half(templates::BACKUP_UNWRAP_LABEL, ObjectClass::PRIVATE_KEY))?.first() {
                Some(private) => Ok(!super::raw::has_unwrap_template(&self.module, s, *private)?),
                None => Ok(false),
            }
        })
    }

    fn wrap(&self, wrapping_key: KeyHandle, key: KeyHandle) -> Result<Vec<u8>, HsmError> {
        self.with_session("C_WrapKey", |s| s.wrap_key(&backup_mechanism(), self.resolve(s, wrapping_key)?, self.resolve(s, key)?))
    }

    fn unwrap(&self, unwrapping_key: KeyHandle, wrapped: &[u8], what: Wrapped, token: bool) -> Result<KeyHandle, HsmError> {
        let template = what.unwrap_template(token);
        let generation = self.generation();
        self.with_session("C_UnwrapKey", |s| s.unwrap_key(&backup_mechanism(), self.resolve(s, unwrapping_key)?, wrapped, &template))
            .map(|o| Self::tag(o, generation))
    }

    fn mac(&self, key: KeyHandle, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_session("C_Sign", |s| s.sign(&Mechanism::Sha256Hmac, self.resolve(s, key)?, data))
    }

    fn verify_mac(&self, key: KeyHandle, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        match self.with_session("C_Verify", |s| s.verify(&Mechanism::Sha256Hmac, self.resolve(s, key)?, data, mac)) {
            Ok(()) => Ok(true),
            Err(HsmError::Refused { code: RvError::SignatureInvalid | RvError::SignatureLenRange, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn key_protection(&self, key: KeyHandle) -> Result<KeyProtection, HsmError> {
        self.with_session("C_GetAttributeValue", |s| {
            let wanted = [
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::WrapWithTrusted,
                AttributeType::Local,
            ];
            let mut p = KeyProtection {
                sensitive: false,
                always_sensitive: false,
                extractable: true,
                never_extractable: false,
                wrap_with_trusted: false,
                local: false,
            };
            for a in s.get_attributes(self.resolve(s, key)?, &wanted)? {
                match a {
                    Attribute::Sensitive(v) => p.sensitive = v,
                    Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                    Attribute::Extractable(v) => p.extractable = v,
                    Attribute::NeverExtractable(v) => p.never_extractable = v,
                    Attribute::WrapWithTrusted(v) => p.wrap_with_trusted = v,
                    Attribute::Local(v) => p.local = v,
                    _ => {}
                }
            }
            Ok(p)
        })
    }

    fn signing_keys(&self) -> Result<Vec<RsaPublicKey>, HsmError> {
        self.with_session("C_GenerateKeyPair", |s| {
            let find = |class| s.find_objects(&templates::backup_half(templates::SIGNING_LABEL, class));
            let mut public = find(ObjectClass::PUBLIC_KEY)?;
            if public.is_empty() || find(ObjectClass::PRIVATE_KEY)?.is_empty() {
                // Two nodes making it at once make two pairs: both are published, either signs.
                let (public_template, private_template) = templates::signing_key_pair();
                public.push(s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public_template, &private_template)?.0);
            }
            public.into_iter().map(|o| rsa_public(s, o)).collect()
        })
    }

    fn sign(&self, key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_session("C_Sign", |s| {
            let mut template = templates::backup_half(templates::SIGNING_LABEL, ObjectClass::PRIVATE_KEY);
            template.push(Attribute::Modulus(key.modulus.clone()));
            let Some(private) = s.find_objects(&template)?.first().copied() else {
                return Err(CkError::Pkcs11(RvError::KeyHandleInvalid, cryptoki::context::Function::Sign));
            };
            s.sign(&Mechanism::Sha256RsaPkcs, private, data)
        })
    }

    fn rsa_private(&self, key: &super::RsaPrivateKey, op: super::RsaPrivateOp<'_>) -> Result<SecretBytes, HsmError> {
        use super::{OaepHash, RsaPrivateOp};
        use cryptoki::mechanism::rsa::PkcsPssParams;
        let (mechanism, data, sign) = match op {
            RsaPrivateOp::DecryptPkcs1 { ciphertext } => (Mechanism::RsaPkcs, ciphertext.to_vec(), false),
            RsaPrivateOp::DecryptOaep { hash, label, ciphertext } => {
                let (hash, mgf) = match hash {
                    OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
                    OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                    OaepHash::Sha256Mgf1Sha1 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA1),
                };
                let source = if label.is_empty() { PkcsOaepSource::empty() } else { PkcsOaepSource::data_specified(label) };
                (Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, source)), ciphertext.to_vec(), false)
            }
            // PKCS#1 v1.5 over a digest made elsewhere: the DigestInfo is prefixed here, and the
            // token pads and signs it (CKM_RSA_PKCS).
            RsaPrivateOp::SignPkcs1Sha256 { digest } => (Mechanism::RsaPkcs, [SHA256_DIGEST_INFO, digest].concat(), true),
            RsaPrivateOp::SignPssSha256 { digest, salt } => {
                let params = PkcsPssParams { hash_alg: MechanismType::SHA256, mgf: PkcsMgfType::MGF1_SHA256, s_len: (salt as u64).into() };
                (Mechanism::RsaPkcsPss(params), digest.to_vec(), true)
            }
        };
        let mut template = templates::user_private_key(key, sign);
        let function = if sign { "C_Sign" } else { "C_Decrypt" };
        let result = self.with_session(function, |_| {
            // A session of its own, closed at the end: closing it destroys the key object even
            // if C_DestroyObject failed, so none outlives the call in a pooled session.
            let link = self.link();
            let own = link.ctx.open_rw_session(link.slot)?;
            let made = own.create_object(&template);
            templates::wipe(&mut template);
            let object = made?;
            let out = if sign { own.sign(&mechanism, object, &data) } else { opened(own.decrypt(&mechanism, object, &data)) };
            let _ = own.destroy_object(object);
            if link.retired.load(Ordering::Acquire) {
                // The library was initialised again meanwhile: the handle may be another's now.
                std::mem::forget(own);
            }
            out.map(SecretBytes::new)
        });
        templates::wipe(&mut template);
        match result {
            // Not the key's ciphertext, or bad padding: one uniform answer (as for AES-GCM).
            Err(HsmError::Refused { code: RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, .. }) if !sign => {
                Err(HsmError::DecryptFailed)
            }
            other => other,
        }
    }

    fn export(&self, customer: &RsaPublicKey, versions: &[KeyHandle]) -> Result<Option<Vec<Vec<u8>>>, HsmError> {
        let template = templates::trusted_public_key(&export_label(customer), &customer.modulus);
        let Some(key) = self.with_session("C_FindObjects", |s| Ok(s.find_objects(&template)?.first().copied()))? else {
            return Ok(None);
        };
        let wrapped = self.with_session("C_WrapKey", |s| {
            versions.iter().map(|version| s.wrap_key(&backup_mechanism(), key, self.resolve(s, *version)?)).collect::<Result<Vec<_>, _>>()
        })?;
        // One export per ceremony: the officers cannot export again on their own word.
        self.with_session("C_DestroyObject", |s| s.destroy_object(key))?;
        Ok(Some(wrapped))
    }

    fn new_import_key(&self, label: &str) -> Result<RsaPublicKey, HsmError> {
        let (public, private) = templates::import_key_pair(label);
        self.with_session("C_GenerateKeyPair", |s| {
            let public =
                super::raw::generate_rsa_pair_with_unwrap_template(&self.module, s, &public, &private, &templates::backup_unwrap_template())?;
            rsa_public(s, public)
        })
    }

    fn import_keys(&self) -> Result<Vec<String>, HsmError> {
        self.with_session("C_FindObjects", |s| {
            let mut labels = Vec::new();
            for object in s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Token(true)])? {
                for a in s.get_attributes(object, &[AttributeType::Label])? {
                    if let Attribute::Label(bytes) = a
                        && let Ok(label) = String::from_utf8(bytes)
                        && label.starts_with(templates::IMPORT_LABEL)
                    {
                        labels.push(label);
                    }
                }
            }
            Ok(labels)
        })
    }

    fn has_import_key(&self, label: &str) -> Result<bool, HsmError> {
        self.with_session("C_FindObjects", |s| Ok(!s.find_objects(&templates::backup_half(label, ObjectClass::PRIVATE_KEY))?.is_empty()))
    }

    fn destroy_import_key(&self, label: &str) -> Result<(), HsmError> {
        self.with_session("C_DestroyObject", |s| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                for object in s.find_objects(&templates::backup_half(label, class))? {
                    s.destroy_object(object)?;
                }
            }
            Ok(())
        })
    }

    fn import(&self, label: &str, versions: &[(ObjectName, Vec<u8>)]) -> Result<Option<Vec<KeyHandle>>, HsmError> {
        let generation = self.generation();
        let result = self.with_session("C_UnwrapKey", |s| {
            let Some(private) = s.find_objects(&templates::backup_half(label, ObjectClass::PRIVATE_KEY))?.first().copied() else {
                return Ok(None);
            };
            let mut made = Vec::with_capacity(versions.len());
            let mut failed = None;
            for (name, wrapped) in versions {
                match s.unwrap_key(&backup_mechanism(), private, wrapped, &Wrapped::Version(*name).unwrap_template(true)) {
                    Ok(object) => made.push(object),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                // A failed undo is the error instead: the caller then keeps its create intents,
                // and recovery destroys what is left.
                for object in made {
                    s.destroy_object(object)?;
                }
                return Err(e);
            }
            Ok(Some(made.into_iter().map(|o| Self::tag(o, generation)).collect()))
        });
        match result {
            // Material wrapped under another key or changed: SoftHSM2 says CKR_GENERAL_ERROR
            // (as for a forged AES-GCM tag), the standard CKR_WRAPPED_KEY_INVALID.
            Err(HsmError::Unavailable { function, code: code @ RvError::GeneralError }) => Err(HsmError::Refused { function, code }),
            other => other,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn recent_failures(&self) -> Vec<FailedCall> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().cloned().collect()
    }

    fn sessions(&self) -> SessionUse {
        let link = self.link();
        let state = link.pool.lock();
        SessionUse { open: state.open, in_use: state.open - state.idle.len(), size: link.pool.size, copies: self.copies.ready(self.generation()) }
    }

    fn token_info(&self) -> Result<TokenInfo, HsmError> {
        let link = self.link();
        let info = link.ctx.get_token_info(link.slot).map_err(|e| classify("C_GetTokenInfo", e))?;
        Ok(TokenInfo {
            label: info.label().to_string(),
            manufacturer: info.manufacturer_id().to_string(),
            model: info.model().to_string(),
            serial_number: info.serial_number().to_string(),
        })
    }
}

/// What becomes of a session returned to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkin {
    Keep,
    /// It failed with a session-level error: closed, and replaced on a later checkout.
    Close,
    /// The library was finalised under it: its handle means nothing now.
    Forget,
}

/// A bounded pool of sessions: at most `size` open at once; callers wait when all are in use.
struct SessionPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    size: usize,
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

impl SessionPool {
    fn new(size: usize) -> Self {
        SessionPool { state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }), freed: Condvar::new(), size }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding this lock cannot leave the pool inconsistent (every update is a
        // single push, pop or counter change), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self, open: impl FnOnce() -> Result<Session, CkError>) -> Result<Session, CkError> {
        let mut state = self.lock();
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(session);
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                let opened = open();
                if opened.is_err() {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                }
                return opened;
            }
            state = self.freed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn checkin(&self, session: Session, back: Checkin) {
        let mut state = self.lock();
        match back {
            Checkin::Keep => state.idle.push(session),
            Checkin::Close | Checkin::Forget => {
                state.open -= 1;
                drop(state);
                if back == Checkin::Forget {
                    std::mem::forget(session);
                } else {
                    drop(session);
                }
            }
        }
        self.freed.notify_one();
    }
}
