//! The domain: no I/O. Key ids and aliases, the encryption context, the wrapped-blob format, the
//! key state machine, the AES-GCM usage budget and the grant check.

pub mod blob;
pub mod budget;
pub mod context;
pub mod hex;
pub mod ids;
pub mod lifecycle;
pub mod officer;
pub mod policy;
pub mod rate;
