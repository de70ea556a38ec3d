//! The audit trail: what is recorded, and the hash chain that makes tampering detectable.
//!
//! Every record carries the SHA-256 of the record before it, so modifying, deleting, inserting
//! or reordering a record breaks the chain at that index. (Signed checkpoints, the verifier CLI
//! and data-plane group commit come with the identity-and-audit work.) The SQL lives in
//! `store/`; this module only defines records and hashes.

pub mod writer;

use sha2::{Digest, Sha256};

use crate::domain::context::EncryptionContext;
use crate::domain::ids::KeyId;

/// The outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
    /// A dry run of a change: checked and allowed, nothing changed.
    DryRun,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
            Outcome::DryRun => "dry-run",
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
    /// The caller's own account of who inside the workload asked and why (JSON), if given.
    pub caller_context: Option<String>,
    /// The record of a change made for a dry run, which must never be written: the store refuses
    /// it and the change's transaction rolls back (a backstop behind `Caller::commit_point`, for
    /// a change that would write before it). Not part of the record.
    pub in_dry_run: bool,
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
            caller_context: None,
            in_dry_run: false,
        }
    }

    /// The context as a JSON object, for storage and export.
    pub fn context_json(&self) -> Option<String> {
        self.context.as_ref().map(|c| serde_json::Value::from_iter(c.pairs().map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))).to_string())
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
    pub caller_context: Option<String>,
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
        // Hashed only when present, so that records written before the field existed verify
        // unchanged.
        if let Some(c) = &self.caller_context {
            h.update(b"caller_context");
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_bytes());
        }
        h.finalize().into()
    }
}

/// The hash that precedes the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// A signed checkpoint: the sequence number and hash of the record it covers, with an
/// HMAC-SHA-256 made inside the HSM by a key that never leaves it. Truncating the tail of the
/// trail past the last checkpoint, or rewriting the chain and its hashes, is caught by them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub time: i64,
    pub hash: Vec<u8>,
    pub mac: Vec<u8>,
}

/// The bytes a checkpoint's MAC covers.
pub fn checkpoint_message(seq: i64, time: i64, hash: &[u8]) -> Vec<u8> {
    let mut m = b"kms-audit-checkpoint-v1".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&time.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

/// Where and how a chain stops verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// 1-based position of the first record that does not verify.
    pub index: u64,
    pub problem: String,
}

/// Where a verified chain starts: the genesis, or (after retention pruned the records before
/// it) a signed checkpoint whose record is the last one removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The sequence number of the last record before the chain (0 for the genesis).
    pub seq: i64,
    /// That record's hash.
    pub hash: [u8; 32],
}

impl Anchor {
    pub const GENESIS: Anchor = Anchor { seq: 0, hash: GENESIS };
}

/// Walks the chain from `anchor`: sequence numbers must run anchor+1, anchor+2, ... and each
/// stored hash must be the hash of its record and the previous hash. A modified record breaks at
/// its own index; a deleted, inserted or moved record breaks the sequence (or the chain) at the
/// first place it touches. Returns the anchor the next records chain from (the last record's),
/// so that a long trail is walked a page at a time.
pub fn verify_chain(anchor: Anchor, records: &[(StoredRecord, Vec<u8>)]) -> Result<Anchor, ChainBreak> {
    let mut prev = anchor.hash;
    for (i, (record, stored)) in records.iter().enumerate() {
        let expected = anchor.seq + i as i64 + 1;
        let index = expected as u64;
        if record.seq != expected {
            return Err(ChainBreak {
                index,
                problem: format!("sequence number {} where {expected} was expected (a record deleted, inserted or moved)", record.seq),
            });
        }
        let hash = record.chain_hash(&prev);
        if stored.as_slice() != hash {
            return Err(ChainBreak { index, problem: "the record or the one before it was modified".into() });
        }
        prev = hash;
    }
    Ok(Anchor { seq: anchor.seq + records.len() as i64, hash: prev })
}

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
            caller_context: None,
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
        let mut with_caller = record(1);
        with_caller.caller_context = Some("{}".into());
        assert_ne!(with_caller.chain_hash(&GENESIS), base);
    }

    fn chain(n: i64) -> Vec<(StoredRecord, Vec<u8>)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let r = record(seq);
                let h = r.chain_hash(&prev);
                prev = h;
                (r, h.to_vec())
            })
            .collect()
    }

    #[test]
    fn verify_finds_each_kind_of_tampering_at_its_index() {
        assert_eq!(verify_chain(Anchor::GENESIS, &chain(10)).map(|a| a.seq), Ok(10));
        let mut modified = chain(10);
        modified[4].0.detail = "edited".into();
        assert_eq!(verify_chain(Anchor::GENESIS, &modified).unwrap_err().index, 5);
        let mut deleted = chain(10);
        deleted.remove(6);
        assert_eq!(verify_chain(Anchor::GENESIS, &deleted).unwrap_err().index, 7);
        let mut reordered = chain(10);
        reordered.swap(2, 3);
        assert_eq!(verify_chain(Anchor::GENESIS, &reordered).unwrap_err().index, 3);
        let mut inserted = chain(10);
        inserted.insert(8, (record(9), vec![0; 32]));
        assert_eq!(verify_chain(Anchor::GENESIS, &inserted).unwrap_err().index, 9);
        // Renumbering after a deletion does not help: the chain breaks there.
        let mut renumbered = chain(10);
        renumbered.remove(6);
        for (i, (r, _)) in renumbered.iter_mut().enumerate() {
            r.seq = i as i64 + 1;
        }
        assert_eq!(verify_chain(Anchor::GENESIS, &renumbered).unwrap_err().index, 7);
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_anchor_and_nothing_else() {
        let full = chain(10);
        let anchor = Anchor { seq: 4, hash: full[3].1.clone().try_into().unwrap() };
        let kept = &full[4..];
        assert_eq!(verify_chain(anchor, kept).map(|a| a.seq), Ok(10));
        // From the genesis, or from another record's hash, the same records do not verify.
        assert_eq!(verify_chain(Anchor::GENESIS, kept).unwrap_err().index, 1);
        let wrong = Anchor { seq: 4, hash: full[2].1.clone().try_into().unwrap() };
        assert_eq!(verify_chain(wrong, kept).unwrap_err().index, 5);
        // One more record removed at the head breaks the sequence at the anchor's next index.
        assert_eq!(verify_chain(anchor, &full[5..]).unwrap_err().index, 5);
    }

    #[test]
    fn context_json_escapes() {
        let ctx = EncryptionContext::new([("a\"".to_string(), "\n".to_string())].into_iter().collect()).unwrap();
        let ev = AuditEvent { context: Some(ctx), ..AuditEvent::system("x", None, None, String::new()) };
        assert_eq!(ev.context_json().unwrap(), r#"{"a\"":"\n"}"#);
    }
}
