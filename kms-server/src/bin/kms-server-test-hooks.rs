//! `kms-server` with the end-to-end test hooks (`hooks.rs`): built only by the test harness
//! (`cargo xtask test`), never by a workspace build (it needs the `test-hooks` feature, which no
//! crate turns on), and it refuses to start outside the harness.

fn main() -> anyhow::Result<()> {
    kms_server::cli::main()
}
