//! The audit trail: every call on both planes, allowed or denied, durable before the answer;
//! tampering found at its index; a failing audit write fails the call (fail closed).

use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key, ctx, eventually};

fn count(server: &Server, sql: &str) -> i64 {
    server.db().query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_audited_with_its_outcome_key_and_context() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "audited").await;
    let blob = data
        .encrypt(pb::EncryptRequest {
            key_id: "alias/audited".into(),
            plaintext: b"secret-plaintext".to_vec(),
            encryption_context: ctx(&[("tenant", "acme")]),
            caller_context: Some(pb::CallerContext { user: "jane@acme".into(), reason: "ticket 42".into(), attributes: ctx(&[("job", "nightly")]) }),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let _ = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: ctx(&[("tenant", "other")]),
            key_id: String::new(),
            caller_context: None,
        })
        .await;
    admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap();
    let _ = admin.enable_key(pb::EnableKeyRequest { key_id: "alias/missing".into() }).await;

    let db = server.db();
    type Row = (String, String, String, Option<String>, Option<String>);
    let rows: Vec<Row> = db
        .prepare("SELECT operation, outcome, status, key_id, context FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ops: Vec<(&str, &str, &str)> = rows.iter().map(|(o, out, st, _, _)| (o.as_str(), out.as_str(), st.as_str())).collect();
    assert_eq!(
        ops,
        [
            ("CreateOfficer", "allowed", "OK"),
            ("Login", "allowed", "OK"),
            ("CreateKey", "allowed", "OK"),
            ("CreatePrincipal", "allowed", "OK"),
            ("CreateGrant", "allowed", "OK"),
            ("Encrypt", "allowed", "OK"),
            ("Decrypt", "denied", "INVALID_ARGUMENT"),
            ("DescribeKey", "allowed", "OK"),
            ("EnableKey", "denied", "NOT_FOUND"),
        ]
    );
    for (op, _, _, key_id, context) in &rows[5..7] {
        assert_eq!(key_id.as_deref(), Some(key.as_str()), "{op} names its key");
        assert!(context.as_deref().unwrap().contains("tenant"), "{op} records its context");
    }
    // The caller context is recorded apart from the encryption context.
    let caller: String = db.query_row("SELECT caller_context FROM audit WHERE operation = 'Encrypt'", [], |r| r.get(0)).unwrap();
    let caller: serde_json::Value = serde_json::from_str(&caller).unwrap();
    assert_eq!(caller, serde_json::json!({"user": "jane@acme", "reason": "ticket 42", "attributes": {"job": "nightly"}}));
    let bad = data
        .encrypt(pb::EncryptRequest {
            key_id: "alias/audited".into(),
            plaintext: Vec::new(),
            encryption_context: Default::default(),
            caller_context: Some(pb::CallerContext { user: "x".repeat(257), ..Default::default() }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("caller_context"), "{}", bad.message());

    // Never a plaintext.
    let dump: String = db
        .prepare("SELECT request_id || principal || operation || IFNULL(context, '') || detail FROM audit")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!dump.contains("secret-plaintext"));

    let out = server.kmsctl(&["--json", "audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 10);
    let listed: serde_json::Value =
        serde_json::from_slice(&server.kmsctl(&["--json", "audit", "list", "--after", "1", "--limit", "2"]).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3]);

    // Export for a SIEM: JSON lines, within a time window.
    let file = server.dir.path().join("audit.jsonl");
    let out = server.kmsctl(&["audit", "export", "--since", "2020-01-01", "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 8, "{} lines", lines.len());
    assert_eq!(lines[0]["operation"], "CreateOfficer");
    assert_eq!(lines[2]["principal"], kms_tests::OFFICER, "admin calls name the officer");
    let future = server.kmsctl(&["audit", "export", "--since", "2999-01-01"]);
    assert!(future.status.success() && future.stdout.is_empty(), "nothing after 2999");
    // Tail from the start, bounded.
    let tail = server.kmsctl(&["audit", "tail", "--after", "0", "--count", "3"]);
    assert!(tail.status.success());
    let seqs: Vec<u64> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_a_modified_deleted_or_reordered_record_at_its_index() {
    let mut server = Server::start();
    kms_tests::register_workload(&mut server.admin().await).await;
    {
        let mut data = server.data().await;
        for _ in 0..20 {
            data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await.unwrap();
        }
    }
    let tamperings = [
        ("UPDATE audit SET detail = 'forged' WHERE seq = 7", 7),
        ("DELETE FROM audit WHERE seq = 12", 12),
        ("UPDATE audit SET seq = -seq WHERE seq IN (4, 5); UPDATE audit SET seq = 5 WHERE seq = -4; UPDATE audit SET seq = 4 WHERE seq = -5", 4),
    ];
    // A clean stop checkpoints the WAL into the database file.
    server.stop();
    let pristine = std::fs::read(server.db_path()).unwrap();
    for (sql, index) in tamperings {
        server.stop();
        std::fs::write(server.db_path(), &pristine).unwrap();
        rusqlite::Connection::open(server.db_path()).unwrap().execute_batch(sql).unwrap();
        server.restart();
        let out = server.kmsctl(&["--json", "audit", "verify"]);
        assert!(!out.status.success(), "{sql}: verify passed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["first_bad_index"], index, "{sql}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_audit_record_cannot_be_written_fails_closed() {
    let server = Server::start();
    kms_tests::register_workload(&mut server.admin().await).await;
    let mut data = server.data().await;
    data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await.unwrap();
    let before = count(&server, "SELECT COUNT(*) FROM audit");
    // Another process holds the database's write lock past the server's busy timeout.
    let blocker = rusqlite::Connection::open(server.db_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let e = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("audit"), "{}", e.message());
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    // The service stayed up and recovers as soon as the audit can be written again.
    data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 8, caller_context: None }).await.unwrap();
    let ops: Vec<String> = server
        .db()
        .prepare("SELECT operation || ' ' || outcome || ' ' || principal FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(count(&server, "SELECT COUNT(*) FROM audit"), before + 1, "the failed call left no record, the next one did: {ops:?}");
}

/// A call authorised before a disable and committed after it is refused at commit: it answers
/// UNAVAILABLE (retryable), its record says so and comes after the DisableKey record, and the
/// chain verifies (the writer reads the store's revocation epoch with the audit head, in the
/// batch's transaction: over PostgreSQL, with the head's lock that every node's writer takes).
#[tokio::test(flavor = "multi_thread")]
async fn a_success_that_races_a_disable_is_refused_at_commit_and_audited_as_such() {
    let server = Server::start_with(Options { pause_at: Some("Encrypt/after_hsm".into()), ..Options::default() });
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "raced").await;
    let mut data = server.data().await;
    let call = tokio::spawn(async move {
        data.encrypt(pb::EncryptRequest {
            key_id: "alias/raced".into(),
            plaintext: b"p".to_vec(),
            encryption_context: ctx(&[]),
            caller_context: None,
        })
        .await
    });
    // The encryption is done and waits three seconds before its record goes to the writer.
    eventually("the call to pause after the HSM", Duration::from_secs(10), || {
        std::fs::read_to_string(server.log_path()).is_ok_and(|log| log.contains("pausing at Encrypt/after_hsm"))
    });
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("access changed while the call ran"), "{}", e.message());

    let rows: Vec<(String, String, String)> = server
        .db()
        .prepare("SELECT operation, outcome, detail FROM audit WHERE key_id = ?1 ORDER BY seq")
        .unwrap()
        .query_map([&key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ops: Vec<(&str, &str)> = rows.iter().map(|(o, out, _)| (o.as_str(), out.as_str())).collect();
    assert_eq!(ops[ops.len() - 2..], [("DisableKey", "allowed"), ("Encrypt", "failed")], "{ops:?}");
    assert!(rows[rows.len() - 1].2.starts_with("refused at commit: access changed"), "{rows:?}");
    assert_eq!(verify(&server)["ok"], true);
}

/// Recomputes every hash from `from_seq` on, as an attacker who knows the (public) chain
/// construction but not the HSM's checkpoint key would after editing a record.
fn rechain(db: &rusqlite::Connection, from_seq: i64) {
    use kms_server::audit::StoredRecord;
    let mut stmt = db
        .prepare("SELECT seq, time, request_id, principal, operation, key_id, key_version, context, outcome, status, detail, hash, caller_context FROM audit ORDER BY seq")
        .unwrap();
    let rows: Vec<(StoredRecord, Vec<u8>)> = stmt
        .query_map([], |r| {
            Ok((
                StoredRecord {
                    seq: r.get(0)?,
                    time: r.get(1)?,
                    request_id: r.get(2)?,
                    principal: r.get(3)?,
                    operation: r.get(4)?,
                    key_id: r.get(5)?,
                    key_version: r.get(6)?,
                    context: r.get(7)?,
                    outcome: r.get(8)?,
                    status: r.get(9)?,
                    detail: r.get(10)?,
                    caller_context: r.get(12)?,
                },
                r.get(11)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut prev: [u8; 32] = if from_seq == 1 { kms_server::audit::GENESIS } else { rows[(from_seq - 2) as usize].1.clone().try_into().unwrap() };
    for (record, _) in &rows[(from_seq - 1) as usize..] {
        let hash = record.chain_hash(&prev);
        db.execute("UPDATE audit SET hash = ?1 WHERE seq = ?2", rusqlite::params![hash.to_vec(), record.seq]).unwrap();
        prev = hash;
    }
}

fn verify(server: &Server) -> serde_json::Value {
    let out = server.kmsctl(&["--json", "audit", "verify"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_checkpoints_catch_truncation_and_a_rewritten_chain_over_ten_thousand_records() {
    let mut server = Server::start_with(kms_tests::Options { checkpoint_every_records: 500, ..Default::default() });
    kms_tests::register_workload(&mut server.admin().await).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut data = server.data().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..625 {
                data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None }).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = verify(&server);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["records"].as_u64().unwrap() >= 10_001);
    // One checkpoint per 500 records, at the end of the group-commit batch that reaches them.
    assert!(v["checkpoints"].as_u64().unwrap() >= 10, "{v}");
    assert!(v["last_checkpoint_seq"].as_u64().unwrap() + 1000 >= v["records"].as_u64().unwrap(), "{v}");

    server.stop(); // signs a last checkpoint on the way out
    let pristine = std::fs::read(server.db_path()).unwrap();
    let last: i64 = server.db().query_row("SELECT MAX(seq) FROM audit_checkpoints", [], |r| r.get(0)).unwrap();
    // A consistently re-hashed chain is caught at the first signed checkpoint after the edit.
    let covering: i64 = server.db().query_row("SELECT MIN(seq) FROM audit_checkpoints WHERE seq >= 5000", [], |r| r.get(0)).unwrap();
    let records: i64 = server.db().query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0)).unwrap();
    assert_eq!(last, records, "the shutdown checkpoint covers the last record");

    type Tampering = Box<dyn Fn(&rusqlite::Connection)>;
    let cases: Vec<(Tampering, i64, &str)> = vec![
        (
            // The service's startup check finds the truncation and records it: that record
            // takes the first missing number, so the trail now ends one record later.
            Box::new(move |db| {
                db.execute("DELETE FROM audit WHERE seq > ?1", [last - 10]).unwrap();
            }),
            last - 8,
            "truncated",
        ),
        (
            Box::new(|db| {
                db.execute("UPDATE audit SET detail = 'forged' WHERE seq = 5000", []).unwrap();
                rechain(db, 5000);
            }),
            covering,
            "signed checkpoint",
        ),
        (
            Box::new(|db| {
                db.execute("UPDATE audit_checkpoints SET mac = zeroblob(32) WHERE seq = (SELECT MIN(seq) FROM audit_checkpoints)", []).unwrap();
            }),
            0,
            "bad MAC",
        ),
    ];
    for (tamper, index, problem) in cases {
        std::fs::write(server.db_path(), &pristine).unwrap();
        tamper(&rusqlite::Connection::open(server.db_path()).unwrap());
        server.restart();
        let v = verify(&server);
        assert_eq!(v["ok"], false, "{problem}: {v}");
        assert!(v["problem"].as_str().unwrap().contains(problem), "{v}");
        if index > 0 {
            assert_eq!(v["first_bad_index"], index, "{v}");
        }
        server.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_only_old_records_up_to_a_checkpoint_and_the_rest_still_verifies() {
    let options = kms_tests::Options { checkpoint_every_records: 10, audit_retention_days: 90, ..Default::default() };
    let mut server = Server::start_with(options);
    kms_tests::register_workload(&mut server.admin().await).await;
    {
        let mut data = server.data().await;
        for _ in 0..25 {
            data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None }).await.unwrap();
        }
    }
    // Nothing is 90 days old yet: a few sweeps later, nothing was removed.
    let before = count(&server, "SELECT COUNT(*) FROM audit");
    assert_eq!(count(&server, "SELECT MIN(seq) FROM audit"), 1);
    assert_eq!(verify(&server)["pruned_through_seq"], 0);

    // A hundred days pass (for retention's clock only): the records before the newest
    // checkpoint go, the checkpoint stays as the anchor, and the cut is itself audited.
    server.stop();
    server.options.retention_clock_offset = 100 * 86_400;
    server.restart();
    let pruned_through = || count(&server, "SELECT IFNULL(MIN(seq), 1) - 1 FROM audit");
    kms_tests::eventually("old records pruned", std::time::Duration::from_secs(20), || pruned_through() > 0);
    let through = pruned_through();
    assert!(through >= 20, "pruned through the checkpoint at or after record 20, not {through}");
    let anchored = count(&server, &format!("SELECT COUNT(*) FROM audit_checkpoints WHERE seq = {through}"));
    assert_eq!(anchored, 1, "the anchoring checkpoint is kept");
    assert_eq!(count(&server, &format!("SELECT COUNT(*) FROM audit_checkpoints WHERE seq < {through}")), 0);
    let prune_records = count(&server, "SELECT COUNT(*) FROM audit WHERE operation = 'AuditPrune' AND principal = 'system'");
    assert!(prune_records >= 1);
    assert!(count(&server, "SELECT COUNT(*) FROM audit") < before + prune_records + 10);

    // Back to the real clock (no more pruning); what is left verifies from its anchor.
    server.stop();
    server.options.retention_clock_offset = 0;
    server.restart();
    let v = verify(&server);
    assert_eq!(v["ok"], true, "{v}");
    let anchor = v["pruned_through_seq"].as_i64().unwrap();
    assert!(anchor >= through, "{v}");
    let human = server.kmsctl(&["audit", "verify"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("removed by retention"), "{}", String::from_utf8_lossy(&human.stdout));

    // Deleting the first kept record is found at its index, not mistaken for retention.
    server.sql(&format!("DELETE FROM audit WHERE seq = {}", anchor + 1));
    let v = verify(&server);
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad_index"], anchor + 1, "{v}");
    // Removing the anchoring checkpoint is found too.
    server.sql(&format!("DELETE FROM audit_checkpoints WHERE seq = {anchor}"));
    let v = verify(&server);
    assert_eq!(v["ok"], false);
    assert!(v["problem"].as_str().unwrap().contains("missing"), "{v}");
}

#[test]
fn a_retention_under_ninety_days_stops_startup() {
    let server = Server::start();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    let path = server.dir.path().join("short-retention.toml");
    for (days, accepted) in [(89, false), (90, true), (0, true)] {
        std::fs::write(&path, config.replace("retention_days = 0", &format!("retention_days = {days}"))).unwrap();
        let out = std::process::Command::new(kms_tests::bin("kms-server")).arg("check-config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), accepted, "{days} days: {err}");
        if !accepted {
            assert!(err.contains("audit.retention_days") && err.contains("at least 90"), "{err}");
        }
    }
}
