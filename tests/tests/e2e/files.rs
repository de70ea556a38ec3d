//! Every file the service and kmsctl write is private to their user whatever the umask, and the
//! service refuses to start on a database other accounts can read.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kms_tests::{Options, Server, bin, with_umask};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// Every file under `dir` is 0600 and every directory 0700 (the paths that are not are listed).
fn exposed_under(dir: &Path) -> Vec<String> {
    let mut exposed = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let (m, want) = (mode(&path), if path.is_dir() { 0o700 } else { 0o600 });
        if m != want {
            exposed.push(format!("{} {m:o}", path.display()));
        }
        if path.is_dir() {
            exposed.extend(exposed_under(&path));
        }
    }
    exposed
}

#[test]
fn the_database_backups_and_exports_are_private_under_a_permissive_umask() {
    let mut server = Server::start_with(Options { umask: Some(0), backup_key: true, ..Options::default() });
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(server.kmsctl(&["key", "create", "--alias", "files"]));
    let backup = server.dir.path().join("kms.kmsbak");
    let export = server.dir.path().join("audit.jsonl");
    ok(server.kmsctl(&["backup", "create", "--out", backup.to_str().unwrap()]));
    ok(server.kmsctl(&["audit", "export", "--out", export.to_str().unwrap()]));
    for name in ["kms.db", "kms.db-wal", "kms.db-shm"] {
        assert_eq!(mode(&server.dir.path().join(name)), 0o600, "{name}");
    }
    assert_eq!(mode(&backup), 0o600, "the backup");
    assert_eq!(mode(&export), 0o600, "the audit export");
    // kmsctl's own login, into a directory it makes.
    let passphrase = server.dir.path().join("officer.passphrase");
    let session = server.dir.path().join("sessions/officer");
    let code = kms_tests::totp_now(&server.officer_totp, 1);
    let login = ["login", "--name", kms_tests::OFFICER, "--passphrase-file", passphrase.to_str().unwrap(), "--totp", &code];
    ok(server.kmsctl_with_session(&session, &login));
    assert_eq!(mode(&session), 0o600, "kmsctl's session");
    assert_eq!(mode(session.parent().unwrap()), 0o700, "kmsctl's session directory");

    // A database others can read: the service names it and does not start; check-config too.
    server.stop();
    for name in ["kms.db", "kms.db-wal"] {
        let path = server.dir.path().join(name);
        if !path.exists() {
            continue;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let out = Command::new(bin("kms-server")).args(args).arg(server.config_path()).output().unwrap();
            assert!(!out.status.success(), "{args:?} accepted a readable {name}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&path.display().to_string()) && err.contains("chmod 600"), "{args:?}: {err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    server.restart();
    ok(server.kmsctl(&["key", "describe", "alias/files"]));
}

#[test]
fn development_mode_makes_every_directory_0700_and_every_file_0600_under_a_permissive_umask() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("new/dev");
    let mut dev = Command::new(bin("kms-server"));
    dev.args([
        "dev",
        "--data-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--xks-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&data_dir)
    .env("KMS_LOG", "warn");
    let mut child = with_umask(dev, Some(0)).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    // Serving means the database, the token, the PKI and the development officer are made.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let serving = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(60)).ok()).any(|line| line.starts_with("try:"));
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = kms_tests::wait_for(&mut child, Duration::from_secs(20));
    assert!(serving, "kms-server dev did not start");
    assert_eq!(mode(&root.path().join("new")), 0o700);
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(exposed_under(&data_dir), Vec::<String>::new());
}
