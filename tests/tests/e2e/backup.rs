//! TESTPLAN R14: backups. The drill: keys created, rotated, used; a backup through `kmsctl`;
//! the token and the database wiped; `kms-server restore` into a token holding only the same
//! backup key pair: every blob made before the backup decrypts, the audit verifies, and a key
//! destroyed after the backup stays destroyed. A one-bit change anywhere in the file is refused
//! by `kmsctl backup verify` and by the restore, which then writes nothing.

use std::path::Path;
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key, ctx};

/// A data key made under `key`: (blob, plaintext, context pair).
async fn data_key(data: &mut kms_proto::v1::crypto_client::CryptoClient<kms_client::Channel>, key: &str, n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut r = data.generate_data_key(kms_tests::gdk(key, &[("n", &n.to_string())])).await.unwrap().into_inner();
    (std::mem::take(&mut r.ciphertext_blob), std::mem::take(&mut r.plaintext))
}

async fn decrypts(data: &mut kms_proto::v1::crypto_client::CryptoClient<kms_client::Channel>, blob: &[u8], n: usize) -> Option<Vec<u8>> {
    let request = pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(&[("n", &n.to_string())]),
        key_id: String::new(),
        caller_context: None,
    };
    data.decrypt(request).await.ok().map(|r| std::mem::take(&mut r.into_inner().plaintext))
}

fn wipe(server: &Server) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", server.db_path().display()));
    }
    server.replace_token_with_replica();
}

fn flipped(original: &Path, at: usize, to: &Path) {
    let mut bytes = std::fs::read(original).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(to, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_backup_wipe_restore_every_blob_decrypts_and_the_audit_verifies() {
    let mut server = Server::start_with(Options { backup_key: true, ..Options::default() });
    let (keys, blobs) = {
        let mut admin = server.admin().await;
        let mut data = server.data().await;
        let keys = [create_key(&mut admin, "a").await, create_key(&mut admin, "b").await, create_key(&mut admin, "c").await];
        let mut blobs = Vec::new();
        for round in 0..3 {
            for key in &keys {
                let n = blobs.len();
                let (blob, plaintext) = data_key(&mut data, key, n).await;
                blobs.push((key.clone(), blob, plaintext));
            }
            admin.rotate_key(pb::RotateKeyRequest { key_id: keys[round % 2].clone() }).await.unwrap();
        }
        (keys, blobs)
    };
    let file = server.dir.path().join("drill.kmsbak");
    let file_arg = file.display().to_string();
    let out = server.kmsctl(&["--json", "backup", "create", "--out", &file_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["manifest"]["keys"], 3);
    assert_eq!(made["manifest"]["live_versions"], 6, "{made}");
    assert_eq!(made["manifest"]["objects"], 8, "six versions and the two service keys");
    assert_eq!(made["manifest"]["file_bytes"].as_u64(), Some(std::fs::metadata(&file).unwrap().len()));
    let bytes = std::fs::read(&file).unwrap();
    for (blob_key, _, plaintext) in &blobs {
        assert!(!bytes.windows(plaintext.len()).any(|w| w == plaintext.as_slice()), "a data key of {blob_key} is in the file in clear");
    }
    let verified = server.kmsctl(&["backup", "verify", &file_arg]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    assert!(String::from_utf8_lossy(&verified.stdout).contains("backup ok"));

    // A one-bit change anywhere is refused: in the magic, the manifest, the MAC, the wrapped
    // objects, the database.
    let manifest_len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let mac_at = 12 + manifest_len;
    let changed = server.dir.path().join("changed.kmsbak");
    for (at, what) in [(3, "magic"), (30, "manifest"), (mac_at + 5, "mac"), (mac_at + 40, "objects"), (bytes.len() - 100, "database")] {
        flipped(&file, at, &changed);
        let out = server.kmsctl(&["backup", "verify", &changed.display().to_string()]);
        assert!(!out.status.success(), "a bit changed in the {what} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let names = match what {
            "magic" => "magic",
            "manifest" => "manifest",
            "mac" => "mac",
            "objects" => "objects_sha256",
            _ => "database_sha256",
        };
        assert!(stderr.contains(names), "{what}: {stderr}");
    }

    // Key c is destroyed after the backup.
    {
        let mut admin = server.admin().await;
        let request = pb::ScheduleKeyDestructionRequest { key_id: keys[2].clone(), pending_window_days: 7 };
        admin.schedule_key_destruction(request).await.unwrap();
    }
    server.stop();
    server.sql("UPDATE keys SET destruction_at = 1");
    server.restart();
    kms_tests::eventually("key c destroyed", Duration::from_secs(20), || {
        server.db().query_row("SELECT state FROM keys WHERE key_id = ?1", [&keys[2]], |r| r.get::<_, String>(0)).unwrap() == "Destroyed"
    });
    let listed = server.kmsctl(&["key", "list", "--state", "destroyed", "--ids"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), keys[2], "what the operator tells the restore");
    server.stop();

    // The disaster: token and database gone; a token holding the same backup key pair.
    wipe(&server);
    let restore = |args: &[&str]| {
        let mut all = vec!["restore"];
        all.extend_from_slice(args);
        server.server_command(&all).unwrap()
    };
    let silent = restore(&[&file_arg]);
    assert!(!silent.status.success(), "a restore that does not say what was destroyed since must be refused");
    assert!(String::from_utf8_lossy(&silent.stderr).contains("--destroyed-since"), "{}", String::from_utf8_lossy(&silent.stderr));
    for at in [mac_at + 5, bytes.len() - 100] {
        flipped(&file, at, &changed);
        let out = restore(&[&changed.display().to_string(), "--none-destroyed-since"]);
        assert!(!out.status.success(), "a changed file was restored");
        assert!(!server.db_path().exists() && !server.dir.path().join("kms.db.restoring").exists(), "a refused restore wrote a database");
        assert!(server.object_labels().is_empty(), "a refused restore unwrapped objects");
    }
    // What another backup's interrupted restore left is refused, and nothing is cleaned up.
    let leftover = server.dir.path().join("kms.db.restoring");
    std::fs::write(&leftover, b"half a database").unwrap();
    std::fs::write(server.dir.path().join("kms.db.restoring.backup"), b"another backup").unwrap();
    let out = restore(&[&file_arg, "--none-destroyed-since"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("another backup"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&leftover).unwrap(), b"half a database");
    std::fs::remove_file(&leftover).unwrap();

    let destroyed_list = server.dir.path().join("destroyed-since.txt");
    let mut list = b"# destroyed after the backup (kmsctl key list --state destroyed --ids)\n".to_vec();
    list.extend_from_slice(&listed.stdout);
    std::fs::write(&destroyed_list, list).unwrap();
    let out = restore(&[&file_arg, "--destroyed-since", &destroyed_list.display().to_string()]);
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 keys, 6 live versions"), "{}", String::from_utf8_lossy(&out.stdout));
    let again = restore(&[&file_arg, "--none-destroyed-since"]);
    assert!(!again.status.success(), "a second restore over a restored service must be refused");

    server.restart();
    server.relogin();
    let mut data = server.data().await;
    let mut restored = 0;
    for (n, (key, blob, plaintext)) in blobs.iter().enumerate() {
        let got = decrypts(&mut data, blob, n).await;
        if *key == keys[2] {
            assert_eq!(got, None, "a blob of the key destroyed after the backup decrypted");
        } else {
            assert_eq!(got.as_deref(), Some(plaintext.as_slice()), "blob {n} of {key}");
            restored += 1;
        }
    }
    assert_eq!(restored, 6, "every blob of the keys still alive decrypts");
    let state: String = server.db().query_row("SELECT state FROM keys WHERE key_id = ?1", [&keys[2]], |r| r.get(0)).unwrap();
    assert_eq!(state, "Destroyed");
    assert_eq!(server.object_labels(), server.live_version_labels(), "HSM objects and live rows agree");
    assert!(!server.object_labels().iter().any(|o| o.contains(&keys[2])), "the destroyed key's material came back");
    // Restored objects are as hard to get out as the originals, the backup key pair included.
    let attacked: Vec<serde_json::Value> = serde_json::from_slice(&server.inspect("attack")).unwrap();
    assert!(attacked.len() >= 6, "the restored versions and the service's keys: {attacked:?}");
    for o in &attacked {
        for (attempt, allowed) in o["attack"].as_object().unwrap() {
            assert_eq!(allowed.as_bool(), Some(false), "{}: {attempt} was allowed on a restored object", o["label"]);
        }
    }

    // The restored versions encrypt no more (their use after the backup is unknown): the first
    // encryption rotates the key.
    let (blob, plaintext) = data_key(&mut data, &keys[0], 99).await;
    assert_eq!(decrypts(&mut data, &blob, 99).await, Some(plaintext));
    let mut admin = server.admin().await;
    let a = admin.describe_key(pb::DescribeKeyRequest { key_id: keys[0].clone() }).await.unwrap().into_inner();
    assert_eq!(a.key.unwrap().primary_version, 4, "key a (three versions in the backup) rotated on its first encryption");

    let verify = server.kmsctl(&["--json", "audit", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let restores: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Restore'", [], |r| r.get(0)).unwrap();
    assert_eq!(restores, 1, "the restore is in the audit trail");

    // Restored objects keep their template: they can be backed up again.
    let second = server.dir.path().join("second.kmsbak").display().to_string();
    let out = server.kmsctl(&["--json", "backup", "create", "--out", &second]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["manifest"]["live_versions"], 6, "a's four versions and b's two: {made}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_a_backup_key_refuses_backups_and_leaves_no_file() {
    let server = Server::start();
    let out = server.kmsctl(&["backup", "create", "--out", &server.dir.path().join("b.kmsbak").display().to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FailedPrecondition") && stderr.contains("backup-key"), "{stderr}");
    assert!(!server.dir.path().join("b.kmsbak").exists() && !server.dir.path().join("b.kmsbak.partial").exists());
}

/// The same drill over PostgreSQL: the backup's database section is the same SQLite snapshot,
/// and the restore copies it into an empty database at its commit point.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_store_restores_into_an_empty_database() {
    let mut server = Server::start_with(Options { backup_key: true, backend: kms_tests::Backend::Postgres, ..Options::default() });
    let mut blobs = Vec::new();
    {
        let mut admin = server.admin().await;
        let mut data = server.data().await;
        let key = create_key(&mut admin, "pg").await;
        for n in 0..4 {
            blobs.push(data_key(&mut data, &key, n).await);
            if n == 1 {
                admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
            }
        }
    }
    let file = server.dir.path().join("pg.kmsbak").display().to_string();
    let out = server.kmsctl(&["backup", "create", "--out", &file]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    server.stop();
    server.replace_token_with_replica();
    // Into the database it came from (not empty): refused, and nothing unwrapped.
    let refused = server.server_command(&["restore", &file, "--none-destroyed-since"]).unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("restore only into an empty one"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(server.object_labels().is_empty(), "a refused restore unwrapped objects");

    server.use_database(kms_tests::Database::create().unwrap());
    let out = server.server_command(&["restore", &file, "--none-destroyed-since"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!server.dir.path().join("kms.db.restoring").exists() && !server.db_path().exists(), "nothing left in the data directory");
    server.restart();
    server.relogin();
    let mut data = server.data().await;
    for (n, (blob, plaintext)) in blobs.iter().enumerate() {
        assert_eq!(decrypts(&mut data, blob, n).await.as_ref(), Some(plaintext), "blob {n}");
    }
    let verify: serde_json::Value = serde_json::from_slice(&server.kmsctl(&["--json", "audit", "verify"]).stdout).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    let restored: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Restore'", [], |r| r.get(0)).unwrap();
    assert_eq!(restored, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cloud_facades_come_back_with_a_restore_and_open_what_aws_and_google_hold() {
    use crate::xks::{REGION, allow, decrypt_body, encrypt_body, key_store, new_key, xks};
    let mut server = Server::start_with(Options { backup_key: true, ..Options::default() });
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "s3").await;
    let credential = key_store(&mut admin, "aws", "/aws").await;
    allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    let path = |call: &str| format!("/aws/kms/xks/v1/keys/{key}/{call}");
    let encrypt = encrypt_body(b"secret");
    let (status, sealed) = xks(&server, "POST", &path("encrypt"), &encrypt, &credential, REGION);
    assert_eq!(status, 200, "{sealed}");
    let google = crate::cse::tenant(&server, &mut admin, &key).await;
    let (status, wrapped) = crate::cse::post(&server, "wrap", &google.wrap(b"data key"));
    assert_eq!(status, 200, "{wrapped}");
    drop(admin);
    let file = server.dir.path().join("xks.kmsbak").display().to_string();
    let out = server.kmsctl(&["backup", "create", "--out", &file]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    server.stop();
    wipe(&server);
    let out = server.server_command(&["restore", &file, "--none-destroyed-since"]).unwrap();
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    server.restart();
    // The key store, its credential (sealed under a restored HSM key) and its grant are back:
    // what AWS holds decrypts, signed with the credential AWS holds.
    let decrypt = decrypt_body(&sealed, None);
    let (status, opened) = xks(&server, "POST", &path("decrypt"), &decrypt, &credential, REGION);
    assert_eq!((status, opened["plaintext"].as_str()), (200, Some("c2VjcmV0")), "{opened}");
    // Google's settings, issuers and grant too: what Google holds unwraps.
    let (status, opened) = crate::cse::post(&server, "unwrap", &google.unwrap(&wrapped["wrapped_key"], "ana@example.com", "reader"));
    assert_eq!((status, opened["key"].as_str()), (200, Some("ZGF0YSBrZXk=")), "{opened}");
}
