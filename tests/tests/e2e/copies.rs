//! Session copies of key versions (ARCHITECTURE.md, `hsm/copies.rs`): made in the background
//! with the backup key pair once a version is used, used by the data plane from then on,
//! destroyed with their version, evicted when left unused and made again on the next use, and
//! off on a token without a backup key pair. (After a lost
//! login or a re-initialised library they are made again: `faults.rs`.)

use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key, eventually, gdk};

pub const COPIES: &str = "kms_hsm_session_copies";

/// Successful calls of a PKCS#11 function so far.
pub fn calls(server: &Server, function: &str) -> f64 {
    server.metric(&format!("kms_hsm_calls_total{{function=\"{function}\",result=\"ok\"}}")).unwrap_or(0.0)
}

fn decrypt(blob: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest { ciphertext_blob: blob.to_vec(), encryption_context: Default::default(), key_id: String::new(), caller_context: None }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_version_gets_a_session_copy_that_is_destroyed_with_it() {
    // The sweep's clock runs 8 days ahead, so a version scheduled for destruction in 7 days is
    // destroyed at the next sweep, while the server (and its copies) run.
    let server = Server::start_with(Options { backup_key: true, sweep_clock_offset: 8 * 86_400, ..Options::default() });
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "copied").await;
    assert_eq!(server.metric(COPIES), Some(0.0), "no copy before the first use");

    let first = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
    eventually("the copy of version 1", Duration::from_secs(10), || server.metric(COPIES) == Some(1.0));
    assert_eq!((calls(&server, "C_WrapKey"), calls(&server, "C_UnwrapKey")), (1.0, 1.0), "one wrap and one unwrap make a copy");
    for _ in 0..20 {
        let r = data.decrypt(decrypt(&first.ciphertext_blob)).await.unwrap().into_inner();
        assert_eq!(r.plaintext, first.plaintext, "the copy decrypts what the token object encrypted");
        let more = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
        assert_eq!(&data.decrypt(decrypt(&more.ciphertext_blob)).await.unwrap().into_inner().plaintext, &more.plaintext);
    }
    assert_eq!(calls(&server, "C_UnwrapKey"), 1.0, "the copy is made once and kept");
    let status = server.kmsctl(&["status"]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("session copies of key versions: 1"), "{said}");

    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    let second = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
    eventually("the copy of version 2", Duration::from_secs(10), || server.metric(COPIES) == Some(2.0));

    let destroyed_before = calls(&server, "C_DestroyObject");
    admin
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest { key_id: key.clone(), key_version: 1, pending_window_days: 7 })
        .await
        .unwrap();
    eventually("version 1 destroyed", Duration::from_secs(30), || server.live_version_labels() == [format!("kms:{key}:2")]);
    assert_eq!(server.object_labels(), [format!("kms:{key}:2")]);
    eventually("its copy gone", Duration::from_secs(10), || server.metric(COPIES) == Some(1.0));
    assert_eq!(calls(&server, "C_DestroyObject") - destroyed_before, 2.0, "the copy and the token object");

    let e = data.decrypt(decrypt(&first.ciphertext_blob)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "version 1 is gone: {e}");
    assert_eq!(&data.decrypt(decrypt(&second.ciphertext_blob)).await.unwrap().into_inner().plaintext, &second.plaintext);
    assert_eq!(calls(&server, "C_UnwrapKey"), 2.0, "no copy is made of a destroyed version");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_backup_key_pair_there_are_no_session_copies() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let r = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
    assert_eq!(&data.decrypt(decrypt(&r.ciphertext_blob)).await.unwrap().into_inner().plaintext, &r.plaintext);
    assert_eq!(server.metric(COPIES), None);
    assert_eq!(calls(&server, "C_UnwrapKey"), 0.0);
    let status = server.kmsctl(&["status"]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("session copies of key versions: off"), "{said}");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("session copies off: the token holds no backup key pair"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_left_unused_is_evicted_and_made_again_on_its_next_use() {
    let server = Server::start_with(Options { backup_key: true, session_copy_idle_ms: Some(2000), ..Options::default() });
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = create_key(&mut admin, "").await;
    let first = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
    eventually("the copy", Duration::from_secs(10), || server.metric(COPIES) == Some(1.0));

    // Used all along: kept over several idle passes.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        data.generate_data_key(gdk(&key, &[])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.metric(COPIES), Some(1.0));
    assert_eq!(calls(&server, "C_UnwrapKey"), 1.0, "a copy in use is kept");

    // Left unused: evicted at a pass, destroyed at the next.
    let destroyed = calls(&server, "C_DestroyObject");
    eventually("the idle copy evicted", Duration::from_secs(10), || server.metric(COPIES) == Some(0.0));
    eventually("and destroyed", Duration::from_secs(10), || calls(&server, "C_DestroyObject") == destroyed + 1.0);

    // The next use runs on the token object and asks for a new copy.
    assert_eq!(&data.decrypt(decrypt(&first.ciphertext_blob)).await.unwrap().into_inner().plaintext, &first.plaintext);
    eventually("a new copy", Duration::from_secs(10), || server.metric(COPIES) == Some(1.0));
    assert_eq!(calls(&server, "C_UnwrapKey"), 2.0);
    assert_eq!(&data.decrypt(decrypt(&first.ciphertext_blob)).await.unwrap().into_inner().plaintext, &first.plaintext);
}
