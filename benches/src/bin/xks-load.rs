//! `xks-load`: load on the XKS facade as AWS KMS makes it: HTTPS connections (HTTP/1.1 by
//! default), each request signed with SigV4, Encrypt then Decrypt of a 32-byte data key with
//! an integrity value asked, each phase after the same run's empty calls (`GET /ping`: TLS and
//! HTTP only), so that a figure can be read against the machine's own.
//!
//! ```text
//! kmsctl xks create bench --region eu-west-3 --xks-url https://127.0.0.1:7403 > xks.json
//! kmsctl xks allow bench --key alias/bench
//! xks-load --proxy-file xks.json --ca .kms-dev/pki/ca.pem --key KEY_ID --clients 16
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

#[derive(Parser, Clone, Debug)]
#[command(name = "xks-load", about = "Load generator for the key management service's AWS XKS facade")]
struct Args {
    /// The proxy configuration file `kmsctl xks create` printed (endpoint, path, credential).
    #[arg(long)]
    proxy_file: std::path::PathBuf,
    /// The CA that issued the XKS listener's certificate (PEM).
    #[arg(long)]
    ca: std::path::PathBuf,
    /// The region the key store was made for.
    #[arg(long, default_value = "eu-west-3")]
    region: String,
    /// The external key id (the key's id) the key store may encrypt and decrypt with.
    #[arg(long)]
    key: String,
    /// Connections, each with one request in flight (closed loop); with `--rate`, the pool the
    /// offered requests are spread over.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds for each phase (empty calls, Encrypt, Decrypt).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Open loop: offer this many requests per second (latency from the scheduled start).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// HTTP/2 (one stream at a time per connection) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
}

/// What one connection sends: a signed request and its answer.
struct Connection {
    send: Sender,
    authority: String,
}

enum Sender {
    One(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Target {
    host: String,
    port: u16,
    path: String,
    access_key_id: String,
    secret: String,
    region: String,
    tls: tokio_rustls::TlsConnector,
    http2: bool,
}

impl Target {
    fn load(args: &Args) -> Result<Target> {
        let file: Value = serde_json::from_slice(&std::fs::read(&args.proxy_file).context("--proxy-file")?).context("--proxy-file: JSON")?;
        let endpoint = file["XksProxyUriEndpoint"].as_str().context("XksProxyUriEndpoint")?;
        let uri: hyper::Uri = endpoint.parse().context("XksProxyUriEndpoint: a URL")?;
        let credential = &file["XksProxyAuthenticationCredential"];
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&args.ca).context("--ca")? {
            roots.add(cert.context("--ca: a certificate")?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if args.http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        Ok(Target {
            host: uri.host().context("XksProxyUriEndpoint: a host")?.to_string(),
            port: uri.port_u16().unwrap_or(443),
            path: file["XksProxyUriPath"].as_str().context("XksProxyUriPath")?.to_string(),
            access_key_id: credential["AccessKeyId"].as_str().context("AccessKeyId")?.to_string(),
            secret: credential["RawSecretAccessKey"].as_str().context("RawSecretAccessKey")?.to_string(),
            region: args.region.clone(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            http2: args.http2,
        })
    }

    async fn connect(&self) -> Result<Connection> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
        let io = hyper_util::rt::TokioIo::new(self.tls.connect(name, tcp).await?);
        let send = if self.http2 {
            let (send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::Two(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::One(send)
        };
        Ok(Connection { send, authority: format!("{}:{}", self.host, self.port) })
    }
}

/// One call; its status and JSON answer.
async fn call(target: &Target, conn: &mut Connection, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let body = if method == "GET" { Vec::new() } else { body.to_string().into_bytes() };
    let (mut parts, ()) = hyper::Request::builder()
        .method(method)
        .uri(if target.http2 { format!("https://{}{path}", conn.authority) } else { path.to_string() })
        .header("content-type", "application/json")
        .body(())?
        .into_parts();
    if !target.http2 {
        parts.headers.insert("host", conn.authority.parse()?);
    }
    if method == "POST" {
        kms_server::facade::xks::auth::sign(&mut parts, &body, &target.region, &target.access_key_id, &target.secret, chrono::Utc::now())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let request = hyper::Request::from_parts(parts, Full::new(Bytes::from(body)));
    let response = match &mut conn.send {
        Sender::One(s) => {
            s.ready().await?;
            s.send_request(request).await?
        }
        Sender::Two(s) => {
            s.ready().await?;
            s.send_request(request).await?
        }
    };
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Empty,
    Encrypt,
    Decrypt,
}

/// The request of `phase`, and its path.
fn request(target: &Target, key: &str, phase: Phase, sealed: &Value) -> (&'static str, String, Value) {
    let meta = |op: &str| {
        json!({"awsPrincipalArn": "arn:aws:iam::123456789012:role/xks-load", "kmsKeyArn": "arn:aws:kms:eu-west-3:123456789012:key/xks-load",
               "kmsOperation": op, "kmsRequestId": "xks-load"})
    };
    match phase {
        Phase::Empty => ("GET", "/ping".to_string(), Value::Null),
        Phase::Encrypt => (
            "POST",
            format!("{}/keys/{key}/encrypt", target.path),
            json!({"requestMetadata": meta("GenerateDataKey"), "plaintext": B64.encode([7u8; 32]), "encryptionAlgorithm": "AES_GCM",
                   "additionalAuthenticatedData": B64.encode(b"xks-load"), "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}),
        ),
        Phase::Decrypt => (
            "POST",
            format!("{}/keys/{key}/decrypt", target.path),
            json!({"requestMetadata": meta("Decrypt"), "encryptionAlgorithm": "AES_GCM", "ciphertext": sealed["ciphertext"],
                   "initializationVector": sealed["initializationVector"], "authenticationTag": sealed["authenticationTag"],
                   "ciphertextMetadata": sealed["ciphertextMetadata"], "additionalAuthenticatedData": B64.encode(b"xks-load")}),
        ),
    }
}

/// Latencies (µs) of the successes and the count of each failure.
#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    errors: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, answer: Result<(u16, Value)>, micros: u32) {
        match answer {
            Ok((200, _)) => self.latencies.push(micros),
            Ok((status, body)) => *self.errors.entry(format!("{status} {}", body["errorName"].as_str().unwrap_or(""))).or_default() += 1,
            Err(e) => *self.errors.entry(format!("transport: {e}")).or_default() += 1,
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() { 0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
}

/// One phase: closed loop on every connection, or the offered rate spread over them.
async fn phase(target: &Arc<Target>, connections: &mut Vec<Connection>, args: &Args, phase: Phase, sealed: &Value) -> Result<(Tally, f64)> {
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let (method, path, body) = request(target, &args.key, phase, sealed);
    let (method, path, body) = (Arc::new(method), Arc::new(path), Arc::new(body));
    // Open loop: a thread of its own releases each start at its time (tokio's timer ticks in
    // whole milliseconds, which would add up to one to each latency), and the starts go to the
    // connections in turn; latency counts from the scheduled start, waiting for a busy
    // connection included.
    let mut queues = Vec::new();
    let timer = args.rate.map(|rate| {
        let (release, starts) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let thread = std::thread::spawn(move || {
            let gap = Duration::from_secs_f64(1.0 / rate as f64);
            let mut at = Instant::now();
            while at < deadline {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if release.send(at.max(Instant::now())).is_err() {
                    break;
                }
                at += gap;
            }
        });
        (thread, starts)
    });
    let mut tasks = Vec::new();
    for mut conn in connections.drain(..) {
        let (target, method, path, body) = (target.clone(), method.clone(), path.clone(), body.clone());
        let mut queue = timer.as_ref().map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            queues.push(tx);
            rx
        });
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let from = match &mut queue {
                    Some(queue) => match queue.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None if Instant::now() < deadline => Instant::now(),
                    None => break,
                };
                let answer = call(&target, &mut conn, &method, &path, &body).await;
                tally.record(answer, from.elapsed().as_micros() as u32);
            }
            (tally, conn)
        }));
    }
    if let Some((thread, mut starts)) = timer {
        let mut i = 0;
        while let Some(at) = starts.recv().await {
            let _ = queues[i % queues.len()].send(at);
            i += 1;
        }
        queues.clear();
        if thread.join().is_err() {
            bail!("the open-loop timer thread panicked");
        }
    }
    let mut all = Tally::default();
    for t in tasks {
        let (tally, conn) = t.await?;
        all.latencies.extend(tally.latencies);
        for (e, n) in tally.errors {
            *all.errors.entry(e).or_default() += n;
        }
        connections.push(conn);
    }
    all.latencies.sort_unstable();
    Ok((all, started.elapsed().as_secs_f64()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let target = Arc::new(Target::load(&args)?);
    let mut connections = Vec::new();
    for _ in 0..args.clients.max(1) {
        connections.push(target.connect().await.context("connecting to the XKS listener")?);
    }
    // One encryption to decrypt throughout (and a check that the key store works at all).
    let (method, path, body) = request(&target, &args.key, Phase::Encrypt, &Value::Null);
    let (status, sealed) = call(&target, &mut connections[0], method, &path, &body).await?;
    if status != 200 {
        bail!("the first Encrypt answered {status}: {sealed}");
    }
    println!("{:<10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}", "call", "ok", "per_s", "p50_us", "p90_us", "p99_us", "p999_us");
    let mut results = Vec::new();
    for p in [Phase::Empty, Phase::Encrypt, Phase::Decrypt] {
        let (tally, secs) = phase(&target, &mut connections, &args, p, &sealed).await?;
        let l = &tally.latencies;
        let row = json!({"call": format!("{p:?}"), "ok": l.len(), "per_second": l.len() as f64 / secs, "p50_us": percentile(l, 0.5),
                         "p90_us": percentile(l, 0.9), "p99_us": percentile(l, 0.99), "p999_us": percentile(l, 0.999), "errors": tally.errors});
        println!(
            "{:<10} {:>9} {:>10.0} {:>8} {:>8} {:>8} {:>8}{}",
            row["call"].as_str().unwrap_or_default(),
            row["ok"],
            row["per_second"].as_f64().unwrap_or_default(),
            row["p50_us"],
            row["p90_us"],
            row["p99_us"],
            row["p999_us"],
            if tally.errors.is_empty() { String::new() } else { format!("  errors: {}", row["errors"]) }
        );
        results.push(row);
    }
    println!("{}", json!({"clients": args.clients, "rate": args.rate, "http2": args.http2, "results": results}));
    Ok(())
}
