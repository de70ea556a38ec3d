//! Several nodes over one PostgreSQL database: the invariants that must hold across real
//! processes (issue: several nodes over PostgreSQL).

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_tests::cluster::Cluster;
use kms_tests::{Options, create_key, ctx, eventually, gdk};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

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
    let (acknowledged, attempts) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for node in [1, 2] {
        for i in 0..4 {
            let mut data = cluster.node(node).data().await;
            let (key, blob, stop, acknowledged, attempts) = (key.clone(), blob.clone(), stop.clone(), acknowledged.clone(), attempts.clone());
            clients.push(tokio::spawn(async move {
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
                    attempts.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    eventually("load on both nodes", Duration::from_secs(20), || acknowledged.load(Ordering::SeqCst) > 200);
    // Node A disables the key; once that is acknowledged, nothing may succeed anywhere.
    cluster.node(0).admin().await.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let (at_disable, tried) = (acknowledged.load(Ordering::SeqCst), attempts.load(Ordering::SeqCst));
    // Every client keeps calling: 400 more calls in all after the disable.
    eventually("calls after the disable", Duration::from_secs(20), || attempts.load(Ordering::SeqCst) >= tried + 400);
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
            tasks.push(tokio::spawn(kms_tests::encrypt_counting_versions(cluster.node(node).data().await, key.clone(), 100)));
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
    let so_far = Arc::new(AtomicU64::new(0));
    for node in 0..3 {
        let mut data = cluster.node(node).data().await;
        let (key, so_far) = (key.clone(), so_far.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for _ in 0..150 {
                if data.generate_data_key(gdk(&key, &[])).await.is_ok() {
                    ok += 1;
                    so_far.fetch_add(1, Ordering::SeqCst);
                }
            }
            ok
        }));
    }
    // A node killed in the middle of it: what it acknowledged is in the trail, the chain goes on.
    eventually("load on every node", Duration::from_secs(20), || so_far.load(Ordering::SeqCst) >= 60);
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
    // A burst of first uses on node A, all at once: every call sees the key (they share one
    // read of the store; none is refused while another call reloads).
    let data = cluster.node(0).data().await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (mut data, key) = (data.clone(), key.clone());
        burst.spawn(async move { data.generate_data_key(gdk(&key, &[])).await });
    }
    while let Some(r) = burst.join_next().await {
        let r = r.unwrap();
        assert!(r.is_ok(), "a key made on node B a moment ago, on node A: {r:?}");
    }
    let listed = cluster.node(0).kmsctl(&["--json", "key", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&key));
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_one_node_leads_and_another_takes_over_when_it_is_killed() {
    // The sweeps' clock runs 8 days ahead: a version scheduled for destruction in 7 days is
    // destroyed at the leader's next sweep.
    let mut cluster = Cluster::start(3, Options { sweep_clock_offset: 8 * 86_400, ..Options::default() });
    eventually("one leader", Duration::from_secs(10), || cluster.leaders().len() == 1);
    let leader = cluster.leaders()[0];
    for i in 0..3 {
        let status: serde_json::Value = serde_json::from_slice(&cluster.node(i).kmsctl(&["--json", "status"]).stdout).unwrap();
        assert_eq!(status["leader"], i == leader, "node {i}: {status}");
    }
    // A version due for destruction: only the leader's sweep may destroy it, once.
    let key = create_key(&mut cluster.node(0).admin().await, "swept").await;
    let mut admin = cluster.node(0).admin().await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    cluster.nodes[leader].kill9();
    admin = cluster.node((leader + 1) % 3).admin().await;
    admin
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest { key_id: key.clone(), key_version: 1, pending_window_days: 7 })
        .await
        .unwrap();
    // Taken over within a few sweeps (the lock dies with the killed node's connection).
    eventually("a new leader", Duration::from_secs(15), || cluster.leaders().len() == 1);
    let new_leader = cluster.leaders()[0];
    assert_ne!(new_leader, leader);
    eventually("version 1 destroyed by the new leader", Duration::from_secs(30), || {
        cluster.node(new_leader).live_version_labels() == [format!("kms:{key}:2")]
    });
    let destroyed: i64 = cluster
        .node(new_leader)
        .db()
        .query_row("SELECT COUNT(*) FROM audit WHERE operation = 'DestroyKeyVersion' AND key_id = ?1", [&key], |r| r.get(0))
        .unwrap();
    assert_eq!(destroyed, 1, "destroyed once");
    // The killed node comes back as a follower.
    cluster.nodes[leader].restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.leaders(), [new_leader]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destroyed_or_compromised_version_loses_its_session_copy_on_every_node() {
    let options = Options { backup_key: true, sweep_clock_offset: 8 * 86_400, ..Options::default() };
    let cluster = Cluster::start(3, options);
    let mut admin = cluster.node(0).admin().await;
    let destroyed = create_key(&mut admin, "destroyed").await;
    let compromised = create_key(&mut admin, "compromised").await;
    cluster.wait_until_every_node_knows(&compromised);
    let mut blobs = Vec::new();
    for i in 0..3 {
        let mut data = cluster.node(i).data().await;
        for key in [&destroyed, &compromised] {
            blobs.push((i, data.generate_data_key(gdk(key, &[])).await.unwrap().into_inner()));
        }
    }
    let copies = |i: usize| cluster.node(i).metric(crate::copies::COPIES);
    for i in 0..3 {
        eventually(&format!("node {i}'s copies"), Duration::from_secs(10), || copies(i) == Some(2.0));
    }
    admin.rotate_key(pb::RotateKeyRequest { key_id: destroyed.clone() }).await.unwrap();
    admin
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
            key_id: destroyed.clone(),
            key_version: 1,
            pending_window_days: 7,
        })
        .await
        .unwrap();
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: compromised.clone() }).await.unwrap();
    // The compromise: refused at once on every node (retryable while a node has yet to hear of
    // it, then for what it is: what holds for any revocation), and the copies destroyed within a
    // second or two.
    for i in 0..3 {
        let mut data = cluster.node(i).data().await;
        let mut e = data.generate_data_key(gdk(&compromised, &[])).await.unwrap_err();
        while e.code() == tonic::Code::Unavailable {
            tokio::time::sleep(Duration::from_millis(50)).await;
            e = data.generate_data_key(gdk(&compromised, &[])).await.unwrap_err();
        }
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "node {i}: {e}");
    }
    let live = || cluster.node(0).live_version_labels().into_iter().filter(|l| l.contains(&destroyed)).collect::<Vec<_>>();
    eventually("version 1 destroyed", Duration::from_secs(30), || live() == [format!("kms:{destroyed}:2")]);
    for i in 0..3 {
        eventually(&format!("node {i}'s copies destroyed"), Duration::from_secs(10), || copies(i) == Some(0.0));
    }
    // What the token holds: the versions' objects (one of them destroyed), no copy anywhere.
    let mut expected = vec![format!("kms:{compromised}:1"), format!("kms:{destroyed}:2")];
    expected.sort();
    let mut labels = cluster.node(0).object_labels();
    labels.sort();
    assert_eq!(labels, expected);
    for (i, r) in &blobs {
        if r.key_id == destroyed {
            let e = cluster
                .node(*i)
                .data()
                .await
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: r.ciphertext_blob.clone(),
                    encryption_context: Default::default(),
                    key_id: String::new(),
                    caller_context: None,
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "node {i}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_its_database_every_node_fails_closed_and_resumes_by_itself() {
    let postgres = Arc::new(kms_tests::pg::Postgres::start().expect("PostgreSQL started"));
    let database = kms_tests::Database::create_in(postgres.clone()).expect("a database");
    let cluster = Cluster::start_on(3, Options::default(), database);
    let key = create_key(&mut cluster.node(0).admin().await, "closed").await;
    cluster.wait_until_every_node_knows(&key);
    // Two clients per node, calling without pause throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for node in 0..3 {
        for _ in 0..2 {
            let mut data = cluster.node(node).data().await;
            let (key, stop, acknowledged) = (key.clone(), stop.clone(), acknowledged.clone());
            clients.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match data.generate_data_key(gdk(&key, &[])).await {
                        Ok(_) => _ = acknowledged.fetch_add(1, Ordering::SeqCst),
                        Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
                    }
                }
            }));
        }
    }
    eventually("load on every node", Duration::from_secs(20), || acknowledged.load(Ordering::SeqCst) > 100);
    postgres.stop().expect("PostgreSQL stopped");
    let while_down = acknowledged.load(Ordering::SeqCst);
    for i in 0..3 {
        let e = cluster.node(i).data().await.generate_data_key(gdk(&key, &[])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "node {i}: {e}");
        let mut health = HealthClient::new(cluster.node(i).channel(&cluster.node(i).data_addr).await);
        let mut serving = true;
        for _ in 0..100 {
            let r = health.check(HealthCheckRequest { service: "kms.v1.Crypto".into() }).await.unwrap().into_inner();
            serving = r.status != ServingStatus::NotServing as i32;
            if !serving {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!serving, "node {i} still SERVING ten seconds after its database went away");
    }
    assert_eq!(acknowledged.load(Ordering::SeqCst), while_down, "a success answered without a database");
    postgres.start_again().expect("PostgreSQL started again");
    // Each node serves again within seconds, without a restart.
    eventually("service resumed", Duration::from_secs(10), || acknowledged.load(Ordering::SeqCst) > while_down + 300);
    for i in 0..3 {
        let r = cluster.node(i).data().await.generate_data_key(gdk(&key, &[])).await;
        assert!(r.is_ok(), "node {i}: {r:?}");
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // Every success answered has its record (the last three direct calls' too), and the chain is
    // whole. A call whose commit PostgreSQL made as it went down, but could not confirm, was
    // answered UNAVAILABLE with its record kept: at most one per client.
    let (count, _) = successes(&cluster, &key);
    let answered = acknowledged.load(Ordering::SeqCst) + 3;
    assert!((answered..=answered + 6).contains(&(count as u64)), "{count} records for {answered} successes");
    assert_eq!(cluster.node(0).kmsctl(&["--json", "audit", "verify"]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_starting_node_and_the_leader_leave_a_live_nodes_change_alone() {
    let mut cluster = Cluster::start(2, Options::default());
    let key = create_key(&mut cluster.node(0).admin().await, "rotated").await;
    // A third node that waits three seconds between making the new version's HSM object and
    // committing it (the intent in the store all that time).
    let paused = cluster.add_node(Options { pause_at: Some("RotateKey/after_hsm".into()), hsm_deadline_ms: 10_000, ..Options::default() });
    let mut admin = paused.admin().await;
    let rotation = tokio::spawn({
        let key = key.clone();
        async move { admin.rotate_key(pb::RotateKeyRequest { key_id: key }).await }
    });
    let intent = |cluster: &Cluster| cluster.node(0).db().query_row("SELECT COUNT(*) FROM intents", [], |r| r.get::<_, i64>(0)).unwrap();
    eventually("the rotation's intent", Duration::from_secs(5), || intent(&cluster) == 1);
    // Meanwhile the leader sweeps (every second) and a fourth node starts and recovers.
    cluster.add_node(Options::default());
    let rotated = rotation.await.unwrap().expect("the rotation completes");
    assert_eq!(rotated.into_inner().version.unwrap().version, 2);
    assert_eq!(intent(&cluster), 0);
    let repairs: i64 = cluster.node(0).db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Recovery'", [], |r| r.get(0)).unwrap();
    assert_eq!(repairs, 0, "nobody settled the live node's intent");
    let mut labels = cluster.node(0).object_labels();
    labels.sort();
    assert_eq!(labels, [format!("kms:{key}:1"), format!("kms:{key}:2")]);
    // Every node follows the rotation within a second (a rotation revokes nothing: until then a
    // node may still encrypt under version 1).
    for i in 0..4 {
        let mut data = cluster.node(i).data().await;
        let mut version = 0;
        for _ in 0..20 {
            version = data.generate_data_key(gdk(&key, &[])).await.unwrap().into_inner().key_version;
            if version == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(version, 2, "node {i} still encrypts under version 1 two seconds after the rotation");
    }
}

/// TESTPLAN R1 across the cluster: 8 data clients spread over 3 nodes, failing over between
/// them, and an officer loop; a random node killed at a random instant and restarted while the
/// others carry the load, 10 times (`scripts/soak-kill9.sh --cluster` runs more). After each:
/// every acknowledged blob decrypts, every acknowledged change is there, HSM objects and live
/// rows match one to one (no orphan), the counters cover every acknowledged encryption, and
/// the one audit trail verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_at_random_instants_under_load_loses_nothing_acknowledged() {
    use crate::kill9::{OfficerView, Until, check, data_client, officer_loop};
    let iterations: u64 = std::env::var("KMS_KILL9_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut cluster = Cluster::start(3, Options { usage_reservation_block: 64, ..Options::default() });
    let data_key = create_key(&mut cluster.node(0).admin().await, "load").await;
    cluster.wait_until_every_node_knows(&data_key);
    let view = Arc::new(std::sync::Mutex::new(OfficerView { data_key_version: 1, ..Default::default() }));
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    for iteration in 0..iterations {
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let until = Until::Stopped(stop.clone());
        let mut tasks = Vec::new();
        for client in 0..8 {
            let data = pb::crypto_client::CryptoClient::new(cluster.data_channel(client).await);
            tasks.push(tokio::spawn(data_client(data, data_key.clone(), iteration * 8 + client as u64 + 1, acked.clone(), until.clone())));
        }
        let officer = tokio::spawn(officer_loop(cluster.admin(iteration as usize).await, data_key.clone(), view.clone(), until));
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let victim = ((seed >> 40) % 3) as usize;
        let kill_after = Duration::from_millis(50 + (seed >> 33) % 950);
        tokio::time::sleep(kill_after).await;
        let before = acked.lock().unwrap().len();
        cluster.nodes[victim].kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.nodes[victim].restart_after_kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        officer.await.unwrap();
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        assert!(acked.len() > before, "iteration {iteration}: the other nodes carried no load while node {victim} was down");
        let mut seen = std::mem::take(&mut *view.lock().unwrap());
        check(cluster.node(victim), &data_key, &acked, &mut seen, iteration, kill_after).await;
        *view.lock().unwrap() = seen;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_and_kmsctl_fail_over_to_a_node_that_serves() {
    let mut cluster = Cluster::start(3, Options::default());
    let key = create_key(&mut cluster.node(0).admin().await, "failover").await;
    cluster.wait_until_every_node_knows(&key);
    let data_endpoints = cluster.endpoints(0, |n| &n.data_addr);
    let admin_endpoints = cluster.endpoints(0, |n| &n.admin_addr);
    let mut client = kms_client::DataClient::connect(&data_endpoints, &cluster.node(0).tls()).await.unwrap();
    client.retry.attempts = 4;
    let ctx = std::collections::BTreeMap::new();
    let (first, wrapped) = client.generate_data_key(&key, &ctx).await.unwrap();
    // Node 0, where the client and kmsctl begin, dies: the next calls go to node 1, within the
    // retry policy, and kmsctl starts on the first node that answers.
    cluster.nodes[0].kill9();
    let again = client.decrypt_data_key(&wrapped, &ctx).await.expect("failed over to another node");
    assert_eq!(again.expose_secret(), first.expose_secret());
    let kmsctl = |cluster: &Cluster, endpoints: &str, args: &[&str]| {
        let mut cmd = Command::new(kms_tests::bin("kmsctl"));
        cmd.args(["--endpoint", endpoints, "--data-endpoint", &data_endpoints, "--pki"]).arg(cluster.node(1).pki_dir());
        cmd.arg("--session-file").arg(cluster.node(1).session_path()).args(args);
        cmd.output().unwrap()
    };
    let out = kmsctl(&cluster, &admin_endpoints, &["--json", "key", "describe", &key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A node that is up but cannot serve (its HSM fails: NOT_SERVING) is passed over too.
    cluster.nodes[0].restart();
    cluster.node(0).hsm_fault(Some("C_Encrypt CKR_DEVICE_ERROR"));
    let admin_endpoints = cluster.endpoints(0, |n| &n.admin_addr);
    eventually("node 0 NOT_SERVING", Duration::from_secs(10), || {
        let status: serde_json::Value = serde_json::from_slice(&cluster.node(0).kmsctl(&["--json", "status"]).stdout).unwrap_or_default();
        status["health"] != "ACTIVE"
    });
    let out = kmsctl(&cluster, &admin_endpoints, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["health"], "ACTIVE", "kmsctl went to a node that serves: {status}");
}

/// `cargo xtask cluster`'s binary: three nodes come up, kmsctl reaches them as it says, a node
/// killed is failed over, and Ctrl-C stops everything, PostgreSQL included.
#[test]
fn the_local_cluster_starts_serves_through_a_killed_node_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("cluster");
    let cluster = Command::new(kms_tests::bin("local-cluster")).arg(&at).stdout(std::process::Stdio::piped()).spawn().unwrap();
    /// Stops what is left of the cluster however the test ends.
    struct Stopped(std::process::Child, std::path::PathBuf);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = Command::new("pkill").args(["-INT", "-f", &format!("{}/node", self.1.display())]).status();
            let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
            let _ = kms_tests::wait_for(&mut self.0, Duration::from_secs(30));
        }
    }
    let mut cluster = Stopped(cluster, at.clone());
    let stdout = cluster.0.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok);
    let said: Vec<String> = lines.by_ref().take_while(|l| !l.starts_with("Ctrl-C")).collect();
    std::thread::spawn(move || lines.for_each(drop));
    let export = said.iter().find(|l| l.trim_start().starts_with("export KMS_DEV_DIR")).unwrap_or_else(|| panic!("{said:?}"));
    let kmsctl = |args: &[&str]| {
        let mut cmd = Command::new(kms_tests::bin("kmsctl"));
        for pair in export.trim_start().trim_start_matches("export ").split(' ') {
            let (name, value) = pair.split_once('=').unwrap();
            cmd.env(name, value);
        }
        cmd.env("KMS_SESSION_FILE", dir.path().join("session")).env_remove("KMS_PKI").args(args).output().unwrap()
    };
    let login = kmsctl(&["login", "--dev"]);
    assert!(login.status.success(), "{}", String::from_utf8_lossy(&login.stderr));
    let created = kmsctl(&["--json", "key", "create", "--alias", "demo"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let pid = |node: &str| {
        let out = Command::new("pgrep").args(["-f", &format!("{}/{node}/kms.toml", at.display())]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    Command::new("kill").args(["-9", &pid("node1")]).status().unwrap();
    let listed = kmsctl(&["key", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("alias/demo"), "{listed:?}");
    // Its own interrupt stops the nodes too (a terminal's Ctrl-C would reach them as well), well
    // before it would kill them (15 s each).
    Command::new("kill").args(["-INT", &cluster.0.id().to_string()]).status().unwrap();
    assert!(kms_tests::wait_for(&mut cluster.0, Duration::from_secs(12)).is_some_and(|s| s.success()));
    assert!(pid("node2").is_empty() && pid("node3").is_empty(), "the nodes stopped");
}

/// The database's failover: a primary and a synchronous streaming standby; the primary lost
/// while clients run on every node, the standby promoted. The nodes reconnect by themselves
/// through the multi-host connection string, and nothing acknowledged is missing on the new
/// primary: every acknowledged blob decrypts and has its audit record, and the trail verifies.
#[tokio::test(flavor = "multi_thread")]
async fn the_nodes_ride_out_a_database_failover_and_nothing_acknowledged_is_lost() {
    let primary = Arc::new(kms_tests::pg::Postgres::start().expect("the primary"));
    let name = "kms_failover";
    primary.create_database(name).expect("a database");
    let standby = primary.start_standby().expect("a synchronous standby");
    let database = kms_tests::Database { cluster: primary.clone(), name: name.into(), url: primary.url_with(&standby, name) };
    let cluster = Cluster::start_on(3, Options::default(), database);
    let key = create_key(&mut cluster.node(0).admin().await, "failover").await;
    cluster.wait_until_every_node_knows(&key);

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut data = pb::crypto_client::CryptoClient::new(cluster.data_channel(i).await);
        let (key, stop, acknowledged) = (key.clone(), stop.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match data.generate_data_key(gdk(&key, &[("client", &i.to_string())])).await {
                    Ok(r) => {
                        let mut r = r.into_inner();
                        acknowledged.lock().unwrap().push((i, std::mem::take(&mut r.ciphertext_blob), std::mem::take(&mut r.plaintext)));
                    }
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    let count = || acknowledged.lock().unwrap().len();
    eventually("load before the failover", Duration::from_secs(20), || count() > 200);
    primary.crash().expect("the primary lost");
    let at_crash = count();
    standby.promote().expect("the standby promoted");
    eventually("service through the new primary", Duration::from_secs(30), || count() > at_crash + 200);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    // Every acknowledged success has its record on the new primary, and its blob decrypts.
    let (records, _) = successes(&cluster, &key);
    assert!(records as usize >= acknowledged.len(), "{records} records for {} acknowledged successes", acknowledged.len());
    let mut data = cluster.node(1).data().await;
    for (i, blob, plaintext) in &acknowledged {
        let r = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[("client", &i.to_string())]),
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap_or_else(|e| panic!("an acknowledged blob does not decrypt after the failover: {e}"));
        assert_eq!(&std::mem::take(&mut r.into_inner().plaintext), plaintext);
    }
    let verify: serde_json::Value = serde_json::from_slice(&cluster.node(2).kmsctl(&["--json", "audit", "verify"]).stdout).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xks_key_store_made_on_one_node_serves_on_another_at_once_and_its_revocation_holds() {
    use crate::xks::{REGION, allow, encrypt_body, key_store, new_key, xks};
    let cluster = Cluster::start(2, Options::default());
    let mut admin = cluster.node(0).admin().await;
    let key = new_key(&mut admin, "for-xks").await;
    let credential = key_store(&mut admin, "aws", "/aws").await;
    allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    // At once on node B: the key store, its credential and its grant, made on node A.
    let path = format!("/aws/kms/xks/v1/keys/{key}/encrypt");
    let body = encrypt_body(b"x");
    let (status, answer) = xks(cluster.node(1), "POST", &path, &body, &credential, REGION);
    assert_eq!(status, 200, "{answer}");
    // The credential removed on node A: no success on node B from then on.
    admin.remove_xks_credential(pb::RemoveXksCredentialRequest { access_key_id: credential.id.clone() }).await.unwrap();
    for _ in 0..3 {
        let (status, answer) = xks(cluster.node(1), "POST", &path, &body, &credential, REGION);
        assert_ne!(status, 200, "a removed credential signed a success: {answer}");
    }
    eventually("node B to refuse the removed credential as such", Duration::from_secs(5), || {
        xks(cluster.node(1), "POST", &path, &body, &credential, REGION).0 == 401
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_xks_health_counts_the_live_nodes() {
    use crate::xks::{REGION, key_store, xks};
    use serde_json::json;
    let mut cluster = Cluster::start(3, Options::default());
    let credential = key_store(&mut cluster.node(0).admin().await, "aws", "").await;
    let health = json!({"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}});
    let fleet = |cluster: &Cluster| xks(cluster.node(0), "POST", "/kms/xks/v1/health", &health, &credential, REGION).1["xksProxyFleetSize"].clone();
    // Each node counts the fleet every second or so.
    eventually("three nodes counted", Duration::from_secs(10), || fleet(&cluster) == json!(3));
    cluster.nodes[2].kill9();
    eventually("the killed node out of the count", Duration::from_secs(10), || fleet(&cluster) == json!(2));
    cluster.nodes[2].restart();
    eventually("the restarted node counted again", Duration::from_secs(10), || fleet(&cluster) == json!(3));
}
