//! TESTPLAN R10 through the real interface: proptest builds hostile requests for every data-plane
//! RPC (and the admin calls that take free text) and sends them to the real server. Nothing may
//! crash it or take over a second; every refusal is a precise status (an INVALID_ARGUMENT names
//! the field); no refusal changes anything but the audit trail. 2,000 cases per RPC.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

/// Strings that mix valid-looking ids and aliases with junk, control characters and length.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "alias/[a-z0-9/_-]{0,40}",
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ".{0,64}",
        proptest::collection::vec(any::<char>(), 0..300).prop_map(|c| c.into_iter().collect()),
        (0usize..10_000).prop_map(|n| "k".repeat(n)),
    ]
}

fn context() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![proptest::collection::hash_map(text(), text(), 0..4), proptest::collection::hash_map("[a-z]{1,8}", ".{0,2000}", 60..70),]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), proptest::collection::vec(any::<u8>(), 6000..6300)]
}

/// What a refusal may be: anything precise, never INTERNAL, UNKNOWN or UNAVAILABLE.
fn precise(status: &tonic::Status, what: &str) {
    let allowed = [Code::InvalidArgument, Code::NotFound, Code::PermissionDenied, Code::FailedPrecondition, Code::AlreadyExists];
    assert!(allowed.contains(&status.code()), "{what}: {status:?}");
    if status.code() == Code::InvalidArgument {
        // The field first (or the one uniform decrypt message, which names ciphertext_blob).
        let first = status.message().split(' ').next().unwrap_or_default();
        assert!(first.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !first.is_empty(), "{what}: {}", status.message());
    }
}

/// A call answered within a second, and precisely if refused.
fn answered<T>(what: &str, started: Instant, r: Result<T, tonic::Status>) {
    assert!(started.elapsed() < Duration::from_secs(1), "{what} took {:?}", started.elapsed());
    if let Err(e) = r {
        precise(&e, what);
    }
}

#[test]
fn hostile_requests_to_every_rpc_are_refused_precisely_and_change_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = Server::start();
    let (mut data, admin, key) = rt.block_on(async {
        let mut admin = server.admin().await;
        let key = create_key(&mut admin, "fuzzed").await;
        (server.data().await, admin, key)
    });
    let blob = rt.block_on(async {
        let mut r = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                key_spec: 1,
                number_of_bytes: 0,
                encryption_context: HashMap::new(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        std::mem::take(&mut r.ciphertext_blob)
    });
    let before = server.state_snapshot();
    let cases: u32 = std::env::var("KMS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });

    runner
        .run(&(text(), any::<i32>(), prop_oneof![Just(0u32), any::<u32>()], context()), |(key_id, spec, n, ctx)| {
            let started = Instant::now();
            let r = rt.block_on(data.clone().generate_data_key(pb::GenerateDataKeyRequest {
                key_id,
                key_spec: spec,
                number_of_bytes: n,
                encryption_context: ctx,
                caller_context: None,
            }));
            answered("GenerateDataKey", started, r);
            Ok(())
        })
        .unwrap();
    runner
        .run(&(text(), bytes(), context()), |(key_id, plaintext, ctx)| {
            let started = Instant::now();
            let r = rt.block_on(data.clone().encrypt(pb::EncryptRequest { key_id, plaintext, encryption_context: ctx, caller_context: None }));
            answered("Encrypt", started, r);
            Ok(())
        })
        .unwrap();
    runner
        .run(&(mutated(&blob), context(), text()), |(ciphertext_blob, ctx, key_id)| {
            let started = Instant::now();
            let r = rt.block_on(data.clone().decrypt(pb::DecryptRequest { ciphertext_blob, encryption_context: ctx, key_id, caller_context: None }));
            answered("Decrypt", started, r);
            Ok(())
        })
        .unwrap();
    runner
        .run(&(mutated(&blob), context(), text(), context()), |(ciphertext_blob, source_ctx, destination, dest_ctx)| {
            let started = Instant::now();
            let r = rt.block_on(data.clone().re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob,
                source_encryption_context: source_ctx,
                source_key_id: String::new(),
                destination_key_id: destination,
                destination_encryption_context: dest_ctx,
                caller_context: None,
            }));
            answered("ReEncrypt", started, r);
            Ok(())
        })
        .unwrap();
    runner
        .run(&(any::<u32>(), proptest::option::of((text(), text(), proptest::collection::hash_map(text(), text(), 0..12)))), |(n, caller)| {
            let caller_context = caller.map(|(user, reason, attributes)| pb::CallerContext { user, reason, attributes });
            let started = Instant::now();
            let r = rt.block_on(data.clone().generate_random(pb::GenerateRandomRequest { number_of_bytes: n, caller_context }));
            answered("GenerateRandom", started, r);
            Ok(())
        })
        .unwrap();
    // Admin calls that take free text, refused or not, must stay precise too.
    runner
        .run(&(text(), text()), |(key_id, alias)| {
            let started = Instant::now();
            let r = rt.block_on(admin.clone().create_alias(pb::CreateAliasRequest { alias, key_id }));
            answered("CreateAlias", started, r);
            Ok(())
        })
        .unwrap();
    // A backup's head to verify: junk, or a manifest-shaped JSON with junk values.
    let manifest = prop_oneof![
        bytes(),
        (text(), any::<i64>(), any::<u64>()).prop_map(|(label, t, n)| {
            format!(r#"{{"format":1,"created_at":{t},"service_version":"x","token_label":{label:?},"token_serial":"","backup_key_label":"","keys":{n},"live_versions":0,"audit_checkpoint_seq":0,"objects":{{"count":0,"bytes":0,"sha256":""}},"database":{{"count":1,"bytes":{n},"sha256":""}}}}"#)
                .into_bytes()
        }),
    ];
    runner
        .run(&(manifest, bytes(), any::<u64>(), text()), |(manifest, mac, n, sha)| {
            let started = Instant::now();
            let request =
                pb::VerifyBackupRequest { manifest, mac, objects_bytes: n, objects_sha256: sha.clone(), database_bytes: n, database_sha256: sha };
            let r = rt.block_on(admin.clone().verify_backup(request));
            assert!(r.is_err(), "a forged backup head verified");
            answered("VerifyBackup", started, r);
            Ok(())
        })
        .unwrap();
    // The server is still there and nothing but aliases (which CreateAlias may have made from a
    // valid random request) and the audit trail changed.
    rt.block_on(admin.clone().list_keys(pb::ListKeysRequest::default())).unwrap();
    let strip_aliases = |s: String| s.lines().filter(|l| !l.contains("alias")).map(|l| format!("{l}\n")).collect::<String>();
    assert_eq!(strip_aliases(server.state_snapshot()), strip_aliases(before));
}

/// Junk, or the real blob with one bit flipped or cut short.
fn mutated(blob: &[u8]) -> impl Strategy<Value = Vec<u8>> {
    let blob = blob.to_vec();
    (bytes(), any::<usize>(), any::<u8>()).prop_map(move |(junk, at, bit)| if junk.len() % 2 == 0 { junk } else { mutate(&blob, at, bit) })
}

/// `blob` with one bit flipped at `at` (modulo its length), or cut short there.
fn mutate(blob: &[u8], at: usize, bit: u8) -> Vec<u8> {
    let mut out = blob.to_vec();
    let i = at % out.len();
    if bit & 0x80 == 0 {
        out[i] ^= 1 << (bit & 7);
    } else {
        out.truncate(i);
    }
    out
}
