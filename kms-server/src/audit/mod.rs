//! The audit trail: what is recorded, and the hash chain that makes tampering detectable.
//!
//! Every record carries the SHA-256 of the record before it, so modifying, deleting, inserting
//! or reordering a record breaks the chain at that index. (Signed checkpoints, the verifier CLI
//! and data-plane group commit come with the identity-and-audit work.) The SQL lives in
//! `store/`; this module only defines records and hashes.

use sha2::{Digest, Sha256};

use crate::domain::context::EncryptionContext;
use crate::domain::ids::KeyId;

/// The outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One audit record, before it is chained. Never holds a plaintext, a data key or a PIN: the
/// fields below are the only ones there are.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub request_id: String,
    /// Who asked: a principal name, or `system` for background actions.
    pub principal: String,
    /// The RPC or background action (`CreateKey`, `DestructionSweep`, `Recovery`, ...).
    pub operation: &'static str,
    pub key_id: Option<KeyId>,
    pub key_version: Option<u32>,
    /// The encryption context, recorded as AWS KMS does (callers must not put secrets in it).
    pub context: Option<EncryptionContext>,
    pub outcome: Outcome,
    /// The gRPC status code name (`OK`, `FAILED_PRECONDITION`, ...).
    pub status: &'static str,
    /// A short, secret-free detail (the state reached, what recovery repaired).
    pub detail: String,
}

impl AuditEvent {
    /// A record of a background action taken by the service itself.
    pub fn system(operation: &'static str, key_id: Option<KeyId>, key_version: Option<u32>, detail: String) -> Self {
        AuditEvent {
            request_id: String::new(),
            principal: "system".into(),
            operation,
            key_id,
            key_version,
            context: None,
            outcome: Outcome::Allowed,
            status: "OK",
            detail,
        }
    }

    /// The context as a JSON object, for storage and export.
    pub fn context_json(&self) -> Option<String> {
        self.context.as_ref().map(|c| serde_json::Value::from_iter(
            c.pairs().map(|(k, v)| (k.to_string(), serde_json::Value::from(v))),
        ).to_string())
    }
}

/// The stored form of a record, as hashed: every field, length-prefixed, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: i64,
    pub time: i64,
    pub request_id: String,
    pub principal: String,
    pub operation: String,
    pub key_id: Option<String>,
    pub key_version: Option<i64>,
    pub context: Option<String>,
    pub outcome: String,
    pub status: String,
    pub detail: String,
}

impl StoredRecord {
    /// SHA-256 over the previous record's hash and this record's fields.
    pub fn chain_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"kms-audit-v1");
        h.update(prev);
        h.update(self.seq.to_be_bytes());
        h.update(self.time.to_be_bytes());
        for field in [
            Some(self.request_id.as_str()),
            Some(self.principal.as_str()),
            Some(self.operation.as_str()),
            self.key_id.as_deref(),
            self.context.as_deref(),
            Some(self.outcome.as_str()),
            Some(self.status.as_str()),
            Some(self.detail.as_str()),
        ] {
            match field {
                Some(s) => {
                    h.update([1]);
                    h.update((s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
                None => h.update([0]),
            }
        }
        h.update(self.key_version.unwrap_or(-1).to_be_bytes());
        h.finalize().into()
    }
}

/// The hash that precedes the first record.
pub const GENESIS: [u8; 32] = [0; 32];

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64) -> StoredRecord {
        StoredRecord {
            seq,
            time: 1,
            request_id: "r".into(),
            principal: "p".into(),
            operation: "CreateKey".into(),
            key_id: None,
            key_version: Some(1),
            context: Some("{\"a\":\"b\"}".into()),
            outcome: "allowed".into(),
            status: "OK".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = record(1).chain_hash(&GENESIS);
        let mut changed = record(1);
        changed.detail = "x".into();
        assert_ne!(changed.chain_hash(&GENESIS), base);
        assert_ne!(record(2).chain_hash(&GENESIS), base);
        assert_ne!(record(1).chain_hash(&[1; 32]), base);
        let mut moved = record(1);
        moved.request_id = "rp".into();
        moved.principal = String::new();
        assert_ne!(moved.chain_hash(&GENESIS), base);
    }

    #[test]
    fn context_json_escapes() {
        let ctx = EncryptionContext::new([("a\"".to_string(), "\n".to_string())].into_iter().collect()).unwrap();
        let ev = AuditEvent { context: Some(ctx), ..AuditEvent::system("x", None, None, String::new()) };
        assert_eq!(ev.context_json().unwrap(), r#"{"a\"":"\n"}"#);
    }
}
