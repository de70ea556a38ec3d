//! The cloud providers' own doors to the same keys: thin adapters beside [`crate::api`], over
//! the same service, the same audit trail and the same lifecycle. Each turns its protocol into
//! service calls and the service's errors into its protocol's.
//!
//! * [`xks`]: the AWS KMS external key store proxy API (XKS Proxy API v1).
//! * [`cse`]: Google Workspace client-side encryption's key service (KACLS), in progress.

pub mod cse;
pub mod https;
pub mod xks;
