//! What the facades' load generators (`xks-load`, `cse-load`) share: keep-alive HTTPS
//! connections (HTTP/1.1, or HTTP/2 one stream at a time), a phase run closed loop on every
//! connection or open loop at an offered rate, and its latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

/// The load both generators take.
#[derive(clap::Args, Clone, Debug)]
pub struct Load {
    /// Connections, each with one request in flight (closed loop); with `--rate`, the pool the
    /// offered requests are spread over.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds for each phase (the empty calls, then each call measured).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Open loop: offer this many requests per second (latency from the scheduled start).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// HTTP/2 (one stream at a time per connection) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
}

/// Where the connections go, and how.
#[allow(missing_debug_implementations)] // a TLS connector
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub http2: bool,
    tls: tokio_rustls::TlsConnector,
}

impl Endpoint {
    /// `url`'s host and port, trusting the CA in `ca` (PEM).
    pub fn new(url: &str, ca: &std::path::Path, http2: bool) -> Result<Endpoint> {
        let uri: hyper::Uri = url.parse().context("a URL")?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).context("--ca")? {
            roots.add(cert.context("--ca: a certificate")?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        Ok(Endpoint {
            host: uri.host().context("a host")?.to_string(),
            port: uri.port_u16().unwrap_or(443),
            http2,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    pub async fn connect(&self) -> Result<Connection> {
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
        Ok(Connection { send, authority: format!("{}:{}", self.host, self.port), http2: self.http2 })
    }
}

/// One connection, one request in flight.
#[allow(missing_debug_implementations)] // hyper's senders
pub struct Connection {
    send: Sender,
    pub authority: String,
    http2: bool,
}

enum Sender {
    One(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    pub fn http2(&self) -> bool {
        self.http2
    }

    /// The request line's target for `path`: the path (HTTP/1.1, with a `host` header) or the
    /// whole URL (HTTP/2).
    pub fn target(&self, path: &str) -> String {
        if self.http2 { format!("https://{}{path}", self.authority) } else { path.to_string() }
    }

    /// Sends `parts` with `body`; the status and the answer as JSON (null if it is not).
    pub async fn send(&mut self, mut parts: hyper::http::request::Parts, body: Vec<u8>) -> Result<(u16, Value)> {
        if !self.http2 {
            parts.headers.insert("host", self.authority.parse()?);
        }
        let request = hyper::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let response = match &mut self.send {
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
}

/// Latencies (µs) of the successes and the count of each failure.
#[derive(Debug, Default)]
pub struct Tally {
    pub latencies: Vec<u32>,
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    /// Counts an answer: 200 is a success; otherwise its status and error name (`name_field`
    /// of the JSON answer).
    fn record(&mut self, answer: Result<(u16, Value)>, micros: u32, name_field: &str) {
        match answer {
            Ok((200, _)) => self.latencies.push(micros),
            Ok((status, body)) => *self.errors.entry(format!("{status} {}", body[name_field].as_str().unwrap_or(""))).or_default() += 1,
            Err(e) => *self.errors.entry(format!("transport: {e}")).or_default() += 1,
        }
    }
}

pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() { 0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
}

/// One call on a connection, as a phase makes it: its status and JSON answer.
pub type BoxCall<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(u16, Value)>> + Send + 'a>>;
/// What a phase sends.
pub type Call = Arc<dyn for<'a> Fn(&'a mut Connection) -> BoxCall<'a> + Send + Sync>;

/// One phase: closed loop on every connection for `duration`, or `rate` calls a second spread
/// over them (open loop: latency counts from each call's scheduled start, waiting for a busy
/// connection included). `name_field` names the error's name in a refusal's JSON.
pub async fn phase(
    connections: &mut Vec<Connection>,
    duration: Duration,
    rate: Option<u64>,
    call: Call,
    name_field: &'static str,
) -> Result<(Tally, f64)> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    // Open loop: a thread of its own releases each start at its time (tokio's timer ticks in
    // whole milliseconds, which would add up to one to each latency), and the starts go to the
    // connections in turn.
    let mut queues = Vec::new();
    let timer = rate.map(|rate| {
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
        let call = call.clone();
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
                let answer = call(&mut conn).await;
                tally.record(answer, from.elapsed().as_micros() as u32, name_field);
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

/// The header of the table `row` prints under.
pub fn print_header() {
    println!("{:<10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}", "call", "ok", "per_s", "p50_us", "p90_us", "p99_us", "p999_us");
}

/// A phase's figures, printed as a row of the table and returned as JSON.
pub fn row(call: &str, tally: &Tally, secs: f64) -> Value {
    let l = &tally.latencies;
    let row = json!({"call": call, "ok": l.len(), "per_second": l.len() as f64 / secs, "p50_us": percentile(l, 0.5),
                     "p90_us": percentile(l, 0.9), "p99_us": percentile(l, 0.99), "p999_us": percentile(l, 0.999), "errors": tally.errors});
    println!(
        "{:<10} {:>9} {:>10.0} {:>8} {:>8} {:>8} {:>8}{}",
        call,
        row["ok"],
        row["per_second"].as_f64().unwrap_or_default(),
        row["p50_us"],
        row["p90_us"],
        row["p99_us"],
        row["p999_us"],
        if tally.errors.is_empty() { String::new() } else { format!("  errors: {}", row["errors"]) }
    );
    row
}
