//! "Would this call be allowed now, and why?" (`ExplainAccess`, `kmsctl explain`), the question
//! of a yearly access review ("who can decrypt payroll?"), answered without making the call: the
//! data plane's own checks, through the same functions, in the same order — the principal's rate
//! limit (`Kms::admit`), the policy (`policy::decide`, which is `policy::authorize` with its
//! reasons), then what the key's state allows (`lifecycle::key_allows`) — each reported.

use super::Kms;
use crate::clock::now;
use crate::domain::context::EncryptionContext;
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::lifecycle::{KeyState, Use, VersionState, key_allows};
use crate::domain::policy::{self, Denied, Operation};
use crate::error::Result;
use crate::service::registry::KeyEntry;

/// The answer for one key and operation.
#[derive(Debug, Clone)]
pub struct AccessExplanation {
    pub key_id: KeyId,
    pub key_state: KeyState,
    /// One per principal asked about, or per principal holding a grant on the key.
    pub decisions: Vec<AccessDecision>,
}

/// Whether one principal's call would be allowed now, and every check with its verdict.
#[derive(Debug, Clone)]
pub struct AccessDecision {
    pub principal: String,
    pub allowed: bool,
    /// The grant that allows it, if the policy does.
    pub grant_id: Option<String>,
    /// Each check, in the order the data plane makes them, one sentence each.
    pub reasons: Vec<String>,
}

/// What the key's state allows the operation, the same for every principal: `Ok` with what it
/// allows, or `Err` with why not.
fn key_verdict(entry: &KeyEntry, operation: Operation) -> std::result::Result<String, String> {
    let r = &entry.record;
    let use_ = operation.key_use();
    key_allows(r.state, use_).map_err(|state| format!("key {} is {state}: it does not allow {operation}", r.key_id))?;
    match use_ {
        Use::Encrypt => {
            let primary = entry.primary().ok_or_else(|| format!("key {} has no primary version", r.key_id))?;
            if primary.handle.is_none() {
                return Err(format!("the HSM object of version {} of key {}, its primary, is missing", r.primary_version, r.key_id));
            }
            Ok(format!("key {} is {}: {operation} uses version {}, its primary", r.key_id, r.state, r.primary_version))
        }
        Use::Decrypt | Use::DecryptForReEncrypt => {
            let usable: Vec<String> = entry
                .versions
                .values()
                .filter(|v| v.record.state == VersionState::Enabled && v.handle.is_some())
                .map(|v| v.record.version.to_string())
                .collect();
            if usable.is_empty() {
                return Err(format!("key {} is {}, but none of its versions can decrypt", r.key_id, r.state));
            }
            Ok(format!("key {} is {}: blobs of versions {} decrypt", r.key_id, r.state, usable.join(", ")))
        }
    }
}

impl Kms {
    /// Whether `principal` (or each principal holding a grant on the key) may do `operation` on
    /// `key` with `context` now, and why. Changes nothing: the rate limit is looked at, not
    /// taken from; no last use is recorded.
    pub fn explain_access(
        &self,
        principal: Option<&str>,
        operation: Operation,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<AccessExplanation> {
        let state = self.registry.read();
        let entry = state.resolve(key)?;
        let key_id = entry.record.key_id;
        let grants = state.grants.get(&key_id).map(Vec::as_slice).unwrap_or_default();
        let mut names: Vec<String> = match principal {
            Some(p) => vec![p.to_string()],
            None => grants.iter().map(|g| g.principal.clone()).collect(),
        };
        names.sort();
        names.dedup();
        let key = key_verdict(entry, operation);
        let at = now();
        let decisions = names
            .into_iter()
            .map(|name| {
                let mut reasons = Vec::new();
                let throttled = self.throttled(&name);
                if let Some(wait) = throttled {
                    reasons.push(format!("principal {name} is over its rate limit: it is refused for the next {} ms", wait.as_millis().max(1)));
                }
                let principal_state = state.principals.get(&name).map(|p| p.state);
                let decision = policy::decide(&name, principal_state, grants, key_id, operation, context, at);
                match &decision.outcome {
                    Ok(grant) => reasons.push(format!("grant {grant} allows {operation} with this encryption context")),
                    Err(Denied::UnknownPrincipal) => reasons.push(format!("principal {name} is not registered")),
                    Err(Denied::DisabledPrincipal) => reasons.push(format!("principal {name} is disabled")),
                    Err(Denied::NoGrant) if decision.grants.is_empty() => reasons.push(format!("principal {name} holds no grant on key {key_id}")),
                    Err(Denied::NoGrant) => {
                        for (grant, misses) in &decision.grants {
                            let why: Vec<String> = misses.iter().map(ToString::to_string).collect();
                            reasons.push(format!("grant {grant} {}", why.join("; ")));
                        }
                    }
                }
                match &key {
                    Ok(allows) => reasons.push(allows.clone()),
                    Err(why) => reasons.push(why.clone()),
                }
                let allowed = throttled.is_none() && decision.outcome.is_ok() && key.is_ok();
                AccessDecision { principal: name, allowed, grant_id: decision.outcome.ok(), reasons }
            })
            .collect();
        Ok(AccessExplanation { key_id, key_state: entry.record.state, decisions })
    }
}
