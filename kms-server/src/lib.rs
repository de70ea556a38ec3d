//! The client-held key management service.
//!
//! A gRPC service in front of the customer's HSM (PKCS#11): customer keys are born, used and
//! destroyed inside the HSM; cloud workloads get data keys wrapped under them (envelope
//! encryption) over the data plane, and security officers manage the keys' lifecycle over the
//! admin plane. See ARCHITECTURE.md for the map and the invariants.
//!
//! * [`domain`]: no I/O — ids, the encryption context, the blob format, the state machine, the
//!   AES-GCM usage budget.
//! * [`hsm`]: the narrow HSM trait and its PKCS#11 implementation; all attribute templates.
//! * [`store`]: SQLite, every SQL statement.
//! * [`audit`]: audit records and their hash chain.
//! * [`service`]: the operations, startup recovery and background work.
//! * [`api`]: the gRPC boundary.
//! * [`facade`]: the cloud providers' own APIs (AWS XKS), beside `api` over the same service.

pub mod api;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod facade;
pub mod files;
pub mod hooks;
pub mod hsm;
pub mod metrics;
pub mod migrate;
pub mod notify;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod workers;
