//! The Prometheus metrics listener: the named series after a few calls, and nothing secret or
//! caller-supplied in it.

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, ctx};

/// The value of the one series `line_start` begins (metric name and labels).
fn value(body: &str, line_start: &str) -> f64 {
    let line = body.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no {line_start} in:\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_expose_requests_hsm_audit_keys_and_usage_without_secrets() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "measured").await;
    let context = ctx(&[("tenant", "context-value-never-in-metrics")]);
    let mut encrypted = Vec::new();
    for _ in 0..3 {
        let r = data
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: b"plaintext-never-in-metrics".to_vec(),
                encryption_context: context.clone(),
                caller_context: None,
            })
            .await
            .unwrap();
        encrypted.push(r.into_inner().ciphertext_blob);
    }
    let refused = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: vec![1, 2, 3],
            encryption_context: context.clone(),
            key_id: String::new(),
            caller_context: None,
        })
        .await;
    assert!(refused.is_err());

    let (status, body) = server.http_get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(value(&body, "kms_requests_total{rpc=\"Encrypt\",code=\"OK\"}"), 3.0);
    assert_eq!(value(&body, "kms_requests_total{rpc=\"Decrypt\",code=\"INVALID_ARGUMENT\"}"), 1.0);
    assert_eq!(value(&body, "kms_request_duration_seconds_count{rpc=\"Encrypt\"}"), 3.0);
    assert!(value(&body, "kms_hsm_calls_total{function=\"C_Encrypt\",result=\"ok\"}") >= 3.0);
    assert!(value(&body, "kms_hsm_call_duration_seconds_count{function=\"C_Encrypt\"}") >= 3.0);
    assert!(value(&body, "kms_audit_batch_records_count") >= 1.0);
    assert!(value(&body, "kms_audit_commit_duration_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert_eq!(value(&body, "kms_keys{state=\"Enabled\"}"), 1.0);
    assert_eq!(value(&body, "kms_keys{state=\"Destroyed\"}"), 0.0);
    assert!(value(&body, &format!("kms_key_version_encryptions{{key_id=\"{key}\",version=\"1\"}}")) >= 3.0);
    assert!(value(&body, &format!("kms_key_version_encryptions_remaining{{key_id=\"{key}\",version=\"1\"}}")) > 3.0e9);
    assert_eq!(value(&body, "kms_hsm_up"), 1.0);
    assert_eq!(value(&body, "kms_hsm_sessions_max"), 4.0);
    assert_eq!(value(&body, "kms_access_review_overdue"), 1.0);
    assert!(body.contains("# TYPE kms_requests_total counter"));
    // Nothing a caller sent, and nothing secret.
    for secret in ["context-value-never-in-metrics", "tenant", "plaintext-never-in-metrics", kms_tests::OFFICER_PASSPHRASE, &server.session] {
        assert!(!body.contains(secret), "{secret} in the metrics");
    }
    assert!(encrypted.iter().all(|blob| !body.contains(&String::from_utf8_lossy(blob).to_string())));

    let (status, _) = server.http_get("/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn a_metrics_listener_off_loopback_stops_startup() {
    let server = Server::start();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    let path = server.dir.path().join("remote-metrics.toml");
    std::fs::write(&path, config.replace("metrics = \"127.0.0.1:0\"", "metrics = \"0.0.0.0:9464\"")).unwrap();
    let out = std::process::Command::new(kms_tests::bin("kms-server")).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen.metrics") && err.contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_parse_and_carry_the_request_id_and_key() {
    let mut server = Server::start_with(kms_tests::Options { json_logs: true, ..Default::default() });
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "logged").await;
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    server.stop();
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.len() > 5);
    let changed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "key state changed" && l["fields"]["key_id"] == key.as_str())
        .unwrap_or_else(|| panic!("no state change logged:\n{log}"));
    assert_eq!(changed["span"]["operation"], "DisableKey", "{changed}");
    assert!(!changed["span"]["request_id"].as_str().unwrap().is_empty(), "{changed}");
    assert!(!log.contains(kms_tests::OFFICER_PASSPHRASE) && !log.contains(&server.session));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_alert_rules_name_only_series_the_service_exposes() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    let mut data = server.data().await;
    data.encrypt(pb::EncryptRequest { key_id: key, plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None })
        .await
        .unwrap();
    let (_, body) = server.http_get("/metrics");
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/alerts.yml")).unwrap();
    let mut names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("kms_"))
        .map(|w| w.trim_end_matches("_bucket"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(body.contains(&format!("# TYPE {name} ")), "docs/alerts.yml names {name}, which /metrics does not expose");
    }
}
