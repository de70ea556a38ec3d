//! Per-principal rate limits: past its burst a principal gets RESOURCE_EXHAUSTED with a retry
//! hint (message and `retry-after-ms` metadata), audited; others are not slowed; the bucket
//! refills.

use kms_proto::v1 as pb;
use kms_tests::{Options, Server};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn a_principal_over_its_rate_is_told_when_to_retry_and_others_go_on() {
    let server = Server::start_with(Options { principal_calls_per_second: 2.0, principal_burst: 5.0, ..Options::default() });
    let mut admin = server.admin().await;
    kms_tests::register_workload(&mut admin).await;
    let mut data = server.data().await;
    let random = || pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None };
    let mut refused = None;
    for _ in 0..10 {
        if let Err(e) = data.generate_random(random()).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the workload was never limited");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains(kms_tests::WORKLOAD) && e.message().contains("retry after"), "{}", e.message());
    let hint: u64 = e.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=500).contains(&hint), "{hint} ms");
    // The officer has a bucket of its own.
    admin.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    // The workload's bucket refills at two calls a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while data.generate_random(random()).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let limited: i64 = server
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE status = 'RESOURCE_EXHAUSTED' AND outcome = 'denied' AND operation = 'GenerateRandom'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(limited >= 1);
}

#[test]
fn a_negative_rate_stops_startup() {
    let server = Server::start();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    let path = server.dir.path().join("bad-limits.toml");
    std::fs::write(&path, config.replace("principal_calls_per_second = 0.0", "principal_calls_per_second = -1.0")).unwrap();
    let out = std::process::Command::new(kms_tests::bin("kms-server")).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits"), "{}", String::from_utf8_lossy(&out.stderr));
}
