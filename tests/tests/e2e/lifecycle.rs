//! Every key transition over gRPC, legal and illegal, and state enforcement on the data plane.

use kms_proto::v1 as pb;
use kms_tests::{Admin, Server, create_key, ctx};
use tonic::Code;

#[derive(Debug, Clone, Copy)]
enum Op {
    Enable,
    Disable,
    Compromise,
    Schedule,
    Cancel,
    Rotate,
}

async fn apply(admin: &mut Admin, key: &str, op: Op) -> Result<i32, tonic::Status> {
    let key_id = key.to_string();
    let meta = match op {
        Op::Enable => admin.enable_key(pb::EnableKeyRequest { key_id }).await?.into_inner().key,
        Op::Disable => admin.disable_key(pb::DisableKeyRequest { key_id }).await?.into_inner().key,
        Op::Compromise => admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id }).await?.into_inner().key,
        Op::Schedule => admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id, pending_window_days: 7 }).await?.into_inner().key,
        Op::Cancel => admin.cancel_key_destruction(pb::CancelKeyDestructionRequest { key_id }).await?.into_inner().key,
        Op::Rotate => admin.rotate_key(pb::RotateKeyRequest { key_id }).await?.into_inner().key,
    };
    Ok(meta.expect("metadata").state)
}

async fn state_of(admin: &mut Admin, key: &str) -> pb::KeyState {
    let d = admin.describe_key(pb::DescribeKeyRequest { key_id: key.into() }).await.unwrap().into_inner();
    pb::KeyState::try_from(d.key.unwrap().state).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn key_transitions_table() {
    use pb::KeyState::*;
    let server = Server::start();
    let mut admin = server.admin().await;
    // (path to reach the starting state, operation, expected state or None for FAILED_PRECONDITION)
    let table: &[(&[Op], Op, Option<pb::KeyState>)] = &[
        (&[], Op::Enable, Some(Enabled)),
        (&[], Op::Disable, Some(Disabled)),
        (&[], Op::Compromise, Some(Compromised)),
        (&[], Op::Schedule, Some(PendingDestruction)),
        (&[], Op::Cancel, None),
        (&[], Op::Rotate, Some(Enabled)),
        (&[Op::Disable], Op::Enable, Some(Enabled)),
        (&[Op::Disable], Op::Disable, Some(Disabled)),
        (&[Op::Disable], Op::Compromise, Some(Compromised)),
        (&[Op::Disable], Op::Schedule, Some(PendingDestruction)),
        (&[Op::Disable], Op::Rotate, None),
        (&[Op::Compromise], Op::Enable, None),
        (&[Op::Compromise], Op::Disable, None),
        (&[Op::Compromise], Op::Rotate, None),
        (&[Op::Compromise], Op::Compromise, None),
        (&[Op::Compromise], Op::Schedule, Some(PendingDestruction)),
        (&[Op::Compromise, Op::Schedule], Op::Cancel, Some(Compromised)),
        (&[Op::Schedule], Op::Cancel, Some(Disabled)),
        (&[Op::Schedule], Op::Enable, None),
        (&[Op::Schedule], Op::Rotate, None),
        (&[Op::Schedule], Op::Schedule, None),
        (&[Op::Schedule], Op::Compromise, None),
    ];
    for (path, op, want) in table {
        let key = create_key(&mut admin, "").await;
        for step in *path {
            apply(&mut admin, &key, *step).await.unwrap_or_else(|e| panic!("{path:?}: {e}"));
        }
        let before = state_of(&mut admin, &key).await;
        match (apply(&mut admin, &key, *op).await, want) {
            (Ok(state), Some(want)) => assert_eq!(state, *want as i32, "{path:?} then {op:?}"),
            (Err(e), None) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{path:?} then {op:?}: {e}");
                assert!(e.message().contains("state"), "the error names the state: {}", e.message());
                assert_eq!(state_of(&mut admin, &key).await, before, "a refused transition changes nothing");
            }
            (got, want) => panic!("{path:?} then {op:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_window_bounds_and_version_rules() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    for (days, ok) in [(6, false), (31, false), (7, true), (30, true)] {
        let r = admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key.clone(), pending_window_days: days }).await;
        match r {
            Ok(resp) => {
                assert!(ok, "{days} days accepted");
                let meta = resp.into_inner().key.unwrap();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
                assert!((meta.destruction_time - now - i64::from(days) * 86_400).abs() < 60);
                admin.cancel_key_destruction(pb::CancelKeyDestructionRequest { key_id: key.clone() }).await.unwrap();
                admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
            }
            Err(e) => {
                assert!(!ok, "{days} days refused: {e}");
                assert_eq!(e.code(), Code::InvalidArgument);
                assert!(e.message().contains("pending_window_days"));
            }
        }
    }
    // The primary version cannot be disabled or destroyed alone; an older one can.
    let primary = admin.disable_key_version(pb::KeyVersionRequest { key_id: key.clone(), key_version: 1 }).await.unwrap_err();
    assert_eq!(primary.code(), Code::FailedPrecondition);
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    let v1 = admin.disable_key_version(pb::KeyVersionRequest { key_id: key.clone(), key_version: 1 }).await.unwrap().into_inner();
    assert_eq!(v1.version.unwrap().state, pb::KeyVersionState::VersionDisabled as i32);
    let missing = admin.enable_key_version(pb::KeyVersionRequest { key_id: key.clone(), key_version: 9 }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let sched = admin
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest { key_id: key.clone(), key_version: 1, pending_window_days: 7 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sched.version.unwrap().state, pb::KeyVersionState::VersionPendingDestruction as i32);
    let cancel = admin.cancel_key_version_destruction(pb::KeyVersionRequest { key_id: key, key_version: 1 }).await.unwrap().into_inner();
    assert_eq!(cancel.version.unwrap().state, pb::KeyVersionState::VersionDisabled as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_enforcement_under_concurrent_load() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "hot").await;
    let other = create_key(&mut admin, "other").await;
    let blob = server
        .data()
        .await
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"kept".to_vec(),
            encryption_context: ctx(&[("a", "b")]),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;

    // 16 clients hammer the key; each records when each request started and how it ended.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let mut data = server.data().await;
        let key = key.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let r = data
                    .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                        key_id: key.clone(),
                        key_spec: pb::DataKeySpec::Aes256.into(),
                        number_of_bytes: 0,
                        encryption_context: Default::default(),
                        caller_context: None,
                    })
                    .await;
                seen.push((started, r.map(|_| ()).map_err(|e| e.code())));
            }
            seen
        }));
    }
    // Let some succeed first.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let d = admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap().into_inner();
            if d.versions[0].encryptions > 50 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("load reached the key");
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let committed = std::time::Instant::now();
    // Keep the load on a little longer after the commit.
    let until = committed + std::time::Duration::from_millis(300);
    while std::time::Instant::now() < until {
        tokio::task::yield_now().await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut after = 0;
    for w in workers {
        for (started, outcome) in w.await.unwrap() {
            if started > committed {
                after += 1;
                assert_eq!(outcome, Err(Code::FailedPrecondition), "a request that started after DisableKey succeeded");
            }
        }
    }
    assert!(after > 0, "some requests started after the commit");

    // Compromised: no new encryption, no plain Decrypt, but ReEncrypt out works.
    admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key.clone() }).await.unwrap();
    let mut data = server.data().await;
    let e = data
        .encrypt(pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("Compromised"), "{}", e.message());
    let e = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: ctx(&[("a", "b")]),
            key_id: String::new(),
            caller_context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let moved = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob,
            source_encryption_context: ctx(&[("a", "b")]),
            source_key_id: String::new(),
            destination_key_id: other.clone(),
            destination_encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.key_id, other);
    // ReEncrypt *into* a compromised key is refused.
    let e = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: moved.ciphertext_blob,
            source_encryption_context: Default::default(),
            source_key_id: String::new(),
            destination_key_id: key,
            destination_encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn aliases() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "first").await;
    let dup = admin
        .create_key(pb::CreateKeyRequest { description: String::new(), alias: "alias/first".into(), rotation_period_seconds: 0 })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let keys = admin.list_keys(pb::ListKeysRequest { page_size: 0, page_token: String::new() }).await.unwrap().into_inner();
    assert_eq!(keys.keys.len(), 1, "a refused create leaves no key behind");
    admin.create_alias(pb::CreateAliasRequest { alias: "second".into(), key_id: key.clone() }).await.unwrap();
    let by_alias = admin.list_aliases(pb::ListAliasesRequest { key_id: "alias/second".into() }).await.unwrap().into_inner();
    let names: Vec<_> = by_alias.aliases.iter().map(|a| a.alias.as_str()).collect();
    assert_eq!(names, ["alias/first", "alias/second"]);
    admin.delete_alias(pb::DeleteAliasRequest { alias: "alias/first".into() }).await.unwrap();
    let gone = admin.describe_key(pb::DescribeKeyRequest { key_id: "alias/first".into() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let d = admin.describe_key(pb::DescribeKeyRequest { key_id: "alias/second".into() }).await.unwrap().into_inner();
    assert_eq!(d.key.unwrap().aliases, ["alias/second"]);
    let e = admin.create_alias(pb::CreateAliasRequest { alias: "alias/aws-x".into(), key_id: key }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_keys_pages() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(create_key(&mut admin, "").await);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin.list_keys(pb::ListKeysRequest { page_size: 2, page_token: token }).await.unwrap().into_inner();
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    made.sort();
    assert_eq!(seen, made);
}
