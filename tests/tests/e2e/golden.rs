//! TESTPLAN R15: format stability. Blobs, an envelope file, a SoftHSM2 token and a database made
//! by release 0.1.0 are committed under `tests/fixtures/v1/`; this build must open and decrypt
//! them all.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kms_proto::v1 as pb;
use kms_tests::{Options, Server};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1")
}

/// Starts a server on a copy of the committed token and database.
fn start_on_fixture() -> (Server, serde_json::Value) {
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = kms_tests::token_from_fixture(&fixture(), dir.path(), golden["token_label"].as_str().unwrap()).unwrap();
    std::fs::copy(fixture().join("kms.db"), dir.path().join("kms.db")).unwrap();
    // A checkout gives the committed database the umask's mode; the service wants it private.
    std::fs::set_permissions(dir.path().join("kms.db"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (Server::start_in(dir, token, Options::default()), golden)
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_blobs_from_release_0_1_0_still_decrypt() {
    let (server, golden) = start_on_fixture();
    // Release 0.1.0 had no grants: the database migrates, and an officer grants the workload.
    let mut admin = server.admin().await;
    kms_tests::grant_all(&mut admin, golden["alias"].as_str().unwrap()).await;
    let mut data = server.data().await;
    for v in golden["vectors"].as_array().unwrap() {
        let context = v["encryption_context"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        let mut d = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: B64.decode(v["ciphertext_blob"].as_str().unwrap()).unwrap(),
                encryption_context: context,
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap_or_else(|e| panic!("golden vector {v} no longer decrypts: {e}"))
            .into_inner();
        assert_eq!(std::mem::take(&mut d.plaintext), B64.decode(v["plaintext"].as_str().unwrap()).unwrap());
        assert_eq!(d.key_id, v["key_id"].as_str().unwrap());
        assert_eq!(u64::from(d.key_version), v["key_version"].as_u64().unwrap());
    }

    // The database fixture opens: the alias, both versions and their counts are there.
    let described = admin.describe_key(pb::DescribeKeyRequest { key_id: golden["alias"].as_str().unwrap().into() }).await.unwrap().into_inner();
    assert_eq!(described.key.unwrap().primary_version, 2);
    assert_eq!(described.versions.len(), 2);

    // The envelope file from release 0.1.0 decrypts through kmsctl.
    let env = &golden["envelope"];
    let out = server.dir.path().join("golden.out");
    let result = server.kmsctl(&["decrypt", "--in", fixture().join(env["file"].as_str().unwrap()).to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(fixture().join(env["plaintext_file"].as_str().unwrap())).unwrap());
}
