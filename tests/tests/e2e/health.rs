//! Health and reflection on both listeners, so standard tooling works without our files.

use kms_tests::Server;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

#[tokio::test(flavor = "multi_thread")]
async fn both_planes_report_serving_for_their_own_service() {
    let server = Server::start();
    for (addr, service) in [(&server.data_addr, "kms.v1.Crypto"), (&server.admin_addr, "kms.v1.KeyManagement")] {
        let mut health = HealthClient::new(server.channel(addr).await);
        for name in [service, ""] {
            let r = health.check(HealthCheckRequest { service: name.into() }).await.unwrap().into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{addr} {name:?}");
        }
    }
    // The data plane does not serve the admin service, and the other way round.
    let mut data_admin = kms_proto::v1::key_management_client::KeyManagementClient::new(server.channel(&server.data_addr).await);
    let e = data_admin.list_keys(kms_proto::v1::ListKeysRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let mut admin_data = kms_proto::v1::crypto_client::CryptoClient::new(server.channel(&server.admin_addr).await);
    let e = admin_data.generate_random(kms_proto::v1::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_goes_not_serving_and_requests_unavailable_when_the_hsm_loses_its_objects() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "").await;
    let mut health = HealthClient::new(server.channel(&server.data_addr).await);
    // Take the token's objects away from SoftHSM2 (it re-reads them on every use of a token key).
    std::fs::rename(server.token.dir.join("tokens"), server.token.dir.join("tokens-gone")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = health.check(HealthCheckRequest { service: "kms.v1.Crypto".into() }).await.unwrap().into_inner();
        if r.status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health never went NOT_SERVING");
        tokio::task::yield_now().await;
    }
    let mut data = server.data().await;
    let e = data
        .encrypt(kms_proto::v1::EncryptRequest {
            key_id: key,
            plaintext: b"x".to_vec(),
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("retry later"), "{}", e.message());
    // The operator's status says so, with the reason.
    let out = server.kmsctl(&["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["health"], "UNAVAILABLE", "{status}");
    assert!(!status["health_detail"].as_str().unwrap().is_empty());
    assert!(status["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().starts_with("the HSM is unavailable")), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_each_planes_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = Server::start();
    for (addr, service) in [(&server.data_addr, "kms.v1.Crypto"), (&server.admin_addr, "kms.v1.KeyManagement")] {
        let mut client = ServerReflectionClient::new(server.channel(addr).await);
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let response = responses.message().await.unwrap().expect("one response");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("not a service list") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == service), "{addr}: {names:?}");
        assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{addr}: {names:?}");
    }
}

/// The deep health check's middle state: the probe (under the canary) succeeds but requests'
/// HSM calls failed in the last minute: DEGRADED, with the failures listed in `kmsctl status`
/// and the state in the metrics; gRPC health still SERVING.
#[tokio::test(flavor = "multi_thread")]
async fn failed_hsm_calls_with_a_healthy_probe_report_degraded_with_the_last_errors() {
    let server = kms_tests::Server::start();
    let key = kms_tests::create_key(&mut server.admin().await, "").await;
    let status = |server: &kms_tests::Server| -> serde_json::Value {
        let out = server.kmsctl(&["--json", "status"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(status(&server)["health"], "ACTIVE");

    let mut data = server.data().await;
    let mut r = data.generate_data_key(kms_tests::gdk(&key, &[])).await.unwrap().into_inner();
    let blob = std::mem::take(&mut r.ciphertext_blob);
    server.hsm_fault(Some("C_Decrypt CKR_DEVICE_ERROR"));
    let request =
        kms_proto::v1::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: String::new(), caller_context: None };
    assert_eq!(data.decrypt(request).await.unwrap_err().code(), tonic::Code::Unavailable);
    server.hsm_fault(None);

    let s = status(&server);
    assert_eq!(s["health"], "DEGRADED", "{s}");
    let errors = s["recent_hsm_errors"].as_array().unwrap();
    assert!(errors[0].as_str().unwrap().ends_with("C_Decrypt DeviceError"), "{s}");
    assert!(s["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("HSM calls failed")), "{s}");
    let (_, metrics) = server.http_get("/metrics");
    assert!(metrics.contains("kms_health{state=\"DEGRADED\"} 1"), "{metrics}");
    let mut health = HealthClient::new(server.channel(&server.data_addr).await);
    let r = health.check(HealthCheckRequest { service: "kms.v1.Crypto".into() }).await.unwrap().into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32, "degraded still serves");
}

/// A caller's tampered ciphertext is the caller's fault, not the HSM's: refused, counted in the
/// metrics as a failed C_Decrypt, but the health stays ACTIVE with no HSM error listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_ciphertext_does_not_make_the_health_degraded() {
    let server = kms_tests::Server::start();
    let key = kms_tests::create_key(&mut server.admin().await, "").await;
    let mut data = server.data().await;
    let mut r = data.generate_data_key(kms_tests::gdk(&key, &[])).await.unwrap().into_inner();
    let mut blob = std::mem::take(&mut r.ciphertext_blob);
    *blob.last_mut().unwrap() ^= 1;
    let request =
        kms_proto::v1::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: String::new(), caller_context: None };
    assert_eq!(data.decrypt(request).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let out = server.kmsctl(&["--json", "status"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&s["health"], s["recent_hsm_errors"].as_array().map(Vec::len)), (&serde_json::json!("ACTIVE"), Some(0)), "{s}");
    let (_, metrics) = server.http_get("/metrics");
    assert!(metrics.contains("kms_hsm_calls_total{function=\"C_Decrypt\",result=\"error\"} 1"), "{metrics}");
}
