//! Project automation, std only (the rust-analyzer convention):
//!
//! * `cargo xtask dev [ARGS]`: installs what is missing (SoftHSM2, from the distribution's
//!   packages), builds, and starts `kms-server dev` (token, PIN and database under `.kms-dev/`).
//! * `cargo xtask cluster [DIR]`: installs what is missing (SoftHSM2, PostgreSQL), builds, and
//!   starts three nodes over one PostgreSQL database and one token on loopback, under
//!   `.kms-cluster/` (`tests/src/bin/local-cluster.rs`).
//! * `cargo xtask test`: installs what is missing (SoftHSM2; a Python virtual environment with
//!   grpcio for the Python example client, from PyPI), builds every binary the end-to-end tests
//!   spawn (among them `kms-server-test-hooks`, the one binary with the test hooks), and runs
//!   the whole suite. `.ci/run` calls exactly this.
//! * `cargo xtask deb [OUT_DIR]`: builds `kms-server` and `kmsctl` in release mode and packages
//!   them with `packaging/build-deb.sh` (default `target/debian/`).
//!
//! No command here, and no workspace build, makes a `kms-server` with the test hooks: only
//! `kms-server-test-hooks` has them, built by `test` alone.

use std::path::Path;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("dev") => dev(&args[1..]),
        Some("cluster") => cluster(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("deb") => deb(&args[1..]),
        _ => Err(
            "usage: cargo xtask dev [kms-server dev options] | cargo xtask cluster [DIR [NODES]] | cargo xtask test [test filter] | cargo xtask deb [OUT_DIR]"
                .to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed: {status}")) }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// SoftHSM2 from Debian/Ubuntu's own packages; nothing is downloaded from anywhere else.
fn ensure_softhsm() -> Result<(), String> {
    let module_present =
        ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"].iter().any(|p| Path::new(p).exists());
    if on_path("softhsm2-util") && module_present {
        return Ok(());
    }
    eprintln!("xtask: installing SoftHSM2 from the distribution's packages");
    apt_install("softhsm2")
}

/// `apt-get install PACKAGE` (through `sudo -n` when not root).
fn apt_install(package: &str) -> Result<(), String> {
    if !on_path("apt-get") {
        return Err(format!("{package} is missing and this is not a Debian/Ubuntu system: install it with your package manager"));
    }
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut cmd = if is_root { Command::new("apt-get") } else { Command::new("sudo") };
        if !is_root {
            cmd.args(["-n", "apt-get"]);
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(&mut apt(&["install", "-y", "-qq", "--no-install-recommends", package]))
}

/// The PostgreSQL cluster a test run shares (`tests/src/bin/pg-cluster.rs`), stopped when
/// dropped, whatever the run's outcome.
struct TestCluster {
    file: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl TestCluster {
    fn start(target: &Path) -> Result<TestCluster, String> {
        let file = std::fs::canonicalize(target).map_err(|e| e.to_string())?.join("pg-test.json");
        let bin = target.join("debug/pg-cluster");
        if file.exists() {
            // Left by an interrupted run.
            let _ = Command::new(&bin).arg("stop").arg(&file).status();
        }
        run(Command::new(&bin).arg("start").arg(&file))?;
        Ok(TestCluster { file, bin })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new(&self.bin).arg("stop").arg(&self.file)) {
            eprintln!("xtask: {e}");
        }
    }
}

/// The end-to-end tests left out of the second run, over PostgreSQL: the ones about SQLite itself
/// (that copy, lock, fill or chmod the database file, the committed SQLite fixture, restore,
/// which writes a SQLite file), the build and package checks, and the cluster's and the
/// migration's, which use PostgreSQL in either run.
const FIRST_RUN_ONLY: &[&str] = &[
    "audit::verify_finds",
    "audit::signed_checkpoints",
    "audit::a_call_whose_audit_record",
    "storage::",
    "files::",
    "golden::",
    "backup::",
    "crash::",
    "builds::",
    "package::",
    "cluster::",
    "migrate::",
    "report::a_tampered",
    "quorum::a_request_expires",
];

/// PostgreSQL from Debian/Ubuntu's own packages (the tests' cluster and `cargo xtask cluster`),
/// when no `initdb` is installed.
fn ensure_postgres() -> Result<(), String> {
    let installed = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|d| d.flatten().any(|v| v.path().join("bin/initdb").exists()));
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing PostgreSQL from the distribution's packages");
    apt_install("postgresql")
}

/// curl from the distribution's packages: the XKS facade's tests sign their requests with
/// curl's own SigV4 (`--aws-sigv4`), a signer independent of the server's verifier.
fn ensure_curl() -> Result<(), String> {
    if on_path("curl") {
        return Ok(());
    }
    eprintln!("xtask: installing curl from the distribution's packages");
    apt_install("curl")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The release package.
fn deb(args: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--release", "-p", "kms-server", "-p", "kms-client", "--bins"]))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let out = args.first().cloned().unwrap_or_else(|| format!("{target}/debian"));
    run(Command::new("bash").arg("packaging/build-deb.sh").arg(Path::new(&target).join("release")).arg(out))
}

fn dev(args: &[String]) -> Result<(), String> {
    ensure_softhsm()?;
    // The same build as `cargo xtask test`, so the two share every artifact.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    run(Command::new(Path::new(&target).join("debug/kms-server")).arg("dev").args(args))
}

/// A local cluster to try several nodes with (`tests/src/bin/local-cluster.rs`): PostgreSQL,
/// one SoftHSM2 token and three nodes (or NODES) on loopback, under `.kms-cluster` unless DIR
/// is given.
fn cluster(args: &[String]) -> Result<(), String> {
    ensure_softhsm()?;
    ensure_postgres()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    run(Command::new(Path::new(&target).join("debug/local-cluster")).args(args))
}

/// A virtual environment under `target/` with what `examples/python/requirements.txt` pins, for
/// the test that runs the Python example client against a real server. Returns its python.
fn ensure_python() -> Result<std::path::PathBuf, String> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    std::fs::create_dir_all(&target).map_err(|e| format!("{target}: {e}"))?;
    let venv = std::fs::canonicalize(&target).map_err(|e| format!("{target}: {e}"))?.join("python");
    let python = venv.join("bin/python");
    let ready = || Command::new(&python).args(["-c", "import grpc, grpc_tools, cryptography"]).output().is_ok_and(|o| o.status.success());
    if !ready() {
        eprintln!("xtask: installing the Python example's packages into {}", venv.display());
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "-r", "examples/python/requirements.txt"]))?;
    }
    Ok(python)
}

fn test(args: &[String]) -> Result<(), String> {
    // The house format (rustfmt.toml) and lints (clippy.toml, the workspace's [lints]), where
    // rustfmt and clippy are installed: about a minute on 2 cores. The server is linted twice:
    // as every build makes it, and with the test hooks of the harness's own binary.
    if cargo().args(["fmt", "--version"]).output().is_ok_and(|o| o.status.success()) {
        run(cargo().args(["fmt", "--all", "--check"]))?;
    }
    if cargo().args(["clippy", "--version"]).output().is_ok_and(|o| o.status.success()) {
        run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
        run(cargo().args(["clippy", "-p", "kms-server", "--all-targets", "--features", "test-hooks", "--", "-D", "warnings"]))?;
    }
    ensure_softhsm()?;
    ensure_postgres()?;
    ensure_curl()?;
    let python = ensure_python()?;
    // The end-to-end tests spawn kms-server-test-hooks, kms-server, kmsctl and token-inspect:
    // build them first. The hooked server alone gets the feature (`--bin`), so
    // `target/debug/kms-server` stays the binary every other build makes.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["build", "-p", "kms-server", "--features", "test-hooks", "--bin", "kms-server-test-hooks"]))?;
    // The benches compile and each runs once (criterion's test mode, in the test profile so
    // nothing is compiled twice): no timing is asserted.
    run(cargo().args(["test", "-p", "kms-benches", "--benches"]))?;
    // One PostgreSQL cluster for the run: the tests of several nodes use it, and the suite runs
    // a second time with every server over it (less the SQLite-only tests).
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let cluster = TestCluster::start(Path::new(&target))?;
    // The suite runs last, so that its summary closes the output.
    let nextest = cargo().args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success());
    let suite = |backend: &str| {
        let mut cmd = cargo();
        if nextest {
            cmd.args(["nextest", "run", "--no-fail-fast"]);
        } else {
            cmd.args(["test", "--no-fail-fast"]);
        }
        match backend {
            "postgres" if nextest => {
                let names: Vec<String> = FIRST_RUN_ONLY.iter().map(|t| format!("test(/^{t}/)")).collect();
                cmd.args(["-p", "kms-tests", "--test", "e2e", "-E"]).arg(format!("not ({})", names.join(" | ")))
            }
            "postgres" => cmd.args(["-p", "kms-tests", "--test", "e2e", "--"]).args(FIRST_RUN_ONLY.iter().flat_map(|t| ["--skip", t])),
            _ => cmd.arg("--workspace"),
        };
        cmd.args(args).env("KMS_PYTHON", &python).env("KMS_TEST_PG", &cluster.file).env("KMS_TEST_BACKEND", backend);
        cmd
    };
    if nextest {
        // nextest does not run doctests.
        run(cargo().args(["test", "--workspace", "--doc"]))?;
    }
    let sqlite = run(&mut suite("sqlite"));
    let postgres = run(&mut suite("postgres"));
    sqlite.and(postgres)
}
