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
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Parser;
use kms_benches::https_load::{Call, Connection, Endpoint, Load, phase, print_header, row};
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
    #[command(flatten)]
    load: Load,
}

/// The key store: its path prefix and credential.
struct Target {
    path: String,
    access_key_id: String,
    secret: String,
    region: String,
}

/// One call; its status and JSON answer.
async fn call(target: &Target, conn: &mut Connection, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let body = if method == "GET" { Vec::new() } else { body.to_string().into_bytes() };
    let (mut parts, ()) =
        hyper::Request::builder().method(method).uri(conn.target(path)).header("content-type", "application/json").body(())?.into_parts();
    if method == "POST" {
        if !conn.http2() {
            // Signed: the host the server will see.
            parts.headers.insert("host", conn.authority.parse()?);
        }
        kms_server::facade::xks::auth::sign(&mut parts, &body, &target.region, &target.access_key_id, &target.secret, chrono::Utc::now())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    conn.send(parts, body).await
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let file: Value = serde_json::from_slice(&std::fs::read(&args.proxy_file).context("--proxy-file")?).context("--proxy-file: JSON")?;
    let endpoint = Endpoint::new(file["XksProxyUriEndpoint"].as_str().context("XksProxyUriEndpoint")?, &args.ca, args.load.http2)?;
    let credential = &file["XksProxyAuthenticationCredential"];
    let target = Arc::new(Target {
        path: file["XksProxyUriPath"].as_str().context("XksProxyUriPath")?.to_string(),
        access_key_id: credential["AccessKeyId"].as_str().context("AccessKeyId")?.to_string(),
        secret: credential["RawSecretAccessKey"].as_str().context("RawSecretAccessKey")?.to_string(),
        region: args.region.clone(),
    });
    let mut connections = Vec::new();
    for _ in 0..args.load.clients.max(1) {
        connections.push(endpoint.connect().await.context("connecting to the XKS listener")?);
    }
    // One encryption to decrypt throughout (and a check that the key store works at all).
    let (method, path, body) = request(&target, &args.key, Phase::Encrypt, &Value::Null);
    let (status, sealed) = call(&target, &mut connections[0], method, &path, &body).await?;
    if status != 200 {
        bail!("the first Encrypt answered {status}: {sealed}");
    }
    print_header();
    let mut results = Vec::new();
    for p in [Phase::Empty, Phase::Encrypt, Phase::Decrypt] {
        let (method, path, body) = request(&target, &args.key, p, &sealed);
        let (target, path, body) = (target.clone(), Arc::new(path), Arc::new(body));
        let one: Call = Arc::new(move |conn| {
            let (target, path, body) = (target.clone(), path.clone(), body.clone());
            Box::pin(async move { call(&target, conn, method, &path, &body).await })
        });
        let (tally, secs) = phase(&mut connections, Duration::from_secs(args.load.duration), args.load.rate, one, "errorName").await?;
        results.push(row(&format!("{p:?}"), &tally, secs));
    }
    println!("{}", json!({"clients": args.load.clients, "rate": args.load.rate, "http2": args.load.http2, "results": results}));
    Ok(())
}
