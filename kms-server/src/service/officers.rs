//! Officers and auditors on the admin plane: creation (and the first officer's bootstrap on the
//! server's host), login with passphrase and TOTP, sessions, and the check every admin call
//! passes.
//!
//! The TOTP secret must be usable by the service, so it cannot be a hash: it is sealed with
//! AES-GCM under an HSM key (`ServiceKey::OfficerSecrets`), the officer's name bound as
//! associated data, and unsealed only inside a login.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::Caller;
use crate::clock::now;
use crate::domain::blob::{IV_LEN, Iv};
use crate::domain::officer::{Passphrase, Role, TOTP_SECRET_LEN, hash_passphrase, otpauth_uri, verify_passphrase, verify_totp};
use crate::domain::policy::valid_principal;
use crate::error::{Error, Result};
use crate::hsm::{Hsm, KeyHandle};
use crate::secret::SecretBytes;
use crate::store::{OfficerRecord, Store};

/// Consecutive failed logins before a lockout, and its length (OWASP Authentication Cheat
/// Sheet: lock after a small number of failures, for a period rather than for ever).
pub const MAX_FAILED_LOGINS: u32 = 5;
pub const LOCKOUT_SECONDS: i64 = 15 * 60;
/// Each failed login is answered this much later per earlier consecutive failure (at most 1 s),
/// so that guessing is slow even before the lockout.
const FAILURE_DELAY_MS: u64 = 200;

/// A session token: 32 random bytes from the HSM, hex. Only its SHA-256 is stored.
pub struct SessionToken(Zeroizing<String>);

impl SessionToken {
    pub fn new(text: String) -> Self {
        SessionToken(Zeroizing::new(text))
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// A successful login.
#[derive(Debug)]
pub struct Session {
    pub token: SessionToken,
    pub expires_at: i64,
    pub role: Role,
}

/// An officer's enrolment: the URI for an authenticator app, shown once.
pub struct Enrolment(pub Zeroizing<String>);

impl fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Enrolment(<redacted>)")
    }
}

/// Officer operations over the HSM and the store.
pub struct Officers<'a> {
    pub hsm: &'a dyn Hsm,
    pub store: &'a Store,
    /// The `ServiceKey::OfficerSecrets` key.
    pub secrets: KeyHandle,
    pub session_seconds: i64,
}

impl fmt::Debug for Officers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Officers")
    }
}

fn unauthenticated(reason: &str) -> Error {
    Error::Unauthenticated { reason: reason.to_string() }
}

fn aad(name: &str) -> Vec<u8> {
    format!("kms-officer-totp:{name}").into_bytes()
}

impl Officers<'_> {
    fn seal(&self, name: &str, secret: &[u8]) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_LEN];
        self.hsm.random(&mut iv)?;
        let mut sealed = iv.to_vec();
        sealed.extend(self.hsm.encrypt(self.secrets, &Iv(iv), &aad(name), secret)?);
        Ok(sealed)
    }

    fn unseal(&self, name: &str, sealed: &[u8]) -> Result<SecretBytes> {
        if sealed.len() < IV_LEN {
            return Err(unauthenticated("invalid name, passphrase or TOTP code"));
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&sealed[..IV_LEN]);
        Ok(self.hsm.decrypt(self.secrets, &Iv(iv), &aad(name), &sealed[IV_LEN..])?)
    }

    /// Creates an officer or auditor with a fresh TOTP secret; returns its enrolment URI.
    pub fn create(&self, by: &Caller, name: &str, role: Role, passphrase: &Passphrase) -> Result<Enrolment> {
        if !valid_principal(name) {
            return Err(Error::invalid("name", "must be 1 to 512 bytes without control characters"));
        }
        if !passphrase.acceptable() {
            return Err(Error::invalid("passphrase", format!("must be at least {} characters", crate::domain::officer::MIN_PASSPHRASE_CHARS)));
        }
        // Checked here, before the argon2 hash, as well as by the insert (two officers added at
        // once under the same name).
        if self.store.read(|tx| tx.officer(name))?.is_some() {
            return Err(Error::AlreadyExists { what: format!("officer {name}") });
        }
        by.commit_point(|| format!("add the {role} {name}, with a new TOTP enrolment shown once"))?;
        let hash = hash_passphrase(passphrase).ok_or_else(|| Error::invalid("passphrase", "could not be hashed"))?;
        let mut secret = SecretBytes::zeroed(TOTP_SECRET_LEN);
        self.hsm.random(secret.expose_secret_mut())?;
        let at = now();
        let record = OfficerRecord {
            name: name.to_string(),
            role,
            enabled: true,
            passphrase_hash: hash,
            sealed_totp: self.seal(name, secret.expose_secret())?,
            last_totp_step: 0,
            failed_attempts: 0,
            locked_until: None,
            created_at: at,
            last_login_at: None,
        };
        let inserted = self.store.write(|tx| {
            let inserted = tx.insert_officer(&record)?;
            if inserted {
                tx.append_audit(&by.audit("CreateOfficer", None, None, format!("{role} {name}")), at)?;
            }
            Ok(inserted)
        })?;
        if !inserted {
            return Err(Error::AlreadyExists { what: format!("officer {name}") });
        }
        Ok(Enrolment(Zeroizing::new(otpauth_uri(name, secret.expose_secret()))))
    }

    /// The first officer, made on the server's host; refused once any officer exists.
    pub fn bootstrap(&self, name: &str, passphrase: &Passphrase) -> Result<Enrolment> {
        if !self.store.read(|tx| tx.officers())?.is_empty() {
            return Err(Error::precondition("an officer already exists: add others with `kmsctl officer add`"));
        }
        let by = Caller::internal("bootstrap (server host)");
        self.create(&by, name, Role::Officer, passphrase)
    }

    /// Checks name, passphrase and TOTP code; opens a session.
    pub fn login(&self, name: &str, passphrase: &Passphrase, code: &str) -> Result<Session> {
        let at = now();
        let mut officer = self.check_credentials(name, passphrase, code, at)?;
        officer.last_login_at = Some(at);
        let mut raw = SecretBytes::zeroed(32);
        self.hsm.random(raw.expose_secret_mut())?;
        let token = SessionToken::new(raw.expose_secret().iter().map(|b| format!("{b:02x}")).collect());
        let expires_at = at + self.session_seconds;
        self.store.write(|tx| {
            tx.update_officer(&officer)?;
            tx.insert_session(&token.hash(), name, at, expires_at)
        })?;
        Ok(Session { token, expires_at, role: officer.role })
    }

    /// Checks an officer's passphrase and TOTP code again, as a login does (a code used once is
    /// refused the second time; failures count towards the lock-out): what an approval asks
    /// beyond an open session.
    pub fn reauthenticate(&self, name: &str, passphrase: &Passphrase, code: &str) -> Result<()> {
        let officer = self.check_credentials(name, passphrase, code, now())?;
        Ok(self.store.write(|tx| tx.update_officer(&officer))?)
    }

    /// The officer `name` if the passphrase and code are theirs (the code's step noted, the
    /// failure count cleared: the caller writes it back); a failure is counted, written, and
    /// slowed down.
    fn check_credentials(&self, name: &str, passphrase: &Passphrase, code: &str, at: i64) -> Result<OfficerRecord> {
        let Some(mut officer) = self.store.read(|tx| tx.officer(name))? else {
            // Spend the same time as a real check, so names cannot be told apart by timing.
            let _ = hash_passphrase(passphrase);
            return Err(unauthenticated("invalid name, passphrase or TOTP code"));
        };
        if let Some(until) = officer.locked_until.filter(|t| *t > at) {
            return Err(unauthenticated(&format!("too many failed logins: locked until {until} (Unix time)")));
        }
        let ok = officer.enabled
            && verify_passphrase(passphrase, &officer.passphrase_hash)
            && verify_totp(self.unseal(name, &officer.sealed_totp)?.expose_secret(), code, at, officer.last_totp_step)
                .map(|step| officer.last_totp_step = step)
                .is_some();
        if !ok {
            let delay = FAILURE_DELAY_MS * u64::from(officer.failed_attempts.min(5));
            officer.failed_attempts += 1;
            if officer.failed_attempts >= MAX_FAILED_LOGINS {
                officer.locked_until = Some(at + LOCKOUT_SECONDS);
                officer.failed_attempts = 0;
            }
            self.store.write(|tx| tx.update_officer(&officer))?;
            std::thread::sleep(std::time::Duration::from_millis(delay));
            return Err(unauthenticated("invalid name, passphrase or TOTP code"));
        }
        officer.failed_attempts = 0;
        officer.locked_until = None;
        Ok(officer)
    }

    /// The officer a session token belongs to, if the session is live, the officer enabled, and
    /// their role allows `needs`.
    pub fn authenticate(&self, token: Option<&SessionToken>, needs: Role) -> Result<String> {
        let token = token.ok_or_else(|| unauthenticated("no session: log in with `kmsctl login`"))?;
        let at = now();
        let (name, expires_at) = self.store.read(|tx| tx.session(&token.hash()))?.ok_or_else(|| unauthenticated("unknown session: log in again"))?;
        if expires_at <= at {
            return Err(unauthenticated("the session expired: log in again"));
        }
        let officer = self.store.read(|tx| tx.officer(&name))?.filter(|o| o.enabled).ok_or_else(|| unauthenticated("the officer is disabled"))?;
        if !officer.role.allows(needs) {
            return Err(Error::PermissionDenied { reason: format!("{name} is an {}; this needs an {needs}", officer.role) });
        }
        Ok(name)
    }

    pub fn logout(&self, token: &SessionToken) -> Result<()> {
        self.store.write(|tx| tx.delete_session(&token.hash()))?;
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<OfficerRecord>> {
        Ok(self.store.read(|tx| tx.officers())?)
    }

    /// Disables an officer and ends their sessions at once.
    pub fn disable(&self, by: &Caller, name: &str) -> Result<OfficerRecord> {
        if by.principal == name {
            return Err(Error::precondition("officers cannot disable themselves"));
        }
        let mut officer = self.store.read(|tx| tx.officer(name))?.ok_or_else(|| Error::NotFound { what: format!("officer {name}") })?;
        by.commit_point(|| format!("disable the {} {name} and end their sessions", officer.role))?;
        officer.enabled = false;
        let at = now();
        self.store.write(|tx| {
            tx.update_officer(&officer)?;
            tx.delete_sessions(name, at)?;
            tx.append_audit(&by.audit("DisableOfficer", None, None, name.to_string()), at)
        })?;
        Ok(officer)
    }

    /// Changes the caller's own passphrase, given the current one.
    pub fn change_passphrase(&self, by: &Caller, current: &Passphrase, new: &Passphrase) -> Result<()> {
        let mut officer = self.store.read(|tx| tx.officer(&by.principal))?.ok_or_else(|| unauthenticated("unknown officer"))?;
        if !verify_passphrase(current, &officer.passphrase_hash) {
            return Err(unauthenticated("the current passphrase is wrong"));
        }
        if !new.acceptable() {
            return Err(Error::invalid("new_passphrase", format!("must be at least {} characters", crate::domain::officer::MIN_PASSPHRASE_CHARS)));
        }
        by.commit_point(|| format!("change the passphrase of {}", by.principal))?;
        officer.passphrase_hash = hash_passphrase(new).ok_or_else(|| Error::invalid("new_passphrase", "could not be hashed"))?;
        self.store.write(|tx| {
            tx.update_officer(&officer)?;
            tx.append_audit(&by.audit("ChangePassphrase", None, None, by.principal.clone()), now())
        })?;
        Ok(())
    }

    /// A new TOTP secret for the caller; the old one stops working at once.
    pub fn reenroll_totp(&self, by: &Caller) -> Result<Enrolment> {
        let mut officer = self.store.read(|tx| tx.officer(&by.principal))?.ok_or_else(|| unauthenticated("unknown officer"))?;
        by.commit_point(|| format!("replace the TOTP secret of {}; the old one stops working at once", by.principal))?;
        let mut secret = SecretBytes::zeroed(TOTP_SECRET_LEN);
        self.hsm.random(secret.expose_secret_mut())?;
        officer.sealed_totp = self.seal(&officer.name, secret.expose_secret())?;
        self.store.write(|tx| {
            tx.update_officer(&officer)?;
            tx.append_audit(&by.audit("ReenrollTotp", None, None, by.principal.clone()), now())
        })?;
        Ok(Enrolment(Zeroizing::new(otpauth_uri(&officer.name, secret.expose_secret()))))
    }
}
