//! End-to-end tests: the real server binary, SoftHSM2, a SQLite file, gRPC on loopback and
//! `kmsctl`. One test binary with a module per capability, to keep link time down.

mod audit;
mod backup;
mod batch;
mod builds;
mod cache;
mod copies;
mod crash;
mod envelope;
mod faults;
mod files;
mod fuzz;
mod golden;
mod grants;
mod health;
mod hsm_objects;
mod identity;
mod kill9;
mod kmsctl;
mod leaks;
mod lifecycle;
mod limits;
mod load;
mod matrix;
mod metrics;
mod officers;
mod package;
mod persistence;
mod python;
mod rate;
mod review;
mod shutdown;
mod status;
mod storage;
mod tamper;
mod usage;
