//! `cargo xtask cluster [DIR [NODES]]` runs this: a cluster on loopback to try several nodes with, the
//! way `kms-server dev` is one node to try the service with. A fresh one each time, under DIR
//! (default `.kms-cluster`):
//!
//! * a PostgreSQL cluster (Debian's package) with TLS, run as an unprivileged user when started
//!   as root, and one database `kms` for the nodes;
//! * one SoftHSM2 token (`DIR/softhsm`) that every node's process opens: a network HSM's
//!   partition seen by several hosts;
//! * a development PKI (`DIR/pki`), the token's backup key pair, and the first officer
//!   `dev-officer` (its passphrase and TOTP secret under DIR, for `kmsctl login --dev`);
//! * three `kms-server run` nodes (or NODES, 1 to 9: `local-cluster DIR NODES`), the build
//!   without test hooks beside this binary, each with its `kms.toml` and log under `DIR/nodeN`,
//!   data plane on 74N0, admin plane on 74N1, metrics on 74N2.
//!
//! Ctrl-C stops the nodes and PostgreSQL and removes its files (DIR stays, to read the logs).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use kms_tests::pg::Postgres;

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".kms-cluster".into()));
    // How many nodes (1 to 9: their ports are 74N0 to 74N2).
    let nodes: usize = match std::env::args().nth(2) {
        None => 3,
        Some(n) => n.parse().ok().filter(|n| (1..=9).contains(n)).with_context(|| format!("{n}: the number of nodes is 1 to 9"))?,
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the last cluster's {}", dir.display()))?;
    }
    kms_server::files::create_dir(&dir)?;
    let dir = dir.canonicalize()?;

    let postgres = Postgres::start().context("starting PostgreSQL")?;
    let url = postgres.create_database("kms")?;
    let token = hsm_sim::Token::open_or_provision(&dir.join("softhsm"), "kms-cluster")?;
    let pki = kms_server::tls::DevPki::ensure(&dir.join("pki")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let configs: Vec<PathBuf> = (1..=nodes)
        .map(|n| {
            let node = dir.join(format!("node{n}"));
            kms_server::files::create_dir(&node)?;
            let config = format!(
                "data_dir = {node:?}\n\
                 [store]\nbackend = \"postgres\"\nurl = {url:?}\npassword_file = {:?}\n\
                 [hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\n\
                 [listen]\ndata = \"127.0.0.1:74{n}0\"\nadmin = \"127.0.0.1:74{n}1\"\nmetrics = \"127.0.0.1:74{n}2\"\n\
                 [tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
                postgres.password_file, token.module, token.label, token.pin_file, pki.server_cert, pki.server_key, pki.ca_cert
            );
            let path = node.join("kms.toml");
            kms_server::files::write(&path, config.as_bytes())?;
            Ok(path)
        })
        .collect::<Result<_>>()?;

    // The kms-server built beside this binary (`cargo build --workspace --bins`).
    let kms_server = std::env::current_exe()?.with_file_name("kms-server");
    let server = |args: &[&str], config: &Path| {
        let mut cmd = Command::new(&kms_server);
        cmd.args(args).arg("--config").arg(config).env(hsm_sim::SOFTHSM2_CONF, &token.conf);
        cmd
    };
    let done = |mut cmd: Command, what: &str| -> Result<String> {
        let out = cmd.output().with_context(|| what.to_string())?;
        if !out.status.success() {
            bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let so_pin = token.so_pin_file.display().to_string();
    done(server(&["backup-key", "--so-pin-file", &so_pin], &configs[0]), "kms-server backup-key")?;
    let passphrase = random_base32()?;
    let passphrase_file = dir.join("dev-officer.passphrase");
    kms_server::files::write(&passphrase_file, passphrase.as_bytes())?;
    let passphrase_arg = passphrase_file.display().to_string();
    let enrolled =
        done(server(&["bootstrap-officer", "--name", "dev-officer", "--passphrase-file", &passphrase_arg], &configs[0]), "bootstrap-officer")?;
    let secret = kms_tests::otpauth_secret(enrolled.lines().find(|l| l.starts_with("otpauth://")).context("no enrolment URI")?);
    kms_server::files::write(&dir.join("dev-officer.totp"), secret.as_bytes())?;

    let mut children: Vec<Child> = Vec::new();
    for (n, config) in configs.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("node{}/kms.log", n + 1)))?;
        let mut child = server(&["run"], config).stdout(Stdio::piped()).stderr(log).spawn().context("starting a node")?;
        // Each node prints its listeners once it serves.
        let stdout = child.stdout.take().context("the node's output")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        if !lines.any(|l| l.is_ok_and(|l| l.starts_with("admin plane"))) {
            bail!("node {} did not start: see {}", n + 1, dir.join(format!("node{}/kms.log", n + 1)).display());
        }
        // The rest of its output, read so that the node never writes into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        children.push(child);
    }
    let list = |port: u8| (1..=nodes).map(|n| format!("https://127.0.0.1:74{n}{port}")).collect::<Vec<_>>().join(",");
    println!(
        "{nodes} nodes over PostgreSQL on 127.0.0.1:{} (database kms), one SoftHSM2 token, files under {}\n\n\
         officers (every node takes any session):\n  \
         export KMS_DEV_DIR={} KMS_ENDPOINT={} KMS_DATA_ENDPOINT={}\n  \
         kmsctl login --dev && kmsctl status && kmsctl key create --alias demo\n\n\
         a workload (kms_client::ClientConfig; calls fail over between the nodes):\n  \
         export KMS_DATA_ENDPOINT={} KMS_PKI={}\n\n\
         try: kill one node (its pid is in `pgrep -f node2/kms.toml`) and watch the others serve.\n\
         Ctrl-C stops the cluster.",
        postgres.port,
        dir.display(),
        dir.display(),
        list(1),
        list(0),
        list(0),
        dir.join("pki").display(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(tokio::signal::ctrl_c())?;
    // A terminal's Ctrl-C reached the nodes too, a `kill -INT` of this process did not: each is
    // told (again), all at once, then waited for in its graceful stop.
    for node in &children {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(node.id().to_string()).status();
    }
    for node in &mut children {
        let _ = kms_tests::wait_for(node, std::time::Duration::from_secs(15)).map_or_else(|| node.kill(), |_| Ok(()));
    }
    println!("stopped; PostgreSQL is stopped and removed with this process, the nodes' logs stay under {}", dir.display());
    Ok(())
}

/// A random passphrase (20 base32 characters from the system's random source).
fn random_base32() -> Result<String> {
    let mut raw = [0u8; 13];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
    Ok(kms_server::domain::officer::base32(&raw))
}
