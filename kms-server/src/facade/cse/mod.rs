//! Google Workspace client-side encryption: the key access control list service (KACLS) API
//! that Drive, Docs, Meet and Calendar call to wrap and unwrap their data encryption keys, so
//! that Google holds wrapped keys only. Each call carries two tokens (the customer's identity
//! provider's and Google's), both checked; the wrapped key is our blob, bound to the resource
//! name and perimeter, under a key of this service, so that a disable cuts Google off as it
//! cuts every other caller.
//!
//! Built so far: [`jwt`] (the tokens' signatures, issuers, audiences and times) and [`wire`]
//! (the claims' checks between the tokens, the wrapped key's envelope, the resource key hash,
//! the structured error). The listener and its operations are not served yet.

pub mod jwt;
pub mod listener;
pub mod wire;
