//! Several nodes over one PostgreSQL database: the invariants that must hold across real
//! processes (issue: several nodes over PostgreSQL).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::cluster::Cluster;
use kms_tests::{Options, create_key, ctx, eventually, gdk};

/// How many successes of `operation` on `key` the audit trail holds, and the last one's place.
fn successes(cluster: &Cluster, key: &str) -> (i64, i64) {
    cluster
        .node(0)
        .db()
        .query_row(
            "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM audit WHERE key_id = ?1 AND outcome = 'allowed' AND operation IN ('GenerateDataKey', 'Decrypt')",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disable_on_one_node_stops_every_success_on_the_others_from_its_commit() {
    let cluster = Cluster::start(3, Options::default());
    let key = create_key(&mut cluster.node(0).admin().await, "shared").await;
    cluster.wait_until_every_node_knows(&key);
    let blob = cluster.node(1).data().await.generate_data_key(gdk(&key, &[("app", "x")])).await.unwrap().into_inner().ciphertext_blob.clone();

    // Clients on nodes B and C at full load, GenerateDataKey and Decrypt.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for node in [1, 2] {
        for i in 0..4 {
            let mut data = cluster.node(node).data().await;
            let (key, blob, stop, acknowledged) = (key.clone(), blob.clone(), stop.clone(), acknowledged.clone());
            clients.push(tokio::spawn(async move {
                let mut after = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let ok = if i % 2 == 0 {
                        data.generate_data_key(gdk(&key, &[("app", "x")])).await.is_ok()
                    } else {
                        data.decrypt(pb::DecryptRequest {
                            ciphertext_blob: blob.clone(),
                            encryption_context: ctx(&[("app", "x")]),
                            key_id: String::new(),
                            caller_context: None,
                        })
                        .await
                        .is_ok()
                    };
                    if ok {
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    after.push(ok);
                }
                after
            }));
        }
    }
    eventually("load on both nodes", Duration::from_secs(20), || acknowledged.load(Ordering::SeqCst) > 200);
    // Node A disables the key; once that is acknowledged, nothing may succeed anywhere.
    cluster.node(0).admin().await.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let at_disable = acknowledged.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // Calls in flight when the disable was acknowledged may still have succeeded (they started
    // before it), but each of those committed before the disable did: every success's audit
    // record comes before the DisableKey record in the one chain.
    let disabled_at: i64 =
        cluster.node(0).db().query_row("SELECT seq FROM audit WHERE operation = 'DisableKey' AND key_id = ?1", [&key], |r| r.get(0)).unwrap();
    let (count, last) = successes(&cluster, &key);
    assert!(last < disabled_at, "a success committed after the disable (record {last} > {disabled_at})");
    let total = acknowledged.load(Ordering::SeqCst);
    assert!(total - at_disable <= 8, "{} successes after the disable was acknowledged", total - at_disable);
    // Every acknowledged success has its record (plus the setup's GenerateDataKey).
    assert_eq!(count as u64, total + 1, "acknowledged successes and their records");
    assert_eq!(cluster.node(0).kmsctl(&["--json", "audit", "verify"]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_budget_holds_with_two_nodes_racing_at_the_limit() {
    let options = Options { rotation_threshold: 800, encryption_limit: 1000, usage_reservation_block: 64, ..Options::default() };
    let cluster = Cluster::start(2, options);
    let key = create_key(&mut cluster.node(0).admin().await, "budget").await;
    cluster.wait_until_every_node_knows(&key);
    let mut tasks = Vec::new();
    for node in [0, 1] {
        for _ in 0..8 {
            let mut data = cluster.node(node).data().await;
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let mut per_version: HashMap<u32, u64> = HashMap::new();
                for _ in 0..100 {
                    let r = data
                        .encrypt(pb::EncryptRequest {
                            key_id: key.clone(),
                            plaintext: b"x".to_vec(),
                            encryption_context: Default::default(),
                            caller_context: None,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    *per_version.entry(r.key_version).or_default() += 1;
                }
                per_version
            }));
        }
    }
    let mut per_version: HashMap<u32, u64> = HashMap::new();
    for t in tasks {
        for (v, n) in t.await.unwrap() {
            *per_version.entry(v).or_default() += n;
        }
    }
    assert_eq!(per_version.values().sum::<u64>(), 1600);
    assert_eq!(per_version.len(), 2, "one rotation, at the threshold, whichever node crossed it: {per_version:?}");
    let db = cluster.node(1).db();
    for (version, acknowledged) in &per_version {
        assert!(*acknowledged <= 1000, "version {version} did {acknowledged} encryptions, over the limit");
        let reserved: i64 = db
            .query_row("SELECT reserved FROM key_versions WHERE key_id = ?1 AND version = ?2", rusqlite::params![key, version], |r| r.get(0))
            .unwrap();
        assert!(reserved as u64 >= *acknowledged, "version {version}: {reserved} reserved, {acknowledged} acknowledged");
        assert!(reserved <= 1000, "version {version}: {reserved} reserved, over the limit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_audit_trail_in_one_order_with_a_node_killed() {
    let mut cluster = Cluster::start(3, Options { checkpoint_every_records: 50, ..Options::default() });
    let key = create_key(&mut cluster.node(0).admin().await, "audited").await;
    cluster.wait_until_every_node_knows(&key);
    let mut tasks = Vec::new();
    for node in 0..3 {
        let mut data = cluster.node(node).data().await;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for _ in 0..150 {
                ok += u64::from(data.generate_data_key(gdk(&key, &[])).await.is_ok());
            }
            ok
        }));
    }
    // A node killed in the middle of it: what it acknowledged is in the trail, the chain goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.nodes[2].kill9();
    let mut acknowledged = 0;
    for t in tasks {
        acknowledged += t.await.unwrap();
    }
    let (count, _) = successes(&cluster, &key);
    assert!(count as u64 >= acknowledged, "{count} records for {acknowledged} acknowledged successes");
    for node in [0, 1] {
        let out = cluster.node(node).kmsctl(&["--json", "audit", "verify"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], true, "node {node}: {v}");
    }
    cluster.nodes[2].restart();
    let v: serde_json::Value = serde_json::from_slice(&cluster.node(2).kmsctl(&["--json", "audit", "verify"]).stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_made_on_one_node_is_usable_at_once_on_another_and_sessions_work_on_every_node() {
    let cluster = Cluster::start(2, Options::default());
    // The officer logged in on node A; the same session works on node B.
    let key = create_key(&mut cluster.node(1).admin().await, "elsewhere").await;
    let r = cluster.node(0).data().await.generate_data_key(gdk(&key, &[])).await;
    assert!(r.is_ok(), "a key made on node B a moment ago, on node A: {r:?}");
    let listed = cluster.node(0).kmsctl(&["--json", "key", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&key));
}
