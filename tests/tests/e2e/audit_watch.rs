//! The service verifies its audit trail on its own initiative (at startup from the last signed
//! checkpoint, each segment as its checkpoint is signed, the whole trail soon after startup and
//! then daily): a tampered trail shows in `kmsctl status`, in the `kms_audit_verified` metric and
//! in the trail itself, and the service keeps serving.

use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key, eventually, gdk};

fn options() -> Options {
    Options { checkpoint_every_records: 10, ..Options::default() }
}

/// `kmsctl status --json`'s audit section.
fn audit_status(server: &Server) -> serde_json::Value {
    let out = server.kmsctl(&["--json", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["audit"].clone()
}

/// Audited calls: each admin read is one record.
async fn records(server: &Server, n: usize) {
    let mut admin = server.admin().await;
    for _ in 0..n {
        admin.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    }
}

/// The details of the `AuditVerificationFailed` records in the trail.
fn failure_records(server: &Server) -> Vec<String> {
    let db = server.db();
    let mut stmt = db.prepare("SELECT detail FROM audit WHERE operation = 'AuditVerificationFailed' ORDER BY seq").unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// The service still answers both planes.
async fn still_serving(server: &Server, key: &str) {
    let mut data = server.data().await;
    data.generate_data_key(gdk(key, &[])).await.expect("the data plane serves");
    let out = server.kmsctl(&["key", "describe", key]);
    assert!(out.status.success(), "the admin plane serves: {}", String::from_utf8_lossy(&out.stderr));
}

fn broken_at(status: &serde_json::Value, record: i64, by: &str) -> bool {
    let problem = status["problem"].as_str().unwrap_or_default();
    status["verified"] == false && problem.starts_with(&format!("record {record}: ")) && problem.contains(by)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_and_a_deletion_made_while_stopped_are_found_without_being_asked() {
    let mut server = Server::start_with(options());
    let key = create_key(&mut server.admin().await, "watched").await;
    records(&server, 60).await;
    assert_eq!(audit_status(&server)["verified"], true);
    assert_eq!(server.metric("kms_audit_verified"), Some(1.0));

    // An insider edits one record's principal and deletes another while the service is stopped.
    server.stop();
    server.sql("UPDATE audit SET principal = 'someone-else' WHERE seq = 20; DELETE FROM audit WHERE seq = 40;");
    server.restart();

    // The whole trail is checked soon after startup, in the background; nobody asked.
    eventually("the service finds the tampering", Duration::from_secs(30), || broken_at(&audit_status(&server), 20, "scheduled check"));
    assert_eq!(server.metric("kms_audit_verified"), Some(0.0));
    let failures = failure_records(&server);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with("record 20: the record or the one before it was modified"), "{failures:?}");
    let out = server.kmsctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("audit trail: DOES NOT VERIFY: record 20") && text.contains("WARNING: the audit trail does not verify"), "{text}");
    still_serving(&server, &key).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_changed_after_the_last_checkpoint_is_found_by_the_startup_check() {
    let mut server = Server::start_with(options());
    let key = create_key(&mut server.admin().await, "watched").await;
    records(&server, 15).await;
    // A clean stop signs a last checkpoint over the last record; changing that record is seen
    // before the service serves again.
    server.stop();
    let last: i64 = server.db().query_row("SELECT MAX(seq) FROM audit_checkpoints", [], |r| r.get(0)).unwrap();
    server.sql(&format!("UPDATE audit SET detail = 'forged' WHERE seq = {last}"));
    server.restart();
    let status = audit_status(&server);
    assert!(broken_at(&status, last, "startup check"), "{status}");
    assert!(failure_records(&server)[0].contains("differs from its signed checkpoint"));
    still_serving(&server, &key).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_head_is_not_taken_for_retention() {
    let mut server = Server::start_with(options());
    let key = create_key(&mut server.admin().await, "watched").await;
    records(&server, 30).await;
    // The head deleted up to and including a signed checkpoint's record, with no retention
    // record to account for it: what retention leaves, short of its record.
    server.stop();
    let cut: i64 = server.db().query_row("SELECT MIN(seq) FROM audit_checkpoints WHERE seq > 10", [], |r| r.get(0)).unwrap();
    server.sql(&format!("DELETE FROM audit WHERE seq <= {cut}; DELETE FROM audit_checkpoints WHERE seq < {cut};"));
    server.restart();
    eventually("the deleted head found", Duration::from_secs(30), || {
        let s = audit_status(&server);
        s["verified"] == false && s["problem"].as_str().unwrap_or_default().contains("the head was deleted")
    });
    still_serving(&server, &key).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_changed_while_the_service_runs_is_found_when_its_segment_is_signed() {
    let server = Server::start_with(options());
    let key = create_key(&mut server.admin().await, "watched").await;
    records(&server, 25).await;
    eventually("the trail verified", Duration::from_secs(30), || {
        let s = audit_status(&server);
        s["verified"] == true && s["last_full_check_time"].as_i64() > Some(0)
    });
    // An edit past the last checkpoint, through a second connection while the service writes.
    let last: i64 = server.db().query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).unwrap();
    server.sql(&format!("UPDATE audit SET principal = 'someone-else' WHERE seq = {last}"));
    // Enough records for the next checkpoint; the sweeper checks the new segment within a
    // second.
    records(&server, 12).await;
    eventually("the segment check finds the edit", Duration::from_secs(30), || broken_at(&audit_status(&server), last, "newly signed segment"));
    assert_eq!(server.metric("kms_audit_verified"), Some(0.0));
    assert_eq!(failure_records(&server).len(), 1);
    still_serving(&server, &key).await;
}
