//! The audit trail seen from the service: records written on their own, verification of the
//! chain and its signed checkpoints, reading pages, and retention.
//!
//! Retention removes only records older than the retention period (never under 90 days: the
//! framework's "at least three months"), and only up to a signed checkpoint, so that the records
//! kept still verify: the checkpoint's hash anchors the first record kept, and an `AuditPrune`
//! record in the chain says how far the trail was cut. A head removed any other way is reported.
//!
//! The service also verifies the trail on its own initiative, so that an edit of the database
//! does not wait for the yearly audit to be seen: at startup from the last signed checkpoint, each
//! segment as its checkpoint is signed (the sweeper looks for new ones), and the whole trail on a
//! schedule. What they find shows in `kmsctl status`, the `kms_audit_verified` metric and an
//! `AuditVerificationFailed` record in the trail itself; the service goes on serving.

use std::sync::Mutex;

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

/// How many records a verification reads at a time: its memory stays bounded whatever the
/// trail's length (10,000 records are a few MiB).
const PAGE: i64 = 10_000;

/// The operation name of the record the service leaves in the chain when its own check finds
/// the trail broken.
const VERIFICATION_FAILED: &str = "AuditVerificationFailed";

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
    /// The last record, when the chain up to it verified.
    end: Option<Anchor>,
}

/// Which of the service's own checks of the audit trail found a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditCheck {
    /// At startup, the records since the last signed checkpoint (and that checkpoint).
    Startup,
    /// As each checkpoint is signed, the records it covers since the one before.
    Segment,
    /// On a schedule (daily by default, and once soon after startup), the whole trail.
    Full,
}

impl AuditCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditCheck::Startup => "startup check",
            AuditCheck::Segment => "check of a newly signed segment",
            AuditCheck::Full => "scheduled check of the whole trail",
        }
    }
}

/// A problem the service's own checks found in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditProblem {
    pub found: ChainBreak,
    pub by: AuditCheck,
    /// When (Unix seconds).
    pub at: i64,
}

/// What the service's own checks of the audit trail found, for `kmsctl status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditHealth {
    /// The last record verified.
    pub verified_through: u64,
    /// When the whole trail was last verified (Unix seconds).
    pub last_full_check: Option<i64>,
    /// The problem the last check found, until a check of the whole trail passes again.
    pub problem: Option<AuditProblem>,
}

/// The service's own checks: what they found, and the last record verified, which the next
/// segment check chains on from (`None` until the startup check passed).
#[derive(Debug, Default)]
pub struct AuditWatch(Mutex<(AuditHealth, Option<Anchor>)>);

impl AuditWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, (AuditHealth, Option<Anchor>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn health(&self) -> AuditHealth {
        self.lock().0.clone()
    }
}

/// The first of two problems (by record index).
fn first(a: Option<ChainBreak>, b: Option<ChainBreak>) -> Option<ChainBreak> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.index < a.index { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Kms {
    /// Records an audit event on its own (refusals and failures; successful changes are audited
    /// in their own transaction).
    pub fn record(&self, event: &AuditEvent) -> Result<()> {
        self.store.write(|tx| tx.append_audit(event, now()))?;
        Ok(())
    }

    /// Walks the records after `from` through `through` (to the end when `None`), a page at a
    /// time, checking the chain and that every record a checkpoint of `signed` covers has the
    /// checkpoint's hash. Returns the anchor of the last record walked, or the first problem.
    fn walk(&self, from: Anchor, through: Option<i64>, signed: &[Checkpoint]) -> Result<std::result::Result<Anchor, ChainBreak>> {
        let mut at = from;
        loop {
            let mut page = self.store.read(|tx| tx.audit_page(at.seq, PAGE))?;
            let more = page.len() as i64 == PAGE;
            if let Some(through) = through {
                page.retain(|(r, _)| r.seq <= through);
            }
            if page.is_empty() {
                return Ok(Ok(at));
            }
            let chained = crate::audit::verify_chain(at, &page);
            // The records before a break are in sequence, so each checkpoint up to it is found
            // by its offset; a checkpoint that differs is the earlier problem.
            let sound = match &chained {
                Ok(end) => end.seq,
                Err(b) => b.index as i64 - 1,
            };
            for c in signed.iter().filter(|c| c.seq > at.seq && c.seq <= sound) {
                if page[(c.seq - at.seq - 1) as usize].1 != c.hash {
                    return Ok(Err(ChainBreak { index: c.seq as u64, problem: format!("record {} differs from its signed checkpoint", c.seq) }));
                }
            }
            at = match chained {
                Ok(end) => end,
                Err(b) => return Ok(Err(b)),
            };
            if !more || through.is_some_and(|t| at.seq >= t) {
                return Ok(Ok(at));
            }
        }
    }

    /// Verifies the chain of kept records from its anchor, then every signed checkpoint against
    /// it: a checkpoint past the last record means the tail was truncated; a checkpoint whose
    /// hash differs from its record's, or whose MAC the HSM rejects, means the chain was
    /// rewritten; a head missing without a retention record and a signed anchor was deleted.
    /// Reads the trail a page at a time.
    pub fn verify_audit(&self) -> Result<AuditVerification> {
        let (checkpoints, prunes, first_seq, last, records) =
            self.store.read(|tx| Ok((tx.checkpoints()?, tx.audit_details(PRUNE)?, tx.first_audit_seq()?, tx.last_audit()?, tx.audit_count()?)))?;
        // Where the kept records start: after the newest retention cut the chain records, whose
        // checkpoint must still be there; or at the genesis.
        let cut = prunes.iter().filter_map(|d| pruned_through(d)).max();
        let first_seq = first_seq.unwrap_or(1);
        let mut problem = None;
        let anchor = match cut {
            None if first_seq > 1 => {
                problem = Some(ChainBreak {
                    index: 1,
                    problem: format!("records 1 to {} are missing and no retention record accounts for them: the head was deleted", first_seq - 1),
                });
                Anchor { seq: first_seq - 1, hash: GENESIS }
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
        let mut end = None;
        if problem.is_none() {
            match self.walk(anchor, None, &checkpoints)? {
                Ok(last) => end = Some(last),
                Err(found) => problem = Some(found),
            }
        }
        let last = last.map_or(anchor.seq, |(seq, _)| seq);
        for c in &checkpoints {
            let found = if c.seq > last {
                Some(ChainBreak {
                    index: last as u64 + 1,
                    problem: format!("the trail ends at record {last} but a signed checkpoint covers record {}: the tail was truncated", c.seq),
                })
            } else if !self.checkpoint_signed(c)? {
                Some(ChainBreak { index: c.seq as u64, problem: format!("the checkpoint of record {} has a bad MAC", c.seq) })
            } else {
                None
            };
            problem = first(problem, found);
        }
        Ok(AuditVerification {
            records,
            pruned_through: anchor.seq as u64,
            checkpoints: checkpoints.len() as u64,
            last_checkpoint: checkpoints.last().map_or(0, |c| c.seq as u64),
            end: end.filter(|_| problem.is_none()),
            problem,
        })
    }

    /// What the service's own checks of the audit trail found.
    pub fn audit_health(&self) -> AuditHealth {
        self.audit_watch.health()
    }

    /// The startup check: the newest signed checkpoint (its MAC, and its record's hash) and
    /// every record after it. Without a checkpoint yet, the whole (short) trail. A problem is
    /// reported (`audit_broken`), never a reason not to serve.
    pub fn check_audit_at_startup(&self) -> Result<()> {
        let checkpoints = self.store.read(|tx| tx.checkpoints())?;
        let Some(last) = checkpoints.last().cloned() else {
            return self.check_whole_audit(AuditCheck::Startup);
        };
        let found = match self.anchor_at(&last)? {
            Err(found) => Some(found),
            Ok(anchor) => match self.walk(anchor, None, &[])? {
                Err(found) => Some(found),
                Ok(end) => {
                    let mut watch = self.audit_watch.lock();
                    watch.0.verified_through = end.seq as u64;
                    watch.1 = Some(end);
                    None
                }
            },
        };
        if let Some(found) = found {
            self.audit_broken(found, AuditCheck::Startup)?;
        }
        Ok(())
    }

    /// A signed checkpoint to walk from: its MAC checked in the HSM, and its record hashed
    /// again (from the stored hash of the record before it) and compared with the checkpoint's
    /// hash. The checkpoint retention cut the trail at has no record left: its MAC vouches alone.
    fn anchor_at(&self, c: &Checkpoint) -> Result<std::result::Result<Anchor, ChainBreak>> {
        let at = |problem: String| Ok(Err(ChainBreak { index: c.seq as u64, problem }));
        if !self.checkpoint_signed(c)? {
            return at(format!("the checkpoint of record {} has a bad MAC", c.seq));
        }
        let anchor = Anchor { seq: c.seq, hash: <[u8; 32]>::try_from(c.hash.as_slice()).unwrap_or(GENESIS) };
        let page = self.store.read(|tx| tx.audit_page(c.seq - 2, 2))?;
        let Some((record, stored)) = page.iter().find(|(r, _)| r.seq == c.seq) else {
            return match page.first() {
                Some((r, _)) if r.seq == c.seq + 1 && self.store.read(|tx| tx.first_audit_seq())? == Some(c.seq + 1) => Ok(Ok(anchor)),
                _ => at(format!("record {}, which a signed checkpoint covers, is missing", c.seq)),
            };
        };
        let prev = match page.iter().find(|(r, _)| r.seq == c.seq - 1) {
            Some((_, hash)) => <[u8; 32]>::try_from(hash.as_slice()).ok(),
            None if c.seq == 1 => Some(GENESIS),
            None => None,
        };
        let hash = prev.map_or_else(|| stored.clone(), |prev| record.chain_hash(&prev).to_vec());
        if hash != c.hash {
            return at(format!("record {} differs from its signed checkpoint", c.seq));
        }
        Ok(Ok(anchor))
    }

    /// The segment check: each checkpoint signed since the last record verified, with the
    /// records up to it, chained on from that record. When retention removed the records after
    /// it, goes on from the signed checkpoint retention cut the trail at. Nothing to do until
    /// the startup check passed.
    pub fn check_new_audit_segments(&self) -> Result<()> {
        let Some(mut anchor) = self.audit_watch.lock().1 else { return Ok(()) };
        let (checkpoints, first_seq) = self.store.read(|tx| Ok((tx.checkpoints()?, tx.first_audit_seq()?)))?;
        if let Some(first) = first_seq
            && first > anchor.seq + 1
        {
            let cut = checkpoints.iter().find(|c| c.seq == first - 1).cloned().ok_or_else(|| ChainBreak {
                index: anchor.seq as u64 + 1,
                problem: format!("records {} to {} are gone and no signed checkpoint anchors the rest", anchor.seq + 1, first - 1),
            });
            anchor = match cut.map(|c| self.anchor_at(&c)) {
                Ok(Ok(Ok(cut))) => cut,
                Ok(Ok(Err(found))) | Err(found) => return self.audit_broken(found, AuditCheck::Segment),
                Ok(Err(e)) => return Err(e),
            };
        }
        let from = anchor.seq;
        for c in checkpoints.into_iter().filter(|c| c.seq > from) {
            let found = if !self.checkpoint_signed(&c)? {
                Some(ChainBreak { index: c.seq as u64, problem: format!("the checkpoint of record {} has a bad MAC", c.seq) })
            } else {
                match self.walk(anchor, Some(c.seq), std::slice::from_ref(&c))? {
                    Ok(end) if end.seq == c.seq => {
                        anchor = end;
                        let mut watch = self.audit_watch.lock();
                        watch.0.verified_through = watch.0.verified_through.max(c.seq as u64);
                        watch.1 = Some(end);
                        None
                    }
                    Ok(end) => Some(ChainBreak {
                        index: end.seq as u64 + 1,
                        problem: format!(
                            "the trail ends at record {} but a signed checkpoint covers record {}: the tail was truncated",
                            end.seq, c.seq
                        ),
                    }),
                    Err(found) => Some(found),
                }
            };
            if let Some(found) = found {
                return self.audit_broken(found, AuditCheck::Segment);
            }
        }
        Ok(())
    }

    /// The whole trail, as `kmsctl audit verify` checks it. Passing clears a problem an earlier
    /// check found (its record stays in the chain).
    pub fn check_whole_audit(&self, by: AuditCheck) -> Result<()> {
        let verified = self.verify_audit()?;
        match (verified.problem, verified.end) {
            (Some(found), _) => self.audit_broken(found, by)?,
            (None, end) => {
                let mut watch = self.audit_watch.lock();
                watch.0.verified_through = verified.pruned_through + verified.records;
                watch.0.problem = None;
                // Segment checks go on from here, unless they are further on already.
                if let Some(end) = end
                    && watch.1.is_none_or(|a| a.seq < end.seq)
                {
                    watch.1 = Some(end);
                }
            }
        }
        self.audit_watch.lock().0.last_full_check = Some(now());
        Ok(())
    }

    /// A check found the trail broken: logged, shown by `kmsctl status` and the metrics, and
    /// recorded in the trail itself. The first break (by record index) is kept until a check of
    /// the whole trail passes, and recorded once: the other checks find it again, sometimes in
    /// other words. The service goes on serving: a broken trail must not become a way to stop
    /// every workload.
    fn audit_broken(&self, found: ChainBreak, by: AuditCheck) -> Result<()> {
        tracing::error!(record = found.index, problem = %found.problem, check = by.as_str(), "the audit trail does not verify: run kmsctl audit verify");
        let new = {
            let mut watch = self.audit_watch.lock();
            let new = watch.0.problem.as_ref().is_none_or(|p| found.index < p.found.index);
            if new {
                watch.0.problem = Some(AuditProblem { found: found.clone(), by, at: now() });
            }
            new
        };
        if new {
            let detail = format!("record {}: {} (found by the {})", found.index, found.problem, by.as_str());
            self.record(&AuditEvent {
                outcome: crate::audit::Outcome::Failed,
                status: "DATA_LOSS",
                ..AuditEvent::system(VERIFICATION_FAILED, None, None, detail)
            })?;
        }
        Ok(())
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
