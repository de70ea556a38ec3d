//! The service's one error enum. `api::status` is the only place it becomes a gRPC status.

use std::fmt;

use crate::domain::ids::KeyId;
use crate::hsm::HsmError;
use crate::store::StoreError;

#[derive(Debug)]
pub enum Error {
    /// A malformed request; `field` is the request field at fault.
    InvalidArgument {
        field: &'static str,
        reason: String,
    },
    /// The named key or alias does not exist.
    NotFound {
        what: String,
    },
    /// An alias that is already taken.
    AlreadyExists {
        what: String,
    },
    /// The caller did not prove who they are (no or a bad session, failed login).
    Unauthenticated {
        reason: String,
    },
    /// The caller may not do this: an unknown or disabled principal, or no grant (also for a key
    /// that does not exist, so that keys cannot be probed for).
    PermissionDenied {
        reason: String,
    },
    /// The key or version does not allow the operation in its current state.
    FailedPrecondition {
        reason: String,
    },
    /// A call a quorum policy covers: it did not run; request `request_id` was made, and runs
    /// once `required` officers other than the caller approve it.
    ApprovalRequired {
        request_id: String,
        required: u32,
    },
    /// A blob could not be decrypted. Deliberately without detail: every cause (bad tag, wrong
    /// context, unknown key or version, destroyed version, truncation, bad header) is this one
    /// variant, so the caller cannot learn which.
    DecryptFailed,
    /// The version reached its AES-GCM usage limit (NIST SP 800-38D) and no rotation was possible.
    UsageExhausted {
        key_id: KeyId,
        version: u32,
    },
    /// The call did not finish within the HSM deadline (`hsm.deadline_ms`); the work it started
    /// is abandoned (its result, if it comes, is dropped and wiped).
    Deadline {
        after: std::time::Duration,
    },
    /// The caller is over its rate limit; it may call again after `retry_after`.
    RateLimited {
        principal: String,
        retry_after: std::time::Duration,
    },
    /// Every data-plane worker is busy and the queue in front of them is full (`workers`).
    Overloaded,
    /// Not a failure: a dry run (`Caller::commit_point`) stopped before its first write, every
    /// check against the live state and the caller's rights passed; `would` says what the call
    /// would have changed. The API layer answers it as a success, with nothing written.
    DryRun {
        would: String,
    },
    Hsm(HsmError),
    Store(StoreError),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl fmt::Display) -> Error {
        Error::InvalidArgument { field, reason: reason.to_string() }
    }

    pub fn precondition(reason: impl fmt::Display) -> Error {
        Error::FailedPrecondition { reason: reason.to_string() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { field, reason } => write!(f, "{field} {reason}"),
            Error::NotFound { what } => write!(f, "{what} not found"),
            Error::AlreadyExists { what } => write!(f, "{what} already exists"),
            Error::FailedPrecondition { reason } | Error::PermissionDenied { reason } | Error::Unauthenticated { reason } => f.write_str(reason),
            Error::DecryptFailed => f.write_str("the ciphertext blob could not be decrypted"),
            Error::UsageExhausted { key_id, version } => {
                write!(f, "version {version} of key {key_id} reached its encryption limit and the key could not be rotated")
            }
            Error::Deadline { after } => write!(f, "the HSM did not answer within {} ms", after.as_millis()),
            Error::RateLimited { principal, retry_after } => {
                write!(f, "principal {principal} is over its rate limit; retry after {} ms", retry_after.as_millis().max(1))
            }
            Error::Overloaded => f.write_str("the service is overloaded: every worker is busy and the queue is full"),
            Error::DryRun { would } => write!(f, "dry run: would {would}"),
            Error::ApprovalRequired { request_id, required } => write!(
                f,
                "approval required: request {request_id} was made; it runs once {required} officers other than you approve it \
                 (kmsctl approval approve {request_id})"
            ),
            Error::Hsm(e) => e.fmt(f),
            Error::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<HsmError> for Error {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::DecryptFailed => Error::DecryptFailed,
            other => Error::Hsm(other),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
