//! TESTPLAN R3: tampering and context binding. Every altered blob and every wrong context is
//! refused with one identical status (code and message), no plaintext comes back, and nothing
//! in the database changes.

use kms_client::Channel;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_tests::{Server, create_key, ctx};
use std::collections::HashMap;

const UNIFORM: &str = "ciphertext_blob could not be decrypted with this encryption context";

async fn expect_uniform_refusal(data: &mut CryptoClient<Channel>, blob: Vec<u8>, context: HashMap<String, String>, what: &str) {
    match data.decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context: context, key_id: String::new(), caller_context: None }).await {
        Ok(_) => panic!("{what}: decrypted"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
            assert_eq!(e.message(), UNIFORM, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bit_flip_truncation_and_extension_is_refused_identically() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let context = ctx(&[("tenant", "acme")]);
    let mut gdk = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            key_spec: pb::DataKeySpec::Aes256.into(),
            number_of_bytes: 0,
            encryption_context: context.clone(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    let _ = std::mem::take(&mut gdk.plaintext);
    let small = data
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"a small secret".to_vec(),
            encryption_context: context.clone(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let before = server.state_snapshot();
    let audited = |server: &Server| -> i64 {
        server
            .db()
            .query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Decrypt' AND outcome = 'denied' AND status = 'INVALID_ARGUMENT'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let mut refused = 0;
    for (kind, blob) in [("data key blob", gdk.ciphertext_blob.clone()), ("ciphertext blob", small)] {
        for bit in 0..blob.len() * 8 {
            let mut b = blob.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            expect_uniform_refusal(&mut data, b, context.clone(), &format!("{kind}: bit {bit} flipped")).await;
            refused += 1;
        }
        for len in 1..blob.len() {
            expect_uniform_refusal(&mut data, blob[..len].to_vec(), context.clone(), &format!("{kind}: truncated to {len}")).await;
            refused += 1;
        }
        let mut longer = blob.clone();
        longer.push(0);
        expect_uniform_refusal(&mut data, longer, context.clone(), &format!("{kind}: one byte appended")).await;
        refused += 1;
    }
    assert_eq!(server.state_snapshot(), before, "refused decryptions change nothing but the audit trail");
    assert_eq!(audited(&server), refused, "every refusal is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn context_must_match_exactly_but_order_is_free() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let base = [("Tenant", "acme"), ("file", "caf\u{e9}")];
    let blob = data
        .encrypt(pb::EncryptRequest { key_id: key, plaintext: b"p".to_vec(), encryption_context: ctx(&base), caller_context: None })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let mutations: &[(&str, &[(&str, &str)])] = &[
        ("value changed", &[("Tenant", "acmf"), ("file", "caf\u{e9}")]),
        ("key changed", &[("tenant", "acme"), ("file", "caf\u{e9}")]),
        ("value case", &[("Tenant", "ACME"), ("file", "caf\u{e9}")]),
        ("pair removed", &[("Tenant", "acme")]),
        ("pair added", &[("Tenant", "acme"), ("file", "caf\u{e9}"), ("x", "")]),
        ("empty context", &[]),
        ("Unicode decomposed", &[("Tenant", "acme"), ("file", "cafe\u{301}")]),
        ("trailing space", &[("Tenant", "acme "), ("file", "caf\u{e9}")]),
        ("moved between key and value", &[("Tenantacme", ""), ("file", "caf\u{e9}")]),
    ];
    for (what, pairs) in mutations {
        expect_uniform_refusal(&mut data, blob.clone(), ctx(pairs), what).await;
    }
    let reordered: HashMap<String, String> = base.iter().rev().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut ok = data
        .decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context: reordered, key_id: String::new(), caller_context: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(std::mem::take(&mut ok.plaintext), b"p");
}

#[tokio::test(flavor = "multi_thread")]
async fn swapping_key_id_or_version_between_blobs_is_refused() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let a = create_key(&mut admin, "").await;
    let b = create_key(&mut admin, "").await;
    let enc = |key: &str| pb::EncryptRequest {
        key_id: key.into(),
        plaintext: b"same".to_vec(),
        encryption_context: Default::default(),
        caller_context: None,
    };
    let blob_a = data.encrypt(enc(&a)).await.unwrap().into_inner().ciphertext_blob;
    let blob_b = data.encrypt(enc(&b)).await.unwrap().into_inner().ciphertext_blob;
    admin.rotate_key(pb::RotateKeyRequest { key_id: a.clone() }).await.unwrap();
    let blob_a2 = data.encrypt(enc(&a)).await.unwrap().into_inner().ciphertext_blob;
    // Header layout (docs/blob-format.md): key id at 5..21, version at 21..25.
    let mut swapped_key = blob_a.clone();
    swapped_key[5..21].copy_from_slice(&blob_b[5..21]);
    expect_uniform_refusal(&mut data, swapped_key, HashMap::new(), "key id swapped").await;
    let mut swapped_version = blob_a.clone();
    swapped_version[21..25].copy_from_slice(&blob_a2[21..25]);
    expect_uniform_refusal(&mut data, swapped_version, HashMap::new(), "version swapped").await;
    let mut unknown_version = blob_a.clone();
    unknown_version[21..25].copy_from_slice(&77u32.to_be_bytes());
    expect_uniform_refusal(&mut data, unknown_version, HashMap::new(), "unknown version").await;
    let mut unknown_key = blob_a;
    unknown_key[5..21].copy_from_slice(&[0x42; 16]);
    expect_uniform_refusal(&mut data, unknown_key, HashMap::new(), "unknown key").await;
}
