//! The Rust client's data-key cache (off by default): reuse within its limits, and revocation
//! felt from the client's next call to the service (a new revocation epoch, or a refusal).

use std::collections::BTreeMap;

use kms_client::{CacheLimits, DataClient};
use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key};

fn count(server: &Server, operation: &str, key: &str) -> i64 {
    server
        .db()
        .query_row("SELECT COUNT(*) FROM audit WHERE operation = ?1 AND key_id = ?2 AND status = 'OK'", [operation, key], |r| r.get(0))
        .unwrap()
}

fn context(v: &str) -> BTreeMap<String, String> {
    [("tenant".to_string(), v.to_string())].into()
}

async fn seal(client: &mut DataClient, key: &str, ctx: &BTreeMap<String, String>, data: &[u8]) -> Result<Vec<u8>, kms_client::Error> {
    let mut out = Vec::new();
    client.encrypt_stream(key, ctx, &mut std::io::Cursor::new(data), &mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_data_keys_are_reused_within_limits_and_dropped_on_revocation() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let a = create_key(&mut admin, "a").await;
    let b = create_key(&mut admin, "b").await;
    let mut client = DataClient::connect(&format!("https://{}", server.data_addr), &server.tls())
        .await
        .unwrap()
        .with_cache(CacheLimits { max_messages: 3, ..CacheLimits::default() });

    // Three envelopes, one data key from the service; a fourth needs a new one.
    let mut sealed = Vec::new();
    for i in 0..4 {
        sealed.push(seal(&mut client, "alias/a", &context("acme"), format!("file {i}").as_bytes()).await.unwrap());
    }
    assert_eq!(count(&server, "GenerateDataKey", &a), 2, "max_messages 3");
    // Decrypting them unwraps each data key once.
    for (i, file) in sealed.iter().enumerate() {
        let mut out = Vec::new();
        client.decrypt_stream(&BTreeMap::new(), &mut std::io::Cursor::new(file), &mut out).await.unwrap();
        assert_eq!(out, format!("file {i}").as_bytes());
    }
    assert_eq!(count(&server, "Decrypt", &a), 2);
    assert_eq!(client.cache().unwrap().len(), (1, 2));

    // Another key is disabled: the revocation epoch rises, and the next answer from the service
    // (here a data key under another context) drops everything cached.
    admin.disable_key(pb::DisableKeyRequest { key_id: b.clone() }).await.unwrap();
    seal(&mut client, "alias/a", &context("other"), b"x").await.unwrap();
    assert_eq!(client.cache().unwrap().len(), (1, 0), "only the key just made is left");
    seal(&mut client, "alias/a", &context("acme"), b"y").await.unwrap();
    assert_eq!(count(&server, "GenerateDataKey", &a), 4, "the acme key was dropped and made again");

    // The key itself is disabled: the client's next call is refused, and nothing is left cached.
    admin.disable_key(pb::DisableKeyRequest { key_id: a.clone() }).await.unwrap();
    let header = kms_client::envelope::Header::read(&mut std::io::Cursor::new(&sealed[0])).unwrap();
    let refused = client.decrypt_data_key(&header.wrapped_key, &header.context).await.unwrap_err();
    assert!(matches!(&refused, kms_client::Error::Status(s) if s.code() == tonic::Code::FailedPrecondition), "{refused}");
    assert!(client.cache().unwrap().is_empty());
    assert!(seal(&mut client, "alias/a", &context("acme"), b"z").await.is_err());

    // Off by default: every envelope asks the service.
    admin.enable_key(pb::EnableKeyRequest { key_id: a.clone() }).await.unwrap();
    let mut plain = DataClient::connect(&format!("https://{}", server.data_addr), &server.tls()).await.unwrap();
    let before = count(&server, "GenerateDataKey", &a);
    for _ in 0..2 {
        seal(&mut plain, "alias/a", &context("acme"), b"p").await.unwrap();
    }
    assert_eq!(count(&server, "GenerateDataKey", &a), before + 2);
    assert!(plain.cache().is_none());
}

fn audited(server: &Server, status: &str) -> i64 {
    server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'GenerateDataKey' AND status = ?1", [status], |r| r.get(0)).unwrap()
}

async fn client(server: &Server) -> DataClient {
    DataClient::connect(&format!("https://{}", server.data_addr), &server.tls()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_waits_out_a_rate_limit_by_its_hint() {
    let server = Server::start_with(Options { principal_calls_per_second: 2.0, principal_burst: 5.0, ..Options::default() });
    create_key(&mut server.admin().await, "retried").await;
    let mut client = client(&server).await;
    // Past the burst, the rate limit's hint is waited out: every call succeeds in the end.
    for _ in 0..6 {
        client.generate_data_key("alias/retried", &context("acme")).await.unwrap();
    }
    assert!(audited(&server, "RESOURCE_EXHAUSTED") >= 1, "the sixth call was limited, then retried");
    assert_eq!(audited(&server, "OK"), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_retries_an_unavailable_hsm_and_never_a_refusal() {
    let server = Server::start();
    let key = create_key(&mut server.admin().await, "retried").await;
    let mut client = client(&server).await;
    // An HSM that keeps failing: three attempts, then UNAVAILABLE for the caller.
    server.hsm_fault(Some("C_Encrypt CKR_DEVICE_ERROR"));
    let e = client.generate_data_key(&key, &context("acme")).await.unwrap_err();
    assert!(matches!(&e, kms_client::Error::Status(s) if s.code() == tonic::Code::Unavailable), "{e}");
    assert_eq!(audited(&server, "UNAVAILABLE"), 3, "one call, three attempts");
    server.hsm_fault(None);
    client.generate_data_key(&key, &context("acme")).await.unwrap();
    // A refusal is final: one attempt.
    assert!(client.generate_data_key("alias/nothing-here", &context("acme")).await.is_err());
    assert_eq!(audited(&server, "PERMISSION_DENIED"), 1);
}
