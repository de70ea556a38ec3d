//! A disk that fills up, and a database that becomes read-only (TESTPLAN R1's storage faults,
//! injected by the `test-hooks` build as SQLite's own SQLITE_FULL and SQLITE_READONLY): every
//! call fails closed with UNAVAILABLE and a retry hint, a data key is never handed out
//! unaudited, nothing changes (no row, no HSM object left behind), the service stays up, and it
//! recovers by itself when the disk has room or the file is writable again.

use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key};
use tonic::Code;

fn objects(server: &Server) -> usize {
    server.token_objects().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_or_a_read_only_database_fails_every_call_closed_and_the_service_recovers() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    let mut data = server.data().await;
    data.generate_data_key(kms_tests::gdk(&key, &[("app", "storage")])).await.unwrap();

    for fault in ["disk-full", "read-only"] {
        server.store_fault(Some(fault));
        // The database may still have room in its last page: the first refusal comes within a
        // page's worth of records.
        let mut refused = None;
        for _ in 0..500 {
            if let Err(e) = data.generate_data_key(kms_tests::gdk(&key, &[("app", "storage")])).await {
                refused = Some(e);
                break;
            }
        }
        let e = refused.unwrap_or_else(|| panic!("{fault}: 500 calls answered"));
        assert_eq!(e.code(), Code::Unavailable, "{fault}: {e}");
        assert!(e.message().contains("audit trail could not be written; retry later"), "{fault}: {}", e.message());

        let (state, hsm_objects) = (server.state_snapshot(), objects(&server));
        for _ in 0..5 {
            let e = data.generate_data_key(kms_tests::gdk(&key, &[("app", "storage")])).await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{fault}: every later call fails closed too");
        }
        let e = admin.create_key(pb::CreateKeyRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{fault}: {e}");
        assert!(e.message().contains("retry later"), "{fault}: {}", e.message());
        let e = admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{fault}: {e}");
        assert_eq!(server.state_snapshot(), state, "{fault}: a refused call changed a row");
        assert_eq!(objects(&server), hsm_objects, "{fault}: a refused create left an HSM object");

        // The process is still up and answers health checks.
        let (status, _) = server.http_get("/metrics");
        assert!(status.contains("200"), "{fault}: {status}");

        server.store_fault(None);
        let started = std::time::Instant::now();
        kms_tests::eventually(&format!("{fault}: calls succeed again"), Duration::from_secs(5), || {
            let rt = tokio::runtime::Handle::current();
            let (mut data, key) = (data.clone(), key.clone());
            std::thread::spawn(move || rt.block_on(async move { data.generate_data_key(kms_tests::gdk(&key, &[("app", "storage")])).await.is_ok() }))
                .join()
                .unwrap()
        });
        assert!(started.elapsed() < Duration::from_secs(1), "{fault}: recovery took {:?}", started.elapsed());
        admin.create_key(pb::CreateKeyRequest::default()).await.unwrap();
    }
    let verify = server.kmsctl(&["--json", "audit", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}
