//! Least privilege on the data plane: principals, grants, and the check that produces proof.
//!
//! Nothing is allowed unless granted. A grant names one principal, one key, the operations it
//! allows, optional conditions on the encryption context (pairs that must be present with
//! exactly these values, keys that must be present), and an optional expiry — the shape of AWS
//! KMS grants and their `EncryptionContextSubset` constraint. [`authorize`] is the only way to
//! make an [`Authorized`] value, and every data-plane operation takes one as an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::context::EncryptionContext;
use super::ids::KeyId;
use super::lifecycle::Use;

/// A data-plane operation a grant can allow (AWS KMS grant operation names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    Encrypt,
    Decrypt,
    /// Decrypting a blob inside ReEncrypt (the plaintext never reaches the caller).
    ReEncryptFrom,
    /// Encrypting under the destination key of ReEncrypt.
    ReEncryptTo,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Operation::GenerateDataKey,
        Operation::GenerateDataKeyWithoutPlaintext,
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::ReEncryptFrom,
        Operation::ReEncryptTo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::ReEncryptFrom => "ReEncryptFrom",
            Operation::ReEncryptTo => "ReEncryptTo",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// What the operation does with the key, which its state must allow
    /// (`lifecycle::key_allows`).
    pub fn key_use(self) -> Use {
        match self {
            Operation::GenerateDataKey | Operation::GenerateDataKeyWithoutPlaintext | Operation::Encrypt | Operation::ReEncryptTo => Use::Encrypt,
            Operation::Decrypt => Use::Decrypt,
            Operation::ReEncryptFrom => Use::DecryptForReEncrypt,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest principal name (a SPIFFE ID is at most 2,048 bytes; 512 covers real ones and
/// keeps audit records small).
pub const MAX_PRINCIPAL_LEN: usize = 512;

/// Checks a principal name: 1 to 512 bytes, no control characters.
pub fn valid_principal(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_PRINCIPAL_LEN && !name.chars().any(char::is_control)
}

/// A workload principal's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalState {
    Enabled,
    Disabled,
}

impl PrincipalState {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalState::Enabled => "Enabled",
            PrincipalState::Disabled => "Disabled",
        }
    }

    pub fn parse(s: &str) -> Option<PrincipalState> {
        match s {
            "Enabled" => Some(PrincipalState::Enabled),
            "Disabled" => Some(PrincipalState::Disabled),
            _ => None,
        }
    }
}

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub grant_id: String,
    pub principal: String,
    pub key_id: KeyId,
    pub operations: BTreeSet<Operation>,
    /// Pairs the request's encryption context must contain, with exactly these values.
    pub required_pairs: BTreeMap<String, String>,
    /// Keys the request's encryption context must contain, with any value.
    pub required_keys: BTreeSet<String>,
    /// Seconds since the Unix epoch after which the grant allows nothing.
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

/// What keeps a grant of the principal on the key from allowing a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantMiss {
    /// The grant does not name the operation.
    Operation(Operation),
    /// The grant expired at this time.
    Expired(i64),
    /// The context must hold this pair, and does not (the key is absent or has another value).
    Pair(String, String),
    /// The context must hold this key, with any value, and does not.
    Key(String),
}

impl fmt::Display for GrantMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantMiss::Operation(op) => write!(f, "does not allow {op}"),
            GrantMiss::Expired(at) => write!(f, "expired at {at}"),
            GrantMiss::Pair(k, v) => write!(f, "requires the encryption context pair {k}={v}"),
            GrantMiss::Key(k) => write!(f, "requires the encryption context key {k}"),
        }
    }
}

impl Grant {
    /// Everything that keeps this grant from allowing `operation` with `context` at `now`,
    /// lazily (nothing: it allows it). The grant's own principal and key are not looked at.
    pub fn misses<'a>(&'a self, operation: Operation, context: &'a EncryptionContext, now: i64) -> impl Iterator<Item = GrantMiss> + 'a {
        let op = (!self.operations.contains(&operation)).then_some(GrantMiss::Operation(operation));
        let expired = self.expires_at.filter(|t| now >= *t).map(GrantMiss::Expired);
        let pairs =
            self.required_pairs.iter().filter(|(k, v)| context.get(k) != Some(v.as_str())).map(|(k, v)| GrantMiss::Pair(k.clone(), v.clone()));
        let keys = self.required_keys.iter().filter(|k| context.get(k).is_none()).map(|k| GrantMiss::Key(k.clone()));
        op.into_iter().chain(expired).chain(pairs).chain(keys)
    }

    /// Whether this grant allows `principal` to do `operation` on `key_id` with `context` at `now`
    /// (the first miss ends the check: nothing is allocated on the data plane's path).
    pub fn permits(&self, principal: &str, key_id: KeyId, operation: Operation, context: &EncryptionContext, now: i64) -> bool {
        self.principal == principal && self.key_id == key_id && self.misses(operation, context, now).next().is_none()
    }
}

/// Proof that a policy check passed. Only [`authorize`] makes one; the operations that need it
/// take it as an argument, so none can run unchecked.
#[derive(Debug)]
pub struct Authorized {
    principal: String,
    key_id: KeyId,
    operation: Operation,
    grant_id: String,
}

impl Authorized {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn operation(&self) -> Operation {
        self.operation
    }

    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The grant that allowed the call (for the access review's last-use dates).
    pub fn grant_id(&self) -> &str {
        &self.grant_id
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    UnknownPrincipal,
    DisabledPrincipal,
    /// No grant allows the operation on this key with this context now. Also the answer for a
    /// key that does not exist, so a principal cannot probe for keys it may not use.
    NoGrant,
}

/// The first step of the check: only a registered, enabled principal may be granted anything.
pub fn principal_may_call(principal_state: Option<PrincipalState>) -> Result<(), Denied> {
    match principal_state {
        None => Err(Denied::UnknownPrincipal),
        Some(PrincipalState::Disabled) => Err(Denied::DisabledPrincipal),
        Some(PrincipalState::Enabled) => Ok(()),
    }
}

/// The policy check. `principal_state` is `None` for a principal nobody registered.
pub fn authorize<'g>(
    principal: &str,
    principal_state: Option<PrincipalState>,
    grants: impl IntoIterator<Item = &'g Grant>,
    key_id: KeyId,
    operation: Operation,
    context: &EncryptionContext,
    now: i64,
) -> Result<Authorized, Denied> {
    principal_may_call(principal_state)?;
    match grants.into_iter().find(|g| g.permits(principal, key_id, operation, context, now)) {
        Some(g) => Ok(Authorized { principal: principal.to_string(), key_id, operation, grant_id: g.grant_id.clone() }),
        None => Err(Denied::NoGrant),
    }
}

/// The policy check with its reasons, for an officer asking "may P do O on K?" (`ExplainAccess`):
/// the same two steps as [`authorize`] (the principal's state, then the grants, through
/// [`Grant::permits`] and [`Grant::misses`]), each grant of the principal on the key with what
/// keeps it from allowing the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What [`authorize`] answers: the allowing grant's id, or why not.
    pub outcome: Result<String, Denied>,
    /// Every grant of the principal on the key, with its misses (none for the allowing grant).
    pub grants: Vec<(String, Vec<GrantMiss>)>,
}

pub fn decide<'g>(
    principal: &str,
    principal_state: Option<PrincipalState>,
    grants: impl IntoIterator<Item = &'g Grant>,
    key_id: KeyId,
    operation: Operation,
    context: &EncryptionContext,
    now: i64,
) -> Decision {
    let grants: Vec<(String, Vec<GrantMiss>)> = grants
        .into_iter()
        .filter(|g| g.principal == principal && g.key_id == key_id)
        .map(|g| (g.grant_id.clone(), g.misses(operation, context, now).collect()))
        .collect();
    // `authorize`'s two steps, over the misses just listed.
    let outcome = principal_may_call(principal_state)
        .and_then(|()| grants.iter().find(|(_, misses)| misses.is_empty()).map(|(id, _)| id.clone()).ok_or(Denied::NoGrant));
    Decision { outcome, grants }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
    }

    fn grant() -> Grant {
        Grant {
            grant_id: "g".into(),
            principal: "spiffe://a".into(),
            key_id: KeyId::from_bytes([1; 16]),
            operations: [Operation::Encrypt, Operation::Decrypt].into(),
            required_pairs: [("tenant".to_string(), "acme".to_string())].into(),
            required_keys: ["file".to_string()].into(),
            expires_at: Some(100),
            created_at: 0,
        }
    }

    #[test]
    fn a_grant_allows_exactly_what_it_names() {
        let g = grant();
        let k = g.key_id;
        let good = ctx(&[("tenant", "acme"), ("file", "x"), ("extra", "ok")]);
        let on = Some(PrincipalState::Enabled);
        assert!(authorize("spiffe://a", on, [&g], k, Operation::Encrypt, &good, 99).is_ok());
        type Case = (&'static str, Option<PrincipalState>, KeyId, Operation, EncryptionContext, i64, Denied);
        let cases: &[Case] = &[
            ("spiffe://b", on, k, Operation::Encrypt, good.clone(), 99, Denied::NoGrant),
            ("spiffe://a", None, k, Operation::Encrypt, good.clone(), 99, Denied::UnknownPrincipal),
            ("spiffe://a", Some(PrincipalState::Disabled), k, Operation::Encrypt, good.clone(), 99, Denied::DisabledPrincipal),
            ("spiffe://a", on, KeyId::from_bytes([2; 16]), Operation::Encrypt, good.clone(), 99, Denied::NoGrant),
            ("spiffe://a", on, k, Operation::GenerateDataKey, good.clone(), 99, Denied::NoGrant),
            ("spiffe://a", on, k, Operation::Encrypt, good.clone(), 100, Denied::NoGrant),
            ("spiffe://a", on, k, Operation::Encrypt, ctx(&[("tenant", "other"), ("file", "x")]), 99, Denied::NoGrant),
            ("spiffe://a", on, k, Operation::Encrypt, ctx(&[("tenant", "acme")]), 99, Denied::NoGrant),
        ];
        for (p, state, key, op, c, now, want) in cases {
            assert_eq!(authorize(p, *state, [&g], *key, *op, c, *now).unwrap_err(), *want, "{p} {op} {now}");
        }
    }

    #[test]
    fn a_decision_agrees_with_authorize_and_names_every_miss() {
        let g = grant();
        let k = g.key_id;
        let on = Some(PrincipalState::Enabled);
        let good = ctx(&[("tenant", "acme"), ("file", "x")]);
        let d = decide("spiffe://a", on, [&g], k, Operation::Encrypt, &good, 99);
        assert_eq!(d.outcome, Ok("g".into()));
        assert_eq!(d.grants, vec![("g".into(), vec![])]);
        let d = decide("spiffe://a", on, [&g], k, Operation::GenerateDataKey, &ctx(&[("tenant", "other")]), 100);
        assert_eq!(d.outcome, Err(Denied::NoGrant));
        let misses = &d.grants[0].1;
        assert_eq!(
            misses,
            &vec![
                GrantMiss::Operation(Operation::GenerateDataKey),
                GrantMiss::Expired(100),
                GrantMiss::Pair("tenant".into(), "acme".into()),
                GrantMiss::Key("file".into())
            ]
        );
        assert_eq!(misses[2].to_string(), "requires the encryption context pair tenant=acme");
        // Another principal's grant is not this principal's.
        assert!(decide("spiffe://b", on, [&g], k, Operation::Encrypt, &good, 99).grants.is_empty());
        assert_eq!(
            decide("spiffe://a", Some(PrincipalState::Disabled), [&g], k, Operation::Encrypt, &good, 99).outcome,
            Err(Denied::DisabledPrincipal)
        );
    }

    #[test]
    fn names() {
        for op in Operation::ALL {
            assert_eq!(Operation::parse(op.as_str()), Some(op));
        }
        assert!(valid_principal("spiffe://kms.dev/workload/dev"));
        assert!(!valid_principal(""));
        assert!(!valid_principal("a\nb"));
        assert!(!valid_principal(&"x".repeat(513)));
    }
}
