//! Restarts, kill -9 and the destruction sweep: keys, versions, counters and states survive;
//! destroyed versions leave no HSM object and a tombstone.

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, ctx, eventually};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn keys_versions_counters_and_states_survive_restart_and_kill9() {
    let mut server = Server::start();
    let (a, b, blob, described) = {
        let mut admin = server.admin().await;
        let mut data = server.data().await;
        let a = create_key(&mut admin, "a").await;
        let b = create_key(&mut admin, "b").await;
        admin.rotate_key(pb::RotateKeyRequest { key_id: a.clone() }).await.unwrap();
        admin.disable_key(pb::DisableKeyRequest { key_id: b.clone() }).await.unwrap();
        let mut blob = Vec::new();
        for i in 0..10 {
            blob = data
                .encrypt(pb::EncryptRequest { key_id: a.clone(), plaintext: vec![i], encryption_context: ctx(&[("n", "1")]), caller_context: None })
                .await
                .unwrap()
                .into_inner()
                .ciphertext_blob;
        }
        let described = admin.describe_key(pb::DescribeKeyRequest { key_id: a.clone() }).await.unwrap().into_inner();
        (a, b, blob, described)
    };
    let used_before = described.versions.iter().find(|v| v.version == 2).unwrap().encryptions;
    assert_eq!(used_before, 10);

    for restart in [Server::restart as fn(&mut Server), Server::restart_after_kill9] {
        restart(&mut server);
        let mut admin = server.admin().await;
        let mut data = server.data().await;
        let d = admin.describe_key(pb::DescribeKeyRequest { key_id: "alias/a".into() }).await.unwrap().into_inner();
        let key = d.key.unwrap();
        assert_eq!((key.key_id.as_str(), key.primary_version), (a.as_str(), 2));
        assert_eq!(d.versions.len(), 2);
        let v2 = d.versions.iter().find(|v| v.version == 2).unwrap();
        assert!(v2.encryptions >= used_before, "the persisted count covers every acknowledged encryption");
        let b_state = admin.describe_key(pb::DescribeKeyRequest { key_id: b.clone() }).await.unwrap().into_inner().key.unwrap().state;
        assert_eq!(b_state, pb::KeyState::Disabled as i32);
        let mut dec = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[("n", "1")]),
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(std::mem::take(&mut dec.plaintext), vec![9]);
    }
    let integrity: String = server.db().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn destruction_sweep_destroys_hsm_objects_and_keeps_a_tombstone() {
    let mut server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let doomed = create_key(&mut admin, "doomed").await;
    let kept = create_key(&mut admin, "kept").await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: kept.clone() }).await.unwrap();
    let blob = data
        .encrypt(pb::EncryptRequest {
            key_id: doomed.clone(),
            plaintext: b"gone".to_vec(),
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let kept_v1_blob = data
        .encrypt(pb::EncryptRequest { key_id: kept.clone(), plaintext: b"v2".to_vec(), encryption_context: Default::default(), caller_context: None })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: doomed.clone(), pending_window_days: 7 }).await.unwrap();
    admin
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest { key_id: kept.clone(), key_version: 1, pending_window_days: 7 })
        .await
        .unwrap();
    let labels =
        |server: &Server| -> Vec<String> { server.token_objects().iter().map(|o| o["label"].as_str().unwrap_or_default().to_string()).collect() };
    assert_eq!(labels(&server).len(), 3);

    // Seven days pass: move the due dates into the past while the server is stopped.
    server.stop();
    server.sql(
        "UPDATE keys SET destruction_at = 1 WHERE destruction_at IS NOT NULL;
         UPDATE key_versions SET destruction_at = 1 WHERE destruction_at IS NOT NULL;",
    );
    server.restart();
    let mut admin = server.admin().await;
    eventually("the sweep", Duration::from_secs(30), || labels(&server).len() == 1);
    assert_eq!(labels(&server), [format!("kms:{kept}:2")]);
    let d = admin.describe_key(pb::DescribeKeyRequest { key_id: doomed.clone() }).await.unwrap().into_inner();
    assert_eq!(d.key.unwrap().state, pb::KeyState::Destroyed as i32, "the tombstone is kept");
    assert!(d.versions.iter().all(|v| v.state == pb::KeyVersionState::VersionDestroyed as i32));
    let kv = admin.list_key_versions(pb::ListKeyVersionsRequest { key_id: kept.clone() }).await.unwrap().into_inner();
    assert_eq!(kv.versions[0].state, pb::KeyVersionState::VersionDestroyed as i32);
    assert_eq!(kv.versions[1].state, pb::KeyVersionState::VersionEnabled as i32);

    let mut data = server.data().await;
    let e = data
        .decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: String::new(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a destroyed key looks like an unknown one");
    let ok = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: kept_v1_blob,
            encryption_context: Default::default(),
            key_id: String::new(),
            caller_context: None,
        })
        .await;
    assert!(ok.is_ok(), "the surviving primary version still decrypts");
    let e = admin.enable_key(pb::EnableKeyRequest { key_id: doomed }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let sweeps: i64 =
        server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation IN ('DestroyKey', 'DestroyKeyVersion')", [], |r| r.get(0)).unwrap();
    assert_eq!(sweeps, 2, "each destruction is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_create_is_rolled_back_at_startup() {
    let mut server = Server::start();
    {
        let mut admin = server.admin().await;
        create_key(&mut admin, "real").await;
    }
    // Simulate a crash between the HSM call and the commit: an intent with no row, and an
    // orphan object made through PKCS#11 by a second process.
    server.stop();
    let orphan = "0badc0de-0000-4000-8000-000000000001";
    server.sql(&format!("INSERT INTO intents (kind, key_id, version, created_at) VALUES ('create', '{orphan}', 1, 0)"));
    let made = server.inspect(&format!("create-orphan:{orphan}"));
    assert!(!made.is_empty());
    assert_eq!(server.token_objects().len(), 2);
    server.restart();
    let labels: Vec<String> = server.token_objects().iter().map(|o| o["label"].as_str().unwrap().to_string()).collect();
    assert_eq!(labels.len(), 1, "the orphan object is gone: {labels:?}");
    assert!(!labels[0].contains(orphan));
    let db = server.db();
    let intents: i64 = db.query_row("SELECT COUNT(*) FROM intents", [], |r| r.get(0)).unwrap();
    assert_eq!(intents, 0);
    let recovery: String = db.query_row("SELECT detail FROM audit WHERE operation = 'Recovery'", [], |r| r.get(0)).unwrap();
    assert!(recovery.contains("rolled back"), "{recovery}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_rotates_when_its_rotation_period_is_due() {
    let mut server = Server::start();
    let key = {
        let mut admin = server.admin().await;
        let r = admin
            .create_key(pb::CreateKeyRequest { description: String::new(), alias: String::new(), rotation_period_seconds: 86_400 })
            .await
            .unwrap()
            .into_inner();
        let meta = r.key.unwrap();
        assert!(meta.next_rotation_time >= meta.creation_time + 86_400);
        meta.key_id
    };
    // A day passes.
    server.stop();
    server.sql("UPDATE keys SET next_rotation_at = 1");
    server.restart();
    let mut admin = server.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap().into_inner();
        let meta = d.key.unwrap();
        if meta.primary_version == 2 {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            assert!(meta.next_rotation_time > now, "the next rotation is a period away");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no automatic rotation");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_hsm_object_is_reported_and_its_version_refused_not_dropped() {
    let mut server = Server::start();
    let (key, blob) = {
        let mut admin = server.admin().await;
        let mut data = server.data().await;
        let key = create_key(&mut admin, "").await;
        let blob = data
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: b"x".to_vec(),
                encryption_context: Default::default(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner()
            .ciphertext_blob;
        (key, blob)
    };
    server.stop();
    server.inspect(&format!("destroy:kms:{key}:1"));
    server.restart();
    let mut admin = server.admin().await;
    let d = admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap().into_inner();
    assert!(d.key.unwrap().material_missing, "the key is reported");
    assert!(d.versions[0].material_missing);
    assert_eq!(d.versions[0].state, pb::KeyVersionState::VersionEnabled as i32, "the row is kept as it was");
    let mut data = server.data().await;
    let e = data
        .encrypt(pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("missing"), "{}", e.message());
    let e = data
        .decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: String::new(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let reported: i64 =
        server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Recovery' AND detail LIKE '%missing%'", [], |r| r.get(0)).unwrap();
    assert_eq!(reported, 1);
}
