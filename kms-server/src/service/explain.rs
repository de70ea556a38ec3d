//! "Would this call be allowed now, and why?" (`ExplainAccess`, `kmsctl explain`), the question
//! of a yearly access review ("who can decrypt payroll?"), answered without making the call: the
//! data plane's own checks, through the same functions, in the same order — the principal's rate
//! limit (the bucket `Kms::admit` takes from, looked at), the policy (`policy::decide`: the
//! steps of `policy::authorize`, with each grant's reasons), then what the key allows
//! (`encryption_version`, `decryption_version`) — each reported.

use super::Kms;
use crate::clock::now;
use crate::domain::context::EncryptionContext;
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::lifecycle::{KeyState, Use};
use crate::domain::policy::{self, Denied, Operation};
use crate::error::{Error, Result};
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

/// What the key allows the operation, the same for every principal: `Ok` with what it allows,
/// or `Err` with why not. The data plane's own checks (`encryption_version`,
/// `decryption_version`), in words.
fn key_verdict(entry: &KeyEntry, operation: Operation) -> std::result::Result<String, String> {
    let (key_id, state) = (entry.record.key_id, entry.record.state);
    let why = |e: Error| match e {
        Error::DecryptFailed => format!("key {key_id} is {state}: no blob of it decrypts"),
        e => e.to_string(),
    };
    if operation.key_use() == Use::Encrypt {
        let (version, _) = super::encryption_version(entry).map_err(why)?;
        return Ok(format!("key {key_id} is {state}: {operation} uses version {}, its primary", version.record.version));
    }
    let mut decrypting = Vec::new();
    let mut refused = None;
    for n in entry.versions.keys() {
        match super::decryption_version(entry, *n, operation) {
            Ok(_) => decrypting.push(n.to_string()),
            Err(e) => refused = Some(e),
        }
    }
    match refused {
        Some(e) if decrypting.is_empty() => Err(why(e)),
        _ if decrypting.is_empty() => Err(format!("key {key_id} has no version")),
        _ => Ok(format!("key {key_id} is {state}: blobs of versions {} decrypt", decrypting.join(", "))),
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
