//! `cse-load`: load on the Google Workspace CSE facade as Google's clients make it: HTTPS
//! keep-alive connections, `wrap` then `unwrap` of a 32-byte data key, each call carrying an
//! authentication token (the identity provider's) and an authorization token (Google's), both
//! verified by the server on every call; each phase after the same run's empty calls (`status`:
//! TLS and HTTP only).
//!
//! It plays both issuers itself: it makes two ES256 key pairs, and, as the officer whose
//! session `kmsctl login` left, configures CSE on the server (the KACLS URL, the key) and trusts
//! the two issuers' key sets; this replaces the server's CSE configuration.
//!
//! ```text
//! kmsctl login --dev && kmsctl key create --alias bench
//! cse-load --admin https://127.0.0.1:7401 --pki .kms-dev/pki --session ~/.config/kmsctl/session \
//!          --kacls-url https://127.0.0.1:7404/v1/cse --key alias/bench --clients 16
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use clap::Parser;
use kms_benches::https_load::{Call, Connection, Endpoint, Load, phase, print_header, row};
use kms_proto::v1 as pb;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

#[derive(Parser, Clone, Debug)]
#[command(name = "cse-load", about = "Load generator for the key management service's Google Workspace CSE facade")]
struct Args {
    /// The admin plane, to configure CSE as the logged-in officer.
    #[arg(long, default_value = "https://127.0.0.1:7401")]
    admin: String,
    /// The development PKI (its CA verifies both listeners).
    #[arg(long, default_value = ".kms-dev/pki")]
    pki: std::path::PathBuf,
    /// The officer's session file (`kmsctl login`).
    #[arg(long)]
    session: std::path::PathBuf,
    /// The KACLS URL the facade serves (the CSE listener and its path).
    #[arg(long, default_value = "https://127.0.0.1:7404/v1/cse")]
    kacls_url: String,
    /// The key CSE wraps under.
    #[arg(long)]
    key: String,
    #[command(flatten)]
    load: Load,
}

/// A token issuer of the tool's own: an ES256 key pair and its key set.
struct Issuer {
    iss: &'static str,
    pair: EcdsaKeyPair,
    jwks: String,
}

impl Issuer {
    fn new(iss: &'static str) -> Result<Issuer> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| anyhow::anyhow!("an ES256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).map_err(|_| anyhow::anyhow!("an ES256 key"))?;
        let point = pair.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": iss, "use": "sig", "alg": "ES256",
                                     "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65])}]});
        Ok(Issuer { iss, pair, jwks: jwks.to_string() })
    }

    /// A JWT (ES256) of `claims`, valid for the whole run.
    fn sign(&self, mut claims: Value) -> Result<String> {
        let now = chrono::Utc::now().timestamp();
        claims["iss"] = json!(self.iss);
        claims["iat"] = json!(now);
        claims["exp"] = json!(now + 3600);
        let signing_input =
            format!("{}.{}", B64URL.encode(json!({"alg": "ES256", "typ": "JWT", "kid": self.iss}).to_string()), B64URL.encode(claims.to_string()));
        let signature = self.pair.sign(&SystemRandom::new(), signing_input.as_bytes()).map_err(|_| anyhow::anyhow!("signing"))?;
        Ok(format!("{signing_input}.{}", B64URL.encode(signature.as_ref())))
    }
}

const IDP_AUDIENCE: &str = "cse-load-idp";
const GOOGLE_AUDIENCE: &str = "cse-authorization";
const EMAIL: &str = "load@example.com";
const RESOURCE: &str = "//googleapis.com/drive/files/cse-load";

/// Configures CSE on the server for the tool's two issuers.
async fn configure(args: &Args, idp: &Issuer, google: &Issuer) -> Result<()> {
    let tls = kms_client::Tls::dev(&args.pki);
    let token = std::fs::read_to_string(&args.session).context("--session")?;
    let channel = kms_client::channel(&args.admin, &tls).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let bearer = kms_client::Bearer::new(Some(token.trim())).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut admin = pb::key_management_client::KeyManagementClient::new(kms_client::AdminChannel::new(channel, bearer));
    let cse = pb::ConfigureCseRequest {
        kacls_url: args.kacls_url.clone(),
        key: args.key.clone(),
        allow_guests: false,
        privileged_users: vec![],
        migration_sources: vec![],
        owner_domain: String::new(),
    };
    admin.configure_cse(cse).await.context("ConfigureCse")?;
    for (issuer, token, audience) in [(idp, "authentication", IDP_AUDIENCE), (google, "authorization", GOOGLE_AUDIENCE)] {
        let put = pb::PutCseIssuerRequest {
            iss: issuer.iss.into(),
            token: token.into(),
            audiences: vec![audience.into()],
            jwks: issuer.jwks.clone(),
            jwks_url: String::new(),
        };
        admin.put_cse_issuer(put).await.context("PutCseIssuer")?;
    }
    Ok(())
}

/// One call; its status and JSON answer.
async fn call(conn: &mut Connection, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let body = if method == "GET" { Vec::new() } else { body.to_string().into_bytes() };
    let (parts, ()) =
        hyper::Request::builder().method(method).uri(conn.target(path)).header("content-type", "application/json").body(())?.into_parts();
    conn.send(parts, body).await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (idp, google) = (Issuer::new("https://idp.cse-load.example")?, Issuer::new("https://google.cse-load.example")?);
    configure(&args, &idp, &google).await?;
    let endpoint = Endpoint::new(&args.kacls_url, &args.pki.join("ca.pem"), args.load.http2)?;
    let base: hyper::Uri = args.kacls_url.parse()?;
    let base = base.path().trim_end_matches('/').to_string();
    let authentication = idp.sign(json!({"aud": IDP_AUDIENCE, "email": EMAIL}))?;
    let authorization = |role: &str| {
        google.sign(json!({"aud": GOOGLE_AUDIENCE, "email": EMAIL, "role": role, "resource_name": RESOURCE, "perimeter_id": "",
                           "kacls_url": args.kacls_url}))
    };
    let wrap = json!({"authentication": authentication, "authorization": authorization("writer")?, "key": B64.encode([7u8; 32]),
                      "reason": "cse-load"});
    let mut connections = Vec::new();
    for _ in 0..args.load.clients.max(1) {
        connections.push(endpoint.connect().await.context("connecting to the CSE listener")?);
    }
    let (status, wrapped) = call(&mut connections[0], "POST", &format!("{base}/wrap"), &wrap).await?;
    if status != 200 {
        bail!("the first wrap answered {status}: {wrapped}");
    }
    let unwrap = json!({"authentication": authentication, "authorization": authorization("reader")?,
                        "wrapped_key": wrapped["wrapped_key"], "reason": "cse-load"});
    print_header();
    let mut results = Vec::new();
    for (name, method, path, body) in [("Empty", "GET", "status", Value::Null), ("Wrap", "POST", "wrap", wrap), ("Unwrap", "POST", "unwrap", unwrap)]
    {
        let (path, body) = (Arc::new(format!("{base}/{path}")), Arc::new(body));
        let one: Call = Arc::new(move |conn| {
            let (path, body) = (path.clone(), body.clone());
            Box::pin(async move { call(conn, method, &path, &body).await })
        });
        let (tally, secs) = phase(&mut connections, Duration::from_secs(args.load.duration), args.load.rate, one, "code").await?;
        results.push(row(name, &tally, secs));
    }
    println!("{}", json!({"clients": args.load.clients, "rate": args.load.rate, "http2": args.load.http2, "results": results}));
    Ok(())
}
