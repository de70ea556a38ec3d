//! The AWS KMS external key store (XKS Proxy API v1.0.2): AWS KMS, and through it S3, EBS, RDS
//! and every AWS service that takes a KMS key, encrypts and decrypts under our keys, in our HSM,
//! each call authenticated (SigV4), authorised (the key store's allowed keys), audited in the
//! same chain and refused as soon as an officer disables the key.
//!
//! * [`auth`]: SigV4 verification of each request.
//! * [`framing`]: the ciphertext metadata (our key version), the AAD, the integrity value.
//! * [`listener`]: the HTTPS listener, its routes, and each call through `api::Shared`.
//! * [`wire`]: the JSON requests, answers and errors.

pub mod auth;
pub mod framing;
pub mod listener;
pub mod wire;
