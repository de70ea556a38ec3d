//! Group commit of audit records.
//!
//! A request is answered only after its audit record is durable. Writing each record in its own
//! transaction would cost one fsync per request; instead one writer thread takes every record
//! waiting in its queue, writes them in one transaction (one fsync), and then releases all their
//! requests. Under load, batches grow and the fsync cost per request falls; at low load a batch
//! is one record and adds one fsync of latency. If the write fails (disk full, read-only file)
//! every request of the batch fails: the service fails closed, never answers unaudited.
//!
//! The records of one call (a batch call has one per item) go into the same transaction. A
//! data worker hands them over itself (`submit`) with a callback that answers the call once
//! they are durable; the async side waits on `record_all`.
//!
//! Revocation holds at commit, on every node: a successful data-plane call carries the
//! revocation epoch it was authorised under; the batch's transaction, once it is the only one
//! appending to the chain, reads the store's epoch (`Tx::audit_head`), and a call
//! authorised under an older one (a disable, a revoked grant, a destruction committed anywhere
//! while it ran) is recorded and answered as failed, retryable, instead of as a success. So no
//! success is committed after the change that took its access away.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{AuditEvent, Checkpoint, checkpoint_message};
use crate::clock::now;
use crate::hsm::{Hsm, HsmError, KeyHandle};
use crate::store::{Store, StoreError, Tx};

/// The most records in one transaction: bounds the latency a large batch adds to its first
/// request. A call's records are never split, so one batch call may take a transaction past it.
const MAX_BATCH: usize = 4096;
/// Records waiting for the writer; past this, callers wait for room (back-pressure).
const QUEUE: usize = 65_536;

/// The audit record could not be made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

impl std::fmt::Display for AuditUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the audit trail could not be written")
    }
}

/// The writer thread, to wait for at shutdown: it finishes once every `AuditWriter` is gone,
/// after writing what was queued and signing a last checkpoint.
#[derive(Debug)]
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the audit writer thread panicked");
        }
    }
}

/// How a call's records went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// As they were.
    Durable,
    /// As a failure: the call was authorised under a revocation epoch older than the store's at
    /// commit (`epoch` then, `now` at commit). It must not answer as a success.
    Stale { epoch: u64, now: u64 },
}

/// What is told a submission's outcome once its records are durable (or could not be written).
type Done = Box<dyn FnOnce(Result<Recorded, AuditUnavailable>) + Send>;

/// The records of one call, written in one transaction.
struct Pending {
    events: Vec<AuditEvent>,
    /// For a success that depends on access (a data-plane call), the revocation epoch it was
    /// authorised under.
    epoch: Option<u64>,
    done: Done,
}

/// The handle requests use to record their audit event.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Pending>,
}

/// Marks a call's records as failed at commit: what it was, and why it was not answered.
fn stale(events: &mut [AuditEvent], epoch: u64, now: u64) {
    for e in events {
        e.outcome = super::Outcome::Failed;
        e.status = "UNAVAILABLE";
        e.detail = format!("refused at commit: access changed while the call ran (revocation epoch {epoch}, now {now}); retry");
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("records", &self.events.len()).finish_non_exhaustive()
    }
}

/// Makes signed checkpoints every `every_records` records or `every_seconds` seconds (whichever
/// comes first, and only when there are new records).
pub struct Checkpointer {
    pub hsm: Arc<dyn Hsm>,
    pub key: KeyHandle,
    pub every_records: i64,
    pub every_seconds: i64,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("every_records", &self.every_records).finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Whether record `seq` (the last one a batch writes at `at`) is due a checkpoint: there are
    /// new records since the last one, and `every_records` of them or `every_seconds` have passed.
    fn due(&self, seq: i64, at: i64, (last_seq, last_time): (i64, i64)) -> bool {
        seq != last_seq && (seq - last_seq >= self.every_records || at - last_time >= self.every_seconds)
    }

    /// Signs the batch's last record in the batch's own transaction `tx` if a checkpoint is due,
    /// and returns what it covers: a checkpoint costs no commit (no fsync) of its own, and is
    /// never durable without its records nor they without it. An HSM failure is logged and the
    /// batch goes in unsigned (its records are chained all the same); the next batch tries again.
    fn sign_with(&self, tx: &Tx<'_>, head: Option<&(i64, Vec<u8>)>, at: i64, last: (i64, i64)) -> Result<Option<(i64, i64)>, StoreError> {
        let Some((seq, hash)) = head.filter(|(seq, _)| self.due(*seq, at, last)) else { return Ok(None) };
        match self.signed(*seq, hash, at) {
            Ok(checkpoint) => {
                tx.insert_checkpoint(&checkpoint)?;
                tracing::debug!(seq, "audit checkpoint signed");
                Ok(Some((*seq, at)))
            }
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint failed; retrying with the next batch");
                Ok(None)
            }
        }
    }

    /// Signs a checkpoint over the last record now, unless the newest checkpoint covers it
    /// already (a backup's snapshot is signed to its end); returns the record it covers (0: none).
    pub fn sign_now(&self, store: &Store, at: i64) -> crate::error::Result<i64> {
        let Some((seq, hash)) = store.read(|tx| tx.last_audit())? else { return Ok(0) };
        if store.read(|tx| tx.last_checkpoint())?.is_none_or(|(covered, _)| covered != seq) {
            let checkpoint = self.signed(seq, &hash, at)?;
            store.write(|tx| tx.insert_checkpoint(&checkpoint))?;
        }
        Ok(seq)
    }

    /// The checkpoint over record `seq`: the HSM's HMAC over its number, time and hash.
    fn signed(&self, seq: i64, hash: &[u8], at: i64) -> Result<Checkpoint, HsmError> {
        let mac = self.hsm.mac(self.key, &checkpoint_message(seq, at, hash))?;
        Ok(Checkpoint { seq, time: at, hash: hash.to_vec(), mac })
    }
}

impl AuditWriter {
    /// Starts the writer thread. It stops when every `AuditWriter` clone is dropped, signing a
    /// last checkpoint on its way out. `changes_seen` is given the store's count of changes at
    /// each commit, for the node to see that another one changed something.
    pub fn start(
        store: Arc<Store>,
        checkpointer: Checkpointer,
        changes_seen: Arc<std::sync::atomic::AtomicU64>,
    ) -> std::io::Result<(AuditWriter, WriterThread)> {
        let (queue, mut rx) = mpsc::channel::<Pending>(QUEUE);
        let thread = std::thread::Builder::new().name("audit-writer".into()).spawn(move || {
            // Read on this thread: a store may not be called from the async runtime.
            let mut last = store.read(|tx| tx.last_checkpoint()).ok().flatten().unwrap_or((0, now()));
            while let Some(first) = rx.blocking_recv() {
                let mut records = first.events.len();
                let mut batch = vec![first];
                let started = std::time::Instant::now();
                let written = store.write(|tx| {
                    let head = tx.audit_head()?;
                    // What arrived while the head's lock was awaited joins the batch: when other
                    // nodes' writers hold it, the wait fills the batch instead of the next one.
                    while records < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(p) => {
                                records += p.events.len();
                                batch.push(p);
                            }
                            Err(_) => break,
                        }
                    }
                    let at = now();
                    let marks = head.marks;
                    let mut outcomes = vec![Recorded::Durable; batch.len()];
                    for (p, outcome) in batch.iter_mut().zip(outcomes.iter_mut()) {
                        if let Some(epoch) = p.epoch.filter(|e| *e < marks.epoch) {
                            stale(&mut p.events, epoch, marks.epoch);
                            *outcome = Recorded::Stale { epoch, now: marks.epoch };
                        }
                    }
                    let end = tx.append_audits(&head, batch.iter().flat_map(|p| &p.events), at)?;
                    Ok((checkpointer.sign_with(tx, end.as_ref(), at, last)?, marks, outcomes))
                });
                crate::metrics::metrics().audit_commit(records, started.elapsed());
                match written {
                    Ok((signed, marks, outcomes)) => {
                        changes_seen.fetch_max(marks.changes, std::sync::atomic::Ordering::SeqCst);
                        for (p, outcome) in batch.into_iter().zip(outcomes) {
                            (p.done)(Ok(outcome));
                        }
                        if let Some(covered) = signed {
                            last = covered;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, records, "audit write failed: failing the requests closed");
                        for p in batch {
                            (p.done)(Err(AuditUnavailable));
                        }
                    }
                }
                tracing::trace!(records, "audit batch committed");
            }
            if let Err(e) = checkpointer.sign_now(&store, now()) {
                tracing::error!(error = %e, "the last audit checkpoint failed");
            }
        })?;
        Ok((AuditWriter { queue }, WriterThread(thread)))
    }

    /// Records every event of a call (in order, in one transaction) and returns once they are
    /// durable, or fails if they could not be written.
    pub async fn record_all(&self, events: Vec<AuditEvent>) -> Result<Recorded, AuditUnavailable> {
        let (done, wait) = oneshot::channel();
        // A caller that went away no longer needs the answer.
        let done: Done = Box::new(move |outcome| {
            let _ = done.send(outcome);
        });
        self.queue.send(Pending { events, epoch: None, done }).await.map_err(|_| AuditUnavailable)?;
        wait.await.map_err(|_| AuditUnavailable)?
    }

    /// Records every event of a call from a thread outside the async runtime (a data worker),
    /// without waiting: `done` is told the outcome, on the writer thread, once they are durable.
    /// A success authorised under revocation `epoch` is recorded as failed if access changed
    /// since. Waits only for room in the queue (back-pressure).
    pub fn submit(&self, events: Vec<AuditEvent>, epoch: Option<u64>, done: impl FnOnce(Result<Recorded, AuditUnavailable>) + Send + 'static) {
        if let Err(refused) = self.queue.blocking_send(Pending { events, epoch, done: Box::new(done) }) {
            (refused.0.done)(Err(AuditUnavailable));
        }
    }
}
