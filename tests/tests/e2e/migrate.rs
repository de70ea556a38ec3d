//! `kms-server migrate --from-sqlite`: the data directory the single-node release left
//! (`tests/fixtures/single-node`, made by `scripts/make-single-node-fixture.sh` with that
//! release's binaries) moves into PostgreSQL, verifies there, and serves its old blobs, keys,
//! grants, officers and trail unchanged.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kms_proto::v1 as pb;
use kms_tests::{Backend, Database, Options, Server, login_officer};
use sha2::{Digest, Sha256};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/single-node")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_node_database_moves_into_postgresql_and_serves_as_before() {
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = kms_tests::token_from_fixture(&fixture(), dir.path(), golden["token_label"].as_str().unwrap()).unwrap();
    let old = dir.path().join("single-node.db");
    std::fs::copy(fixture().join("kms.db"), &old).unwrap();
    let before = Sha256::digest(std::fs::read(&old).unwrap());
    let options = Options { backend: Backend::Postgres, ..Options::default() };
    let mut server = Server::configured(dir, token, options, Some(Database::create().unwrap()));

    // Bad input first, changing nothing: a missing file.
    let out = server.server_command(&["migrate", "--from-sqlite", "/nonexistent/kms.db"]).unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/kms.db: no such database file"), "{}", stderr(&out));

    let out = server.server_command(&["migrate", "--from-sqlite", old.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("keys 2, key_versions 3, aliases 2"), "{report}");
    assert!(report.contains("audit trail verified"), "{report}");
    assert_eq!(Sha256::digest(std::fs::read(&old).unwrap()), before, "the source database is left as it was");
    assert!(!server.dir.path().join("kms.db.migrating").exists(), "the working copy is removed");

    // Into a database that holds something: refused, naming why.
    let again = server.server_command(&["migrate", "--from-sqlite", old.to_str().unwrap()]).unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("migrate only into an empty one"), "{}", stderr(&again));

    server.restart();
    let passphrase = std::fs::read_to_string(fixture().join("dev-officer.passphrase")).unwrap();
    let totp = std::fs::read_to_string(fixture().join("dev-officer.totp")).unwrap();
    server.session = login_officer(&server, "dev-officer", passphrase.trim(), totp.trim()).await;
    std::fs::write(server.session_path(), &server.session).unwrap();

    // The old blobs decrypt, under the versions that made them.
    let mut data = server.data().await;
    for v in golden["vectors"].as_array().unwrap() {
        let answer = &v["answer"];
        let context = v["encryption_context"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        let r = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: B64.decode(answer["ciphertext_blob"].as_str().unwrap()).unwrap(),
                encryption_context: context,
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{v}: {e}"))
            .into_inner();
        assert_eq!(r.plaintext, B64.decode(answer["plaintext"].as_str().unwrap()).unwrap());
        assert_eq!(u64::from(r.key_version), answer["key_version"].as_u64().unwrap());
    }
    let plain = server.dir.path().join("fixture.out");
    let out = server.kmsctl(&["decrypt", "--in", fixture().join("fixture.kmse").to_str().unwrap(), "--out", plain.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(fixture().join("fixture.txt")).unwrap());

    // Keys and their states, aliases, counters, principals, grants, officers and the sign-off.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = server.kmsctl(&[&["--json"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let fixture_key = json(&["key", "describe", "alias/fixture"]);
    assert_eq!(fixture_key["primary_version"], 2, "{fixture_key}");
    assert_eq!(json(&["key", "describe", "alias/disabled"])["state"], "DISABLED");
    let db = server.db();
    let reserved: Vec<i64> = db
        .prepare("SELECT reserved FROM key_versions ORDER BY key_id, version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(reserved.iter().filter(|&&n| n > 0).count(), 2, "the usage counters came along: {reserved:?}");
    let principals = json(&["principal", "list"]);
    let retired = principals.as_array().unwrap().iter().find(|p| p["name"] == "spiffe://kms.dev/workload/retired");
    assert_eq!(retired.map(|p| &p["state"]), Some(&serde_json::json!("Disabled")), "{principals}");
    let grants: i64 = db.query_row("SELECT COUNT(*) FROM grants", [], |r| r.get(0)).unwrap();
    assert_eq!(grants, 2);
    let officers = json(&["officer", "list"]).to_string();
    assert!(officers.contains("auditor1"), "{officers}");
    let signoffs: i64 = db.query_row("SELECT COUNT(*) FROM review_signoffs", [], |r| r.get(0)).unwrap();
    assert_eq!(signoffs, 1);

    // One trail: the old records and checkpoints, then the migration's record, and it verifies.
    let fixture_db = rusqlite::Connection::open(&old).unwrap();
    let old_last: i64 = fixture_db.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).unwrap();
    let migrated: i64 = db.query_row("SELECT seq FROM audit WHERE operation = 'Migrate'", [], |r| r.get(0)).unwrap();
    assert_eq!(migrated, old_last + 1, "the migration's record follows the last one moved");
    let verify = json(&["audit", "verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert!(verify["checkpoints"].as_u64().unwrap() >= 2, "{verify}");
}

#[test]
fn migrate_is_refused_into_a_sqlite_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let token = hsm_sim::Token::open_or_provision(&dir.path().join("softhsm"), "kms-test").unwrap();
    let server = Server::configured(dir, token, Options { backend: Backend::Sqlite, ..Options::default() }, None);
    let out = server.server_command(&["migrate", "--from-sqlite", fixture().join("kms.db").to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("migrate moves a SQLite database into PostgreSQL"), "{}", stderr(&out));
}
