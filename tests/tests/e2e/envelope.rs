//! Envelope encryption round trips, rotation, ReEncrypt and interoperability.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, Nonce};
use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, ctx};

#[tokio::test(flavor = "multi_thread")]
async fn data_keys_round_trip_for_both_key_specs_and_work_with_standard_aes_gcm() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key_id = create_key(&mut admin, "app").await;
    for (spec, len) in [(pb::DataKeySpec::Aes256, 32), (pb::DataKeySpec::Aes128, 16)] {
        let context = ctx(&[("tenant", "acme"), ("bucket", "b1")]);
        let mut gdk = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: "alias/app".into(),
                key_spec: spec.into(),
                number_of_bytes: 0,
                encryption_context: context.clone(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(gdk.key_id, key_id, "responses name the key id, not the alias");
        assert_eq!(gdk.key_version, 1);
        let data_key = std::mem::take(&mut gdk.plaintext);
        assert_eq!(data_key.len(), len);

        // A standard AES-GCM implementation uses the data key as is.
        let nonce = [3u8; 12];
        let sealed = match len {
            32 => Aes256Gcm::new_from_slice(&data_key).unwrap().encrypt(Nonce::from_slice(&nonce), Payload { msg: b"hello", aad: b"" }),
            _ => Aes128Gcm::new_from_slice(&data_key).unwrap().encrypt(Nonce::from_slice(&nonce), Payload { msg: b"hello", aad: b"" }),
        }
        .unwrap();

        let mut dec = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: gdk.ciphertext_blob.clone(),
                encryption_context: context.clone(),
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        let unwrapped = std::mem::take(&mut dec.plaintext);
        assert_eq!(unwrapped, data_key);
        assert_eq!((dec.key_id.as_str(), dec.key_version), (key_id.as_str(), 1));
        let opened = match len {
            32 => Aes256Gcm::new_from_slice(&unwrapped).unwrap().decrypt(Nonce::from_slice(&nonce), Payload { msg: &sealed, aad: b"" }),
            _ => Aes128Gcm::new_from_slice(&unwrapped).unwrap().decrypt(Nonce::from_slice(&nonce), Payload { msg: &sealed, aad: b"" }),
        }
        .unwrap();
        assert_eq!(opened, b"hello");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_old_blobs_decryptable_and_reencrypt_moves_them() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let a = create_key(&mut admin, "a").await;
    let b = create_key(&mut admin, "b").await;
    let c1 = ctx(&[("purpose", "test")]);
    let enc = |key: &str, pt: &[u8]| pb::EncryptRequest {
        key_id: key.into(),
        plaintext: pt.to_vec(),
        encryption_context: c1.clone(),
        caller_context: None,
    };
    let v1 = data.encrypt(enc(&a, b"secret one")).await.unwrap().into_inner();
    assert_eq!(v1.key_version, 1);
    let rotated = admin.rotate_key(pb::RotateKeyRequest { key_id: a.clone() }).await.unwrap().into_inner();
    assert_eq!(rotated.key.unwrap().primary_version, 2);
    let v2 = data.encrypt(enc(&a, b"secret two")).await.unwrap().into_inner();
    assert_eq!(v2.key_version, 2);
    for (blob, want, version) in [(&v1, &b"secret one"[..], 1), (&v2, &b"secret two"[..], 2)] {
        let mut d = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.ciphertext_blob.clone(),
                encryption_context: c1.clone(),
                key_id: a.clone(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(std::mem::take(&mut d.plaintext), want);
        assert_eq!(d.key_version, version);
    }

    // ReEncrypt to the same key moves a v1 blob to the primary version, keeping the context.
    let same = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: v1.ciphertext_blob.clone(),
            source_encryption_context: c1.clone(),
            source_key_id: String::new(),
            destination_key_id: a.clone(),
            destination_encryption_context: c1.clone(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((same.source_key_version, same.key_version), (1, 2));

    // ReEncrypt to another key under a new context.
    let c2 = ctx(&[("purpose", "moved")]);
    let moved = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: v1.ciphertext_blob.clone(),
            source_encryption_context: c1.clone(),
            source_key_id: "alias/a".into(),
            destination_key_id: "alias/b".into(),
            destination_encryption_context: c2.clone(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.source_key_id.as_str(), moved.key_id.as_str()), (a.as_str(), b.as_str()));
    let mut d = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: moved.ciphertext_blob.clone(),
            encryption_context: c2,
            key_id: String::new(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(std::mem::take(&mut d.plaintext), b"secret one");
    // The old context no longer opens the moved blob.
    let wrong = data
        .decrypt(pb::DecryptRequest { ciphertext_blob: moved.ciphertext_blob, encryption_context: c1, key_id: String::new(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_refuses_a_blob_of_another_key_than_expected() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let a = create_key(&mut admin, "a").await;
    let _b = create_key(&mut admin, "b").await;
    let blob = data
        .encrypt(pb::EncryptRequest { key_id: a, plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let err = data
        .decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context: Default::default(), key_id: "alias/b".into(), caller_context: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), kms_server_decrypt_failed());
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_random_and_without_plaintext() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let mut r = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 1024, caller_context: None }).await.unwrap().into_inner();
    let bytes = std::mem::take(&mut r.plaintext);
    assert_eq!(bytes.len(), 1024);
    assert!(bytes.iter().any(|b| *b != 0));
    for bad in [0, 1025] {
        let e = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: bad, caller_context: None }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("number_of_bytes"), "{}", e.message());
    }
    let w = data
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            key_id: key,
            key_spec: 0,
            number_of_bytes: 16,
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut d = data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: w.ciphertext_blob,
            encryption_context: Default::default(),
            key_id: String::new(),
            caller_context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(std::mem::take(&mut d.plaintext).len(), 16);
}

/// The server's uniform decrypt-failure message (kept here as the contract callers see).
pub fn kms_server_decrypt_failed() -> &'static str {
    "ciphertext_blob could not be decrypted with this encryption context"
}

/// A workload that takes its settings from a file (`KMS_CLIENT_CONFIG`) or from the environment,
/// as a deployment would give them, reaches the real service, with retries and the cache as
/// configured.
#[tokio::test(flavor = "multi_thread")]
async fn a_workload_configured_from_a_file_or_the_environment_round_trips_a_data_key() {
    let server = kms_tests::Server::start();
    kms_tests::create_key(&mut server.admin().await, "configured").await;
    let pki = server.pki_dir();
    let file = server.dir.path().join("kms-client.toml");
    std::fs::write(
        &file,
        format!(
            "endpoint = \"https://{}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n[retry]\nattempts = 4\n[cache]\nmax_messages = 10\n",
            server.data_addr,
            pki.join("ca.pem"),
            pki.join("workload.pem"),
            pki.join("workload.key")
        ),
    )
    .unwrap();
    let from_file = kms_client::ClientConfig::from_file(&file).unwrap();
    let (endpoint, pki_text) = (format!("https://{}", server.data_addr), pki.display().to_string());
    let from_env = kms_client::ClientConfig::from_lookup(|name| match name {
        "KMS_DATA_ENDPOINT" => Some(endpoint.clone()),
        "KMS_PKI" => Some(pki_text.clone()),
        _ => None,
    })
    .unwrap();
    for (how, config) in [("file", from_file), ("environment", from_env)] {
        let mut kms = config.connect().await.unwrap_or_else(|e| panic!("{how}: {e}"));
        assert_eq!(kms.retry.attempts, if how == "file" { 4 } else { 3 });
        assert_eq!(kms.cache().is_some(), how == "file", "{how}: the cache is on only when configured");
        let ctx = [("from".to_string(), how.to_string())].into();
        let (data_key, wrapped) = kms.generate_data_key("alias/configured", &ctx).await.unwrap();
        let again = kms.decrypt_data_key(&wrapped, &ctx).await.unwrap();
        assert_eq!(again.expose_secret(), data_key.expose_secret(), "{how}");
    }
}

/// An Encrypt takes its IV from a pool the HSM's generator fills 341 IVs at a time: one HSM call
/// per encryption instead of two (a round trip less with a network HSM), each IV distinct.
#[tokio::test(flavor = "multi_thread")]
async fn encryptions_take_distinct_ivs_from_one_draw_of_the_hsms_generator() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "ivs").await;
    let calls = |function: &str| server.metric(&format!("kms_hsm_calls_total{{function=\"{function}\",result=\"ok\"}}")).unwrap_or(0.0);
    let (draws_before, encrypts_before) = (calls("C_GenerateRandom"), calls("C_Encrypt"));
    let mut ivs = std::collections::HashSet::new();
    for i in 0..200u8 {
        let request = pb::EncryptRequest { key_id: key.clone(), plaintext: vec![i; 8], encryption_context: ctx(&[]), caller_context: None };
        let blob = data.encrypt(request).await.unwrap().into_inner().ciphertext_blob;
        // The IV is at bytes 25..37 of the header (docs/blob-format.md).
        assert!(ivs.insert(blob[25..37].to_vec()), "encryption {i}'s IV repeats an earlier one");
    }
    // The health probe (once a second here) draws an IV of its own for each of its encryptions.
    let probes = calls("C_Encrypt") - encrypts_before - 200.0;
    let draws = calls("C_GenerateRandom") - draws_before - probes;
    assert!(draws <= 1.0, "{draws} C_GenerateRandom calls for 200 encryptions");
}
