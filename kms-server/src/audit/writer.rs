//! Group commit of audit records.
//!
//! A request is answered only after its audit record is durable. Writing each record in its own
//! transaction would cost one fsync per request; instead one writer thread takes every record
//! waiting in its queue, writes them in one transaction (one fsync), and then releases all their
//! requests. Under load, batches grow and the fsync cost per request falls; at low load a batch
//! is one record and adds one fsync of latency. If the write fails (disk full, read-only file)
//! every request of the batch fails: the service fails closed, never answers unaudited.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::AuditEvent;
use crate::service::now;
use crate::store::Store;

/// The most records in one transaction: bounds the latency a large batch adds to its first
/// request.
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

struct Pending {
    event: AuditEvent,
    done: oneshot::Sender<Result<(), AuditUnavailable>>,
}

/// The handle requests use to record their audit event.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("operation", &self.event.operation).finish()
    }
}

impl AuditWriter {
    /// Starts the writer thread. It stops when every `AuditWriter` clone is dropped.
    pub fn start(store: Arc<Store>) -> std::io::Result<AuditWriter> {
        let (queue, mut rx) = mpsc::channel::<Pending>(QUEUE);
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let written = store.write(|tx| tx.append_audits(batch.iter().map(|p| &p.event), now()));
                let outcome = match written {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::error!(error = %e, records = batch.len(), "audit write failed: failing the requests closed");
                        Err(AuditUnavailable)
                    }
                };
                tracing::trace!(records = batch.len(), "audit batch committed");
                for p in batch {
                    // A caller that went away no longer needs the answer.
                    let _ = p.done.send(outcome);
                }
            }
        })?;
        Ok(AuditWriter { queue })
    }

    /// Records `event` and returns once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditUnavailable> {
        let (done, wait) = oneshot::channel();
        self.queue.send(Pending { event, done }).await.map_err(|_| AuditUnavailable)?;
        wait.await.map_err(|_| AuditUnavailable)?
    }
}
