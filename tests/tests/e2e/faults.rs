//! TESTPLAN R7 on the data plane: faults injected below the `Hsm` trait (in the real PKCS#11
//! path, `test-hooks` builds) at the HSM calls a data-plane request makes, each of the 8 faults
//! at each site. The call answers UNAVAILABLE, or DEADLINE_EXCEEDED for a hang, within the HSM
//! deadline (2 s), is audited as failed and changes nothing; health goes NOT_SERVING while the
//! probe's own calls are faulted; the first call after the fault clears succeeds within 1 s.

use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const FAULTS: [&str; 8] = [
    "CKR_DEVICE_ERROR",
    "CKR_SESSION_HANDLE_INVALID",
    "CKR_SESSION_CLOSED",
    "CKR_TOKEN_NOT_PRESENT",
    "CKR_DEVICE_REMOVED",
    "CKR_USER_NOT_LOGGED_IN",
    "CKR_GENERAL_ERROR",
    "hang",
];

/// The HSM functions a data-plane call goes through, and the call that reaches each.
const SITES: [&str; 3] = ["C_GenerateRandom", "C_Encrypt", "C_Decrypt"];

#[tokio::test(flavor = "multi_thread")]
async fn every_fault_at_every_data_plane_hsm_call() {
    for site in SITES {
        for fault in FAULTS {
            let case = format!("{site} {fault}");
            // A server per case: a hang holds a session (and the probe another) for 10 s.
            let mut server = Server::start();
            let key = create_key(&mut server.admin().await, "").await;
            let mut data = server.data().await;
            let gdk = || pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                key_spec: 1,
                number_of_bytes: 0,
                encryption_context: Default::default(),
                caller_context: None,
            };
            let blob = {
                let mut r = data.generate_data_key(gdk()).await.unwrap().into_inner();
                std::mem::take(&mut r.ciphertext_blob)
            };
            let decrypt = || pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: Default::default(),
                key_id: String::new(),
                caller_context: None,
            };
            let before = server.state_snapshot();

            server.hsm_fault(Some(&case));
            let started = Instant::now();
            let result =
                if site == "C_Decrypt" { data.decrypt(decrypt()).await.map(|_| ()) } else { data.generate_data_key(gdk()).await.map(|_| ()) };
            let took = started.elapsed();
            let e = result.expect_err(&case);
            let want = match (site, fault) {
                (_, "hang") => Code::DeadlineExceeded,
                // SoftHSM2 answers a forged tag with CKR_GENERAL_ERROR too, so a device that
                // says it on C_Decrypt gets the uniform decrypt refusal (SOFTHSM-NOTES.md).
                ("C_Decrypt", "CKR_GENERAL_ERROR") => Code::InvalidArgument,
                _ => Code::Unavailable,
            };
            assert_eq!(e.code(), want, "{case}: {e}");
            assert!(took < Duration::from_millis(2500), "{case}: answered after {took:?}");
            if want != Code::InvalidArgument {
                assert!(e.message().contains("retry later"), "{case}: {}", e.message());
            }
            if site != "C_Decrypt" {
                // The health probe encrypts under the canary: it sees the same fault.
                let mut health = HealthClient::new(server.channel(&server.data_addr).await);
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let check =
                        tokio::time::timeout(Duration::from_secs(1), health.check(HealthCheckRequest { service: "kms.v1.Crypto".into() })).await;
                    if matches!(check, Ok(Ok(ref r)) if r.get_ref().status == ServingStatus::NotServing as i32) {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{case}: health never went NOT_SERVING");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            assert_eq!(server.state_snapshot(), before, "{case}: a faulted call changed state");

            server.hsm_fault(None);
            let cleared = Instant::now();
            loop {
                let ok = if site == "C_Decrypt" { data.decrypt(decrypt()).await.is_ok() } else { data.generate_data_key(gdk()).await.is_ok() };
                if ok {
                    break;
                }
                assert!(cleared.elapsed() < Duration::from_secs(1), "{case}: no success within 1 s of the fault clearing");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let failed: i64 = server
                .db()
                .query_row("SELECT COUNT(*) FROM audit WHERE outcome IN ('failed', 'denied') AND principal = ?1", [kms_tests::WORKLOAD], |r| r.get(0))
                .unwrap();
            assert!(failed >= 1, "{case}: the faulted call was not audited");
            // Hung threads would hold a graceful stop for their 10 s.
            server.kill9();
        }
    }
}
