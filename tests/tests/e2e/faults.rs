//! TESTPLAN R7 on the data plane: faults injected below the `Hsm` trait (in the real PKCS#11
//! path, `test-hooks` builds) at the HSM calls a data-plane request makes, each of the 8 faults
//! at each site. The call answers UNAVAILABLE, or DEADLINE_EXCEEDED for a hang, within the HSM
//! deadline (2 s), is audited as failed and changes nothing; health goes NOT_SERVING while the
//! probe's own calls are faulted; the first call after the fault clears succeeds within 1 s.

use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, eventually};
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
            let gdk = || kms_tests::gdk(&key, &[]);
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

/// The HSM loses the process's login (a real `C_Logout` on the anchor session), or the device
/// fails and takes the library's state with it (a real `C_Finalize`): the failing call answers
/// UNAVAILABLE, the service checks the link, logs in again or initialises the library again, and
/// the next call succeeds within a second, without a restart. Every key still works.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_login_or_a_failed_library_is_repaired_without_a_restart() {
    // With a backup key pair the data plane runs on session copies. They are not private
    // objects, so a lost login does not stop them: the copies' thread finds it within a second,
    // logs in on a new anchor and closes the old one with the copies, which are made again in
    // the new generation.
    for (action, copies) in [("logout", false), ("finalize", false), ("logout", true), ("finalize", true)] {
        let what = format!("{action}, session copies {copies}");
        let mut server = Server::start_with(kms_tests::Options { backup_key: copies, ..kms_tests::Options::default() });
        let mut admin = server.admin().await;
        let key = create_key(&mut admin, "").await;
        let mut data = server.data().await;
        let gdk = || kms_tests::gdk(&key, &[]);
        let blob = std::mem::take(&mut data.generate_data_key(gdk()).await.unwrap().into_inner().ciphertext_blob);
        if copies {
            eventually("the copy", Duration::from_secs(10), || server.metric(super::copies::COPIES) == Some(1.0));
        }

        server.hsm_fault(Some(&format!("C_Encrypt {action}")));
        let first = data.generate_data_key(gdk()).await;
        if action == "logout" && copies {
            first.unwrap_or_else(|e| panic!("{what}: the copy serves on after a logout: {e}"));
        } else {
            let e = first.expect_err(&what);
            assert_eq!(e.code(), Code::Unavailable, "{what}: {e}");
        }
        server.hsm_fault(None);
        if action == "logout" && copies {
            eventually("the copies' thread to find the lost login", Duration::from_secs(5), || {
                std::fs::read_to_string(server.log_path()).is_ok_and(|log| log.contains("logging in again"))
            });
        }

        let cleared = Instant::now();
        loop {
            if data.generate_data_key(gdk()).await.is_ok() {
                break;
            }
            if cleared.elapsed() > Duration::from_secs(1) {
                panic!("{what}: no success within 1 s:\n{}", std::fs::read_to_string(server.log_path()).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let decrypt =
            pb::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: String::new(), caller_context: None };
        data.decrypt(decrypt).await.unwrap_or_else(|e| panic!("{what}: an old blob after the repair: {e}"));
        if copies {
            eventually("the copy made again in the new generation", Duration::from_secs(10), || {
                super::copies::calls(&server, "C_UnwrapKey") >= 2.0 && server.metric(super::copies::COPIES) == Some(1.0)
            });
        }
        admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap_or_else(|e| panic!("{what}: rotate after the repair: {e}"));
        data.generate_data_key(gdk()).await.unwrap_or_else(|e| panic!("{what}: the new version: {e}"));
        let log = std::fs::read_to_string(server.log_path()).unwrap();
        let said = if action == "logout" { "logging in again" } else { "initialised again" };
        assert!(log.contains(said), "{what}: the repair was not logged:\n{log}");
        server.stop();
    }
}

/// TESTPLAN R7 on the admin plane: the 7 error faults at each HSM call an officer's request
/// makes (opening a session, key generation, finding the backup key, wrapping, signing,
/// verifying), and a hang at key generation: UNAVAILABLE (DEADLINE_EXCEEDED for the hang) with a
/// retry hint, nothing changed (no row, no HSM object), and the call works once the fault is
/// gone.
#[tokio::test(flavor = "multi_thread")]
async fn every_fault_at_every_admin_plane_hsm_call() {
    let server = Server::start_with(kms_tests::Options { backup_key: true, ..kms_tests::Options::default() });
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    let backup = server.dir.path().join("faults.kmsbak").display().to_string();
    let out = server.kmsctl(&["backup", "create", "--out", &backup]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let objects = || server.token_objects().len();

    // (site, what reaches it)
    let sites = [
        ("C_GenerateKey", "create"),
        ("C_GenerateKey", "rotate"),
        ("C_FindObjects", "backup"),
        ("C_WrapKey", "backup"),
        ("C_Sign", "backup"),
        ("C_Verify", "verify-backup"),
        ("C_OpenSession", "open"),
    ];
    for (site, call) in sites {
        for fault in FAULTS.iter().filter(|f| **f != "hang") {
            let case = format!("{site} {fault} ({call})");
            let (state, hsm_objects) = (server.state_snapshot(), objects());
            server.hsm_fault(Some(&format!("{site} {fault}")));
            let failure = match call {
                "create" => admin.create_key(pb::CreateKeyRequest::default()).await.err(),
                "open" => {
                    // A session is opened only when the pool has none idle: empty it first (a
                    // session that fails with a session-level error is closed), then call. The
                    // health probe may refill it in between, so try a few times.
                    let mut data = server.data().await;
                    let mut refused = None;
                    for _ in 0..20 {
                        server.hsm_fault(Some("* CKR_SESSION_CLOSED"));
                        for _ in 0..6 {
                            let _ = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await;
                        }
                        server.hsm_fault(Some(&format!("{site} {fault}")));
                        if let Err(e) = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await {
                            refused = Some(e);
                            break;
                        }
                    }
                    refused
                }
                "rotate" => admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.err(),
                "backup" | "verify-backup" => {
                    let args: &[&str] = if call == "backup" { &["backup", "create", "--out", "/dev/null"] } else { &["backup", "verify", &backup] };
                    let out = server.kmsctl(args);
                    assert!(!out.status.success(), "{case}: succeeded");
                    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
                    assert!(stderr.contains("Unavailable") && stderr.contains("retry later"), "{case}: {stderr}");
                    None
                }
                _ => unreachable!(),
            };
            if let Some(e) = failure {
                assert_eq!(e.code(), Code::Unavailable, "{case}: {e}");
                assert!(e.message().contains("retry later"), "{case}: {}", e.message());
            } else {
                assert!(call.contains("backup"), "{case}: the call succeeded");
            }
            assert_eq!(server.state_snapshot(), state, "{case}: a faulted call changed state");
            assert_eq!(objects(), hsm_objects, "{case}: a faulted call left an HSM object");
            server.hsm_fault(None);
        }
    }
    // Once the faults are gone every call works.
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    let out = server.kmsctl(&["backup", "verify", &backup]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A hang at key generation: DEADLINE_EXCEEDED at the deadline, and the key the HSM makes
    // when it finally answers is rolled back, so nothing changed.
    let (state, hsm_objects) = (server.state_snapshot(), objects());
    server.hsm_fault(Some("C_GenerateKey hang"));
    let started = Instant::now();
    let e = admin.create_key(pb::CreateKeyRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(started.elapsed() < Duration::from_millis(2800), "answered after {:?}", started.elapsed());
    server.hsm_fault(None);
    eventually("the late key rolled back", Duration::from_secs(15), || {
        server
            .db()
            .query_row("SELECT COUNT(*) FROM audit WHERE operation = 'CreateKey' AND status = 'DEADLINE_EXCEEDED'", [], |r| r.get::<_, i64>(0))
            .unwrap()
            >= 1
            && server.db().query_row("SELECT COUNT(*) FROM intents", [], |r| r.get::<_, i64>(0)).unwrap() == 0
    });
    assert_eq!(server.state_snapshot(), state, "the late key left a row");
    assert_eq!(objects(), hsm_objects, "the late key left an HSM object");
}

/// C_DestroyObject failing, with each error fault, when the sweeper destroys a key whose
/// window has passed: the key stays PendingDestruction with its objects (nothing half-done, no
/// intent left behind), and the sweeper finishes the destruction once the HSM answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_destruction_the_hsm_refuses_is_retried_by_the_sweeper_until_done() {
    let mut server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key.clone(), pending_window_days: 7 }).await.unwrap();
    server.stop();
    server.sql("UPDATE keys SET destruction_at = 1");
    server.hsm_fault(Some("C_DestroyObject CKR_DEVICE_ERROR"));
    server.restart();
    let state = |server: &Server| server.db().query_row("SELECT state FROM keys", [], |r| r.get::<_, String>(0)).unwrap();
    let refusals = |server: &Server| std::fs::read_to_string(server.log_path()).unwrap().matches("sweep failed; will retry").count();
    for fault in FAULTS.iter().filter(|f| **f != "hang") {
        server.hsm_fault(Some(&format!("C_DestroyObject {fault}")));
        let before = refusals(&server);
        eventually(&format!("{fault}: a refused sweep"), Duration::from_secs(10), || refusals(&server) >= before + 2);
        assert_eq!(state(&server), "PendingDestruction", "{fault}");
        assert_eq!(server.token_objects().len(), 2, "{fault}: both versions' objects are still there");
        let intents: i64 = server.db().query_row("SELECT COUNT(*) FROM intents", [], |r| r.get(0)).unwrap();
        assert_eq!(intents, 0, "{fault}: a refused destroy leaves no intent behind");
    }

    server.hsm_fault(None);
    eventually("the destruction finished", Duration::from_secs(10), || state(&server) == "Destroyed");
    assert!(server.token_objects().is_empty(), "no object left");
}

/// The login is lost while the HSM no longer accepts the service's PIN (as when it was changed
/// on the HSM behind the service's back; injected, since SoftHSM2 keeps the PIN it loaded): the
/// service tries to log in again once, is refused (CKR_PIN_INCORRECT), and never tries again
/// however many calls fail after, so that it cannot lock the token.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_pin_is_never_tried_a_second_time() {
    let server = Server::start();
    let key = create_key(&mut server.admin().await, "").await;
    let mut data = server.data().await;
    let gdk = || kms_tests::gdk(&key, &[]);
    data.generate_data_key(gdk()).await.unwrap();

    server.hsm_fault(Some("C_Login CKR_PIN_INCORRECT\nC_Encrypt logout"));
    assert_eq!(data.generate_data_key(gdk()).await.unwrap_err().code(), Code::Unavailable);
    server.hsm_fault(Some("C_Login CKR_PIN_INCORRECT"));
    // Calls go on failing (the login is gone) for longer than the longest backoff would allow a
    // second attempt after the first failed repair (2 s).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(data.generate_data_key(gdk()).await.unwrap_err().code(), Code::Unavailable);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    let attempts = log.lines().filter(|l| l.contains("logging in again")).count();
    assert_eq!(attempts, 1, "the service logged in again {attempts} times with a refused PIN:\n{log}");
    assert!(log.contains("the HSM refused the user PIN (CKR_PIN_INCORRECT)"), "{log}");
    assert_eq!(log.matches("could not be repaired").count(), 1, "{log}");
}
