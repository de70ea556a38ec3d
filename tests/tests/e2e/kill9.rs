//! TESTPLAN R1: SIGKILL at a random instant under load (8 data-plane clients doing
//! GenerateDataKey, Encrypt, Decrypt and ReEncrypt; one officer loop creating, rotating,
//! disabling and enabling keys), then a restart on the same token and database, 20 times. After
//! each: every blob whose answer reached a client decrypts byte-identical; every key and version
//! the officer saw acknowledged is there in its state; the database is intact; HSM objects and
//! live rows match one to one; the audit verifies; each version's persisted usage count is at
//! least the encryptions acknowledged under it. `scripts/soak-kill9.sh` runs 500.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_client::Channel;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_tests::{Admin, Options, Server, create_key, ctx};

/// A blob a client got an answer for: what it must decrypt to, under which context.
#[derive(Clone)]
pub(crate) struct Acknowledged {
    blob: Vec<u8>,
    plaintext: Vec<u8>,
    context: HashMap<String, String>,
    key_version: u32,
}

/// What the officer loop was told.
#[derive(Default)]
pub(crate) struct OfficerView {
    /// Keys it created, and the state its last acknowledged change left (true: Disabled).
    pub keys: HashMap<String, bool>,
    /// A change sent but not acknowledged: the key may be in either state.
    pub uncertain: Option<String>,
    /// The highest version of the data key a rotation was acknowledged for.
    pub data_key_version: u32,
}

/// When a data client stops: at its first error (one server, killed), or once `stop` is set,
/// riding out errors until then (a cluster: the client fails over to another node).
#[derive(Clone)]
pub(crate) enum Until {
    FirstError,
    Stopped(Arc<AtomicBool>),
}

impl Until {
    fn stopped(&self) -> bool {
        matches!(self, Until::Stopped(stop) if stop.load(Ordering::SeqCst))
    }

    /// Whether the loop goes on after an error.
    fn go_on(&self) -> bool {
        matches!(self, Until::Stopped(_)) && !self.stopped()
    }
}

pub(crate) async fn data_client(mut data: CryptoClient<Channel>, key: String, seed: u64, acked: Arc<Mutex<Vec<Acknowledged>>>, until: Until) {
    let mut n = seed;
    while !until.stopped() {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let context = ctx(&[("client", &seed.to_string()), ("n", &n.to_string())]);
        let earlier = acked.lock().unwrap().last().cloned();
        let result = match (n >> 60) % 4 {
            0 => data
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key_id: key.clone(),
                    key_spec: 1,
                    number_of_bytes: 0,
                    encryption_context: context.clone(),
                    caller_context: None,
                })
                .await
                .map(|r| {
                    let mut r = r.into_inner();
                    Some((std::mem::take(&mut r.ciphertext_blob), std::mem::take(&mut r.plaintext), r.key_version))
                }),
            1 => {
                let plaintext = n.to_be_bytes().to_vec();
                data.encrypt(pb::EncryptRequest {
                    key_id: key.clone(),
                    plaintext: plaintext.clone(),
                    encryption_context: context.clone(),
                    caller_context: None,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    Some((r.ciphertext_blob, plaintext, r.key_version))
                })
            }
            2 => match &earlier {
                Some(e) => data
                    .decrypt(pb::DecryptRequest {
                        ciphertext_blob: e.blob.clone(),
                        encryption_context: e.context.clone(),
                        key_id: String::new(),
                        caller_context: None,
                    })
                    .await
                    .map(|mut r| {
                        assert_eq!(std::mem::take(&mut r.get_mut().plaintext), e.plaintext, "a live decrypt");
                        None
                    }),
                None => Ok(None),
            },
            _ => match &earlier {
                Some(e) => data
                    .re_encrypt(pb::ReEncryptRequest {
                        ciphertext_blob: e.blob.clone(),
                        source_encryption_context: e.context.clone(),
                        source_key_id: String::new(),
                        destination_key_id: key.clone(),
                        destination_encryption_context: context.clone(),
                        caller_context: None,
                    })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        Some((r.ciphertext_blob, e.plaintext.clone(), r.key_version))
                    }),
                None => Ok(None),
            },
        };
        match result {
            Ok(Some((blob, plaintext, key_version))) => acked.lock().unwrap().push(Acknowledged { blob, plaintext, context, key_version }),
            Ok(None) => {}
            // Another node answers the next call.
            Err(_) if until.go_on() => tokio::time::sleep(Duration::from_millis(20)).await,
            // The server is gone: this client's run is over.
            Err(_) => return,
        }
    }
}

/// The officer's changes until the first error (a change then may or may not have committed)
/// or `until` stops it.
pub(crate) async fn officer_loop(mut admin: Admin, data_key: String, view: Arc<Mutex<OfficerView>>, until: Until) {
    let mut own: Option<String> = None;
    for step in 0u64.. {
        if until.stopped() {
            return;
        }
        let result = match (step % 4, &own) {
            (0, _) | (_, None) => admin.create_key(pb::CreateKeyRequest::default()).await.map(|r| {
                let id = r.into_inner().key.unwrap().key_id;
                view.lock().unwrap().keys.insert(id.clone(), false);
                own = Some(id);
            }),
            (1, _) => admin.rotate_key(pb::RotateKeyRequest { key_id: data_key.clone() }).await.map(|r| {
                let primary = r.into_inner().key.unwrap().primary_version;
                let mut v = view.lock().unwrap();
                v.data_key_version = v.data_key_version.max(primary);
            }),
            (2, Some(k)) => {
                view.lock().unwrap().uncertain = Some(k.clone());
                admin.disable_key(pb::DisableKeyRequest { key_id: k.clone() }).await.map(|_| {
                    let mut v = view.lock().unwrap();
                    v.keys.insert(k.clone(), true);
                    v.uncertain = None;
                })
            }
            (_, Some(k)) => {
                view.lock().unwrap().uncertain = Some(k.clone());
                admin.enable_key(pb::EnableKeyRequest { key_id: k.clone() }).await.map(|_| {
                    let mut v = view.lock().unwrap();
                    v.keys.insert(k.clone(), false);
                    v.uncertain = None;
                })
            }
        };
        if result.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_at_random_instants_under_load_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("KMS_KILL9_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut server = Server::start_with(Options { usage_reservation_block: 64, ..Options::default() });
    let data_key = create_key(&mut server.admin().await, "load").await;
    let view = Arc::new(Mutex::new(OfficerView { data_key_version: 1, ..Default::default() }));
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    for iteration in 0..iterations {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for client in 0..8 {
            let (data, k, a) = (server.data().await, data_key.clone(), acked.clone());
            tasks.push(tokio::spawn(data_client(data, k, iteration * 8 + client + 1, a, Until::FirstError)));
        }
        let officer = tokio::spawn(officer_loop(server.admin().await, data_key.clone(), view.clone(), Until::FirstError));
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let kill_after = Duration::from_millis(50 + (seed >> 33) % 1950);
        tokio::time::sleep(kill_after).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        officer.await.unwrap();
        server.restart_after_kill9();
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let mut seen = std::mem::take(&mut *view.lock().unwrap());
        check(&server, &data_key, &acked, &mut seen, iteration, kill_after).await;
        *view.lock().unwrap() = seen;
    }
}

pub(crate) async fn check(server: &Server, data_key: &str, acked: &[Acknowledged], view: &mut OfficerView, iteration: u64, after: Duration) {
    let at = format!("iteration {iteration} (killed after {after:?}, {} blobs acknowledged)", acked.len());
    let data = server.data().await;
    let mut acknowledged_per_version: HashMap<u32, u64> = HashMap::new();
    // As a workload would: UNAVAILABLE retried (a node of a cluster that has yet to hear of the
    // other nodes' latest changes answers it once).
    let retry = kms_client::RetryPolicy { attempts: 5, ..Default::default() };
    for a in acked {
        *acknowledged_per_version.entry(a.key_version).or_default() += 1;
        let request = pb::DecryptRequest {
            ciphertext_blob: a.blob.clone(),
            encryption_context: a.context.clone(),
            key_id: String::new(),
            caller_context: None,
        };
        let mut r = retry
            .run(|_| {
                let (mut data, request) = (data.clone(), request.clone());
                async move { data.decrypt(request).await }
            })
            .await
            .unwrap_or_else(|e| panic!("{at}: an acknowledged blob no longer decrypts: {e}"));
        assert_eq!(std::mem::take(&mut r.get_mut().plaintext), a.plaintext, "{at}");
    }
    let mut admin = server.admin().await;
    let described = admin.describe_key(pb::DescribeKeyRequest { key_id: data_key.into() }).await.unwrap().into_inner();
    assert!(described.key.unwrap().primary_version >= view.data_key_version, "{at}: an acknowledged rotation was lost");
    // The persisted count (every node's reservations) covers every acknowledged encryption.
    let db = server.db();
    for v in &described.versions {
        let acknowledged = acknowledged_per_version.get(&v.version).copied().unwrap_or(0);
        let reserved: i64 = db
            .query_row("SELECT reserved FROM key_versions WHERE key_id = ?1 AND version = ?2", rusqlite::params![data_key, v.version], |r| r.get(0))
            .unwrap();
        assert!(reserved as u64 >= acknowledged, "{at}: version {} counts {reserved} < {acknowledged} acknowledged", v.version);
    }
    let uncertain = view.uncertain.take();
    for (key, disabled) in view.keys.iter_mut() {
        let state = admin.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await.unwrap().into_inner().key.unwrap().state();
        if uncertain.as_deref() == Some(key.as_str()) {
            // A change sent but never answered may or may not have committed; what the restarted
            // service shows is now the truth to hold it to.
            assert!(matches!(state, pb::KeyState::Enabled | pb::KeyState::Disabled), "{at}: key {key} is {state:?}");
            *disabled = state == pb::KeyState::Disabled;
        } else {
            let want = if *disabled { pb::KeyState::Disabled } else { pb::KeyState::Enabled };
            assert_eq!(state, want, "{at}: key {key}");
        }
    }
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok", "{at}");
    let mut stmt = db.prepare("SELECT key_id, version FROM key_versions WHERE state != 'Destroyed' ORDER BY key_id, version").unwrap();
    let mut live: Vec<String> =
        stmt.query_map([], |r| Ok(format!("kms:{}:{}", r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).unwrap().map(Result::unwrap).collect();
    live.sort();
    let mut objects: Vec<String> = server.token_objects().iter().map(|o| o["label"].as_str().unwrap().to_string()).collect();
    objects.sort();
    assert_eq!(objects, live, "{at}: HSM objects and live rows");
    let verify = server.kmsctl(&["--json", "audit", "verify"]);
    assert!(verify.status.success(), "{at}: {}", String::from_utf8_lossy(&verify.stdout));
}
