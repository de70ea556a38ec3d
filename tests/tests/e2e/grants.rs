//! Least privilege on the data plane (TESTPLAN R11, the workload half): nothing is allowed
//! unless a grant allows it, and every refusal is audited and changes nothing.

use kms_client::Channel;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_tests::{Server, WORKLOAD, ctx};
use tonic::Code;

async fn encrypt(data: &mut CryptoClient<Channel>, key: &str, context: &[(&str, &str)]) -> Result<Vec<u8>, Code> {
    data.encrypt(pb::EncryptRequest { key_id: key.into(), plaintext: b"p".to_vec(), encryption_context: ctx(context), caller_context: None })
        .await
        .map(|r| r.into_inner().ciphertext_blob)
        .map_err(|e| e.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cell_of_the_workload_matrix() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let new_key = |alias: &'static str| pb::CreateKeyRequest { description: String::new(), alias: alias.into(), rotation_period_seconds: 0 };
    let key = admin.create_key(new_key("mine")).await.unwrap().into_inner().key.unwrap().key_id;
    let other = admin.create_key(new_key("theirs")).await.unwrap().into_inner().key.unwrap().key_id;

    // Not registered: refused.
    assert_eq!(encrypt(&mut data, &key, &[]).await, Err(Code::PermissionDenied), "unregistered principal");
    kms_tests::register_workload(&mut admin).await;
    // Registered, no grant: refused; an unknown key looks the same.
    assert_eq!(encrypt(&mut data, &key, &[]).await, Err(Code::PermissionDenied), "no grant");
    assert_eq!(encrypt(&mut data, "alias/nope", &[]).await, Err(Code::PermissionDenied), "unknown key");

    let grant = |key: &str, ops: &[&str], required: &[(&str, &str)], keys: &[&str], expires: i64| pb::CreateGrantRequest {
        principal: WORKLOAD.into(),
        key_id: key.into(),
        operations: ops.iter().map(|o| o.to_string()).collect(),
        required_encryption_context: ctx(required),
        required_encryption_context_keys: keys.iter().map(|k| k.to_string()).collect(),
        expiration_time: expires,
    };
    // A grant on another key does not help.
    admin.create_grant(grant(&other, &["Encrypt"], &[], &[], 0)).await.unwrap();
    assert_eq!(encrypt(&mut data, &key, &[]).await, Err(Code::PermissionDenied), "grant on another key");
    // A grant for another operation does not help.
    admin.create_grant(grant(&key, &["Decrypt"], &[], &[], 0)).await.unwrap();
    assert_eq!(encrypt(&mut data, &key, &[]).await, Err(Code::PermissionDenied), "grant for another operation");
    // Context conditions.
    admin.create_grant(grant(&key, &["Encrypt"], &[("tenant", "acme")], &["file"], 0)).await.unwrap();
    assert_eq!(encrypt(&mut data, &key, &[("tenant", "acme")]).await, Err(Code::PermissionDenied), "required key missing");
    assert_eq!(encrypt(&mut data, &key, &[("tenant", "evil"), ("file", "x")]).await, Err(Code::PermissionDenied), "wrong value");
    let blob = encrypt(&mut data, "alias/mine", &[("tenant", "acme"), ("file", "x")]).await.expect("properly granted");
    // Decrypt is granted without conditions; GenerateDataKey is not granted at all.
    let d = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: ctx(&[("tenant", "acme"), ("file", "x")]),
            key_id: String::new(),
            caller_context: None,
        })
        .await;
    assert!(d.is_ok());
    let g = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            key_spec: 1,
            number_of_bytes: 0,
            encryption_context: ctx(&[("tenant", "acme"), ("file", "x")]),
            caller_context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(g.code(), Code::PermissionDenied);
    // ReEncrypt needs ReEncryptFrom on the source and ReEncryptTo on the destination.
    let re = |dest: &str| pb::ReEncryptRequest {
        ciphertext_blob: blob.clone(),
        source_encryption_context: ctx(&[("tenant", "acme"), ("file", "x")]),
        source_key_id: String::new(),
        destination_key_id: dest.into(),
        destination_encryption_context: Default::default(),
        caller_context: None,
    };
    assert_eq!(data.re_encrypt(re(&other)).await.unwrap_err().code(), Code::PermissionDenied);
    admin.create_grant(grant(&other, &["ReEncryptTo"], &[], &[], 0)).await.unwrap();
    assert_eq!(data.re_encrypt(re(&other)).await.unwrap_err().code(), Code::PermissionDenied, "no ReEncryptFrom on the source");
    admin.create_grant(grant(&key, &["ReEncryptFrom"], &[], &[], 0)).await.unwrap();
    assert!(data.re_encrypt(re(&other)).await.is_ok());

    // An expiring grant stops working when it expires.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    admin.create_grant(grant(&other, &["GenerateDataKeyWithoutPlaintext"], &[], &[], now + 2)).await.unwrap();
    let gdk = |data: &mut CryptoClient<Channel>| {
        let mut data = data.clone();
        let other = other.clone();
        async move {
            data.generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                key_id: other,
                key_spec: 1,
                number_of_bytes: 0,
                encryption_context: Default::default(),
                caller_context: None,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
        }
    };
    assert_eq!(gdk(&mut data).await, Ok(()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gdk(&mut data).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the grant never expired");
        tokio::task::yield_now().await;
    }
    assert_eq!(gdk(&mut data).await, Err(Code::PermissionDenied));

    // A disabled principal is cut off from its next call.
    admin.disable_principal(pb::PrincipalRequest { name: WORKLOAD.into() }).await.unwrap();
    assert_eq!(encrypt(&mut data, &key, &[("tenant", "acme"), ("file", "x")]).await, Err(Code::PermissionDenied), "disabled principal");
    let random = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None }).await.unwrap_err();
    assert_eq!(random.code(), Code::PermissionDenied);

    // Every refusal is audited; none created a key version or a usage count.
    let db = server.db();
    let denials: i64 =
        db.query_row("SELECT COUNT(*) FROM audit WHERE status = 'PERMISSION_DENIED' AND outcome = 'denied'", [], |r| r.get(0)).unwrap();
    assert!(denials >= 13, "{denials} denials audited");
    let principal: String = db.query_row("SELECT principal FROM audit WHERE status = 'PERMISSION_DENIED' LIMIT 1", [], |r| r.get(0)).unwrap();
    assert_eq!(principal, WORKLOAD);
    let versions: i64 = db.query_row("SELECT COUNT(*) FROM key_versions", [], |r| r.get(0)).unwrap();
    assert_eq!(versions, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn grant_requests_are_validated() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "").await;
    let base = pb::CreateGrantRequest { principal: WORKLOAD.into(), key_id: key.clone(), operations: vec!["Encrypt".into()], ..Default::default() };
    let cases = [
        (pb::CreateGrantRequest { operations: vec![], ..base.clone() }, Code::InvalidArgument, "operations"),
        (pb::CreateGrantRequest { operations: vec!["Sign".into()], ..base.clone() }, Code::InvalidArgument, "operations"),
        (pb::CreateGrantRequest { principal: String::new(), ..base.clone() }, Code::InvalidArgument, "principal"),
        (pb::CreateGrantRequest { principal: "nobody".into(), ..base.clone() }, Code::NotFound, "principal"),
        (pb::CreateGrantRequest { key_id: "alias/none".into(), ..base.clone() }, Code::NotFound, "alias/none"),
        (pb::CreateGrantRequest { expiration_time: 5, ..base.clone() }, Code::InvalidArgument, "expiration_time"),
    ];
    for (request, code, mentions) in cases {
        let e = admin.create_grant(request).await.unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        assert!(e.message().contains(mentions), "{e}");
    }
    let e = admin.revoke_grant(pb::RevokeGrantRequest { grant_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let listed = admin.list_grants(pb::ListGrantsRequest { key_id: key, principal: String::new() }).await.unwrap().into_inner();
    assert_eq!(listed.grants.len(), 1, "only the helper's grant exists");
}
