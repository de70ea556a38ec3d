//! criterion benches of the key management service (`cargo bench -p kms-benches`).
//!
//! `benches/domain.rs`: the domain code alone (blob encode and parse, canonical encryption
//! context). The HSM-layer and end-to-end benches and the load generator come with the
//! throughput work (issue 5).
