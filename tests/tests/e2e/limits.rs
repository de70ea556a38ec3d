//! TESTPLAN R17: input limits. Each is INVALID_ARGUMENT naming the field, and changes nothing.

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, ctx};
use tonic::Code;

fn expect_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
    assert!(e.message().starts_with(field), "{what}: the message names {field}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_malformed_inputs_name_their_field() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "k").await;
    let audit_before: i64 = server.db().query_row("SELECT COUNT(*) FROM key_versions", [], |r| r.get(0)).unwrap();

    let enc = |pt: Vec<u8>, c| pb::EncryptRequest { key_id: key.clone(), plaintext: pt, encryption_context: c, caller_context: None };
    expect_invalid(data.encrypt(enc(vec![0; 4097], Default::default())).await, "plaintext", "plaintext of 4,097 bytes");
    assert!(data.encrypt(enc(vec![0; 4096], Default::default())).await.is_ok(), "4,096 bytes are fine");

    let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect();
    expect_invalid(data.encrypt(enc(vec![], many.into_iter().collect())).await, "encryption_context", "65 pairs");
    let big = "x".repeat(8192);
    expect_invalid(data.encrypt(enc(vec![], ctx(&[("k", &big)]))).await, "encryption_context", "8,193 bytes");
    expect_invalid(data.encrypt(enc(vec![], ctx(&[("", "v")]))).await, "encryption_context", "empty context key");

    let dec = |blob: Vec<u8>| pb::DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: Default::default(),
        key_id: String::new(),
        caller_context: None,
    };
    expect_invalid(data.decrypt(dec(vec![0; 6145])).await, "ciphertext_blob", "blob of 6,145 bytes");
    expect_invalid(data.decrypt(dec(vec![])).await, "ciphertext_blob", "empty blob");

    for (spec, n, field) in [(0, 0, "key_spec"), (0, 24, "number_of_bytes"), (0, 64, "number_of_bytes"), (7, 0, "key_spec")] {
        let r = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                key_spec: spec,
                number_of_bytes: n,
                encryption_context: Default::default(),
                caller_context: None,
            })
            .await;
        expect_invalid(r, field, &format!("data key spec {spec} bytes {n}"));
    }
    for bad in ["", "not-a-key", "alias/", "alias/has space", "1234"] {
        let r = data
            .encrypt(pb::EncryptRequest { key_id: bad.into(), plaintext: vec![], encryption_context: Default::default(), caller_context: None })
            .await;
        expect_invalid(r, "key_id", &format!("key id {bad:?}"));
    }
    let unknown = data
        .encrypt(pb::EncryptRequest {
            key_id: "00000000-0000-4000-8000-000000000000".into(),
            plaintext: vec![],
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied, "an unknown key looks like a key without a grant");

    let long = "d".repeat(1025);
    expect_invalid(
        admin.create_key(pb::CreateKeyRequest { description: long, alias: String::new(), rotation_period_seconds: 0 }).await,
        "description",
        "long description",
    );
    expect_invalid(
        admin.create_key(pb::CreateKeyRequest { description: String::new(), alias: String::new(), rotation_period_seconds: 60 }).await,
        "rotation_period_seconds",
        "a one-minute rotation period",
    );
    expect_invalid(admin.list_keys(pb::ListKeysRequest { page_size: 1001, page_token: String::new() }).await, "page_size", "page of 1,001");
    expect_invalid(admin.list_keys(pb::ListKeysRequest { page_size: 1, page_token: "garbage".into() }).await, "page_token", "bad page token");
    expect_invalid(admin.enable_key_version(pb::KeyVersionRequest { key_id: key.clone(), key_version: 0 }).await, "key_version", "version 0");

    let audit_after: i64 = server.db().query_row("SELECT COUNT(*) FROM key_versions", [], |r| r.get(0)).unwrap();
    assert_eq!(audit_before, audit_after, "no refused request created anything");
    let keys: i64 = server.db().query_row("SELECT COUNT(*) FROM keys", [], |r| r.get(0)).unwrap();
    assert_eq!(keys, 1);
}
