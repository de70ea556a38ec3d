//! The Level 2 evidence report: drawn live from the service and its HSM, signed in the HSM, and
//! failing the item whose control is missing.

use kms_proto::v1 as pb;
use kms_tests::{Options, Server};
use serde_json::Value;

/// The report's items by id: (verdict, why).
fn verdicts(report: &Value) -> std::collections::BTreeMap<String, (String, String)> {
    report["report"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_string(), (i["verdict"].as_str().unwrap().to_string(), i["why"].as_str().unwrap().to_string())))
        .collect()
}

fn json_report(server: &Server) -> Value {
    let file = server.dir.path().join("report.json");
    let _ = std::fs::remove_file(&file);
    let out = server.kmsctl(&["report", "dgssi", "--format", "json", "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_on_a_well_kept_instance_passes_and_its_signature_holds() {
    let server = Server::start_with(Options { backup_key: true, ..Options::default() });
    let mut admin = server.admin().await;
    admin
        .create_key(pb::CreateKeyRequest { description: "payroll".into(), alias: "payroll".into(), rotation_period_seconds: 90 * 86_400 })
        .await
        .unwrap();
    admin.rotate_key(pb::RotateKeyRequest { key_id: "alias/payroll".into() }).await.unwrap();
    let totp = kms_tests::add_officer(&server, "second", "officer", "a second long passphrase").await;
    let kmsctl = |args: &[&str]| {
        let out = server.kmsctl(args);
        assert!(out.status.success(), "kmsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    kmsctl(&["review", "sign-off", "--note", "2026 review"]);
    let backup = server.dir.path().join("b.kmsbak").display().to_string();
    kmsctl(&["backup", "create", "--out", &backup]);
    kmsctl(&["backup", "verify", &backup]);
    // Incidents go to the host's syslog (a socket of the test's).
    let syslog = server.dir.path().join("syslog.sock");
    let _socket = std::os::unix::net::UnixDatagram::bind(&syslog).unwrap();
    kmsctl(&["notify", "add", &format!("syslog://{}", syslog.display()), "--min-severity", "warning"]);
    // A reversibility export, under a customer key the security officer made trusted.
    let (private, public) = (server.dir.path().join("customer-key.pem"), server.dir.path().join("customer.pem"));
    let openssl = |args: &[&str]| assert!(std::process::Command::new("openssl").args(args).status().unwrap().success(), "openssl {args:?}");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", private.to_str().unwrap()]);
    openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    let so_pin = server.token.so_pin_file.display().to_string();
    let ceremony = server.server_command(&["export-key", "--so-pin-file", &so_pin, "--public-key", public.to_str().unwrap()]).unwrap();
    assert!(ceremony.status.success(), "{}", String::from_utf8_lossy(&ceremony.stderr));
    kmsctl(&["export", "--to-public-key", public.to_str().unwrap(), "--out", server.dir.path().join("bundle").to_str().unwrap()]);

    let report = json_report(&server);
    let v = verdicts(&report);
    // Every item passes.
    assert_eq!(v.len(), 9, "{v:?}");
    for (id, (verdict, why)) in &v {
        assert_eq!(verdict, "pass", "{id}: {why}");
    }
    let text = report.to_string();
    assert!(text.contains("RotateKey") && text.contains("2 versions"), "each key's history: {text}");
    assert!(text.contains("last signed off by"), "{text}");
    assert!(!text.contains(&totp) && !text.contains("a second long passphrase"), "no secret in the report");
    let recorded: String =
        server.db().query_row("SELECT detail FROM audit WHERE operation = 'EvidenceReport' ORDER BY seq DESC", [], |r| r.get(0)).unwrap();
    assert_eq!(recorded, "9 pass, 0 warn, 0 fail");

    // Every format verifies; a changed byte does not, nor a report signed by another HSM.
    for format in ["md", "json", "html"] {
        let file = server.dir.path().join(format!("report.{format}"));
        let _ = std::fs::remove_file(&file);
        kmsctl(&["report", "dgssi", "--format", format, "--out", file.to_str().unwrap()]);
        let document = std::fs::read_to_string(&file).unwrap();
        let verified = kmsctl(&["--json", "report", "verify", file.to_str().unwrap()]);
        let verified: Value = serde_json::from_slice(&verified.stdout).unwrap();
        assert_eq!(verified["valid"], true, "{format}");
        let changed = document.replacen("pass", "fail", 1);
        assert_ne!(changed, document, "{format}");
        std::fs::write(&file, changed).unwrap();
        let out = server.kmsctl(&["report", "verify", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{format}: a changed report verifies");
        assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let html = std::fs::read_to_string(server.dir.path().join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"), "{html}");
    let markdown = kmsctl(&["report", "dgssi"]);
    assert!(String::from_utf8_lossy(&markdown.stdout).contains("## PASS — Encryption keys are known only to the customer"));
    let other = Server::start();
    let file = server.dir.path().join("report.json");
    kmsctl(&["report", "dgssi", "--format", "json", "--out", server.dir.path().join("again.json").to_str().unwrap()]);
    std::fs::copy(server.dir.path().join("again.json"), &file).unwrap();
    let out = other.kmsctl(&["report", "verify", file.to_str().unwrap()]);
    assert!(!out.status.success(), "another service's HSM does not vouch for this report");
    let out = server.kmsctl(&["report", "dgssi", "--format", "pdf"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("format"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_or_neglected_instance_fails_the_matching_items() {
    // No backup key, no backup, no review sign-off; then an officer without a second factor and
    // an audit record changed behind the service's back.
    let mut server = Server::start();
    kms_tests::add_officer(&server, "second", "officer", "a second long passphrase").await;
    let v = verdicts(&json_report(&server));
    assert_eq!(v["backups"].0, "fail", "{:?}", v["backups"]);
    assert_eq!(v["access-review"].0, "fail", "{:?}", v["access-review"]);
    assert_eq!((v["mfa"].0.as_str(), v["audit-trail"].0.as_str()), ("pass", "pass"));
    server.stop();
    let db = rusqlite::Connection::open(server.db_path()).unwrap();
    db.execute_batch("UPDATE officers SET totp_secret = x'' WHERE name = 'second'; UPDATE audit SET detail = 'forged' WHERE seq = 3").unwrap();
    drop(db);
    server.restart();
    let v = verdicts(&json_report(&server));
    assert_eq!(v["mfa"], ("fail".to_string(), "officers without a second factor: second".to_string()));
    assert_eq!(v["audit-trail"].0, "fail", "{:?}", v["audit-trail"]);
}
