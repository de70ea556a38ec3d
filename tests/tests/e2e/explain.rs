//! `ExplainAccess` / `kmsctl explain` agree with what the real call does, for a table of
//! principals' states, grants and their conditions, expiries, rate limits and key states.

use std::collections::HashMap;
use std::time::Duration;

use kms_client::Channel;
use kms_proto::v1 as pb;
use kms_tests::{Admin, Options, Server, WORKLOAD, create_key, ctx, eventually, register_workload};

type Data = pb::crypto_client::CryptoClient<Channel>;

/// The data-plane call itself: GenerateDataKey, Encrypt, Decrypt (of `blob`) or ReEncrypt (of
/// `blob`, from `key` to `to`), with `context`. Returns the blob it made, if any.
async fn real(
    data: &mut Data,
    operation: &str,
    key: &str,
    context: &HashMap<String, String>,
    blob: &[u8],
    to: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let encryption_context = context.clone();
    match operation {
        "GenerateDataKey" => data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.into(),
                key_spec: pb::DataKeySpec::Aes256.into(),
                encryption_context,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().ciphertext_blob.clone()),
        "Encrypt" => data
            .encrypt(pb::EncryptRequest { key_id: key.into(), plaintext: b"explained".to_vec(), encryption_context, caller_context: None })
            .await
            .map(|r| r.into_inner().ciphertext_blob),
        "Decrypt" => data
            .decrypt(pb::DecryptRequest { ciphertext_blob: blob.to_vec(), encryption_context, key_id: key.into(), caller_context: None })
            .await
            .map(|_| Vec::new()),
        "ReEncryptFrom" => data
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: blob.to_vec(),
                source_encryption_context: encryption_context,
                source_key_id: key.into(),
                destination_key_id: to.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().ciphertext_blob),
        other => panic!("no call for {other}"),
    }
}

async fn explain(admin: &mut Admin, principal: &str, operation: &str, key: &str, context: &HashMap<String, String>) -> pb::ExplainAccessResponse {
    admin
        .explain_access(pb::ExplainAccessRequest {
            principal: principal.into(),
            operation: operation.into(),
            key_id: key.into(),
            encryption_context: context.clone(),
        })
        .await
        .expect("explained")
        .into_inner()
}

/// Both planes' clients.
struct Clients {
    admin: Admin,
    data: Data,
}

impl Clients {
    /// Asks, then calls, and checks the two agree; returns the blob the call made, if it did.
    async fn agree(&mut self, step: &str, operation: &str, key: &str, context: &[(&str, &str)], blob: &[u8], to: &str) -> Vec<u8> {
        let context = ctx(context);
        let explained = explain(&mut self.admin, WORKLOAD, operation, key, &context).await;
        let decision = &explained.decisions[0];
        let answer = real(&mut self.data, operation, key, &context, blob, to).await;
        assert_eq!(decision.allowed, answer.is_ok(), "{step}: {operation} {context:?}: explain says {decision:?}, the call answered {answer:?}");
        answer.unwrap_or_default()
    }
}

async fn grant(admin: &mut Admin, key: &str, operations: &[&str], pairs: &[(&str, &str)], keys: &[&str], expires: i64) -> String {
    admin
        .create_grant(pb::CreateGrantRequest {
            principal: WORKLOAD.into(),
            key_id: key.into(),
            operations: operations.iter().map(|o| o.to_string()).collect(),
            required_encryption_context: ctx(pairs),
            required_encryption_context_keys: keys.iter().map(|k| k.to_string()).collect(),
            expiration_time: expires,
        })
        .await
        .expect("grant created")
        .into_inner()
        .grant
        .expect("a grant")
        .grant_id
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_agrees_with_the_real_call_for_every_principal_grant_condition_and_key_state() {
    let server = Server::start();
    let mut c = Clients { admin: server.admin().await, data: server.data().await };
    let key =
        c.admin.create_key(pb::CreateKeyRequest { alias: "payroll".into(), ..Default::default() }).await.unwrap().into_inner().key.unwrap().key_id;
    let (hr, other, tenant) = (&[("app", "hr")][..], &[("app", "x")][..], &[("app", "hr"), ("tenant", "t1")][..]);

    // An unknown principal, then a registered one without a grant.
    let unknown = explain(&mut c.admin, WORKLOAD, "Encrypt", &key, &ctx(hr)).await;
    assert!(unknown.decisions[0].reasons.iter().any(|r| r.contains("is not registered")), "{unknown:?}");
    c.agree("unregistered", "Encrypt", &key, hr, &[], "").await;
    register_workload(&mut c.admin).await;
    c.agree("no grant", "Encrypt", &key, hr, &[], "").await;
    let dest = create_key(&mut c.admin, "destination").await; // grants the workload everything

    // A grant with a required pair, another with a required key.
    let g1 = grant(&mut c.admin, &key, &["Encrypt", "Decrypt", "ReEncryptFrom"], hr, &[], 0).await;
    grant(&mut c.admin, &key, &["GenerateDataKey"], &[], &["tenant"], 0).await;
    let blob = c.agree("granted", "Encrypt", &key, hr, &[], "").await;
    assert!(!blob.is_empty());
    for (operation, context, step) in [
        ("Encrypt", other, "wrong pair value"),
        ("Encrypt", &[][..], "no context"),
        ("GenerateDataKey", hr, "required key missing"),
        ("GenerateDataKey", tenant, "required key present"),
        ("Decrypt", hr, "decrypt granted"),
        ("Decrypt", other, "decrypt with another context"),
    ] {
        c.agree(step, operation, &key, context, &blob, "").await;
    }
    let why = explain(&mut c.admin, WORKLOAD, "Encrypt", &key, &ctx(other)).await;
    assert!(why.decisions[0].reasons.iter().any(|r| r.contains(&g1) && r.contains("requires the encryption context pair app=hr")), "{why:?}");

    // The principal disabled, then enabled again.
    c.admin.disable_principal(pb::PrincipalRequest { name: WORKLOAD.into() }).await.unwrap();
    c.agree("principal disabled", "Encrypt", &key, hr, &[], "").await;
    c.admin.enable_principal(pb::PrincipalRequest { name: WORKLOAD.into() }).await.unwrap();

    // The key disabled, then enabled again.
    c.admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    for operation in ["Encrypt", "Decrypt", "ReEncryptFrom"] {
        c.agree("key disabled", operation, &key, hr, &blob, &dest).await;
    }
    c.admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    c.agree("key enabled again", "Encrypt", &key, hr, &[], "").await;

    // Compromised: nothing new is encrypted, and blobs can only be re-encrypted out.
    c.admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key.clone() }).await.unwrap();
    for operation in ["Encrypt", "GenerateDataKey", "Decrypt", "ReEncryptFrom"] {
        c.agree("compromised", operation, &key, if operation == "GenerateDataKey" { tenant } else { hr }, &blob, &dest).await;
    }
    let out = explain(&mut c.admin, WORKLOAD, "ReEncryptFrom", &key, &ctx(hr)).await;
    assert!(out.decisions[0].allowed, "{out:?}");

    // The grant revoked.
    c.admin.revoke_grant(pb::RevokeGrantRequest { grant_id: g1 }).await.unwrap();
    c.agree("grant revoked", "ReEncryptFrom", &key, hr, &blob, &dest).await;

    // Who can decrypt under the destination key? The workload, through its grant.
    let everyone = explain(&mut c.admin, "", "Decrypt", &dest, &HashMap::new()).await;
    assert_eq!(everyone.decisions.len(), 1);
    assert!(everyone.decisions[0].allowed && everyone.decisions[0].principal == WORKLOAD, "{everyone:?}");
    // An unknown key is an error for an officer, not a decision.
    let missing = c
        .admin
        .explain_access(pb::ExplainAccessRequest { operation: "Decrypt".into(), key_id: "alias/none".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad = c
        .admin
        .explain_access(pb::ExplainAccessRequest { operation: "Destroy".into(), key_id: dest.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(bad.code() == tonic::Code::InvalidArgument && bad.message().starts_with("operation "), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_sees_expiry_and_rate_limits_as_the_call_does() {
    // Every principal has its own bucket, the officer too: a burst of 8, refilled every 20 s.
    let server = Server::start_with(Options { principal_calls_per_second: 0.05, principal_burst: 8.0, ..Options::default() });
    let mut c = Clients { admin: server.admin().await, data: server.data().await };
    let (admin, data) = (&mut c.admin, &mut c.data);
    let key = admin.create_key(pb::CreateKeyRequest::default()).await.unwrap().into_inner().key.unwrap().key_id;
    register_workload(admin).await;
    let soon = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 5;
    grant(admin, &key, &["Encrypt"], &[], &[], soon).await;
    // Within the burst, allowed; past it, refused by the rate limit, and explain says so first.
    let allowed = explain(admin, WORKLOAD, "Encrypt", &key, &HashMap::new()).await;
    assert!(allowed.decisions[0].allowed, "{allowed:?}");
    for _ in 0..8 {
        real(data, "Encrypt", &key, &HashMap::new(), &[], "").await.expect("within the burst");
    }
    let throttled = explain(admin, WORKLOAD, "Encrypt", &key, &HashMap::new()).await;
    assert!(!throttled.decisions[0].allowed && throttled.decisions[0].reasons[0].contains("rate limit"), "{throttled:?}");
    let refused = real(data, "Encrypt", &key, &HashMap::new(), &[], "").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // The grant expires: explain names the expiry, and once the bucket refills the call is
    // refused by the policy too.
    eventually("the grant to expire", Duration::from_secs(15), || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        now > soon
    });
    let expired = explain(admin, WORKLOAD, "Encrypt", &key, &HashMap::new()).await;
    assert!(expired.decisions[0].reasons.iter().any(|r| r.contains(&format!("expired at {soon}"))), "{expired:?}");
    assert!(!expired.decisions[0].allowed);
}

#[test]
fn kmsctl_explain_lists_who_can_decrypt() {
    let server = Server::start();
    let run = |args: &[&str]| {
        let out = server.kmsctl(args);
        assert!(out.status.success(), "kmsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["key", "create", "--alias", "payroll"]);
    run(&["principal", "add", WORKLOAD]);
    run(&["principal", "add", "spiffe://example.org/reporting"]);
    run(&["grant", "create", "--principal", WORKLOAD, "--key", "alias/payroll", "--operations", "Decrypt", "--require", "app=hr"]);
    run(&["grant", "create", "--principal", "spiffe://example.org/reporting", "--key", "alias/payroll", "--operations", "Encrypt"]);
    let text = run(&["explain", "--key", "alias/payroll", "--operation", "Decrypt", "--context", "app=hr"]);
    assert!(text.contains(&format!("ALLOWED  {WORKLOAD}")), "{text}");
    assert!(text.contains("DENIED   spiffe://example.org/reporting") && text.contains("does not allow Decrypt"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&run(&["--json", "explain", "--key", "alias/payroll", "--operation", "Decrypt"])).unwrap();
    let decisions = json["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2);
    assert!(decisions.iter().all(|d| d["allowed"] == false), "without app=hr nobody can: {json}");
    let one = run(&["explain", "--principal", "spiffe://example.org/nobody", "--key", "alias/payroll", "--operation", "Encrypt"]);
    assert!(one.contains("is not registered"), "{one}");
}
