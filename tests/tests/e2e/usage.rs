//! TESTPLAN R4 (IV uniqueness) and R5 (the AES-GCM usage budget under concurrency and a kill).

use std::collections::{HashMap, HashSet};

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key, gdk};

#[tokio::test(flavor = "multi_thread")]
async fn ivs_are_unique_over_a_hundred_thousand_encryptions() {
    // Half Encrypt, half GenerateDataKey (whose data key and IV come from one draw: the IV must
    // not be a slice of the data key it encrypts).
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut data = server.data().await;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut ivs = Vec::with_capacity(6250);
            for i in 0..6250 {
                let (blob, data_key) = if i % 2 == 0 {
                    let mut r = data
                        .encrypt(pb::EncryptRequest {
                            key_id: key.clone(),
                            plaintext: Vec::new(),
                            encryption_context: Default::default(),
                            caller_context: None,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    (std::mem::take(&mut r.ciphertext_blob), Vec::new())
                } else {
                    let mut r = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner();
                    (std::mem::take(&mut r.ciphertext_blob), std::mem::take(&mut r.plaintext))
                };
                // The IV is at bytes 25..37 of the header (docs/blob-format.md).
                let iv = <[u8; 12]>::try_from(&blob[25..37]).unwrap();
                assert!(!data_key.windows(12).any(|w| w == iv), "the IV is part of the data key");
                ivs.push(iv);
            }
            ivs
        }));
    }
    let mut all = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for iv in t.await.unwrap() {
            total += 1;
            assert!(all.insert(iv), "IV reused: {iv:02x?}");
        }
    }
    assert_eq!(total, 100_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_budget_rotates_at_the_threshold_and_never_passes_the_limit() {
    let mut server =
        Server::start_with(Options { rotation_threshold: 800, encryption_limit: 1000, usage_reservation_block: 64, ..Options::default() });
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "budget").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(kms_tests::encrypt_counting_versions(server.data().await, key.clone(), 100)));
    }
    let mut acknowledged: HashMap<u32, u64> = HashMap::new();
    for t in tasks {
        for (v, n) in t.await.unwrap() {
            *acknowledged.entry(v).or_default() += n;
        }
    }
    assert_eq!(acknowledged.values().sum::<u64>(), 1600, "every encryption succeeded");
    assert!(acknowledged[&1] <= 1000 && acknowledged[&1] >= 800, "v1 used until rotation: {acknowledged:?}");
    assert!(acknowledged.contains_key(&2), "rotated at the threshold: {acknowledged:?}");

    let d = admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap().into_inner();
    for v in &d.versions {
        assert!(v.encryptions <= 1000, "version {} above its limit", v.version);
    }
    let rotations: i64 =
        server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'RotateKey' AND principal = 'system'", [], |r| r.get(0)).unwrap();
    assert!(rotations >= 1);

    // After a kill, each version's persisted count covers what was acknowledged.
    server.restart_after_kill9();
    let db = server.db();
    for (version, acked) in &acknowledged {
        let reserved: i64 = db
            .query_row("SELECT reserved FROM key_versions WHERE key_id = ?1 AND version = ?2", rusqlite::params![key, version], |r| r.get(0))
            .unwrap();
        assert!(reserved as u64 >= *acked, "version {version}: persisted {reserved} < acknowledged {acked}");
        assert!(reserved <= 1000);
    }
}
