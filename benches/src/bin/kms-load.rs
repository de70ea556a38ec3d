//! `kms-load`: a load generator for the data plane, for what criterion does poorly — many
//! concurrent clients, an operation mix, open-loop rates — always bounded: by a duration or a
//! number of calls, and each call by a timeout.
//!
//! It reports throughput, latency percentiles and errors by status per operation, the server's
//! RSS and CPU time over the run (with `--server-pid`), and, with `--hsm-*`, the raw rate of the
//! same HSM work measured in the same run, so the service's rate reads as a fraction of the
//! HSM's. Output is a table, or JSON with `--json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kms_client::Channel;
use kms_client::{Tls, channel};
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use serde_json::{Value, json};

#[derive(Parser, Clone)]
#[command(name = "kms-load", about = "Load generator for the key management service's data plane")]
struct Args {
    /// The data plane: one endpoint, or several comma-separated (the nodes of a cluster): the
    /// connections are spread over them, each failing over to the next.
    #[arg(long, default_value = "https://127.0.0.1:7400")]
    data_endpoint: String,
    /// ca.pem, workload.pem and workload.key (what `kms-server dev` writes to DATA_DIR/pki).
    #[arg(long, default_value = ".kms-dev/pki")]
    pki: PathBuf,
    /// The key to use; the workload needs GenerateDataKey, Decrypt, ReEncryptFrom and ReEncryptTo.
    #[arg(long)]
    key: String,
    /// Concurrent clients (calls in flight, closed loop).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// HTTP/2 connections shared by the clients (rounded up to a multiple of the endpoints).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Seconds to run (default 10); with `--requests`, the most seconds to run (default an hour).
    #[arg(long)]
    duration: Option<u64>,
    /// Stop after this many calls in all (with `--rate`, once that many have started).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Milliseconds a call may take; a longer one counts as DEADLINE_EXCEEDED (AWS's external
    /// key store fails calls past 250 ms), so a server that hangs cannot hold a run past its end.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Operation mix in percent: decrypt, generate (GenerateDataKey), reencrypt, encrypt.
    #[arg(long, default_value = "decrypt=70,generate=20,reencrypt=10")]
    mix: String,
    /// Items per call: above 1, `generate` and `decrypt` run as GenerateDataKeys and DecryptBatch
    /// of this many items (1 to 256), the mix may name only those two, and rates also count data
    /// keys, so that the service's share of the raw HSM rate is per data key.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    batch: u32,
    /// Open loop: offer this many requests per second in total (latency is measured from the
    /// scheduled start, so a stalled server shows up instead of slowing the offer).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// With `--rate`: arrivals evenly spaced, or a Poisson process of the same mean rate (random
    /// gaps, bursts included), as many independent clients would send.
    #[arg(long, value_enum, default_value_t = Arrivals::Even, requires = "rate")]
    arrivals: Arrivals,
    /// The server's process id, to report its RSS and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Measure the raw HSM rate in the same run: the PKCS#11 module, token label and PIN file of
    /// the server's token (run with the server's SOFTHSM2_CONF for SoftHSM2).
    #[arg(long, requires_all = ["hsm_token", "hsm_pin_file"])]
    hsm_module: Option<PathBuf>,
    #[arg(long)]
    hsm_token: Option<String>,
    #[arg(long)]
    hsm_pin_file: Option<PathBuf>,
    /// Threads for the raw HSM measurement.
    #[arg(long, default_value_t = 2)]
    hsm_threads: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Arrivals {
    Even,
    Poisson,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Decrypt,
    Generate,
    ReEncrypt,
    Encrypt,
}

impl Op {
    fn name(self, batch: u32) -> &'static str {
        match (self, batch > 1) {
            (Op::Decrypt, false) => "Decrypt",
            (Op::Decrypt, true) => "DecryptBatch",
            (Op::Generate, false) => "GenerateDataKey",
            (Op::Generate, true) => "GenerateDataKeys",
            (Op::ReEncrypt, _) => "ReEncrypt",
            (Op::Encrypt, _) => "Encrypt",
        }
    }
}

fn parse_mix(s: &str, batch: u32) -> Result<Vec<(Op, u32)>> {
    let mut mix = Vec::new();
    for part in s.split(',') {
        let (name, pct) = part.split_once('=').context("--mix: NAME=PERCENT,...")?;
        let op = match name {
            "decrypt" => Op::Decrypt,
            "generate" => Op::Generate,
            "reencrypt" => Op::ReEncrypt,
            "encrypt" => Op::Encrypt,
            other => bail!("--mix: unknown operation {other:?}"),
        };
        if batch > 1 && !matches!(op, Op::Decrypt | Op::Generate) {
            bail!("--mix: {name} has no batch form; with --batch the mix names only decrypt and generate");
        }
        mix.push((op, pct.parse()?));
    }
    if mix.iter().map(|(_, p)| p).sum::<u32>() != 100 {
        bail!("--mix: the percentages must add up to 100");
    }
    Ok(mix)
}

/// A small deterministic generator (xorshift64*) to pick operations.
struct Picker(u64);

impl Picker {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick(&mut self, mix: &[(Op, u32)]) -> Op {
        let mut roll = (self.next() >> 33) % 100;
        for (op, pct) in mix {
            if roll < u64::from(*pct) {
                return *op;
            }
            roll -= u64::from(*pct);
        }
        mix[0].0
    }

    /// A uniform draw in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// The start times of an open-loop run, `rate` (at least 1) a second until `deadline`.
fn schedule(rate: u64, arrivals: Arrivals, from: Instant, deadline: Instant) -> impl Iterator<Item = Instant> {
    let mean = 1.0 / rate as f64;
    let mut gaps = Picker(0xD1B5_4A32_D192_ED03);
    std::iter::successors(Some(from), move |at| {
        let gap = match arrivals {
            Arrivals::Even => mean,
            // Exponential gaps: a Poisson process.
            Arrivals::Poisson => -gaps.unit().ln() * mean,
        };
        Some(*at + Duration::from_secs_f64(gap))
    })
    .take_while(move |at| *at < deadline)
}

#[derive(Default)]
struct Tally {
    latencies: BTreeMap<Op, Vec<u32>>,
    errors: BTreeMap<String, u64>,
}

/// The code of a batch's first failed item, if one failed.
fn first_failure<'a>(errors: impl Iterator<Item = Option<&'a pb::ItemError>>) -> Result<(), tonic::Code> {
    match errors.flatten().next() {
        Some(e) => Err(tonic::Code::from_i32(e.code)),
        None => Ok(()),
    }
}

/// One call of `op`, given at most `timeout`.
async fn call(client: &mut CryptoClient<Channel>, op: Op, batch: u32, key: &str, blob: &[u8], timeout: Duration) -> Result<(), tonic::Code> {
    tokio::time::timeout(timeout, attempt(client, op, batch, key, blob)).await.unwrap_or(Err(tonic::Code::DeadlineExceeded))
}

/// One call of `op`; a batch call fails if any of its items did.
async fn attempt(client: &mut CryptoClient<Channel>, op: Op, batch: u32, key: &str, blob: &[u8]) -> Result<(), tonic::Code> {
    let decrypt =
        || pb::DecryptRequest { ciphertext_blob: blob.to_vec(), encryption_context: Default::default(), key_id: String::new(), caller_context: None };
    let generate = || pb::GenerateDataKeyRequest {
        key_id: key.into(),
        key_spec: pb::DataKeySpec::Aes256 as i32,
        number_of_bytes: 0,
        encryption_context: Default::default(),
        caller_context: None,
    };
    let items = batch as usize;
    let r = match op {
        Op::Decrypt if batch > 1 => {
            let r = client.decrypt_batch(pb::DecryptBatchRequest { items: vec![decrypt(); items], caller_context: None }).await;
            return r.map_err(|s| s.code()).and_then(|r| {
                use pb::decrypt_result::Result as R;
                first_failure(r.get_ref().results.iter().map(|i| match &i.result {
                    Some(R::Error(e)) => Some(e),
                    _ => None,
                }))
            });
        }
        Op::Generate if batch > 1 => {
            let r = client.generate_data_keys(pb::GenerateDataKeysRequest { items: vec![generate(); items], caller_context: None }).await;
            return r.map_err(|s| s.code()).and_then(|r| {
                use pb::generate_data_key_result::Result as R;
                first_failure(r.get_ref().results.iter().map(|i| match &i.result {
                    Some(R::Error(e)) => Some(e),
                    _ => None,
                }))
            });
        }
        Op::Decrypt => client.decrypt(decrypt()).await.map(|_| ()),
        Op::Generate => client.generate_data_key(generate()).await.map(|_| ()),
        Op::ReEncrypt => client
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: blob.to_vec(),
                source_encryption_context: Default::default(),
                source_key_id: String::new(),
                destination_key_id: key.into(),
                destination_encryption_context: Default::default(),
                caller_context: None,
            })
            .await
            .map(|_| ()),
        Op::Encrypt => client
            .encrypt(pb::EncryptRequest { key_id: key.into(), plaintext: vec![0; 32], encryption_context: Default::default(), caller_context: None })
            .await
            .map(|_| ()),
    };
    r.map_err(|s| s.code())
}

/// The server's resident memory (KiB) and CPU time (clock ticks) from /proc.
fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss, ticks))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

/// The raw HSM rate of the data plane's work as the service does it: one draw from the generator
/// for the IVs and data keys of `--batch` data keys, then AES-GCM of each; on `--hsm-threads`
/// threads for `secs` seconds. The key is a throwaway one of the kind the service uses by
/// default: a session object when the token has the backup key pair that makes session copies,
/// a token object otherwise (`"key_object"` in the report). A service key is never used: these
/// encryptions would not count in its usage budget.
fn raw_hsm_rate(args: &Args, secs: u64) -> Result<Value> {
    use kms_server::domain::blob::Iv;
    use kms_server::hsm::Hsm;
    use kms_server::hsm::pkcs11::Pkcs11Hsm;
    let (Some(module), Some(token), Some(pin)) = (&args.hsm_module, &args.hsm_token, &args.hsm_pin_file) else {
        return Ok(Value::Null);
    };
    let pin = kms_server::secret::Pin::new(std::fs::read_to_string(pin)?);
    let hsm = Arc::new(Pkcs11Hsm::open(module, token, &pin, args.hsm_threads).map_err(|e| anyhow::anyhow!("{e}"))?);
    let backup = hsm.backup_key().map_err(|e| anyhow::anyhow!("{e}"))?;
    let on_token = backup.wrap.is_none() || backup.unwrap.is_none();
    let handle = hsm.generate_throwaway_key(on_token).map_err(|e| anyhow::anyhow!("{e}"))?;
    let object = if on_token { "token object" } else { "session object" };
    let batch = args.batch as usize;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..args.hsm_threads)
        .map(|_| {
            let hsm = hsm.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = vec![0u8; 44 * batch];
                'run: while Instant::now() < deadline {
                    if hsm.random(&mut buf).is_err() {
                        break;
                    }
                    for one in buf.chunks_exact(44) {
                        let iv = Iv(one[..12].try_into().unwrap_or([0; 12]));
                        if hsm.encrypt(handle, &iv, b"aad", &one[12..]).is_err() {
                            break 'run;
                        }
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    if on_token {
        hsm.destroy(handle).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(json!({"operation": format!("C_GenerateRandom({}) + {batch} C_Encrypt(AES-GCM, 32 B)", 44 * batch), "key_object": object,
               "threads": args.hsm_threads, "ops_per_second": total as f64 / secs as f64}))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mix = parse_mix(&args.mix, args.batch)?;
    let tls = Tls::dev(&args.pki);
    let endpoints: Vec<&str> = args.data_endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    let mut channels = Vec::new();
    // As many connections on each endpoint (so that no node takes a bigger share of the load).
    let per_endpoint = args.channels.max(1).div_ceil(endpoints.len().max(1));
    for i in 0..per_endpoint * endpoints.len().max(1) {
        // Connection i starts at endpoint i (modulo their number) and fails over to the next.
        let from_here = [&endpoints[i % endpoints.len().max(1)..], &endpoints[..i % endpoints.len().max(1)]].concat().join(",");
        channels.push(channel(&from_here, &tls).await.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    // One data key to decrypt and re-encrypt throughout.
    let mut setup = CryptoClient::new(channels[0].clone());
    let timeout = Duration::from_millis(args.timeout_ms);
    let setup = setup.generate_data_key(pb::GenerateDataKeyRequest {
        key_id: args.key.clone(),
        key_spec: 1,
        number_of_bytes: 0,
        encryption_context: Default::default(),
        caller_context: None,
    });
    let gdk = tokio::time::timeout(timeout, setup)
        .await
        .map_err(|_| anyhow::anyhow!("GenerateDataKey for the setup: no answer within {} ms", args.timeout_ms))?
        .context("GenerateDataKey for the setup (does the workload have a grant on the key?)")?
        .into_inner();
    let key_id = gdk.key_id.clone();
    let blob = Arc::new(gdk.ciphertext_blob.clone());
    drop(gdk);

    let batch = args.batch;
    let before = args.server_pid.and_then(process_usage);
    let started = Instant::now();
    let seconds = args.duration.unwrap_or(if args.requests.is_some() { 3600 } else { 10 });
    let deadline = started + Duration::from_secs(seconds);
    let tallies: Vec<Tally> = match args.rate {
        None => {
            // The calls left to make, shared by the clients.
            let left = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
            let mut tasks = Vec::new();
            for i in 0..args.clients {
                let mut client = CryptoClient::new(channels[i % channels.len()].clone());
                let (mix, key, blob, left) = (mix.clone(), key_id.clone(), blob.clone(), left.clone());
                tasks.push(tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut picker = Picker(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
                    while Instant::now() < deadline && left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                        let op = picker.pick(&mix);
                        let t = Instant::now();
                        match call(&mut client, op, batch, &key, &blob, timeout).await {
                            Ok(()) => tally.latencies.entry(op).or_default().push(t.elapsed().as_micros() as u32),
                            Err(code) => *tally.errors.entry(format!("{}: {code:?}", op.name(batch))).or_default() += 1,
                        }
                    }
                    tally
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await?);
            }
            out
        }
        Some(rate) => {
            // Open loop: one task per scheduled request, at most 4,096 in flight. A thread of
            // its own releases each start at its time: tokio's timer ticks in whole milliseconds,
            // which at 1,800 a second would send requests in pairs, and add up to a millisecond
            // of the load generator's own to each. Latency counts from the scheduled start (or
            // from when the thread could release it, if it woke late), so a server that holds
            // requests up shows (no coordinated omission); waiting for the in-flight limit counts.
            let (release, mut starts) = tokio::sync::mpsc::unbounded_channel();
            let (arrivals, calls) = (args.arrivals, args.requests.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)));
            let timer = std::thread::spawn(move || {
                for at in schedule(rate, arrivals, Instant::now(), deadline).take(calls) {
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if release.send(at.max(Instant::now())).is_err() {
                        break;
                    }
                }
            });
            let limit = Arc::new(tokio::sync::Semaphore::new(4096));
            let mut picker = Picker(0x9E37_79B9_7F4A_7C15);
            let mut tasks = Vec::new();
            let mut i = 0usize;
            while let Some(scheduled) = starts.recv().await {
                let permit = limit.clone().acquire_owned().await?;
                let mut client = CryptoClient::new(channels[i % channels.len()].clone());
                let (op, key, blob) = (picker.pick(&mix), key_id.clone(), blob.clone());
                tasks.push(tokio::spawn(async move {
                    let r = call(&mut client, op, batch, &key, &blob, timeout).await;
                    drop(permit);
                    (op, scheduled.elapsed().as_micros() as u32, r)
                }));
                i += 1;
            }
            if timer.join().is_err() {
                bail!("the open-loop timer thread panicked");
            }
            let mut tally = Tally::default();
            for t in tasks {
                let (op, micros, r) = t.await?;
                match r {
                    Ok(()) => tally.latencies.entry(op).or_default().push(micros),
                    Err(code) => *tally.errors.entry(format!("{}: {code:?}", op.name(batch))).or_default() += 1,
                }
            }
            vec![tally]
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let after = args.server_pid.and_then(process_usage);

    let mut per_op: BTreeMap<Op, Vec<u32>> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tallies {
        for (op, l) in t.latencies {
            per_op.entry(op).or_default().extend(l);
        }
        for (e, n) in t.errors {
            *errors.entry(e).or_default() += n;
        }
    }
    let mut all: Vec<u32> = per_op.values().flatten().copied().collect();
    all.sort_unstable();
    // Data keys generated or unwrapped (or single calls) per second.
    let service_rate = all.len() as f64 * f64::from(batch) / elapsed;
    let row = |name: &str, l: &mut Vec<u32>| {
        l.sort_unstable();
        json!({
            "operation": name, "ok": l.len(), "per_second": l.len() as f64 / elapsed, "items_per_second": (l.len() as f64) * f64::from(batch) / elapsed,
            "p50_us": percentile(l, 0.5), "p90_us": percentile(l, 0.9), "p99_us": percentile(l, 0.99), "p999_us": percentile(l, 0.999),
        })
    };
    let mut rows: Vec<Value> = per_op.iter_mut().map(|(op, l)| row(op.name(batch), l)).collect();
    rows.push(row("all", &mut all));
    let server = match (before, after) {
        (Some((_, t0)), Some((rss, t1))) => json!({"rss_kib": rss, "cpu_seconds": (t1 - t0) as f64 / 100.0}),
        _ => Value::Null,
    };
    let hsm = tokio::task::spawn_blocking({
        let args = args.clone();
        move || raw_hsm_rate(&args, 3)
    })
    .await??;
    // The service's rate as a share of what the HSM alone does of the same work.
    let share_of_hsm = hsm["ops_per_second"].as_f64().filter(|h| *h > 0.0).map(|h| service_rate / h);
    let report = json!({
        "clients": args.clients, "channels": args.channels, "batch": batch, "seconds": elapsed, "requests": args.requests, "mix": args.mix,
        "offered_rate": args.rate, "arrivals": args.rate.and(args.arrivals.to_possible_value()).map(|v| v.get_name().to_string()), "results": rows, "errors": errors, "server": server, "raw_hsm": hsm,
        "service_share_of_hsm": share_of_hsm,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{:<18} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}", "operation", "ok", "per_s", "p50_us", "p90_us", "p99_us", "p999_us");
        for r in report["results"].as_array().into_iter().flatten() {
            println!(
                "{:<18} {:>9} {:>10.0} {:>8} {:>8} {:>8} {:>8}",
                r["operation"].as_str().unwrap_or(""),
                r["ok"],
                r["per_second"].as_f64().unwrap_or(0.0),
                r["p50_us"],
                r["p90_us"],
                r["p99_us"],
                r["p999_us"]
            );
        }
        if batch > 1 {
            println!("data keys per second: {service_rate:.0} ({batch} a call)");
        }
        println!("errors: {}", report["errors"]);
        println!("server: {}", report["server"]);
        println!("raw HSM: {}", report["raw_hsm"]);
        if let Some(share) = share_of_hsm {
            println!("service rate / raw HSM rate: {:.0}%", share * 100.0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_options_are_checked() {
        let parse = |extra: &[&str]| Args::try_parse_from(["kms-load", "--key", "k"].iter().chain(extra));
        assert_eq!(parse(&["--rate", "1800"]).unwrap().arrivals, Arrivals::Even);
        assert_eq!(parse(&["--rate", "5", "--arrivals", "poisson"]).unwrap().arrivals, Arrivals::Poisson);
        assert!(parse(&["--rate", "0"]).is_err(), "a rate of zero offers nothing");
        assert!(parse(&["--arrivals", "poisson"]).is_err(), "arrivals without a rate");
        let counted = parse(&["--requests", "1000"]).unwrap();
        assert_eq!((counted.requests, counted.duration), (Some(1000), None));
        assert!(parse(&["--requests", "0"]).is_err(), "a run of no calls");
    }

    #[test]
    fn mixes_and_percentiles() {
        assert!(parse_mix("decrypt=70,generate=20,reencrypt=10", 1).is_ok());
        assert!(parse_mix("decrypt=70", 1).is_err());
        assert!(parse_mix("sign=100", 1).is_err());
        assert!(parse_mix("decrypt=70,generate=20,reencrypt=10", 64).is_err(), "ReEncrypt has no batch form");
        let mix = parse_mix("decrypt=50,generate=50", 64).unwrap();
        let mut p = Picker(7);
        let decrypts = (0..10_000).filter(|_| p.pick(&mix) == Op::Decrypt).count();
        assert!((4000..6000).contains(&decrypts), "{decrypts}");
        for arrivals in [Arrivals::Even, Arrivals::Poisson] {
            let from = Instant::now();
            let starts: Vec<Instant> = schedule(1000, arrivals, from, from + Duration::from_secs(10)).collect();
            assert!((9_700..=10_300).contains(&starts.len()), "{arrivals:?}: {} starts in 10 s at 1,000/s", starts.len());
            let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
            let short = gaps.iter().filter(|g| **g < Duration::from_micros(500)).count();
            // Evenly spaced: no gap under the mean; Poisson: 1 - e^-0.5 = 39% of them.
            let want = if arrivals == Arrivals::Even { 0..1 } else { 3_600..4_300 };
            assert!(want.contains(&short), "{arrivals:?}: {short} gaps under half the mean");
        }
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.99), percentile(&v, 0.999)), (500, 990, 999));
    }
}
