//! The gRPC boundary: the only place proto types appear, and the only place errors become gRPC
//! statuses. Requests are parsed into domain types here ("parse, don't validate"); the service
//! below never sees a raw string id or an unchecked map.

pub mod admin;
pub mod audit;
pub mod crypto;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Status;

use crate::audit::writer::{AuditUnavailable, AuditWriter, Recorded};
use crate::audit::{AuditEvent, Outcome};
use crate::domain::context::EncryptionContext;
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::officer::Role;
use crate::error::Error;
use crate::hsm::HsmError;
use crate::service::officers::SessionToken;
use crate::service::{Caller, Kms};
use crate::workers::{Busy, Claim};

/// The one message every undecryptable blob gets, whatever the cause (an oracle otherwise).
pub const DECRYPT_FAILED: &str = "ciphertext_blob could not be decrypted with this encryption context";

/// The largest request message either plane accepts: a 6,144-byte blob plus an 8,192-byte
/// context and framing fit with room to spare; anything bigger is refused before decoding.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The largest data-plane request: a batch of up to 256 items (`GenerateDataKeys`,
/// `DecryptBatch`). 256 data-key blobs with modest contexts take about 100 KiB; 1 MiB leaves room
/// for larger contexts while bounding what one request can make the server hold.
pub const MAX_DATA_MESSAGE_BYTES: usize = 1024 * 1024;

/// The one function that turns a service error into a gRPC status. Internal detail goes to the
/// log with the request id; the caller gets the id to quote and nothing else.
pub fn status(e: &Error, request_id: &str) -> Status {
    match e {
        Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        Error::NotFound { .. } => Status::not_found(e.to_string()),
        Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        Error::PermissionDenied { .. } => Status::permission_denied(e.to_string()),
        Error::Unauthenticated { .. } => Status::unauthenticated(e.to_string()),
        Error::FailedPrecondition { .. } | Error::UsageExhausted { .. } => Status::failed_precondition(e.to_string()),
        Error::ApprovalRequired { request_id, .. } => {
            let mut st = Status::failed_precondition(e.to_string());
            if let Ok(id) = request_id.parse() {
                st.metadata_mut().insert(kms_proto::v1::APPROVAL_REQUEST_HEADER, id);
            }
            st
        }
        // `Shared::call` answers a dry run as a success before any status is made; a dry run
        // anywhere else did not happen, and says so.
        Error::DryRun { .. } => Status::failed_precondition(e.to_string()),
        Error::DecryptFailed => Status::invalid_argument(DECRYPT_FAILED),
        Error::Deadline { .. } => {
            tracing::error!(request_id, error = %e, "HSM deadline passed");
            Status::deadline_exceeded(format!("{e}; retry later (request id {request_id})"))
        }
        Error::Overloaded => {
            tracing::warn!(request_id, "data-plane queue full");
            Status::unavailable(format!("{e}; retry later (request id {request_id})"))
        }
        Error::RateLimited { retry_after, .. } => {
            // The hint also travels as metadata, for clients that back off by it.
            let mut st = Status::resource_exhausted(e.to_string());
            if let Ok(ms) = retry_after.as_millis().max(1).to_string().parse() {
                st.metadata_mut().insert("retry-after-ms", ms);
            }
            st
        }
        Error::Hsm(HsmError::Unavailable { .. }) => {
            tracing::error!(request_id, error = %e, "HSM unavailable");
            Status::unavailable(format!("the HSM is unavailable; retry later (request id {request_id})"))
        }
        Error::Store(s) if s.is_unavailable() => {
            tracing::error!(request_id, error = %e, "store unavailable");
            Status::unavailable(format!("the key store is unavailable; retry later (request id {request_id})"))
        }
        Error::Hsm(_) | Error::Store(_) => {
            tracing::error!(request_id, error = %e, "internal error");
            internal(request_id)
        }
    }
}

// The request header that asks for a dry run of a changing admin call: every check is made
// against the live state and the caller's rights, nothing is written, and the call answers OK
// with an empty response and `DRY_RUN_ANSWER_HEADER` saying what would change. It is audited as
// a dry run, not as a change.
use kms_proto::v1::{DRY_RUN_ANSWER_HEADER as DRY_RUN_ANSWER, DRY_RUN_HEADER as DRY_RUN};

/// What a call's dry-run header asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DryRun {
    No,
    Yes,
    /// A value that is neither yes nor no: refused, never taken for either.
    Malformed,
}

/// Calls whose length grows with the data, waits on another server (an issuer's key set
/// fetched) or runs another call (the approval that runs an approved request), not with the
/// HSM's answer time: they are not held to the HSM deadline.
const LONG_RUNNING: &[&str] = &[
    "CreateBackup",
    "VerifyAudit",
    "EvidenceReport",
    "PutCseIssuer",
    "ApproveRequest",
    "ExportKeys",
    "GetImportParameters",
    "ImportKeyMaterial",
    "ImportKeys",
];

/// How much longer than the HSM deadline an admin call may take: time for the service to roll
/// back a change whose HSM step came back late and answer DEADLINE_EXCEEDED itself.
const ADMIN_DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Request ids: unique within the process and across restarts (the start time in the high
/// bits), short enough to quote on the phone.
#[derive(Debug)]
pub struct RequestIds {
    boot: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let boot = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        RequestIds { boot, next: AtomicU64::new(1) }
    }
}

impl RequestIds {
    pub fn next(&self) -> String {
        format!("{:x}-{:x}", self.boot, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// What both services share.
#[derive(Debug, Clone)]
pub struct Shared {
    pub kms: Arc<Kms>,
    pub ids: Arc<RequestIds>,
    pub audit: AuditWriter,
    /// Where data-plane calls run (admin calls run on tokio's blocking pool).
    pub workers: crate::workers::Workers,
    /// How long a data-plane call may take before it answers DEADLINE_EXCEEDED (`hsm.deadline_ms`).
    pub deadline: std::time::Duration,
    /// The CA certificates the service's outgoing HTTPS calls trust (`outgoing_ca_file`).
    pub outgoing_ca: std::path::PathBuf,
}

/// What a call's audit record says about its key, filled in by the handler as it learns it
/// (a call refused before the key was known has none).
#[derive(Debug, Default)]
pub struct Facts {
    /// Who the record names: the authenticated caller, or for a login the name it claimed.
    pub principal: Option<String>,
    pub key_id: Option<KeyId>,
    pub key_version: Option<u32>,
    pub context: Option<EncryptionContext>,
    pub detail: String,
    /// The caller context a data-plane request carried (JSON).
    pub caller_context: Option<String>,
    /// The items of a batch call, each audited as a record of its own (with the batch's
    /// principal and caller context) in place of one record for the batch.
    pub items: Vec<(Facts, tonic::Code, String)>,
    /// What a dry run would have changed.
    pub dry_run: Option<String>,
    /// The revocation epoch a data-plane call was authorised under: its success is checked
    /// against the store's at commit.
    pub epoch: Option<u64>,
}

/// Which outcomes of a call the API layer audits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Every outcome (data-plane calls, admin reads).
    EveryOutcome,
    /// Refusals and failures only: the success is a state change, audited by the service in the
    /// same transaction as the change itself.
    FailuresInTransactionSuccesses,
}

/// The status code's name, as the audit records it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        _ => "INTERNAL",
    }
}

impl Shared {
    /// Runs one call: the service work (it may wait on the HSM or SQLite) on a data worker, or
    /// for the admin plane on tokio's blocking pool; then its audit record, durable before the
    /// answer leaves (group commit). If the record cannot be written the call fails closed with
    /// UNAVAILABLE, whatever its result was; a result holding a secret is dropped, and so wiped.
    pub(crate) async fn call<T: Default + Send + 'static>(
        &self,
        operation: &'static str,
        who: Who,
        audit: Audit,
        f: impl FnOnce(&Kms, &Caller, &mut Facts) -> Result<T, Error> + Send + 'static,
    ) -> Result<tonic::Response<T>, Status> {
        let started = std::time::Instant::now();
        let request_id = self.ids.next();
        let kms = self.kms.clone();
        let span = tracing::info_span!("rpc", request_id = %request_id, operation);
        let task_request_id = request_id.clone();
        // Every call waits for the HSM at most `deadline` (data plane) or `deadline` and a
        // short grace for the service to roll a late change back itself (admin plane), except
        // the two whose length grows with the data (a backup, an audit verification): they
        // have the listener's request timeout.
        let (claimed, wait) = match &who {
            _ if LONG_RUNNING.contains(&operation) => (None, None),
            Who::Workload(name) => (name.clone(), Some(self.deadline)),
            Who::Facade(name) => (Some(name.clone()), Some(self.deadline)),
            _ => (None, Some(self.deadline + ADMIN_DEADLINE_GRACE)),
        };
        let deadline = wait.map(|_| (started + self.deadline, self.deadline));
        let data_plane = matches!(who, Who::Workload(_) | Who::Facade(_));
        let dry_run = match who {
            Who::Officer { dry_run, .. } => dry_run,
            _ => DryRun::No,
        };
        let work = move || {
            let _entered = span.enter();
            let mut facts = Facts::default();
            let principal = match who {
                Who::Workload(None) => Err(Error::Unauthenticated { reason: "the client certificate names no workload (URI SAN or CN)".into() }),
                Who::Workload(Some(name)) if let Some(whose) = crate::service::facade_principal(&name) => {
                    Err(Error::Unauthenticated { reason: format!("{name}: this name is {whose}, not a workload's") })
                }
                Who::Facade(name) => Ok(name),
                Who::Workload(Some(name)) => Ok(name),
                Who::Officer { token, needs, .. } => kms.officers().authenticate(token.as_ref(), needs),
                Who::Anonymous => Ok("anonymous".to_string()),
            };
            let out = match principal {
                Ok(principal) => {
                    let caller = Caller { request_id: task_request_id, principal, deadline, dry_run: dry_run == DryRun::Yes };
                    if data_plane {
                        // Read before anything is authorised: a change that commits later is
                        // seen at commit.
                        facts.epoch = Some(kms.revocation_epoch());
                    }
                    let out = if dry_run == DryRun::Malformed {
                        Err(Error::invalid(DRY_RUN, "must be 1, true, 0 or false"))
                    } else if dry_run == DryRun::Yes && audit == Audit::EveryOutcome {
                        Err(Error::invalid(DRY_RUN, format!("asks for a dry run, which {operation} does not take")))
                    } else if !data_plane && audit == Audit::EveryOutcome {
                        // An admin read sees what every node committed before it (with several
                        // nodes, one read of the store's count of changes).
                        kms.admit(&caller.principal).and_then(|()| kms.follow_other_nodes(true)).and_then(|()| f(&kms, &caller, &mut facts))
                    } else {
                        kms.admit(&caller.principal).and_then(|()| f(&kms, &caller, &mut facts))
                    };
                    // A dry run that got as far as its first write answers as a success.
                    let out = match out {
                        Err(Error::DryRun { would }) => {
                            facts.dry_run = Some(would);
                            Ok(T::default())
                        }
                        other => other,
                    };
                    if let Err(e) = &out {
                        kms.repair_after(e);
                    }
                    facts.principal.get_or_insert(caller.principal);
                    out
                }
                Err(e) => {
                    facts.principal = Some("unauthenticated".into());
                    Err(e)
                }
            };
            (out, facts)
        };
        let answered = if data_plane {
            (self.on_worker(operation, &request_id, work, claimed, wait).await, None)
        } else {
            let task = tokio::task::spawn_blocking(work);
            let joined = match wait {
                None => task.await,
                Some(wait) => match tokio::time::timeout(wait, task).await {
                    Ok(joined) => joined,
                    Err(_) => Ok((Err(Error::Deadline { after: self.deadline }), Facts::default())),
                },
            };
            let (result, facts) = match joined {
                Ok((out, facts)) => (out.map_err(|e| status(&e, &request_id)), facts),
                Err(join) => {
                    // A panic on a request path is a bug; the caller gets a generic error.
                    tracing::error!(error = %join, operation, "request task failed");
                    (Err(internal(&request_id)), Facts::default())
                }
            };
            let would = facts.dry_run.clone();
            let answered = if result.is_ok() && audit == Audit::FailuresInTransactionSuccesses && would.is_none() {
                Answered { result, statuses: vec![code_name(tonic::Code::Ok)], audited: Ok(Recorded::Durable) }
            } else {
                self.record(operation, &request_id, result, facts).await
            };
            (answered, would)
        };
        let (Answered { result, statuses, audited }, would) = answered;
        let elapsed = started.elapsed();
        for status in statuses {
            crate::metrics::metrics().request(operation, if audited == Ok(Recorded::Durable) { status } else { "UNAVAILABLE" }, elapsed);
        }
        match audited {
            Ok(Recorded::Stale { epoch, now }) => {
                // Whatever the call made (a data key among it) is dropped, and so wiped.
                tracing::info!(request_id = %request_id, epoch, now, "a call that raced a revocation answered UNAVAILABLE");
                Err(Status::unavailable(format!(
                    "access changed while the call ran (revocation epoch {epoch}, now {now}); retry (request id {request_id})"
                )))
            }
            Ok(Recorded::Durable) => {
                if result.is_ok() {
                    crate::hooks::crash_point(operation, crate::hooks::Step::BeforeReply);
                }
                result.map(|answer| {
                    let mut response = tonic::Response::new(answer);
                    if let Some(would) = would {
                        response.metadata_mut().insert_bin(DRY_RUN_ANSWER, tonic::metadata::MetadataValue::from_bytes(would.as_bytes()));
                    }
                    response
                })
            }
            Err(e) => {
                tracing::error!(request_id = %request_id, error = %e, "failing the call closed");
                Err(Status::unavailable(format!("the audit trail could not be written; retry later (request id {request_id})")))
            }
        }
    }

    /// Runs a data-plane call's `work` on a data worker, which also hands its audit records to
    /// the writer: the caller's task is woken once, when the records are durable, rather than
    /// once for the result and again for the records. If `wait` passes first, the caller answers
    /// DEADLINE_EXCEEDED and records that instead; [`Claim`] makes sure exactly one of the two
    /// records the call. Work that ran is recorded even if the client cancelled the call.
    async fn on_worker<T: Send + 'static>(
        &self,
        operation: &'static str,
        request_id: &str,
        work: impl FnOnce() -> (Result<T, Error>, Facts) + Send + 'static,
        claimed: Option<String>,
        wait: Option<std::time::Duration>,
    ) -> Answered<T> {
        let refused = |e: Error| (Err(status(&e, request_id)), Facts { principal: claimed, ..Facts::default() });
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let claim = Claim::default();
        let job = {
            let (claim, audit, request_id) = (claim.clone(), self.audit.clone(), request_id.to_string());
            move || {
                // Nobody waits for it any more: its deadline passed, or the client cancelled it.
                if !claim.waited_for() || tx.is_closed() {
                    return;
                }
                let (out, facts) = work();
                if !claim.finish() {
                    return;
                }
                let result = out.map_err(|e| status(&e, &request_id));
                if result.is_ok() {
                    // Where a test makes a call race a revocation.
                    crate::hooks::crash_point(operation, crate::hooks::Step::AfterHsm);
                }
                let epoch = facts.epoch.filter(|_| result.is_ok());
                let (events, statuses) = records(operation, &request_id, &result, facts);
                audit.submit(events, epoch, move |audited| drop(tx.send(Answered { result, statuses, audited })));
            }
        };
        if let Err(Busy) = self.workers.spawn(job) {
            let (result, facts) = refused(Error::Overloaded);
            return self.record(operation, request_id, result, facts).await;
        }
        let answer = match wait {
            None => rx.await,
            Some(wait) => match tokio::time::timeout(wait, &mut rx).await {
                Ok(answer) => answer,
                Err(_) if claim.give_up() => {
                    let (result, facts) = refused(Error::Deadline { after: self.deadline });
                    return self.record(operation, request_id, result, facts).await;
                }
                // The work finished in time; its records are being written.
                Err(_) => rx.await,
            },
        };
        match answer {
            Ok(answered) => answered,
            Err(_) => {
                // The call panicked (a bug): the worker went on, the caller gets a generic error.
                tracing::error!(operation, "a data-plane call was dropped by its worker");
                self.record(operation, request_id, Err(internal(request_id)), Facts::default()).await
            }
        }
    }

    /// Audits a call a facade refused before it reached the service (its signature failed), as
    /// `principal`, from the caller's task: no data worker is taken for it.
    pub(crate) async fn refusal(&self, operation: &'static str, principal: &str, status: Status) {
        let request_id = self.ids.next();
        let facts = Facts { principal: Some(principal.to_string()), ..Facts::default() };
        let answered = self.record::<()>(operation, &request_id, Err(status), facts).await;
        for status in answered.statuses {
            crate::metrics::metrics().request(operation, status, std::time::Duration::ZERO);
        }
    }

    /// Records a call's outcome from its async task and waits until the records are durable.
    async fn record<T>(&self, operation: &'static str, request_id: &str, result: Result<T, Status>, facts: Facts) -> Answered<T> {
        let (events, statuses) = records(operation, request_id, &result, facts);
        let audited = self.audit.record_all(events).await;
        Answered { result, statuses, audited }
    }
}

/// A call's answer, held until its audit records are durable (`audited`), and the status each
/// record names (for the metrics).
struct Answered<T> {
    result: Result<T, Status>,
    statuses: Vec<&'static str>,
    audited: Result<Recorded, AuditUnavailable>,
}

/// The generic answer to an internal failure (a bug, or an HSM or store error that is not
/// transient): the details go to the log, under the request id, never to the caller.
fn internal(request_id: &str) -> Status {
    Status::internal(format!("internal error (request id {request_id})"))
}

/// A call's audit records and the status each names.
fn records<T>(operation: &'static str, request_id: &str, result: &Result<T, Status>, facts: Facts) -> (Vec<AuditEvent>, Vec<&'static str>) {
    let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
    let events = audit_events(operation, request_id, facts, code, result.as_ref().err().map(Status::message));
    let statuses = events.iter().map(|e| e.status).collect();
    (events, statuses)
}

/// The audit records of one answered call: one for the call, or one for each item of a batch
/// that was run (with the batch's principal and caller context). `refusal` is the status message
/// of a call that failed as a whole.
fn audit_events(operation: &'static str, request_id: &str, mut facts: Facts, code: tonic::Code, refusal: Option<&str>) -> Vec<AuditEvent> {
    let principal = facts.principal.take().unwrap_or_else(|| "unknown".into());
    let dry_run = facts.dry_run.take();
    let event = |facts: Facts, code: tonic::Code, detail: String| AuditEvent {
        request_id: request_id.to_string(),
        principal: principal.clone(),
        operation,
        key_id: facts.key_id,
        key_version: facts.key_version,
        context: facts.context,
        outcome: match code {
            tonic::Code::Ok if dry_run.is_some() => Outcome::DryRun,
            tonic::Code::Ok => Outcome::Allowed,
            tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::DeadlineExceeded => Outcome::Failed,
            _ => Outcome::Denied,
        },
        status: code_name(code),
        detail,
        caller_context: facts.caller_context,
        in_dry_run: false,
    };
    if let Some(message) = refusal {
        return vec![event(facts, code, message.to_string())];
    }
    if facts.items.is_empty() {
        let detail = match &dry_run {
            Some(would) => format!("dry run: would {would}"),
            None => std::mem::take(&mut facts.detail),
        };
        return vec![event(facts, code, detail)];
    }
    let n = facts.items.len();
    let caller_context = facts.caller_context.take();
    (facts.items.drain(..))
        .enumerate()
        .map(|(i, (item, code, detail))| {
            let item = Facts { caller_context: caller_context.clone(), ..item };
            event(item, code, format!("item {} of {n}{}{detail}", i + 1, if detail.is_empty() { "" } else { ": " }))
        })
        .collect()
}

/// Who a call says it is, before the service checks it (in `Shared::call`, for every call).
#[derive(Debug)]
pub enum Who {
    /// The data plane: the identity mutual TLS proved, `None` if the certificate names nobody.
    Workload(Option<String>),
    /// The admin plane: the session token sent, the role the call needs, and whether it asks
    /// for a dry run.
    Officer { token: Option<SessionToken>, needs: Role, dry_run: DryRun },
    /// Login itself, the one call made before there is a session.
    Anonymous,
    /// A facade's caller (a cloud provider's service), as the facade authenticated it: its
    /// principal. Served like the data plane.
    Facade(String),
}

/// The workload identity the data plane's mutual TLS proved: the client certificate's URI SAN
/// or common name (`tls::workload_identity`).
pub fn workload<T>(request: &tonic::Request<T>) -> Who {
    Who::Workload(request.peer_certs().and_then(|certs| certs.first().and_then(|der| crate::tls::workload_identity(der))))
}

/// The officer session a call carries (`authorization: Bearer TOKEN`), and the role it needs.
/// The reason a change gives (`kms-reason` metadata): printable ASCII, at most 256
/// characters; anything else is dropped.
pub fn reason<T>(request: &tonic::Request<T>) -> String {
    let text = request.metadata().get(kms_proto::v1::REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    text.chars().take(256).filter(|c| (' '..='~').contains(c)).collect()
}

/// The approved request a call runs (`kms-approval` metadata), if it names one.
pub fn approval<T>(request: &tonic::Request<T>) -> Option<String> {
    let text = request.metadata().get(kms_proto::v1::APPROVAL_HEADER)?.to_str().ok()?.trim();
    (!text.is_empty()).then(|| text.chars().take(64).collect())
}

pub fn officer<T>(request: &tonic::Request<T>, needs: Role) -> Who {
    let token = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| SessionToken::new(t.trim().to_string()));
    let dry_run = match request.metadata().get(DRY_RUN).map(|v| v.to_str().map(|v| v.trim().to_ascii_lowercase())) {
        None => DryRun::No,
        Some(Ok(v)) if v == "1" || v == "true" => DryRun::Yes,
        Some(Ok(v)) if v == "0" || v == "false" => DryRun::No,
        Some(_) => DryRun::Malformed,
    };
    Who::Officer { token, needs, dry_run }
}

// ----- request parsing -----

pub fn key_ref(field: &'static str, text: &str) -> Result<KeyRef, Error> {
    text.parse().map_err(|e| Error::invalid(field, e))
}

pub fn optional_key_ref(field: &'static str, text: &str) -> Result<Option<KeyRef>, Error> {
    if text.is_empty() { Ok(None) } else { key_ref(field, text).map(Some) }
}

pub fn context(field: &'static str, pairs: HashMap<String, String>) -> Result<EncryptionContext, Error> {
    EncryptionContext::new(pairs).map_err(|e| Error::invalid(field, e))
}
