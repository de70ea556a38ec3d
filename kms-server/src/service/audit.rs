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
use crate::store::Tx;

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
    /// When the whole trail was last checked (Unix seconds), whatever the check found.
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

    /// The last record verified, to chain the next segment on from.
    fn anchor(&self) -> Option<Anchor> {
        self.lock().1
    }

    /// Records up to `end` verified (never moving backwards).
    fn verified(&self, end: Anchor) {
        let mut watch = self.lock();
        if watch.1.is_none_or(|a| a.seq <= end.seq) {
            watch.1 = Some(end);
        }
        watch.0.verified_through = watch.0.verified_through.max(end.seq as u64);
    }

    fn checked_whole_trail(&self) {
        self.lock().0.last_full_check = Some(now());
    }

    /// Forgets a problem found before `at` (a check that began then passed).
    fn clear_problem_found_before(&self, at: i64) {
        let mut watch = self.lock();
        if watch.0.problem.as_ref().is_some_and(|p| p.at < at) {
            watch.0.problem = None;
        }
    }

    /// Keeps `found` if it is the first problem (by record index); whether it is new.
    fn found(&self, found: &ChainBreak, by: AuditCheck) -> bool {
        let mut watch = self.lock();
        let new = watch.0.problem.as_ref().is_none_or(|p| found.index < p.found.index);
        if new {
            watch.0.problem = Some(AuditProblem { found: found.clone(), by, at: now() });
        }
        new
    }
}

/// What every check reads first, in its snapshot: the signed checkpoints, where retention cut
/// the trail (from its `AuditPrune` records), and the first and last kept records.
struct Trail {
    checkpoints: Vec<Checkpoint>,
    cut: Option<i64>,
    first_seq: Option<i64>,
    last: Option<(i64, Vec<u8>)>,
    records: u64,
}

impl Trail {
    fn read(tx: &Tx<'_>) -> Result<Trail> {
        Ok(Trail {
            checkpoints: tx.checkpoints()?,
            cut: tx.audit_details(PRUNE)?.iter().filter_map(|d| pruned_through(d)).max(),
            first_seq: tx.first_audit_seq()?,
            last: tx.last_audit()?,
            records: tx.audit_count()?,
        })
    }

    fn checkpoint(&self, seq: i64) -> Option<&Checkpoint> {
        self.checkpoints.iter().find(|c| c.seq == seq)
    }
}

fn hash_of(c: &Checkpoint) -> [u8; 32] {
    <[u8; 32]>::try_from(c.hash.as_slice()).unwrap_or(GENESIS)
}

fn truncated(last: i64, signed: i64) -> ChainBreak {
    ChainBreak {
        index: last as u64 + 1,
        problem: format!("the trail ends at record {last} but a signed checkpoint covers record {signed}: the tail was truncated"),
    }
}

fn bad_mac(seq: i64) -> ChainBreak {
    ChainBreak { index: seq as u64, problem: format!("the checkpoint of record {seq} has a bad MAC") }
}

/// Walks the records after `from` through `through` (to the end when `None`), a page at a time,
/// checking the chain and that every record a checkpoint of `signed` covers has the checkpoint's
/// hash. Returns the anchor of the last record walked, or the first problem.
fn walk(tx: &Tx<'_>, from: Anchor, through: Option<i64>, signed: &[Checkpoint]) -> Result<std::result::Result<Anchor, ChainBreak>> {
    let mut at = from;
    loop {
        let mut page = tx.audit_page(at.seq, PAGE)?;
        let more = page.len() as i64 == PAGE;
        if let Some(through) = through {
            page.retain(|(r, _)| r.seq <= through);
        }
        if page.is_empty() {
            return Ok(Ok(at));
        }
        let chained = crate::audit::verify_chain(at, &page);
        // The records before a break are in sequence, so each checkpoint up to it is found by
        // its offset; a checkpoint that differs is the earlier problem.
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

    /// Verifies the chain of kept records from its anchor, then every signed checkpoint against
    /// it: a checkpoint past the last record means the tail was truncated; a checkpoint whose
    /// hash differs from its record's, or whose MAC the HSM rejects, means the chain was
    /// rewritten; a head missing without a retention record and a signed anchor was deleted.
    /// Reads one consistent snapshot of the trail, a page at a time, beside the service's writes.
    pub fn verify_audit(&self) -> Result<AuditVerification> {
        self.store.read_snapshot(|tx| self.verify_in(tx))
    }

    fn verify_in(&self, tx: &Tx<'_>) -> Result<AuditVerification> {
        let trail = Trail::read(tx)?;
        let first_seq = trail.first_seq.unwrap_or(1);
        let mut problem = None;
        // Where the kept records start: after the newest retention cut the chain records, whose
        // checkpoint must still be there; or at the genesis.
        let anchor = match trail.cut {
            None if first_seq > 1 => {
                problem = Some(ChainBreak {
                    index: 1,
                    problem: format!("records 1 to {} are missing and no retention record accounts for them: the head was deleted", first_seq - 1),
                });
                Anchor { seq: first_seq - 1, hash: GENESIS }
            }
            None => Anchor::GENESIS,
            Some(through) => match trail.checkpoint(through).map(hash_of) {
                Some(hash) => Anchor { seq: through, hash },
                None => {
                    problem = Some(ChainBreak {
                        index: through as u64 + 1,
                        problem: format!("the signed checkpoint of record {through}, where retention cut the trail, is missing"),
                    });
                    Anchor { seq: through, hash: GENESIS }
                }
            },
        };
        let mut end = None;
        if problem.is_none() {
            match walk(tx, anchor, None, &trail.checkpoints)? {
                Ok(last) => end = Some(last),
                Err(found) => problem = Some(found),
            }
        }
        let last = trail.last.as_ref().map_or(anchor.seq, |(seq, _)| *seq);
        for c in &trail.checkpoints {
            let found = if c.seq > last {
                Some(truncated(last, c.seq))
            } else if !self.checkpoint_signed(c)? {
                Some(bad_mac(c.seq))
            } else {
                None
            };
            problem = first(problem, found);
        }
        Ok(AuditVerification {
            records: trail.records,
            pruned_through: anchor.seq as u64,
            checkpoints: trail.checkpoints.len() as u64,
            last_checkpoint: trail.checkpoints.last().map_or(0, |c| c.seq as u64),
            end: end.filter(|_| problem.is_none()),
            problem,
        })
    }

    /// What the service's own checks of the audit trail found.
    pub fn audit_health(&self) -> AuditHealth {
        self.audit_watch.health()
    }

    /// The startup check: the newest signed checkpoint (its MAC, and its record hashed again) and
    /// every record after it. Without a checkpoint yet, the whole (short) trail. A problem is
    /// reported (`audit_broken`), never a reason not to serve.
    pub fn check_audit_at_startup(&self) -> Result<()> {
        let found = self.store.read_snapshot(|tx| -> Result<Option<Option<ChainBreak>>> {
            let trail = Trail::read(tx)?;
            let Some(last) = trail.checkpoints.last() else { return Ok(None) };
            Ok(Some(match self.anchor_at(tx, &trail, last)? {
                Err(found) => Some(found),
                Ok(anchor) => match walk(tx, anchor, None, &[])? {
                    Err(found) => Some(found),
                    Ok(end) => {
                        self.audit_watch.verified(end);
                        None
                    }
                },
            }))
        })?;
        match found {
            None => self.check_whole_audit(AuditCheck::Startup),
            Some(None) => Ok(()),
            Some(Some(found)) => self.audit_broken(found, AuditCheck::Startup),
        }
    }

    /// A signed checkpoint to walk from: its MAC checked in the HSM, and its record hashed again
    /// from the stored hash of the record before it (or the genesis, or the signed checkpoint
    /// retention cut the trail at) and compared with the checkpoint's. The checkpoint retention
    /// cut the trail at has no record left: its MAC and the `AuditPrune` record naming it vouch.
    fn anchor_at(&self, tx: &Tx<'_>, trail: &Trail, c: &Checkpoint) -> Result<std::result::Result<Anchor, ChainBreak>> {
        let at = |problem: String| Ok(Err(ChainBreak { index: c.seq as u64, problem }));
        if !self.checkpoint_signed(c)? {
            return Ok(Err(bad_mac(c.seq)));
        }
        let anchor = Anchor { seq: c.seq, hash: hash_of(c) };
        let page = tx.audit_page(c.seq - 2, 2)?;
        let Some((record, _)) = page.iter().find(|(r, _)| r.seq == c.seq) else {
            return if trail.cut == Some(c.seq) && trail.first_seq == Some(c.seq + 1) {
                Ok(Ok(anchor))
            } else {
                at(format!("record {}, which a signed checkpoint covers, is missing", c.seq))
            };
        };
        let prev = match page.iter().find(|(r, _)| r.seq == c.seq - 1) {
            Some((_, hash)) => <[u8; 32]>::try_from(hash.as_slice()).ok(),
            None if c.seq == 1 => Some(GENESIS),
            None if trail.cut == Some(c.seq - 1) => trail.checkpoint(c.seq - 1).map(hash_of),
            None => None,
        };
        let Some(prev) = prev else {
            return Ok(Err(ChainBreak { index: c.seq as u64 - 1, problem: format!("record {}, before a signed checkpoint, is missing", c.seq - 1) }));
        };
        if record.chain_hash(&prev).as_slice() != c.hash.as_slice() {
            return at(format!("record {} differs from its signed checkpoint", c.seq));
        }
        Ok(Ok(anchor))
    }

    /// The segment check: each checkpoint signed since the last record verified, with the
    /// records up to it, chained on from that record's hash (kept in memory, so that a record
    /// verified once and then replaced breaks the chain here). When retention removed the
    /// records after it, goes on from the signed checkpoint retention cut the trail at. Nothing
    /// to do until the startup check passed.
    pub fn check_new_audit_segments(&self) -> Result<()> {
        let Some(mut anchor) = self.audit_watch.anchor() else { return Ok(()) };
        let found = self.store.read_snapshot(|tx| -> Result<Option<ChainBreak>> {
            let trail = Trail::read(tx)?;
            if let Some(first) = trail.first_seq
                && first > anchor.seq + 1
            {
                let Some(cut) = trail.checkpoint(first - 1).filter(|_| trail.cut == Some(first - 1)) else {
                    return Ok(Some(ChainBreak {
                        index: anchor.seq as u64 + 1,
                        problem: format!(
                            "records {} to {} are gone and no retention record and signed checkpoint account for them",
                            anchor.seq + 1,
                            first - 1
                        ),
                    }));
                };
                anchor = match self.anchor_at(tx, &trail, cut)? {
                    Ok(cut) => cut,
                    Err(found) => return Ok(Some(found)),
                };
            }
            let from = anchor.seq;
            for c in trail.checkpoints.iter().filter(|c| c.seq > from) {
                if !self.checkpoint_signed(c)? {
                    return Ok(Some(bad_mac(c.seq)));
                }
                match walk(tx, anchor, Some(c.seq), std::slice::from_ref(c))? {
                    Ok(end) if end.seq == c.seq => {
                        anchor = end;
                        self.audit_watch.verified(end);
                    }
                    Ok(end) => return Ok(Some(truncated(end.seq, c.seq))),
                    Err(found) => return Ok(Some(found)),
                }
            }
            Ok(None)
        })?;
        match found {
            Some(found) => self.audit_broken(found, AuditCheck::Segment),
            None => Ok(()),
        }
    }

    /// The whole trail, as `kmsctl audit verify` checks it, and the last record an earlier check
    /// verified still there, unchanged (unless retention removed it). Passing clears a problem
    /// found before this check began (its record stays in the chain); never one found since.
    pub fn check_whole_audit(&self, by: AuditCheck) -> Result<()> {
        let started = now();
        let known = self.audit_watch.anchor();
        let (verified, replaced) = self.store.read_snapshot(|tx| -> Result<_> {
            let verified = self.verify_in(tx)?;
            let replaced = match known {
                Some(a) if a.seq > verified.pruned_through as i64 => {
                    let kept = tx.audit_page(a.seq - 1, 1)?;
                    match kept.first() {
                        Some((r, hash)) if r.seq == a.seq && hash.as_slice() == a.hash.as_slice() => None,
                        _ => {
                            Some(ChainBreak { index: a.seq as u64, problem: format!("record {}, verified earlier, was replaced or removed", a.seq) })
                        }
                    }
                }
                _ => None,
            };
            Ok((verified, replaced))
        })?;
        self.audit_watch.checked_whole_trail();
        match first(verified.problem, replaced) {
            Some(found) => self.audit_broken(found, by),
            None => {
                if let Some(end) = verified.end {
                    self.audit_watch.verified(end);
                }
                self.audit_watch.clear_problem_found_before(started);
                Ok(())
            }
        }
    }

    /// A check found the trail broken: logged, shown by `kmsctl status` and the metrics, and
    /// recorded in the trail itself. The first break (by record index) is kept until a check of
    /// the whole trail that began after it passes, and recorded once: the other checks find it
    /// again, sometimes in other words. The service goes on serving: a broken trail must not
    /// become a way to stop every workload.
    fn audit_broken(&self, found: ChainBreak, by: AuditCheck) -> Result<()> {
        tracing::error!(record = found.index, problem = %found.problem, check = by.as_str(), "the audit trail does not verify: run kmsctl audit verify");
        if self.audit_watch.found(&found, by) {
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
