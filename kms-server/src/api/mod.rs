//! The gRPC boundary: the only place proto types appear, and the only place errors become gRPC
//! statuses. Requests are parsed into domain types here ("parse, don't validate"); the service
//! below never sees a raw string id or an unchecked map.

pub mod admin;
pub mod crypto;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Status;

use crate::domain::context::EncryptionContext;
use crate::domain::ids::KeyRef;
use crate::error::Error;
use crate::hsm::HsmError;
use crate::service::{Caller, Kms};

/// The one message every undecryptable blob gets, whatever the cause (an oracle otherwise).
pub const DECRYPT_FAILED: &str = "ciphertext_blob could not be decrypted with this encryption context";

/// The largest request message either plane accepts: a 6,144-byte blob plus an 8,192-byte
/// context and framing fit with room to spare; anything bigger is refused before decoding.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The one function that turns a service error into a gRPC status. Internal detail goes to the
/// log with the request id; the caller gets the id to quote and nothing else.
pub fn status(e: &Error, request_id: &str) -> Status {
    match e {
        Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        Error::NotFound { .. } => Status::not_found(e.to_string()),
        Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        Error::FailedPrecondition { .. } | Error::UsageExhausted { .. } => Status::failed_precondition(e.to_string()),
        Error::DecryptFailed => Status::invalid_argument(DECRYPT_FAILED),
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
            Status::internal(format!("internal error (request id {request_id})"))
        }
    }
}

/// Request ids: unique within the process and across restarts (the start time in the high
/// bits), short enough to quote on the phone.
#[derive(Debug)]
pub struct RequestIds {
    boot: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
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
}

impl Shared {
    /// Runs a service call on the blocking pool (it may wait on the HSM or SQLite) and maps its
    /// error. The span carries the request id and the operation, never a value.
    async fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Kms, &Caller) -> Result<T, Error> + Send + 'static,
    ) -> Result<(T, Caller), (Error, Caller)> {
        let caller = Caller { request_id: self.ids.next(), principal: "anonymous".into() };
        let kms = self.kms.clone();
        let span = tracing::info_span!("rpc", request_id = %caller.request_id, operation);
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let out = f(&kms, &caller);
            (out, caller)
        })
        .await;
        match joined {
            Ok((Ok(v), caller)) => Ok((v, caller)),
            Ok((Err(e), caller)) => Err((e, caller)),
            Err(join) => {
                // A panic on a request path is a bug; the caller gets a generic error.
                tracing::error!(error = %join, operation, "request task failed");
                Err((
                    Error::Hsm(HsmError::Setup { reason: "request task failed".into() }),
                    Caller { request_id: "-".into(), principal: "anonymous".into() },
                ))
            }
        }
    }
}

impl Shared {
    /// `run`, answering the gRPC way.
    async fn respond<T: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Kms, &Caller) -> Result<T, Error> + Send + 'static,
    ) -> Result<tonic::Response<T>, Status> {
        self.run(operation, f).await.map(|(v, _)| tonic::Response::new(v)).map_err(|(e, c)| status(&e, &c.request_id))
    }
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
