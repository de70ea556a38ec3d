//! The audit trail seen from the service: records written on their own, verification of the
//! chain and its signed checkpoints, reading pages, and retention.
//!
//! Retention removes only records older than the retention period (never under 90 days: the
//! framework's "at least three months"), and only up to a signed checkpoint, so that the records
//! kept still verify: the checkpoint's hash anchors the first record kept, and an `AuditPrune`
//! record in the chain says how far the trail was cut. A head removed any other way is reported.

use super::Kms;
use crate::audit::{Anchor, AuditEvent, ChainBreak, Checkpoint, GENESIS, checkpoint_message};
use crate::clock::now;
use crate::error::Result;

/// The operation name of the record retention leaves in the chain.
const PRUNE: &str = "AuditPrune";

/// The detail of a prune record, and how the verifier reads back the anchor it names.
fn prune_detail(through: i64, retention_days: u32) -> String {
    format!("records 1 to {through} removed (older than {retention_days} days); the trail starts at signed checkpoint {through}")
}

fn pruned_through(detail: &str) -> Option<i64> {
    detail.strip_prefix("records 1 to ")?.split(' ').next()?.parse().ok()
}

/// The result of verifying the audit trail.
#[derive(Debug, Clone)]
pub struct AuditVerification {
    /// Records kept (and checked).
    pub records: u64,
    /// The sequence number the kept records start after (0 unless retention removed the head).
    pub pruned_through: u64,
    pub checkpoints: u64,
    pub last_checkpoint: u64,
    /// The first problem, by record index; `None` when everything verifies.
    pub problem: Option<ChainBreak>,
}

impl Kms {
    /// Records an audit event on its own (refusals and failures; successful changes are audited
    /// in their own transaction).
    pub fn record(&self, event: &AuditEvent) -> Result<()> {
        self.store.write(|tx| tx.append_audit(event, now()))?;
        Ok(())
    }

    /// Verifies the chain of kept records from its anchor, then every signed checkpoint against
    /// it: a checkpoint past the last record means the tail was truncated; a checkpoint whose
    /// hash differs from its record's, or whose MAC the HSM rejects, means the chain was
    /// rewritten; a head missing without a retention record and a signed anchor was deleted.
    pub fn verify_audit(&self) -> Result<AuditVerification> {
        let (records, checkpoints) = self.store.read(|tx| Ok((tx.audit_records()?, tx.checkpoints()?)))?;
        // Where the kept records start: after the newest retention cut the chain records, whose
        // checkpoint must still be there; or at the genesis.
        let cut = records.iter().filter(|(r, _)| r.operation == PRUNE).filter_map(|(r, _)| pruned_through(&r.detail)).max();
        let first = records.first().map_or(1, |(r, _)| r.seq);
        let mut problem = None;
        let anchor = match cut {
            None if first > 1 => {
                problem = Some(ChainBreak {
                    index: 1,
                    problem: format!("records 1 to {} are missing and no retention record accounts for them: the head was deleted", first - 1),
                });
                Anchor { seq: first - 1, hash: GENESIS }
            }
            None => Anchor::GENESIS,
            Some(through) => {
                let signed = checkpoints.iter().find(|c| c.seq == through).and_then(|c| <[u8; 32]>::try_from(c.hash.as_slice()).ok());
                if signed.is_none() {
                    problem = Some(ChainBreak {
                        index: through as u64 + 1,
                        problem: format!("the signed checkpoint of record {through}, where retention cut the trail, is missing"),
                    });
                }
                Anchor { seq: through, hash: signed.unwrap_or(GENESIS) }
            }
        };
        if problem.is_none() {
            problem = crate::audit::verify_chain(anchor, &records).err();
        }
        let last = anchor.seq + records.len() as i64;
        for c in &checkpoints {
            let found = if c.seq > last {
                Some(ChainBreak {
                    index: last as u64 + 1,
                    problem: format!("the trail ends at record {last} but a signed checkpoint covers record {}: the tail was truncated", c.seq),
                })
            } else if c.seq > anchor.seq && records.binary_search_by_key(&c.seq, |(r, _)| r.seq).map_or(true, |i| records[i].1 != c.hash) {
                Some(ChainBreak { index: c.seq as u64, problem: format!("record {} differs from its signed checkpoint", c.seq) })
            } else if !self.checkpoint_signed(c)? {
                Some(ChainBreak { index: c.seq as u64, problem: format!("the checkpoint of record {} has a bad MAC", c.seq) })
            } else {
                None
            };
            if let Some(f) = found
                && problem.as_ref().is_none_or(|p| f.index < p.index)
            {
                problem = Some(f);
            }
        }
        Ok(AuditVerification {
            records: records.len() as u64,
            pruned_through: anchor.seq as u64,
            checkpoints: checkpoints.len() as u64,
            last_checkpoint: checkpoints.last().map_or(0, |c| c.seq as u64),
            problem,
        })
    }

    fn checkpoint_signed(&self, c: &Checkpoint) -> Result<bool> {
        Ok(self.hsm.verify_mac(self.audit_mac, &checkpoint_message(c.seq, c.time, &c.hash), &c.mac)?)
    }

    /// A page of audit records after `after_seq`.
    pub fn audit_page(&self, after_seq: u64, limit: u32) -> Result<Vec<crate::audit::StoredRecord>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let page = self.store.read(|tx| tx.audit_page(after, i64::from(limit)))?;
        Ok(page.into_iter().map(|(record, _)| record).collect())
    }

    /// Removes the records older than `retention_days` (as of `at`), up to the newest signed
    /// checkpoint that only such records reach, and records the removal in the chain. Returns
    /// the sequence number pruned through, if anything was removed. `retention_days` is 0 (keep
    /// everything) or at least 90, as the configuration enforces.
    pub fn prune_audit(&self, retention_days: u32, at: i64) -> Result<Option<i64>> {
        if retention_days == 0 {
            return Ok(None);
        }
        let cutoff = at - i64::from(retention_days) * 86_400;
        let Some(anchor) = self.store.read(|tx| tx.prunable_checkpoint(cutoff))? else {
            tracing::trace!(cutoff, "audit retention: no signed checkpoint old enough to prune through");
            return Ok(None);
        };
        // A checkpoint the HSM does not recognise is never made an anchor: verification would
        // then fail for the whole trail.
        if !self.checkpoint_signed(&anchor)? {
            tracing::error!(seq = anchor.seq, "audit retention: checkpoint has a bad MAC; nothing pruned (run kmsctl audit verify)");
            return Ok(None);
        }
        let removed = self.store.write(|tx| {
            let removed = tx.prune_audit(anchor.seq)?;
            tx.append_audit(&AuditEvent::system(PRUNE, None, None, prune_detail(anchor.seq, retention_days)), now())?;
            Ok(removed)
        })?;
        tracing::info!(through = anchor.seq, removed, retention_days, "audit records past retention removed");
        Ok(Some(anchor.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prune_detail_names_its_anchor() {
        assert_eq!(pruned_through(&prune_detail(4711, 90)), Some(4711));
        assert_eq!(pruned_through("records 1 to x removed"), None);
        assert_eq!(pruned_through("something else"), None);
    }
}
