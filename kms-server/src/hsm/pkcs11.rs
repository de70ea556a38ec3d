//! The PKCS#11 implementation of [`Hsm`], through `cryptoki`.
//!
//! * One library initialisation per process, with `CKF_OS_LOCKING_OK`: without it SoftHSM2
//!   disables all its locking (SOFTHSM-NOTES.md).
//! * One *anchor* session opened at startup and kept for the life of the process: login is
//!   token-wide for the process, and closing the last session logs the token out, so the anchor
//!   keeps every other session logged in without a login (~1 ms) per request.
//! * A bounded pool of worker sessions. `cryptoki::Session` is `Send` but not `Sync`: a session
//!   belongs to one caller at a time. A session that fails with a session-level error is thrown
//!   away and replaced on the next checkout.

use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{BackupKey, Hsm, HsmError, KeyHandle, ObjectName, ServiceKey, SessionUse, TokenInfo, Wrapped, templates};
use crate::domain::blob::{Iv, TAG_LEN};
use crate::secret::{Pin, SecretBytes};

/// The tag length, in bits, of every AES-GCM operation (NIST SP 800-38D allows shorter tags;
/// we never use them).
const TAG_BITS: u64 = (TAG_LEN * 8) as u64;

pub struct Pkcs11Hsm {
    ctx: Pkcs11,
    slot: Slot,
    /// Held for the process's life so that the login persists; never used for operations.
    _anchor: Mutex<Session>,
    pool: SessionPool,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm").field("slot", &self.slot).finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label, logs in and opens the session pool.
    /// Any failure stops the service: there is no fallback.
    pub fn open(module: &Path, token_label: &str, pin: &Pin, sessions: usize) -> Result<Self, HsmError> {
        let setup = |what: &str, e: CkError| HsmError::Setup { reason: format!("{what}: {e}") };
        let ctx = Pkcs11::new(module).map_err(|e| setup(&format!("loading PKCS#11 module {}", module.display()), e))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(|e| setup("C_Initialize", e))?;
        let slot = find_slot(&ctx, token_label)?;
        let anchor = ctx.open_rw_session(slot).map_err(|e| setup("opening the anchor session", e))?;
        let auth = AuthPin::from(pin.expose_secret());
        match anchor.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                // Never retried: repeated wrong PINs lock the token.
                return Err(HsmError::Setup { reason: "the HSM refused the PIN (CKR_PIN_INCORRECT)".into() });
            }
            Err(e) => return Err(setup("C_Login", e)),
        }
        let pool = SessionPool::new(sessions.max(1));
        Ok(Pkcs11Hsm { ctx, slot, _anchor: Mutex::new(anchor), pool })
    }

    /// Runs `op` on a pooled session. Session-level failures retire the session.
    fn with_session<T>(&self, function: &'static str, op: impl FnOnce(&Session) -> Result<T, CkError>) -> Result<T, HsmError> {
        let started = std::time::Instant::now();
        let session = self.pool.checkout(|| self.ctx.open_rw_session(self.slot)).map_err(|e| classify(function, e))?;
        #[cfg(feature = "test-hooks")]
        let result = super::faults::inject(function).and_then(|()| op(&session));
        #[cfg(not(feature = "test-hooks"))]
        let result = op(&session);
        crate::metrics::metrics().hsm_call(function, if result.is_ok() { "ok" } else { "error" }, started.elapsed());
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
        self.pool.checkin(session, broken);
        result.map_err(|e| classify(function, e))
    }
}

/// RSA-OAEP as SoftHSM2 2.6 implements it for wrapping (SHA-1 with MGF1-SHA-1 only; OAEP's
/// security does not rest on SHA-1's collision resistance).
fn backup_mechanism() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty()))
}

/// Whether `create_backup_key` made the key pair or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKeyOutcome {
    Created,
    AlreadyPresent,
}

/// The provisioning step that needs both the user and the security officer, in a process of
/// its own before the service opens the token (the two cannot be logged in at once): the user
/// generates the backup key pair (the private half stays, private and never extractable); the
/// security officer re-creates its public half as a trusted token object
/// (`templates::backup_key_pair`). A no-op when the token holds both halves.
pub fn create_backup_key(module: &Path, token_label: &str, user_pin: &Pin, so_pin: &Pin) -> Result<BackupKeyOutcome, HsmError> {
    let setup = |what: &str, e: CkError| HsmError::Setup { reason: format!("{what}: {e}") };
    let ctx = Pkcs11::new(module).map_err(|e| setup(&format!("loading PKCS#11 module {}", module.display()), e))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(|e| setup("C_Initialize", e))?;
    let slot = find_slot(&ctx, token_label)?;
    let session = ctx.open_rw_session(slot).map_err(|e| setup("C_OpenSession", e))?;
    let login = |user: UserType, pin: &Pin, who: &str| match session.login(user, Some(&AuthPin::from(pin.expose_secret()))) {
        Ok(()) => Ok(()),
        // Never retried: repeated wrong PINs lock the token.
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            Err(HsmError::Setup { reason: format!("the HSM refused the {who}'s PIN (CKR_PIN_INCORRECT)") })
        }
        Err(e) => Err(setup(&format!("C_Login as {who}"), e)),
    };
    let find = |label, class| session.find_objects(&templates::backup_half(label, class)).map_err(|e| setup("C_FindObjects", e));

    login(UserType::User, user_pin, "user")?;
    let private = find(templates::BACKUP_UNWRAP_LABEL, ObjectClass::PRIVATE_KEY)?;
    let public = find(templates::BACKUP_WRAP_LABEL, ObjectClass::PUBLIC_KEY)?;
    if !private.is_empty() && !public.is_empty() {
        return Ok(BackupKeyOutcome::AlreadyPresent);
    }
    if !private.is_empty() || !public.is_empty() {
        return Err(HsmError::Setup { reason: "the token holds only one half of the backup key pair: remove it by hand and run this again".into() });
    }
    let (public_template, private_template) = templates::backup_key_pair();
    let (public, _private) = session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public_template, &private_template)
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

    login(UserType::So, so_pin, "security officer")?;
    session.create_object(&templates::backup_wrap_key(modulus, exponent)).map_err(|e| setup("C_CreateObject (trusted backup wrapping key)", e))?;
    session.logout().map_err(|e| setup("C_Logout", e))?;
    Ok(BackupKeyOutcome::Created)
}

fn find_slot(ctx: &Pkcs11, token_label: &str) -> Result<Slot, HsmError> {
    ctx.get_slots_with_initialized_token()
        .map_err(|e| HsmError::Setup { reason: format!("listing slots: {e}") })?
        .into_iter()
        .find(|slot| ctx.get_token_info(*slot).is_ok_and(|t| t.label() == token_label))
        .ok_or_else(|| HsmError::Setup { reason: format!("no initialised token labelled {token_label:?}") })
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
        self.with_session("C_GenerateKey", |s| s.generate_key(&Mechanism::AesKeyGen, &template))
    }

    fn find_keys(&self) -> Result<Vec<(ObjectName, KeyHandle)>, HsmError> {
        self.with_session("C_FindObjects", |s| {
            let mut found = Vec::new();
            for handle in s.find_objects(&templates::all_aes_keys())? {
                let attrs = s.get_attributes(handle, &[AttributeType::Label])?;
                let label = attrs.iter().find_map(|a| match a {
                    Attribute::Label(bytes) => std::str::from_utf8(bytes).ok(),
                    _ => None,
                });
                if let Some(name) = label.and_then(ObjectName::from_label) {
                    found.push((name, handle));
                }
            }
            Ok(found)
        })
    }

    fn encrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut iv = iv.0;
        self.with_session("C_Encrypt", |s| {
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
            s.encrypt(&Mechanism::AesGcm(params), key, plaintext)
        })
    }

    fn decrypt(&self, key: KeyHandle, iv: &Iv, aad: &[u8], ciphertext: &[u8]) -> Result<SecretBytes, HsmError> {
        let mut iv = iv.0;
        let result = self.with_session("C_Decrypt", |s| {
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
            s.decrypt(&Mechanism::AesGcm(params), key, ciphertext).map(SecretBytes::new)
        });
        match result {
            // A forged tag: SoftHSM2 says CKR_GENERAL_ERROR, the standard CKR_ENCRYPTED_DATA_INVALID.
            Err(HsmError::Unavailable { code: RvError::GeneralError, .. })
            | Err(HsmError::Refused { code: RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, .. }) => Err(HsmError::DecryptFailed),
            other => other,
        }
    }

    fn random(&self, out: &mut [u8]) -> Result<(), HsmError> {
        self.with_session("C_GenerateRandom", |s| s.generate_random_slice(out))
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), HsmError> {
        self.with_session("C_DestroyObject", |s| s.destroy_object(key))
    }

    fn service_key(&self, which: ServiceKey) -> Result<KeyHandle, HsmError> {
        self.with_session("C_FindObjects", |s| match s.find_objects(&templates::by_label(which.label()))?.first() {
            Some(handle) => Ok(*handle),
            None => {
                let (mechanism, template) = which.template();
                s.generate_key(&mechanism, &template)
            }
        })
    }

    fn find_service_key(&self, which: ServiceKey) -> Result<Option<KeyHandle>, HsmError> {
        self.with_session("C_FindObjects", |s| Ok(s.find_objects(&templates::by_label(which.label()))?.first().copied()))
    }

    fn backup_key(&self) -> Result<BackupKey, HsmError> {
        self.with_session("C_FindObjects", |s| {
            let find = |label, class| s.find_objects(&templates::backup_half(label, class)).map(|found| found.first().copied());
            Ok(BackupKey {
                wrap: find(templates::BACKUP_WRAP_LABEL, ObjectClass::PUBLIC_KEY)?,
                unwrap: find(templates::BACKUP_UNWRAP_LABEL, ObjectClass::PRIVATE_KEY)?,
            })
        })
    }

    fn wrap(&self, wrapping_key: KeyHandle, key: KeyHandle) -> Result<Vec<u8>, HsmError> {
        self.with_session("C_WrapKey", |s| s.wrap_key(&backup_mechanism(), wrapping_key, key))
    }

    fn unwrap(&self, unwrapping_key: KeyHandle, wrapped: &[u8], what: Wrapped, token: bool) -> Result<KeyHandle, HsmError> {
        let template = what.unwrap_template(token);
        self.with_session("C_UnwrapKey", |s| s.unwrap_key(&backup_mechanism(), unwrapping_key, wrapped, &template))
    }

    fn mac(&self, key: KeyHandle, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_session("C_Sign", |s| s.sign(&Mechanism::Sha256Hmac, key, data))
    }

    fn verify_mac(&self, key: KeyHandle, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        match self.with_session("C_Verify", |s| s.verify(&Mechanism::Sha256Hmac, key, data, mac)) {
            Ok(()) => Ok(true),
            Err(HsmError::Refused { code: RvError::SignatureInvalid | RvError::SignatureLenRange, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sessions(&self) -> SessionUse {
        let state = self.pool.lock();
        SessionUse { open: state.open, in_use: state.open - state.idle.len(), size: self.pool.size }
    }

    fn token_info(&self) -> Result<TokenInfo, HsmError> {
        let info = self.ctx.get_token_info(self.slot).map_err(|e| classify("C_GetTokenInfo", e))?;
        Ok(TokenInfo {
            label: info.label().to_string(),
            manufacturer: info.manufacturer_id().to_string(),
            model: info.model().to_string(),
            serial_number: info.serial_number().to_string(),
        })
    }
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

    fn checkin(&self, session: Session, broken: bool) {
        let mut state = self.lock();
        if broken {
            state.open -= 1;
            drop(state);
            drop(session);
        } else {
            state.idle.push(session);
            drop(state);
        }
        self.freed.notify_one();
    }
}
