//! The officer's CLI, end to end: every command through `kmsctl` against the real server.

use kms_tests::Server;
use serde_json::Value;

fn ok_json(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = server.kmsctl(&all);
    assert!(out.status.success(), "kmsctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kmsctl {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn fails(server: &Server, args: &[&str]) -> String {
    let out = server.kmsctl(args);
    assert!(!out.status.success(), "kmsctl {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!err.is_empty());
    err
}

#[test]
fn officer_workflow_through_kmsctl() {
    let server = Server::start();
    let created = ok_json(&server, &["key", "create", "--alias", "payroll", "--description", "HR data", "--rotation-period", "365d"]);
    let id = created["key_id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "ENABLED");
    assert_eq!(created["rotation_period_seconds"], 365 * 86_400);
    assert_eq!(created["aliases"], serde_json::json!(["alias/payroll"]));

    let described = ok_json(&server, &["key", "describe", "alias/payroll"]);
    assert_eq!(described["key_id"], id.as_str());
    assert_eq!(described["versions"][0]["primary"], true);

    let rotated = ok_json(&server, &["key", "rotate", &id]);
    assert_eq!(rotated["primary_version"], 2);
    let versions = ok_json(&server, &["key", "versions", &id]);
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);

    assert_eq!(ok_json(&server, &["key", "disable", &id])["state"], "DISABLED");
    assert_eq!(ok_json(&server, &["key", "enable", &id])["state"], "ENABLED");
    assert_eq!(ok_json(&server, &["key", "version", "disable", &id, "1"])["state"], "DISABLED");
    assert_eq!(ok_json(&server, &["key", "version", "enable", &id, "1"])["state"], "ENABLED");
    assert_eq!(ok_json(&server, &["key", "version", "schedule-destruction", &id, "1", "--pending-days", "7"])["state"], "PENDING_DESTRUCTION");
    assert_eq!(ok_json(&server, &["key", "version", "cancel-destruction", &id, "1"])["state"], "DISABLED");

    let alias = ok_json(&server, &["alias", "create", "alias/second", &id]);
    assert_eq!(alias["key_id"], id.as_str());
    assert_eq!(ok_json(&server, &["alias", "list", "--key", &id]).as_array().unwrap().len(), 2);
    ok_json(&server, &["alias", "delete", "alias/second"]);
    assert_eq!(ok_json(&server, &["key", "list"]).as_array().unwrap().len(), 1);

    // Least privilege: the workload may do nothing until granted.
    let denied = fails(&server, &["data-key", "generate", "--key", "alias/payroll", "--context", "app=hr"]);
    assert!(denied.contains("PermissionDenied"), "{denied}");
    assert_eq!(ok_json(&server, &["principal", "add", kms_tests::WORKLOAD])["state"], "Enabled");
    let grant = ok_json(
        &server,
        &[
            "grant",
            "create",
            "--principal",
            kms_tests::WORKLOAD,
            "--key",
            "alias/payroll",
            "--operations",
            "GenerateDataKey,Decrypt",
            "--require",
            "app=hr",
        ],
    );
    assert_eq!(grant["operations"], serde_json::json!(["GenerateDataKey", "Decrypt"]));
    assert_eq!(ok_json(&server, &["grant", "list", "--key", "alias/payroll"]).as_array().unwrap().len(), 1);
    let denied = fails(&server, &["data-key", "generate", "--key", "alias/payroll", "--context", "app=other"]);
    assert!(denied.contains("PermissionDenied"), "the grant's context condition holds: {denied}");

    // A data key and a file of any size, encrypted and decrypted through the envelope format.
    let dk = ok_json(&server, &["data-key", "generate", "--key", "alias/payroll", "--context", "app=hr"]);
    assert_eq!(dk["key_version"], 2);
    assert!(dk["plaintext"].as_str().unwrap().len() >= 44);
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("report.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&plain, &data).unwrap();
    let sealed = dir.path().join("report.enc");
    let opened = dir.path().join("report.out");
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    ok_json(&server, &["encrypt", "--key", "alias/payroll", "--in", &p(&plain), "--out", &p(&sealed), "--context", "app=hr"]);
    assert_ne!(std::fs::read(&sealed).unwrap(), data);
    ok_json(&server, &["decrypt", "--in", &p(&sealed), "--out", &p(&opened), "--context", "app=hr"]);
    assert_eq!(std::fs::read(&opened).unwrap(), data);
    let err = fails(&server, &["decrypt", "--in", &p(&sealed), "--out", &p(&opened), "--context", "app=other"]);
    assert!(err.contains("encryption context"), "{err}");

    // Disabling the principal cuts it off from the next call; enabling restores it.
    ok_json(&server, &["principal", "disable", kms_tests::WORKLOAD]);
    let err = fails(&server, &["decrypt", "--in", &p(&sealed), "--out", &p(&opened)]);
    assert!(err.contains("disabled"), "{err}");
    ok_json(&server, &["principal", "enable", kms_tests::WORKLOAD]);
    assert_eq!(ok_json(&server, &["principal", "list"])[0]["state"], "Enabled");

    // Disabling the key cuts the file off; enabling restores it.
    ok_json(&server, &["key", "disable", "alias/payroll"]);
    let err = fails(&server, &["decrypt", "--in", &p(&sealed), "--out", &p(&dir.path().join("x"))]);
    assert!(err.contains("Disabled"), "{err}");
    assert!(!dir.path().join("x").exists(), "no partial output is left behind");
    ok_json(&server, &["key", "enable", "alias/payroll"]);

    // Revoking the grant cuts the workload off from the next call.
    let grant_id = grant["grant_id"].as_str().unwrap();
    ok_json(&server, &["grant", "revoke", grant_id]);
    let err = fails(&server, &["decrypt", "--in", &p(&sealed), "--out", &p(&opened)]);
    assert!(err.contains("PermissionDenied"), "{err}");

    // Errors are one line.
    let err = fails(&server, &["key", "compromise", &id]);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(err.lines().count(), 1);
    let err = fails(&server, &["key", "describe", "alias/nope"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("NotFound"), "{err}");
    fails(&server, &["key", "schedule-destruction", &id, "--pending-days", "31"]);
    assert_eq!(ok_json(&server, &["key", "compromise", &id, "--yes"])["state"], "COMPROMISED");
    assert_eq!(ok_json(&server, &["key", "schedule-destruction", &id])["state"], "PENDING_DESTRUCTION");
    assert_eq!(ok_json(&server, &["key", "cancel-destruction", &id])["state"], "COMPROMISED");
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let out = std::process::Command::new(kms_tests::bin("kmsctl")).args(["--endpoint", "http://127.0.0.1:9", "key", "list"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("kmsctl: error: cannot reach the service"), "{err}");
}
