//! The Python example client (`examples/python/kms_envelope.py`, grpcio over mutual TLS) against
//! the real server, so the example cannot rot: a file round-trips, the service audited both calls
//! under the workload's identity, and a changed encryption context is refused.
//! `cargo xtask test` makes the Python environment and passes it as `KMS_PYTHON`.

use std::path::PathBuf;
use std::process::Command;

use kms_tests::{Server, create_key};

fn python() -> PathBuf {
    let python = std::env::var_os("KMS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/python/bin/python")));
    assert!(python.exists(), "{} is missing: `cargo xtask test` installs the Python example's packages", python.display());
    python
}

fn example(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python/kms_envelope.py"))
        .args(args)
        .args(["--endpoint", &server.data_addr, "--pki", server.pki_dir().to_str().unwrap()])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_round_trips_a_file_through_the_service() {
    let server = Server::start();
    create_key(&mut server.admin().await, "py").await;
    let dir = server.dir.path();
    let (input, sealed, output) = (dir.join("in.txt"), dir.join("in.txt.enc"), dir.join("out.txt"));
    let contents = "a secret written from Python\n".repeat(1000);
    std::fs::write(&input, &contents).unwrap();

    let out = example(
        &server,
        &["encrypt", "--key", "alias/py", "--context", "app=hr", "--in", input.to_str().unwrap(), "--out", sealed.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = std::fs::read(&sealed).unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("a secret written"), "the file is encrypted");
    let out = example(&server, &["decrypt", "--in", sealed.to_str().unwrap(), "--out", output.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), contents);

    let audited: i64 = server
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE principal = ?1 AND status = 'OK' AND operation IN ('GenerateDataKey', 'Decrypt') AND context LIKE '%app%'",
            [kms_tests::WORKLOAD],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, 2);

    // The stored context is what the service checks: changing it makes the data key unrecoverable.
    let header_end = stored.iter().position(|b| *b == b'\n').unwrap();
    let header = String::from_utf8(stored[..header_end].to_vec()).unwrap();
    assert!(header.contains("\"app\": \"hr\""), "{header}");
    let mut tampered = header.replace("\"app\": \"hr\"", "\"app\": \"it\"").into_bytes();
    tampered.extend_from_slice(&stored[header_end..]);
    std::fs::write(&sealed, tampered).unwrap();
    let out = example(&server, &["decrypt", "--in", sealed.to_str().unwrap(), "--out", output.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kms: INVALID_ARGUMENT"), "{}", String::from_utf8_lossy(&out.stderr));
}
