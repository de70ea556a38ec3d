//! The yearly access review: last use of every access, what went unused for 90 days, and the
//! officers' sign-off.

use kms_tests::{Server, WORKLOAD, create_key};

fn review(server: &Server) -> serde_json::Value {
    let out = server.kmsctl(&["--json", "review"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn entry<'a>(r: &'a serde_json::Value, kind: &str, name: &str) -> &'a serde_json::Value {
    r["entries"].as_array().unwrap().iter().find(|e| e["kind"] == kind && e["name"] == name).unwrap_or_else(|| panic!("no {kind} {name} in {r}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn review_lists_last_uses_flags_stale_access_and_records_sign_off() {
    let mut server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "reviewed").await;
    let mut data = server.data().await;
    data.encrypt(kms_proto::v1::EncryptRequest {
        key_id: key.clone(),
        plaintext: b"x".to_vec(),
        encryption_context: Default::default(),
        caller_context: None,
    })
    .await
    .unwrap();

    let r = review(&server);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let principal = entry(&r, "principal", WORKLOAD);
    assert!((principal["last_used_time"].as_i64().unwrap() - now).abs() < 60, "{principal}");
    assert_eq!(principal["unused_90_days"], false);
    let grant = r["entries"].as_array().unwrap().iter().find(|e| e["kind"] == "grant").unwrap();
    assert!(grant["last_used_time"].as_i64().unwrap() > 0, "the grant that allowed the call is marked used");
    assert!(grant["detail"].as_str().unwrap().contains(&key));
    assert!(entry(&r, "officer", kms_tests::OFFICER)["last_used_time"].as_i64().unwrap() > 0);
    assert_eq!(r["signoff_overdue"], true, "never signed off");
    let text = server.kmsctl(&["review"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("WARNING: the access review has not been signed off"));

    let out = server.kmsctl(&["--json", "review", "sign-off", "--note", "2026 review"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = review(&server);
    assert_eq!(r["signoff_overdue"], false);
    assert_eq!(r["last_signoff_by"], kms_tests::OFFICER);
    let audited: i64 =
        server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'SignOffReview' AND detail = '2026 review'", [], |r| r.get(0)).unwrap();
    assert_eq!(audited, 1);

    // A hundred days pass without use, and more than a year since the sign-off.
    server.stop();
    let past = now - 100 * 86_400;
    server.sql(&format!(
        "UPDATE principals SET last_used_at = {past}, created_at = {past};
         UPDATE grants SET last_used_at = {past}, created_at = {past};
         UPDATE review_signoffs SET time = {};",
        now - 400 * 86_400
    ));
    server.restart();
    let r = review(&server);
    assert_eq!(entry(&r, "principal", WORKLOAD)["unused_90_days"], true);
    assert!(r["entries"].as_array().unwrap().iter().filter(|e| e["kind"] == "grant").all(|e| e["unused_90_days"] == true));
    assert_eq!(r["signoff_overdue"], true);
}
