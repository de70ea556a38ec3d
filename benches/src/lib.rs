//! criterion benches of the key management service (`cargo bench -p kms-benches`), three layers:
//!
//! * `benches/domain.rs`: the domain code alone (blob encode and parse, canonical encryption
//!   context, the policy check);
//! * `benches/hsm.rs`: the HSM layer alone on SoftHSM2 through cryptoki (random bytes, AES-GCM
//!   under a session copy and under a token object, the data plane's whole HSM work), on 1 and 2
//!   threads: the physical limit the service is measured against;
//! * `benches/e2e.rs`: GenerateDataKey, Decrypt, Encrypt, ReEncrypt and the batch calls over
//!   mutual TLS against the real `kms-server` binary, at several concurrencies, beside an empty
//!   call (the health check) on the same connection: the gRPC ceiling of the same run.
//!
//! `src/bin/kms-load.rs` is the load generator for what criterion does poorly; `xks-load` and
//! `cse-load` load the cloud facades, over what `https_load` gives both.

pub mod https_load;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The environment variable that tells a re-executed bench where its token is.
const TOKEN_DIR: &str = "KMS_BENCH_TOKEN_DIR";

/// Makes sure this process runs against its own SoftHSM2 token: SoftHSM2 reads `SOFTHSM2_CONF`
/// when PKCS#11 is initialised, and changing the environment of a running process is unsound,
/// so the first call provisions a token in a temporary directory and re-runs the bench (same
/// arguments) with the variable set, then exits with the child's status. In the child it
/// returns the token.
pub fn softhsm_process(label: &str) -> hsm_sim::Token {
    if let Some(dir) = std::env::var_os(TOKEN_DIR) {
        return hsm_sim::Token::open_or_provision(&PathBuf::from(dir), label).expect("the bench's token");
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token_dir = dir.path().join("softhsm");
    let token = hsm_sim::Token::open_or_provision(&token_dir, label).expect("a SoftHSM2 token (is softhsm2 installed?)");
    let status = std::process::Command::new(std::env::current_exe().expect("the bench's path"))
        .args(std::env::args_os().skip(1))
        .env(TOKEN_DIR, &token_dir)
        .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
        .status()
        .expect("re-running the bench");
    drop(dir);
    std::process::exit(status.code().unwrap_or(1));
}

/// Runs `op` `iters` times spread over `threads` threads and returns the wall time: criterion's
/// `iter_custom` for a multi-threaded throughput figure.
pub fn on_threads(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let share = iters / threads as u64 + u64::from(t < iters % threads as u64);
            let op = &op;
            s.spawn(move || (0..share).for_each(|_| op()));
        }
    });
    start.elapsed()
}
