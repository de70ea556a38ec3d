//! End to end: the real `kms-server` binary in development mode (SoftHSM2, SQLite, every call
//! audited durably by group commit), called over mutual TLS on loopback, with 1, 16 and 64 calls
//! in flight. `empty_call` is the standard health check on the same channels: no HSM, no audit,
//! the gRPC and TLS ceiling of the same run, which the targets are ratios to. The batch calls
//! count one element per data key.
//!
//! The server binary is the one beside this bench's directory (`target/<profile>/kms-server`);
//! it is built first if missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kms_client::Channel;
use kms_client::{AdminChannel, Bearer, Tls};
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A `kms-server dev` child, stopped (SIGTERM) when dropped.
struct DevServer {
    child: Child,
    dir: tempfile::TempDir,
    data: String,
    admin: String,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the bench's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf();
    let bin = dir.join("kms-server");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "kms-server", "--bin", "kms-server"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().expect("cargo").success(), "building kms-server");
    }
    bin
}

fn start() -> DevServer {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut child = Command::new(server_binary())
        .args(["dev", "--data-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("KMS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kms-server starts");
    // Read the listening lines, and keep reading the rest on a thread: a server whose stdout
    // is closed fails at its next print.
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines().map_while(Result::ok);
    let (mut data, mut admin) = (String::new(), String::new());
    for line in lines.by_ref() {
        let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
        if line.starts_with("data plane") {
            data = addr;
        } else if line.starts_with("admin plane") {
            admin = addr;
        }
        if !data.is_empty() && !admin.is_empty() {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    assert!(!data.is_empty() && !admin.is_empty(), "kms-server printed no listening addresses");
    DevServer { child, dir, data, admin }
}

/// Logs the development officer in, makes a key and grants the development workload every
/// data-plane operation on it.
async fn key_for_the_workload(server: &DevServer, tls: &Tls) -> String {
    let read = |f: &str| std::fs::read_to_string(server.dir.path().join(f)).expect("dev officer files");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let channel = kms_client::channel(&format!("https://{}", server.admin), tls).await.expect("admin plane");
    let mut login = pb::LoginRequest {
        name: "dev-officer".into(),
        passphrase: read("dev-officer.passphrase"),
        totp_code: kms_client::totp::code(&read("dev-officer.totp"), now).expect("a TOTP code"),
    };
    let mut session = kms_proto::v1::session_client::SessionClient::new(channel.clone())
        .login(std::mem::take(&mut login))
        .await
        .expect("dev officer login")
        .into_inner();
    let token = std::mem::take(&mut session.session_token);
    let mut admin = KeyManagementClient::new(AdminChannel::new(channel, Bearer::new(Some(&token)).expect("a token")));
    let key = admin.create_key(pb::CreateKeyRequest::default()).await.expect("a key").into_inner().key.expect("metadata").key_id;
    admin.create_principal(pb::PrincipalRequest { name: kms_server::tls::DEV_WORKLOAD_ID.into() }).await.expect("principal");
    let operations = ["GenerateDataKey", "Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo"];
    admin
        .create_grant(pb::CreateGrantRequest {
            principal: kms_server::tls::DEV_WORKLOAD_ID.into(),
            key_id: key.clone(),
            operations: operations.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("grant");
    key
}

fn gdk(key: &str) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest { key_id: key.into(), key_spec: 1, number_of_bytes: 0, encryption_context: Default::default(), caller_context: None }
}

fn decrypt(blob: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest { ciphertext_blob: blob.to_vec(), encryption_context: Default::default(), key_id: String::new(), caller_context: None }
}

/// What one bench call does.
#[derive(Clone, Copy)]
enum Call {
    Empty,
    GenerateDataKey,
    Decrypt,
    Encrypt,
    ReEncrypt,
    GenerateDataKeys,
    DecryptBatch,
}

/// Data keys per batch call.
const BATCH: usize = 64;

async fn one(call: Call, crypto: &mut CryptoClient<Channel>, health: &mut HealthClient<Channel>, key: &str, blob: &[u8]) {
    let ok = match call {
        Call::Empty => health.check(HealthCheckRequest { service: "kms.v1.Crypto".into() }).await.is_ok(),
        Call::GenerateDataKey => crypto.generate_data_key(gdk(key)).await.is_ok(),
        Call::Decrypt => crypto.decrypt(decrypt(blob)).await.is_ok(),
        Call::Encrypt => crypto
            .encrypt(pb::EncryptRequest { key_id: key.into(), plaintext: vec![0; 32], encryption_context: Default::default(), caller_context: None })
            .await
            .is_ok(),
        Call::ReEncrypt => crypto
            .re_encrypt(pb::ReEncryptRequest { ciphertext_blob: blob.to_vec(), destination_key_id: key.into(), ..Default::default() })
            .await
            .is_ok(),
        Call::GenerateDataKeys => {
            crypto.generate_data_keys(pb::GenerateDataKeysRequest { items: vec![gdk(key); BATCH], caller_context: None }).await.is_ok()
        }
        Call::DecryptBatch => crypto.decrypt_batch(pb::DecryptBatchRequest { items: vec![decrypt(blob); BATCH], caller_context: None }).await.is_ok(),
    };
    assert!(ok, "a bench call failed");
}

fn e2e(c: &mut Criterion) {
    let server = start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let tls = Tls::dev(&server.dir.path().join("pki"));
    let key = rt.block_on(key_for_the_workload(&server, &tls));
    // Four HTTP/2 connections shared by the calls in flight, as a workload's client pool would.
    let channels: Vec<Channel> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(kms_client::channel(&format!("https://{}", server.data), &tls).await.expect("data plane"));
        }
        out
    });
    let blob = rt.block_on(async {
        let mut r = CryptoClient::new(channels[0].clone()).generate_data_key(gdk(&key)).await.expect("a data key").into_inner();
        std::mem::take(&mut r.ciphertext_blob)
    });

    let mut g = c.benchmark_group("e2e_mtls");
    let calls = [
        ("empty_call", Call::Empty, 1),
        ("GenerateDataKey", Call::GenerateDataKey, 1),
        ("Decrypt", Call::Decrypt, 1),
        ("Encrypt", Call::Encrypt, 1),
        ("ReEncrypt", Call::ReEncrypt, 1),
        ("GenerateDataKeys_64", Call::GenerateDataKeys, BATCH),
        ("DecryptBatch_64", Call::DecryptBatch, BATCH),
    ];
    // The same calls on one connection too, the set-up of SOFTHSM-NOTES.md's gRPC floor: there
    // the server's work for all calls in flight goes through one HTTP/2 connection task.
    let one_connection = [channels[0].clone()];
    let mut runs: Vec<(String, Call, usize, usize, &[Channel])> = Vec::new();
    for (name, call, per_call) in calls {
        let in_flight: &[usize] = if per_call > 1 { &[4, 16] } else { &[1, 16, 64] };
        for &n in in_flight {
            runs.push((format!("{name}/{n}_in_flight"), call, per_call, n, &channels));
        }
        if matches!(call, Call::Empty | Call::GenerateDataKey | Call::Decrypt) {
            for n in [16, 64] {
                runs.push((format!("{name}/{n}_in_flight_1_connection"), call, per_call, n, &one_connection));
            }
        }
    }
    for (id, call, per_call, n, channels) in runs {
        g.throughput(Throughput::Elements(per_call as u64));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for t in 0..n as u64 {
                        let share = iters / n as u64 + u64::from(t < iters % n as u64);
                        let channel = channels[t as usize % channels.len()].clone();
                        let (key, blob) = (key.clone(), blob.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut crypto = CryptoClient::new(channel.clone());
                            let mut health = HealthClient::new(channel);
                            for _ in 0..share {
                                one(call, &mut crypto, &mut health, &key, &blob).await;
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("a bench task");
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    drop(server);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(20);
    targets = e2e
}
criterion_main!(benches);
