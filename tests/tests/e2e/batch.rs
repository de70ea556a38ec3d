//! The batch RPCs (GenerateDataKeys, DecryptBatch): each item authorised, done and audited on
//! its own, with its own result or the error the call alone would get, in order.

use kms_proto::v1 as pb;
use kms_proto::v1::decrypt_result::Result as DecryptItem;
use kms_proto::v1::generate_data_key_result::Result as GenerateItem;
use kms_tests::{Server, create_key, ctx};
use tonic::Code;

fn item(key: &str, spec: i32, context: &[(&str, &str)]) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest { key_id: key.into(), key_spec: spec, number_of_bytes: 0, encryption_context: ctx(context), caller_context: None }
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_answer_item_by_item_and_audit_each_item() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "batch").await;
    let ungranted = admin.create_key(pb::CreateKeyRequest::default()).await.unwrap().into_inner().key.unwrap().key_id;

    let items = vec![item(&key, 1, &[("object", "a")]), item(&ungranted, 1, &[]), item(&key, 9, &[]), item("alias/batch", 2, &[("object", "b")])];
    let caller = pb::CallerContext { user: "batch-job".into(), ..Default::default() };
    let results = data
        .generate_data_keys(pb::GenerateDataKeysRequest { items: items.clone(), caller_context: Some(caller) })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 4);
    // Each refused item gets exactly what the same call alone gets.
    for (i, want) in [(1, Code::PermissionDenied), (2, Code::InvalidArgument)] {
        let Some(GenerateItem::Error(e)) = &results[i].result else { panic!("item {i}: {:?}", results[i]) };
        let alone = data.generate_data_key(items[i].clone()).await.unwrap_err();
        assert_eq!((Code::from(e.code), e.message.as_str()), (want, alone.message()), "item {i}");
        assert_eq!(alone.code(), want);
    }
    let mut blobs = Vec::new();
    for (i, len, context) in [(0, 32, ("object", "a")), (3, 16, ("object", "b"))] {
        let Some(GenerateItem::DataKey(k)) = &results[i].result else { panic!("item {i}: {:?}", results[i]) };
        assert_eq!((k.key_id.as_str(), k.key_version, k.plaintext.len()), (key.as_str(), 1, len));
        blobs.push((k.ciphertext_blob.clone(), k.plaintext.clone(), context));
    }

    // Decrypt them back in one batch, with a forged blob and a wrong context among them.
    let mut forged = blobs[0].0.clone();
    *forged.last_mut().unwrap() ^= 1;
    let decrypt = |blob: &[u8], context: (&str, &str)| pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(&[context]),
        key_id: String::new(),
        caller_context: None,
    };
    let items =
        vec![decrypt(&blobs[0].0, blobs[0].2), decrypt(&forged, blobs[0].2), decrypt(&blobs[1].0, ("object", "a")), decrypt(&blobs[1].0, blobs[1].2)];
    let mut results = data.decrypt_batch(pb::DecryptBatchRequest { items, caller_context: None }).await.unwrap().into_inner().results;
    for (i, want) in [(0, &blobs[0].1), (3, &blobs[1].1)] {
        let Some(DecryptItem::Plaintext(p)) = &mut results[i].result else { panic!("item {i}") };
        assert_eq!(&std::mem::take(&mut p.plaintext), want, "item {i}");
    }
    let refusals: Vec<(i32, String)> = [1, 2]
        .iter()
        .map(|i| match &results[*i].result {
            Some(DecryptItem::Error(e)) => (e.code, e.message.clone()),
            other => panic!("item {i}: {other:?}"),
        })
        .collect();
    assert_eq!(refusals[0], refusals[1], "a forged blob and a wrong context answer alike");
    assert_eq!(refusals[0], (Code::InvalidArgument as i32, kms_server::api::DECRYPT_FAILED.to_string()));

    // One audit record per item, each with its outcome, the batch's caller context on each.
    let db = server.db();
    let rows: Vec<(String, String, Option<String>)> = db
        .prepare("SELECT status, detail, caller_context FROM audit WHERE operation = 'GenerateDataKeys' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(statuses, ["OK", "PERMISSION_DENIED", "INVALID_ARGUMENT", "OK"]);
    assert!(rows.iter().enumerate().all(|(i, r)| r.1.starts_with(&format!("item {} of 4", i + 1))), "{rows:?}");
    assert!(rows.iter().all(|r| r.2.as_deref().is_some_and(|c| c.contains("batch-job"))), "{rows:?}");
    let decrypts: i64 = db.query_row("SELECT COUNT(*) FROM audit WHERE operation = 'DecryptBatch'", [], |r| r.get(0)).unwrap();
    assert_eq!(decrypts, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_must_have_one_to_256_items_without_their_own_caller_context() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let before = server.state_snapshot();
    let with_caller = pb::GenerateDataKeyRequest { caller_context: Some(pb::CallerContext::default()), ..item(&key, 1, &[]) };
    for (items, what) in
        [(vec![], "has 0 items"), (vec![item(&key, 1, &[]); 257], "has 257 items"), (vec![with_caller], "item 0 has its own caller_context")]
    {
        let e = data.generate_data_keys(pb::GenerateDataKeysRequest { items, caller_context: None }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("items") && e.message().contains(what), "{}", e.message());
    }
    let e = data.decrypt_batch(pb::DecryptBatchRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(server.state_snapshot(), before);
    // 256 items is a valid batch.
    let results = data.generate_data_keys(pb::GenerateDataKeysRequest { items: vec![item(&key, 1, &[]); 256], caller_context: None }).await.unwrap();
    assert_eq!(results.into_inner().results.len(), 256);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_draws_its_data_keys_and_ivs_from_the_hsm_at_once_and_each_is_distinct() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "drawn").await;
    let random_calls = || server.metric("kms_hsm_calls_total{function=\"C_GenerateRandom\",result=\"ok\"}").unwrap_or(0.0);
    // 256 items (the most a batch may have), AES-256 and AES-128 keys in turn.
    let items: Vec<_> = (0..256).map(|i| item(&key, if i % 2 == 0 { 1 } else { 2 }, &[])).collect();
    let before = random_calls();
    let results = data.generate_data_keys(pb::GenerateDataKeysRequest { items, caller_context: None }).await.unwrap().into_inner().results;
    let draws = random_calls() - before;
    // One draw for the batch; the health probe (once a second here) may draw once meanwhile.
    assert!((1.0..=2.0).contains(&draws), "{draws} C_GenerateRandom calls for one batch");

    let mut keys = std::collections::HashSet::new();
    let mut ivs = std::collections::HashSet::new();
    let mut decrypts = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let Some(GenerateItem::DataKey(k)) = &r.result else { panic!("item {i}: {r:?}") };
        assert_eq!(k.plaintext.len(), if i % 2 == 0 { 32 } else { 16 });
        // The IV is at bytes 25..37 of the header (docs/blob-format.md).
        let iv = k.ciphertext_blob[25..37].to_vec();
        assert!(keys.iter().all(|other: &Vec<u8>| !other.windows(12).any(|w| w == iv.as_slice())), "item {i}'s IV is part of a data key");
        assert!(keys.insert(k.plaintext.clone()), "item {i}'s data key repeats an earlier one");
        assert!(ivs.insert(iv), "item {i}'s IV repeats an earlier one");
        decrypts.push(pb::DecryptRequest { ciphertext_blob: k.ciphertext_blob.clone(), ..Default::default() });
    }
    let plaintexts = data.decrypt_batch(pb::DecryptBatchRequest { items: decrypts, caller_context: None }).await.unwrap().into_inner().results;
    for (i, (p, r)) in plaintexts.iter().zip(&results).enumerate() {
        let (Some(DecryptItem::Plaintext(p)), Some(GenerateItem::DataKey(k))) = (&p.result, &r.result) else { panic!("item {i}") };
        assert_eq!(p.plaintext, k.plaintext, "item {i} decrypts to its data key");
    }
}
