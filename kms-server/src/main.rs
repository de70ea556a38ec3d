//! `kms-server`: thin — the command line is `kms_server::cli`.

fn main() -> anyhow::Result<()> {
    kms_server::cli::main()
}
