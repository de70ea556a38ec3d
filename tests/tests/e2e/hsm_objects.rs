//! TESTPLAN R8: the PKCS#11 attributes of every key object, and extraction attempts from a
//! second process logged in as the user.

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key};

#[tokio::test(flavor = "multi_thread")]
async fn every_key_object_is_sensitive_pinned_and_cannot_be_extracted() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let a = create_key(&mut admin, "").await;
    create_key(&mut admin, "").await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: a }).await.unwrap();

    let objects = server.token_objects();
    assert_eq!(objects.len(), 3);
    for o in &objects {
        let label = o["label"].as_str().unwrap();
        assert!(label.starts_with("kms:"), "{label}");
        let expect = [
            ("token", true),
            ("private", true),
            ("sensitive", true),
            ("always_sensitive", true),
            ("modifiable", false),
            ("encrypt", true),
            ("decrypt", true),
            ("wrap", false),
            ("unwrap", false),
            ("sign", false),
            ("verify", false),
            ("derive", false),
            // Extractable only under a trusted wrapping key, for backups (templates.rs).
            ("extractable", true),
            ("wrap_with_trusted", true),
        ];
        for (attr, want) in expect {
            assert_eq!(o[attr].as_bool(), Some(want), "{label}: {attr} in {o}");
        }
        assert_eq!(o["value_len"].as_u64(), Some(32), "{label}: AES-256");
        assert_eq!(o["allowed_mechanisms"], serde_json::json!(["CKM_AES_GCM"]), "{label}");
        assert_eq!(o["id"].as_str().unwrap().len(), 40, "CKA_ID is the key id and version");
    }

    // The service's own keys: the audit checkpoint key signs and verifies only; the health
    // canary only encrypts; neither is readable.
    let all: Vec<serde_json::Value> = serde_json::from_slice(&server.inspect("list")).unwrap();
    let by_label = |label: &str| all.iter().find(|o| o["label"] == label).unwrap_or_else(|| panic!("no {label}")).clone();
    let mac = by_label("kms-audit-hmac");
    for (attr, want) in [
        ("sensitive", true),
        ("modifiable", false),
        ("sign", true),
        ("verify", true),
        ("encrypt", false),
        ("decrypt", false),
        ("wrap", false),
        ("wrap_with_trusted", true),
    ] {
        assert_eq!(mac[attr].as_bool(), Some(want), "audit key: {attr}");
    }
    assert_eq!(mac["allowed_mechanisms"], serde_json::json!(["CKM_SHA256_HMAC"]));
    let canary = by_label("kms-health-canary");
    for (attr, want) in [("sensitive", true), ("extractable", false), ("encrypt", true), ("decrypt", false)] {
        assert_eq!(canary[attr].as_bool(), Some(want), "canary: {attr}");
    }

    let attacked: Vec<serde_json::Value> = serde_json::from_slice(&server.inspect("attack")).unwrap();
    assert_eq!(attacked.len(), 6, "three key versions and the three keys of the service itself");
    for o in attacked {
        let a = &o["attack"];
        for attempt in ["value_readable", "set_extractable", "set_not_sensitive", "set_wrap", "copy_readable", "wrapped_by_untrusted"] {
            assert_eq!(a[attempt].as_bool(), Some(false), "{}: {attempt} was allowed", o["label"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_backup_key_pair_on_the_token_no_key_can_be_unwrapped_into_a_readable_object() {
    // The attack: wrap an object under the trusted public backup key, unwrap it with the private
    // one into a session object that is not sensitive, read its value. The private key's
    // CKA_UNWRAP_TEMPLATE makes the HSM refuse that unwrap.
    let server = Server::start_with(kms_tests::Options { backup_key: true, ..Default::default() });
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "guarded").await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: key }).await.unwrap();
    let attacked: Vec<serde_json::Value> = serde_json::from_slice(&server.inspect("attack")).unwrap();
    let labels: Vec<&str> = attacked.iter().map(|o| o["label"].as_str().unwrap()).collect();
    assert_eq!(attacked.len(), 5, "two versions, the audit and officer keys and the canary: {labels:?}");
    for o in &attacked {
        let a = &o["attack"];
        for attempt in ["value_readable", "set_extractable", "set_not_sensitive", "set_wrap", "copy_readable", "wrapped_by_untrusted"] {
            assert_eq!(a[attempt].as_bool(), Some(false), "{}: {attempt} was allowed", o["label"]);
        }
        assert_eq!(a["readable_through_backup_key"].as_bool(), Some(false), "{}: read through the backup key", o["label"]);
    }
    // The ceremony run again finds the guarded pair and keeps it; status has nothing to say.
    let so_pin = server.token.so_pin_file.display().to_string();
    let out = server.server_command(&["backup-key", "--so-pin-file", &so_pin]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = server.kmsctl(&["status"]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains("CKA_UNWRAP_TEMPLATE"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_key_pair_without_its_unwrap_template_is_refused_by_the_ceremony_and_reported() {
    let mut server = Server::start();
    server.inspect("make-unguarded-backup-key");
    let so_pin = server.token.so_pin_file.display().to_string();
    let out = server.server_command(&["backup-key", "--so-pin-file", &so_pin]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the ceremony accepted an unguarded pair");
    assert!(stderr.contains("without CKA_UNWRAP_TEMPLATE") && stderr.contains("run kms-server backup-key again"), "{stderr}");
    // The service looks at the pair when it starts (as after an upgrade over an old pair).
    server.restart();
    server.relogin();
    let out = server.kmsctl(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("without CKA_UNWRAP_TEMPLATE"), "status does not warn: {stdout}");
}
