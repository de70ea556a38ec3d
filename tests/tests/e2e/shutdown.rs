//! Graceful shutdown: SIGTERM under load stops the listeners, lets the calls in flight finish,
//! writes their audit records and a last signed checkpoint, and exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_finishes_audits_and_exits_zero() {
    let mut server = Server::start();
    let key = create_key(&mut server.admin().await, "").await;
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (mut data, key, answered) = (server.data().await, key.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let request = || pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                key_spec: 1,
                number_of_bytes: 0,
                encryption_context: Default::default(),
                caller_context: None,
            };
            while data.generate_data_key(request()).await.is_ok() {
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    kms_tests::eventually("load running", Duration::from_secs(10), || answered.load(Ordering::SeqCst) > 200);
    let status = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(30))).expect("the server exits");
    assert!(status.success(), "{status}");
    for c in clients {
        c.await.unwrap();
    }
    let answered = answered.load(Ordering::SeqCst);
    let db = server.db();
    let audited: i64 = db.query_row("SELECT COUNT(*) FROM audit WHERE operation = 'GenerateDataKey' AND status = 'OK'", [], |r| r.get(0)).unwrap();
    assert!(audited as u64 >= answered, "{audited} audited, {answered} answered");
    let (last, checkpoint): (i64, i64) =
        db.query_row("SELECT (SELECT MAX(seq) FROM audit), (SELECT MAX(seq) FROM audit_checkpoints)", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!(checkpoint, last, "the last checkpoint covers the last record");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
}
