//! `kmsctl status` (DescribeService): what an operator sees of the service, and its warnings
//! (the access review overdue, a version past half its usage limit, the HSM unavailable).

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key};
use serde_json::Value;

fn status(server: &Server) -> Value {
    let out = server.kmsctl(&["--json", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn warned(s: &Value, about: &str) -> bool {
    s["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains(about))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_health_keys_usage_what_is_due_and_warnings() {
    let server = Server::start_with(Options { rotation_threshold: 90, encryption_limit: 100, usage_reservation_block: 10, ..Options::default() });
    let s = status(&server);
    assert_eq!(s["health"], "ACTIVE", "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["token"]["label"], "kms-test");
    assert_eq!(s["token"]["manufacturer"], "SoftHSM project");
    assert!(s["last_probe_time"].as_i64().unwrap() > 0);
    assert_eq!(s["keys_by_state"], serde_json::json!({}));
    assert_eq!(s["review_overdue"], true);
    assert!(warned(&s, "access review"), "{s}");

    let mut admin = server.admin().await;
    let used = create_key(&mut admin, "used").await;
    let disabled = create_key(&mut admin, "disabled").await;
    admin.disable_key(pb::DisableKeyRequest { key_id: disabled }).await.unwrap();
    let doomed = create_key(&mut admin, "doomed").await;
    admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: doomed.clone(), pending_window_days: 7 }).await.unwrap();
    let out = server.kmsctl(&["--json", "key", "create", "--alias", "rotating", "--rotation-period", "10d"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotating = serde_json::from_slice::<Value>(&out.stdout).unwrap()["key_id"].as_str().unwrap().to_string();
    let mut data = server.data().await;
    for _ in 0..60 {
        data.encrypt(pb::EncryptRequest {
            key_id: used.clone(),
            plaintext: b"x".to_vec(),
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap();
    }
    server.kmsctl(&["review", "sign-off", "--note", "status test"]);

    let s = status(&server);
    assert_eq!(s["keys_by_state"], serde_json::json!({"Enabled": 2, "Disabled": 1, "PendingDestruction": 1}), "{s}");
    let top = &s["versions_nearest_limit"][0];
    assert_eq!(top["key_id"], used.as_str(), "{s}");
    assert!(top["encryptions"].as_u64().unwrap() >= 60 && top["encryption_limit"] == 100, "{s}");
    assert!(warned(&s, &format!("version 1 of key {used} has used")), "{s}");
    let due: Vec<(String, String)> =
        s["due_soon"].as_array().unwrap().iter().map(|d| (d["key_id"].as_str().unwrap().into(), d["action"].as_str().unwrap().into())).collect();
    assert!(due.contains(&(doomed, "destruction".into())), "{s}");
    assert!(due.contains(&(rotating, "rotation".into())), "{s}");
    assert_eq!(s["review_overdue"], false);
    assert!(!warned(&s, "access review"), "{s}");
    let text = String::from_utf8_lossy(&server.kmsctl(&["status"]).stdout).to_string();
    assert!(text.contains("health: ACTIVE") && text.contains("WARNING: version 1 of key"), "{text}");

    // An auditor may read it; every call is audited.
    let audited: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'DescribeService'", [], |r| r.get(0)).unwrap();
    assert_eq!(audited, 3);
}
