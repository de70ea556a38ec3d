//! Google Workspace client-side encryption: the service's side of the CSE facade
//! (`facade::cse`).
//!
//! Google's side is one principal, `cse:workspace`: its grants say which keys Drive, Gmail,
//! Meet and Calendar may wrap and unwrap under (a grant's context conditions can name
//! `cse_perimeter_id` or `cse_resource_name`), so that an officer allows, narrows and revokes
//! Google's use exactly as a workload's. The settings (one row) say where Google reaches the
//! service (the KACLS URL, checked against every authorization token), which key new wraps use,
//! whether guests may unwrap, which users may call `privilegedwrap` and `privilegedunwrap`, and
//! which other key services `rewrap` may migrate keys from; the issuers say whose tokens are
//! trusted, with their key sets: the customer's identity provider (`authentication`), Google
//! (`authorization`), and other key services migrating keys out of this one (`kacls`: their
//! migration tokens stand in for the authentication token of `privilegedunwrap`).

use std::sync::Arc;

use super::admin::changed;
use super::{Caller, Kms, now};
use crate::domain::ids::KeyRef;
use crate::domain::lifecycle::KeyState;
use crate::domain::policy::{Grant, Operation, PrincipalState};
use crate::error::{Error, Result};
use crate::facade::cse::jwt::Issuer;
use crate::hsm::{HsmError, OaepHash, RsaPrivateKey, RsaPrivateOp};
use crate::secret::SecretBytes;
use crate::store::{CseIssuerRecord, CseSettingsRecord, PrincipalRecord};

/// The principal Google Workspace's calls run as; no workload or officer can take a name
/// starting `cse:`.
pub const PRINCIPAL_PREFIX: &str = "cse:";
pub const PRINCIPAL: &str = "cse:workspace";

/// Which token an issuer signs.
pub const AUTHENTICATION: &str = "authentication";
pub const AUTHORIZATION: &str = "authorization";
pub const KACLS: &str = "kacls";

/// The audience of migration tokens between key services.
pub const MIGRATION_AUDIENCE: &str = "kacls-migration";
/// The audience of the delegated authentication tokens this service signs for itself.
pub const DELEGATE_AUDIENCE: &str = "kacls-delegate";

/// The most issuers of each kind, audiences of an issuer, privileged users; the largest key set.
const MAX_ISSUERS: usize = 16;
const MAX_AUDIENCES: usize = 8;
const MAX_PRIVILEGED: usize = 32;
const MAX_JWKS: usize = 64 * 1024;

/// What an officer sets besides the URL and the key (`kmsctl cse configure`).
#[derive(Debug, Default)]
pub struct CseOptions {
    /// Whether guests (`email_type` `google-visitor`, `customer-idp`) may use the keys.
    pub guests: bool,
    /// Who may call the privileged calls (`privilegedwrap`, `privilegedunwrap`,
    /// `wrapprivatekey`, `privilegedprivatekeydecrypt`).
    pub privileged_users: Vec<String>,
    /// The key services whose wrapped keys `rewrap` may fetch.
    pub migration_sources: Vec<String>,
    /// The Google Workspace domain that owns this key service (`None`: not checked).
    pub owner_domain: Option<String>,
}

/// What every CSE call reads: the settings, if any, and the trusted issuers (part of the
/// registry, rebuilt with it).
#[derive(Debug, Default)]
pub struct Config {
    pub settings: Option<CseSettingsRecord>,
    pub issuers: Vec<CseIssuerRecord>,
    pub authentication: Vec<Issuer>,
    pub authorization: Vec<Issuer>,
    /// Other key services, whose migration tokens open keys for them (`privilegedunwrap`).
    pub kacls: Vec<Issuer>,
}

impl Config {
    /// The configuration for these rows; an issuer whose key set cannot be read is left out
    /// (logged), so that one bad row does not stop the others, nor the registry's load.
    pub fn new(settings: Option<CseSettingsRecord>, issuers: Vec<CseIssuerRecord>) -> Config {
        let mut config = Config { settings, ..Default::default() };
        for record in &issuers {
            let audiences: Vec<&str> = record.audiences.iter().map(String::as_str).collect();
            match Issuer::new(&record.iss, &audiences, &record.jwks) {
                Ok(issuer) if record.token == AUTHENTICATION => config.authentication.push(issuer),
                Ok(issuer) if record.token == KACLS => config.kacls.push(issuer),
                Ok(issuer) => config.authorization.push(issuer),
                Err(e) => tracing::error!(iss = %record.iss, error = %e, "a CSE issuer's key set cannot be read; its tokens are refused"),
            }
        }
        config.issuers = issuers;
        config
    }

    /// The path Google's calls arrive under: the KACLS URL's (`https://host/PATH`).
    pub fn path_prefix(&self) -> Option<&str> {
        let url = &self.settings.as_ref()?.kacls_url;
        let rest = url.strip_prefix("https://")?;
        Some(rest.find('/').map_or("", |i| rest[i..].trim_end_matches('/')))
    }

    /// Whether `rewrap` may fetch keys from the key service at `url`.
    pub fn migrates_from(&self, url: &str) -> bool {
        self.settings.as_ref().is_some_and(|s| s.migration_sources.iter().any(|u| u == url.trim_end_matches('/')))
    }

    /// Whether `email` may call `privilegedwrap` and `privilegedunwrap`.
    pub fn privileged(&self, email: &str) -> bool {
        self.settings.as_ref().is_some_and(|s| s.privileged_users.iter().any(|u| u.eq_ignore_ascii_case(email)))
    }
}

/// A key service's URL: `https://HOST[:PORT][/PATH]`, no query, fragment or user, at most 256
/// bytes.
fn check_url(field: &'static str, url: &str) -> Result<()> {
    let bad = || Error::invalid(field, "must be https://HOST[:PORT][/PATH] without a query, fragment or user, at most 256 bytes");
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let host = rest.split('/').next().unwrap_or_default();
    let ok = url.len() <= 256
        && !host.is_empty()
        && !rest.contains(['?', '#', '@', ' '])
        && rest.chars().all(|c| c.is_ascii_graphic())
        && !rest.trim_end_matches('/').contains("//");
    if ok { Ok(()) } else { Err(bad()) }
}

/// A Google Workspace domain: DNS labels of letters, digits and hyphens, at most 253 bytes.
fn check_domain(domain: &str) -> Result<()> {
    let label = |l: &str| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let ok = domain.len() <= 253 && domain.contains('.') && domain.split('.').all(label);
    if ok { Ok(()) } else { Err(Error::invalid("owner_domain", format!("{:?} is not a domain name", domain.chars().take(64).collect::<String>()))) }
}

/// An e-mail address as a token names it (for the privileged users).
fn check_email(email: &str) -> Result<()> {
    let ok =
        email.len() <= 254 && email.split_once('@').is_some_and(|(u, d)| !u.is_empty() && d.contains('.')) && !email.contains(char::is_whitespace);
    if ok { Ok(()) } else { Err(Error::invalid("privileged_users", format!("{email:?} is not an e-mail address"))) }
}

impl Kms {
    /// The CSE settings and issuers every CSE call reads.
    pub fn cse_config(&self) -> Arc<Config> {
        self.registry.read().cse.clone()
    }

    /// Sets where Google reaches the service, which key new wraps use, which Workspace domain
    /// owns it, whether guests may unwrap, who may call `privilegedwrap` and
    /// `privilegedunwrap`, and which key services `rewrap` may fetch from. The first time, registers the principal
    /// `cse:workspace`; and when it holds no grant for both Encrypt and Decrypt on the key,
    /// grants them (without conditions: an officer narrows them like any grant).
    pub fn configure_cse(&self, caller: &Caller, kacls_url: &str, key: &KeyRef, options: CseOptions) -> Result<CseSettingsRecord> {
        let CseOptions { guests, privileged_users, migration_sources, owner_domain } = options;
        check_url("kacls_url", kacls_url)?;
        if let Some(domain) = &owner_domain {
            check_domain(domain)?;
        }
        if migration_sources.len() > MAX_PRIVILEGED {
            return Err(Error::invalid("migration_sources", format!("at most {MAX_PRIVILEGED}")));
        }
        migration_sources.iter().try_for_each(|u| check_url("migration_sources", u))?;
        let migration_sources = migration_sources.iter().map(|u| u.trim_end_matches('/').to_string()).collect();
        if privileged_users.len() > MAX_PRIVILEGED {
            return Err(Error::invalid("privileged_users", format!("at most {MAX_PRIVILEGED}")));
        }
        privileged_users.iter().try_for_each(|u| check_email(u))?;
        let needs_grant = {
            let _admin = self.admin_lock()?;
            let entry = self.registry.entry(key)?;
            if entry.record.state != KeyState::Enabled {
                return Err(Error::precondition(format!("key {} is {:?}; CSE needs an enabled key", entry.record.key_id, entry.record.state)));
            }
            let record = CseSettingsRecord {
                kacls_url: kacls_url.trim_end_matches('/').to_string(),
                key_id: entry.record.key_id,
                guests,
                privileged_users,
                migration_sources,
                updated_at: now(),
                owner_domain: owner_domain.map(|d| d.to_ascii_lowercase()),
            };
            let registered = self.registry.read().principals.contains_key(PRINCIPAL);
            caller.commit_point(|| {
                format!(
                    "serve Google Workspace CSE at {} with key {}{}{}",
                    record.kacls_url,
                    record.key_id,
                    if guests { ", guests allowed" } else { "" },
                    if registered { String::new() } else { format!("; register principal {PRINCIPAL}") }
                )
            })?;
            let mut state = self.registry.write();
            let marks = self.store.write(|tx| {
                if !registered {
                    tx.insert_principal(PRINCIPAL, PrincipalState::Enabled, record.updated_at)?;
                }
                tx.put_cse_settings(&record)?;
                let detail = format!(
                    "KACLS URL {}, key {}, owner domain {}, guests {}, privileged users {}, migration sources {}",
                    record.kacls_url,
                    record.key_id,
                    record.owner_domain.as_deref().unwrap_or("not checked"),
                    if guests { "allowed" } else { "refused" },
                    record.privileged_users.join(","),
                    record.migration_sources.join(",")
                );
                tx.append_audit(&caller.audit("ConfigureCse", Some(record.key_id), None, detail), record.updated_at)?;
                changed(tx, false)
            })?;
            state.note(marks);
            if !registered {
                let p = PrincipalRecord { name: PRINCIPAL.to_string(), state: PrincipalState::Enabled, created_at: record.updated_at };
                state.principals.insert(PRINCIPAL.to_string(), p);
            }
            let granted = |op| state.grants.get(&record.key_id).into_iter().flatten().any(|g| g.principal == PRINCIPAL && g.operations.contains(&op));
            let needs_grant = !(granted(Operation::Encrypt) && granted(Operation::Decrypt));
            state.cse = Arc::new(Config::new(Some(record.clone()), state.cse.issuers.clone()));
            needs_grant.then_some(record)
        };
        let Some(record) = needs_grant else {
            return self.cse_config().settings.clone().ok_or_else(|| Error::NotFound { what: "CSE settings".into() });
        };
        let grant = Grant {
            grant_id: String::new(),
            principal: PRINCIPAL.to_string(),
            key_id: record.key_id,
            operations: [Operation::Encrypt, Operation::Decrypt].into(),
            required_pairs: Default::default(),
            required_keys: Default::default(),
            expires_at: None,
            created_at: 0,
        };
        // A grant like any other: under a CreateGrant quorum policy it waits for its approvals.
        let covered = super::quorum::Covered::CreateGrant {
            principal: PRINCIPAL.to_string(),
            key_id: record.key_id.to_string(),
            operations: grant.operations.iter().map(|o| o.as_str().to_string()).collect(),
            required_pairs: Default::default(),
            required_keys: Vec::new(),
            expires_at: None,
        };
        self.gate(caller, covered, "grant for the key Google Workspace CSE uses")?;
        self.create_grant(caller, grant, &KeyRef::Id(record.key_id))?;
        Ok(record)
    }

    /// Trusts `iss` for `token` (`authentication` or `authorization`) tokens naming one of
    /// `audiences`, verified with the key set `jwks`; replaces its earlier entry.
    pub fn put_cse_issuer(
        &self,
        caller: &Caller,
        token: &str,
        iss: &str,
        audiences: Vec<String>,
        jwks: &str,
        jwks_url: Option<String>,
    ) -> Result<CseIssuerRecord> {
        if ![AUTHENTICATION, AUTHORIZATION, KACLS].contains(&token) {
            return Err(Error::invalid("token", format!("must be {AUTHENTICATION}, {AUTHORIZATION} or {KACLS}")));
        }
        if iss.is_empty() || iss.len() > 256 || !iss.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Error::invalid("iss", "must be 1 to 256 printable ASCII characters"));
        }
        if audiences.is_empty() || audiences.len() > MAX_AUDIENCES || audiences.iter().any(|a| a.is_empty() || a.len() > 256) {
            return Err(Error::invalid("audiences", format!("1 to {MAX_AUDIENCES}, each 1 to 256 characters")));
        }
        if jwks.len() > MAX_JWKS {
            return Err(Error::invalid("jwks", format!("is {} bytes; at most {MAX_JWKS}", jwks.len())));
        }
        if let Some(url) = &jwks_url
            && (!url.starts_with("https://") || url.len() > 1024)
        {
            return Err(Error::invalid("jwks_url", "must be an https:// URL of at most 1,024 bytes"));
        }
        let refs: Vec<&str> = audiences.iter().map(String::as_str).collect();
        Issuer::new(iss, &refs, jwks).map_err(|e| Error::invalid("jwks", e))?;
        let _admin = self.admin_lock()?;
        let config = self.cse_config();
        if config.issuers.iter().filter(|i| i.token == token && i.iss != iss).count() >= MAX_ISSUERS {
            return Err(Error::precondition(format!("{MAX_ISSUERS} {token} issuers are trusted already; remove one first")));
        }
        let record =
            CseIssuerRecord { iss: iss.to_string(), token: token.to_string(), audiences, jwks: jwks.to_string(), jwks_url, updated_at: now() };
        caller.commit_point(|| format!("trust {} tokens from {iss} for the audiences {}", record.token, record.audiences.join(", ")))?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.put_cse_issuer(&record)?;
            let detail = format!("{} issuer {iss}, audiences {}", record.token, record.audiences.join(","));
            tx.append_audit(&caller.audit("PutCseIssuer", None, None, detail), record.updated_at)?;
            changed(tx, false)
        })?;
        state.note(marks);
        let mut issuers: Vec<_> = state.cse.issuers.iter().filter(|i| i.iss != iss).cloned().collect();
        issuers.push(record.clone());
        issuers.sort_by(|a, b| a.iss.cmp(&b.iss));
        state.cse = Arc::new(Config::new(state.cse.settings.clone(), issuers));
        Ok(record)
    }

    /// Replaces `iss`'s key set with `jwks` as fetched again from its URL, if it changed (the
    /// background job's refresh; audited as the system's). `Ok(false)`: unchanged, or no such
    /// issuer any more.
    pub fn refresh_cse_issuer(&self, iss: &str, jwks: &str) -> Result<bool> {
        let _admin = self.admin_lock()?;
        let Some(old) = self.cse_config().issuers.iter().find(|i| i.iss == iss).cloned() else { return Ok(false) };
        if old.jwks == jwks {
            return Ok(false);
        }
        let audiences: Vec<&str> = old.audiences.iter().map(String::as_str).collect();
        Issuer::new(iss, &audiences, jwks).map_err(|e| Error::invalid("jwks", e))?;
        let record = CseIssuerRecord { jwks: jwks.to_string(), updated_at: now(), ..old };
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.put_cse_issuer(&record)?;
            let detail = format!("{} issuer {iss}: its key set fetched again from {}", record.token, record.jwks_url.as_deref().unwrap_or_default());
            tx.append_audit(&crate::audit::AuditEvent::system("RefreshCseIssuer", None, None, detail), record.updated_at)?;
            changed(tx, true)
        })?;
        state.note(marks);
        let issuers = state.cse.issuers.iter().map(|i| if i.iss == iss { record.clone() } else { i.clone() }).collect();
        state.cse = Arc::new(Config::new(state.cse.settings.clone(), issuers));
        Ok(true)
    }

    /// The public halves of the signing keys that verify the tokens this service signs
    /// (`certs`): migration tokens and delegated authentication tokens.
    pub fn cse_signing_keys(&self) -> Result<Vec<crate::hsm::RsaPublicKey>> {
        Ok(self.hsm.signing_keys()?)
    }

    /// A migration token (Google's KACLS-to-KACLS authentication token) for the key service at
    /// `original` to open a key of `resource_name` for this one: for `kacls-migration`, naming
    /// `original`.
    pub fn cse_migration_token(&self, original: &str, resource_name: &str) -> Result<String> {
        self.cse_token(MIGRATION_AUDIENCE, serde_json::json!({"kacls_url": original.trim_end_matches('/'), "resource_name": resource_name}))
    }

    /// A delegated authentication token (`delegate`): `user` lets `delegated_to` wrap and
    /// unwrap the keys of `resource_name` on their behalf; for `kacls-delegate`. This service
    /// takes it as an authentication token beside the identity providers' (`wrap`, `unwrap`).
    pub fn cse_delegated_token(&self, user: &str, delegated_to: &str, resource_name: &str) -> Result<String> {
        self.cse_token(DELEGATE_AUDIENCE, serde_json::json!({"email": user, "delegated_to": delegated_to, "resource_name": resource_name}))
    }

    /// A Gmail user's private key as `wrapprivatekey` is given it (PEM or DER, PKCS#1 or
    /// PKCS#8), checked before it is wrapped: a consistent RSA key (its primes, exponents and
    /// coefficient agree, as `ring` checks them) that the HSM takes and signs with. Its PKCS#1
    /// DER, and its public key's hash.
    pub fn cse_user_key(&self, text: &[u8]) -> Result<(zeroize::Zeroizing<Vec<u8>>, String)> {
        let (pkcs1, key) = RsaPrivateKey::from_text(text).map_err(|e| Error::invalid("private_key", e))?;
        ring::signature::RsaKeyPair::from_der(&pkcs1).map_err(|e| Error::invalid("private_key", format!("is not a consistent RSA key ({e})")))?;
        let probe = [0u8; 32];
        self.hsm.rsa_private(&key, RsaPrivateOp::SignPkcs1Sha256 { digest: &probe }).map_err(|e| match e {
            HsmError::Refused { code, .. } => Error::invalid("private_key", format!("is refused by the HSM ({code:?})")),
            other => other.into(),
        })?;
        Ok((pkcs1, key.public.spki_sha256_base64()))
    }

    /// Runs `op` in the HSM with a Gmail user's private key, `pkcs1` being what their wrapped
    /// private key opened to (the call's authorization was checked against it by then); the
    /// key, whose public half hashes to `spki_hash`, lives in the HSM for this one operation.
    /// OAEP over SHA-256 is tried with MGF1 over SHA-256, then over SHA-1 (Java's reading of
    /// the name): the caller may decrypt either way, so the second try tells them nothing more.
    pub fn cse_private_key_op(&self, pkcs1: &[u8], spki_hash: &str, op: RsaPrivateOp<'_>) -> Result<SecretBytes> {
        let key = RsaPrivateKey::from_pkcs1_der(pkcs1).map_err(|e| Error::invalid("wrapped_private_key", format!("holds a key that {e}")))?;
        if key.public.spki_sha256_base64() != spki_hash {
            return Err(Error::invalid("wrapped_private_key", "holds the private key of another public key than spki_hash names"));
        }
        if let RsaPrivateOp::SignPssSha256 { salt, .. } = op {
            // RFC 8017 9.1.1: the encoded message holds the digest, the salt and two bytes more.
            let room = key.public.bits().div_ceil(8).saturating_sub(32 + 2);
            if salt > room {
                return Err(Error::invalid("rsa_pss_salt_length", format!("is at most {room} bytes with this key")));
            }
        }
        let result = match (self.hsm.rsa_private(&key, op), op) {
            (Err(HsmError::DecryptFailed | HsmError::Refused { .. }), RsaPrivateOp::DecryptOaep { hash: OaepHash::Sha256, label, ciphertext }) => {
                self.hsm.rsa_private(&key, RsaPrivateOp::DecryptOaep { hash: OaepHash::Sha256Mgf1Sha1, label, ciphertext })
            }
            (result, _) => result,
        };
        result.map_err(|e| match e {
            HsmError::DecryptFailed => Error::invalid("encrypted_data_encryption_key", "does not decrypt under this private key with this algorithm"),
            HsmError::Refused { code, .. } => Error::invalid("algorithm", format!("is refused by the HSM for this key ({code:?})")),
            other => other.into(),
        })
    }

    /// A token of this service's: `claims` with its KACLS URL as the issuer, for `audience`,
    /// valid 15 minutes, signed in the HSM.
    fn cse_token(&self, audience: &str, mut claims: serde_json::Value) -> Result<String> {
        let config = self.cse_config();
        let settings = config.settings.as_ref().ok_or_else(|| Error::precondition("Google Workspace CSE is not configured"))?;
        let key = self.hsm.signing_keys()?.into_iter().next().ok_or_else(|| Error::precondition("the HSM made no signing key"))?;
        let at = now();
        for (name, value) in
            [("iss", serde_json::json!(settings.kacls_url)), ("aud", audience.into()), ("iat", at.into()), ("exp", (at + 900).into())]
        {
            claims[name] = value;
        }
        crate::facade::cse::jwt::sign_rs256(&claims, &crate::facade::cse::jwt::kid(&key), |input| self.hsm.sign(&key, input)).map_err(Error::from)
    }

    /// Stops trusting `iss`: its tokens are refused from now on, on every node.
    pub fn remove_cse_issuer(&self, caller: &Caller, iss: &str) -> Result<()> {
        let _admin = self.admin_lock()?;
        if !self.cse_config().issuers.iter().any(|i| i.iss == iss) {
            return Err(Error::NotFound { what: format!("CSE issuer {iss}") });
        }
        caller.commit_point(|| format!("stop trusting tokens from {iss}; they are refused at once"))?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.delete_cse_issuer(iss)?;
            tx.append_audit(&caller.audit("RemoveCseIssuer", None, None, format!("issuer {iss}")), now())?;
            changed(tx, true)
        })?;
        state.note(marks);
        let issuers = state.cse.issuers.iter().filter(|i| i.iss != iss).cloned().collect();
        state.cse = Arc::new(Config::new(state.cse.settings.clone(), issuers));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kacls_urls_and_privileged_users_are_checked() {
        for good in ["https://kacls.example.com", "https://kacls.example.com:8443/v1/cse", "https://k.example.com/"] {
            assert!(check_url("kacls_url", good).is_ok(), "{good}");
        }
        for bad in [
            "http://kacls.example.com",
            "https://",
            "https:///x",
            "https://k.example.com/a?b",
            "https://u@k.example.com",
            "https://k.example.com/a//b",
        ] {
            assert!(check_url("kacls_url", bad).is_err(), "{bad}");
        }
        assert!(check_email("admin@example.com").is_ok());
        for bad in ["admin", "@example.com", "a@b", "a b@example.com"] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_domain("example.com").is_ok() && check_domain("corp-1.example.co.uk").is_ok());
        for bad in ["example", "exa mple.com", "a..b", ".example.com", "x@example.com", &format!("{}.com", "a".repeat(64))] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
        let settings = |url: &str| CseSettingsRecord {
            kacls_url: url.into(),
            key_id: crate::domain::ids::KeyId::from_bytes([1; 16]),
            guests: false,
            privileged_users: vec!["Admin@Example.com".into()],
            migration_sources: vec!["https://old.example.com/kacls".into()],
            updated_at: 0,
            owner_domain: None,
        };
        let config = Config::new(Some(settings("https://kacls.example.com/v1/cse")), vec![]);
        assert_eq!(config.path_prefix(), Some("/v1/cse"));
        assert!(config.privileged("admin@example.com") && !config.privileged("ana@example.com"));
        assert!(config.migrates_from("https://old.example.com/kacls/") && !config.migrates_from("https://evil.example.com"));
        assert_eq!(Config::new(Some(settings("https://kacls.example.com")), vec![]).path_prefix(), Some(""));
        assert_eq!(Config::default().path_prefix(), None);
    }
}
