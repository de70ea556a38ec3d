//! Google Workspace client-side encryption (the KACLS API) through its real HTTPS listener:
//! tokens made here by an identity provider and a "Google" of the test's own (ES256 keys from
//! ring, signed by jsonwebtoken), requests sent by curl.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kms_proto::v1 as pb;
use kms_tests::{Admin, Server};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

const IDP: &str = "https://idp.example.com";
const IDP_AUDIENCE: &str = "kacls-client";
const GOOGLE: &str = "gsuitecse-tokenissuer-drive@system.gserviceaccount.com";
const RESOURCE: &str = "//googleapis.com/drive/files/1AbC";

/// A token issuer of the test's own: an ES256 key pair, its JWKS.
struct Issuer {
    iss: String,
    kid: String,
    pkcs8: Vec<u8>,
    jwks: String,
}

impl Issuer {
    fn new(iss: &str, kid: &str) -> Issuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap().as_ref().to_vec();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                                     "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65])}]});
        Issuer { iss: iss.into(), kid: kid.into(), pkcs8, jwks: jwks.to_string() }
    }

    fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The tenant: its identity provider, Google, and the KACLS URL Google was given.
pub(crate) struct Tenant {
    idp: Issuer,
    google: Issuer,
    kacls_url: String,
}

impl Tenant {
    fn authentication(&self, email: &str) -> String {
        self.idp.sign(json!({"iss": self.idp.iss, "aud": IDP_AUDIENCE, "email": email, "iat": now(), "exp": now() + 300}))
    }

    fn authorization_claims(&self, email: &str, role: &str) -> Value {
        json!({"iss": self.google.iss, "aud": "cse-authorization", "email": email, "role": role, "resource_name": RESOURCE,
               "perimeter_id": "eu", "kacls_url": self.kacls_url, "iat": now(), "exp": now() + 300})
    }

    fn authorization(&self, email: &str, role: &str) -> String {
        self.google.sign(self.authorization_claims(email, role))
    }

    pub(crate) fn wrap(&self, key: &[u8]) -> Value {
        json!({"authentication": self.authentication("ana@example.com"), "authorization": self.authorization("ana@example.com", "writer"),
               "key": B64.encode(key), "reason": "{\"client\":\"drive\"}"})
    }

    pub(crate) fn unwrap(&self, wrapped: &Value, email: &str, role: &str) -> Value {
        json!({"authentication": self.authentication(email), "authorization": self.authorization(email, role),
               "wrapped_key": wrapped, "reason": "open"})
    }
}

/// Sends `body` (if any) to `operation` on the CSE listener with `headers`; the status and JSON.
fn cse_with(server: &Server, method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> (u16, Value, String) {
    let mut curl = Command::new("curl");
    curl.args(["--silent", "--show-error", "--max-time", "10", "--request", method, "--include"])
        .arg("--cacert")
        .arg(server.pki_dir().join("ca.pem"));
    for h in headers {
        curl.args(["--header", h]);
    }
    if let Some(body) = body {
        curl.args(["--header", "content-type: application/json", "--data-binary", body]);
    }
    let out = curl.args(["--write-out", "\n%{http_code}"]).arg(format!("https://{}{path}", server.cse_addr)).output().expect("curl runs");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (response, code) = text.rsplit_once('\n').unwrap();
    let (head, json) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    (code.parse().unwrap(), serde_json::from_str(json).unwrap_or(Value::Null), head.to_ascii_lowercase())
}

pub(crate) fn post(server: &Server, operation: &str, body: &Value) -> (u16, Value) {
    let (status, json, _) = cse_with(server, "POST", &format!("/v1/cse/{operation}"), Some(&body.to_string()), &[]);
    (status, json)
}

/// A server whose CSE serves `key` at /v1/cse, trusting the tenant's two issuers.
pub(crate) async fn tenant(server: &Server, admin: &mut Admin, key: &str) -> Tenant {
    let tenant =
        Tenant { idp: Issuer::new(IDP, "idp-1"), google: Issuer::new(GOOGLE, "google-1"), kacls_url: format!("https://{}/v1/cse", server.cse_addr) };
    admin
        .configure_cse(pb::ConfigureCseRequest {
            kacls_url: tenant.kacls_url.clone(),
            key: key.into(),
            allow_guests: false,
            privileged_users: vec!["admin@example.com".into()],
            migration_sources: vec![],
            owner_domain: String::new(),
        })
        .await
        .expect("CSE configured");
    for (issuer, token, audience) in [(&tenant.idp, "authentication", IDP_AUDIENCE), (&tenant.google, "authorization", "cse-authorization")] {
        admin
            .put_cse_issuer(pb::PutCseIssuerRequest {
                iss: issuer.iss.clone(),
                token: token.into(),
                audiences: vec![audience.into()],
                jwks: issuer.jwks.clone(),
                jwks_url: String::new(),
            })
            .await
            .expect("issuer trusted");
    }
    tenant
}

/// An issuer's key set published over HTTPS by the test: the URL, and how many times it was
/// fetched.
async fn publish(server: &Server, jwks: Arc<Mutex<String>>) -> (String, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let addr = kms_tests::https_endpoint(server, move |_request| {
        counted.fetch_add(1, Ordering::SeqCst);
        let body = jwks.lock().unwrap().clone();
        async move { hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body))) }
    })
    .await;
    (format!("https://{addr}/jwks.json"), fetches)
}

fn resource_key_hash(dek: &[u8], perimeter: &str) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(dek).unwrap();
    mac.update(format!("ResourceKeyDigest:{RESOURCE}:{perimeter}").as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn google_wraps_and_unwraps_under_our_key_with_both_tokens_checked() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "drive").await;
    let t = tenant(&server, &mut admin, "alias/drive").await;

    let (status, answer, _) = cse_with(&server, "GET", "/v1/cse/status", None, &[]);
    assert_eq!((status, &answer["server_type"]), (200, &json!("KACLS")), "{answer}");
    for operation in ["privilegedwrap", "privilegedunwrap"] {
        assert!(answer["operations_supported"].as_array().unwrap().contains(&json!(operation)), "{answer}");
    }

    // Wrap as a writer, unwrap as a reader: the same data key; the wrapped key is our blob.
    let dek: Vec<u8> = (0..32).collect();
    let (status, wrapped) = post(&server, "wrap", &t.wrap(&dek));
    assert_eq!(status, 200, "{wrapped}");
    let wrapped = wrapped["wrapped_key"].clone();
    assert!(!B64.decode(wrapped.as_str().unwrap()).unwrap().windows(dek.len()).any(|w| w == dek), "no clear key in the wrapped key");
    let (status, opened) = post(&server, "unwrap", &t.unwrap(&wrapped, "Ana@Example.com", "reader"));
    assert_eq!((status, B64.decode(opened["key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek.clone()), "{opened}");

    // The resource key hash, as Google's reference defines it, for a verifier.
    let digest = json!({"authorization": t.authorization("ana@example.com", "verifier"), "wrapped_key": wrapped, "reason": "check"});
    let (status, hash) = post(&server, "digest", &digest);
    assert_eq!((status, hash["resource_key_hash"].as_str()), (200, Some(resource_key_hash(&dek, "eu").as_str())), "{hash}");

    // The officer moves CSE to a new key; a migrator rewraps: the new wrapped key is under it,
    // and the old one still opens (its key's grant stays until the officer revokes it).
    let newer = kms_tests::create_key(&mut admin, "drive-2026").await;
    admin
        .configure_cse(pb::ConfigureCseRequest {
            kacls_url: t.kacls_url.clone(),
            key: newer.clone(),
            allow_guests: false,
            privileged_users: vec!["admin@example.com".into()],
            migration_sources: vec![],
            owner_domain: String::new(),
        })
        .await
        .unwrap();
    let rewrap = json!({"authorization": t.authorization("migrator@example.com", "migrator"), "original_kacls_url": t.kacls_url,
                        "wrapped_key": wrapped, "reason": "migration"});
    let (status, rewrapped) = post(&server, "rewrap", &rewrap);
    assert_eq!((status, rewrapped["resource_key_hash"].as_str()), (200, Some(resource_key_hash(&dek, "eu").as_str())), "{rewrapped}");
    assert_ne!(rewrapped["wrapped_key"], wrapped);
    let (status, opened) = post(&server, "unwrap", &t.unwrap(&rewrapped["wrapped_key"], "ana@example.com", "writer"));
    assert_eq!((status, B64.decode(opened["key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek.clone()));
    let elsewhere = json!({"authorization": t.authorization("migrator@example.com", "migrator"),
                           "original_kacls_url": "https://other-kacls.example.com", "wrapped_key": wrapped, "reason": "migration"});
    let (status, e) = post(&server, "rewrap", &elsewhere);
    assert_eq!(status, 403, "{e}");
    assert!(e["message"].as_str().unwrap().contains("not a migration source"), "{e}");

    // privilegedunwrap: the authentication token alone, for a privileged user, bound to the resource.
    let privileged = |email: &str, resource: &str| json!({"authentication": t.authentication(email), "resource_name": resource, "wrapped_key": wrapped, "reason": "takeout"});
    let (status, opened) = post(&server, "privilegedunwrap", &privileged("admin@example.com", RESOURCE));
    assert_eq!((status, B64.decode(opened["key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek.clone()));
    let (status, e) = post(&server, "privilegedunwrap", &privileged("ana@example.com", RESOURCE));
    assert_eq!(status, 403, "{e}");
    assert_eq!(post(&server, "privilegedunwrap", &privileged("admin@example.com", "//googleapis.com/drive/files/other")).0, 400);

    // privilegedwrap: an administrator's bulk import, the authentication token alone; the key is
    // bound to the resource and perimeter the request names, and opens as any other.
    let imported: Vec<u8> = (100..132).collect();
    let import = |email: &str, resource: &str| {
        json!({"authentication": t.authentication(email), "key": B64.encode(&imported), "resource_name": resource,
               "perimeter_id": "eu", "reason": "bulk import"})
    };
    let (status, bulk) = post(&server, "privilegedwrap", &import("admin@example.com", RESOURCE));
    assert_eq!(status, 200, "{bulk}");
    let (status, opened) = post(&server, "unwrap", &t.unwrap(&bulk["wrapped_key"], "ana@example.com", "reader"));
    assert_eq!((status, B64.decode(opened["key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, imported.clone()), "{opened}");
    let (status, e) = post(&server, "privilegedwrap", &import("ana@example.com", RESOURCE));
    assert_eq!(status, 403, "only a privileged user: {e}");
    let (status, e) = post(&server, "privilegedwrap", &import("admin@example.com", ""));
    assert_eq!(status, 400, "{e}");
    let elsewhere = json!({"authentication": t.authentication("admin@example.com"), "resource_name": "//googleapis.com/drive/files/other",
                           "wrapped_key": bulk["wrapped_key"], "reason": "takeout"});
    assert_eq!(post(&server, "privilegedunwrap", &elsewhere).0, 400, "bound to its resource");

    // Every call is in the audit trail as cse:workspace, with the user, role, reason and resource.
    type Record = (String, String, Option<String>, Option<String>, Option<String>);
    let recorded: Vec<Record> = server
        .db()
        .prepare("SELECT operation, outcome, key_id, context, caller_context FROM audit WHERE principal = 'cse:workspace' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ops: Vec<&str> = recorded.iter().map(|r| r.0.as_str()).collect();
    for op in ["CseWrap", "CseUnwrap", "CseDigest", "CseRewrap", "CsePrivilegedWrap", "CsePrivilegedUnwrap"] {
        assert!(ops.contains(&op), "{op} audited: {ops:?}");
    }
    let wrap = recorded.iter().find(|r| r.0 == "CseWrap").unwrap();
    assert_eq!(wrap.2.as_deref(), Some(key.as_str()));
    assert!(wrap.3.as_deref().unwrap_or_default().contains(RESOURCE), "{wrap:?}");
    let who: Value = serde_json::from_str(wrap.4.as_deref().unwrap()).unwrap();
    assert_eq!(
        (who["email"].as_str(), who["role"].as_str(), who["reason"].as_str()),
        (Some("ana@example.com"), Some("writer"), Some("{\"client\":\"drive\"}"))
    );
    assert!(recorded.iter().any(|r| r.0 == "CsePrivilegedUnwrap" && r.1 == "denied"), "the refused privileged unwrap is audited: {recorded:?}");
    assert!(!format!("{recorded:?}").contains(&B64.encode(&dek)), "no key in the audit");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refusal_is_the_specs_error() {
    let server = Server::start();
    let mut admin = server.admin().await;
    kms_tests::create_key(&mut admin, "drive").await;
    let t = tenant(&server, &mut admin, "alias/drive").await;
    let dek = [7u8; 32];
    let (_, wrapped) = post(&server, "wrap", &t.wrap(&dek));
    let wrapped = wrapped["wrapped_key"].clone();
    let stranger = Issuer::new(GOOGLE, "google-1");
    let mut tampered = B64.decode(wrapped.as_str().unwrap()).unwrap();
    *tampered.last_mut().unwrap() ^= 1;

    let with = |mut body: Value, field: &str, value: Value| {
        body[field] = value;
        body
    };
    let authz = |claims: Value| t.google.sign(claims);
    let claims = t.authorization_claims("ana@example.com", "reader");
    let unwrap = t.unwrap(&wrapped, "ana@example.com", "reader");
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        ("a reader wraps", "wrap", with(t.wrap(&dek), "authorization", json!(t.authorization("ana@example.com", "reader"))), 403, "does not allow"),
        (
            "another user's token",
            "unwrap",
            with(unwrap.clone(), "authentication", json!(t.authentication("bob@example.com"))),
            403,
            "different users",
        ),
        (
            "an expired token",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "exp", json!(now() - 600))))),
            401,
            "expired",
        ),
        (
            "a token signed by another key",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(stranger.sign(claims.clone()))),
            401,
            "does not verify",
        ),
        (
            "an untrusted issuer",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "iss", json!("evil@example.com"))))),
            401,
            "does not trust",
        ),
        (
            "another audience",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "aud", json!("other"))))),
            401,
            "another audience",
        ),
        (
            "another KACLS",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "kacls_url", json!("https://evil.example.com"))))),
            403,
            "kacls_url",
        ),
        (
            "a guest",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "email_type", json!("google-visitor"))))),
            403,
            "guest",
        ),
        (
            "another resource",
            "unwrap",
            with(unwrap.clone(), "authorization", json!(authz(with(claims.clone(), "resource_name", json!("//googleapis.com/drive/files/2"))))),
            400,
            "does not open",
        ),
        ("a tampered wrapped key", "unwrap", with(unwrap.clone(), "wrapped_key", json!(B64.encode(tampered.clone()))), 400, "does not open"),
        ("not Base64", "unwrap", with(unwrap.clone(), "wrapped_key", json!("%%%")), 400, "Base64"),
        ("not a token", "unwrap", with(unwrap.clone(), "authentication", json!("x.y.z")), 401, "not a JWT"),
        ("no authorization", "unwrap", json!({"authentication": t.authentication("ana@example.com"), "wrapped_key": wrapped}), 400, "authorization"),
        ("a key over 128 bytes", "wrap", with(t.wrap(&dek), "key", json!(B64.encode([1u8; 129]))), 400, "key must be"),
        ("a reason over 1 KiB", "unwrap", with(unwrap.clone(), "reason", json!("r".repeat(1025))), 400, "reason"),
        (
            "a digest by a reader",
            "digest",
            json!({"authorization": t.authorization("ana@example.com", "reader"), "wrapped_key": wrapped}),
            403,
            "does not allow",
        ),
    ];
    for (what, operation, body, status, why) in cases {
        let (got, e) = post(&server, operation, &body);
        assert_eq!(got, status, "{what}: {e}");
        assert_eq!(e["code"], json!(status), "{what}: {e}");
        assert!(e["message"].as_str().unwrap_or_default().contains(why), "{what}: {e}");
    }
    // Malformed JSON, a GET of a POST, an unknown operation, another path.
    let (status, e, _) = cse_with(&server, "POST", "/v1/cse/unwrap", Some("{not json"), &[]);
    assert_eq!((status, e["code"].as_u64()), (400, Some(400)), "{e}");
    assert_eq!(cse_with(&server, "GET", "/v1/cse/wrap", None, &[]).0, 405);
    assert_eq!(cse_with(&server, "POST", "/v1/cse/exportprivatekey", Some("{}"), &[]).0, 404);
    assert_eq!(cse_with(&server, "GET", "/status", None, &[]).0, 404);

    // CORS: Google's web clients may call; no other origin.
    let google = "origin: https://client-side-encryption.google.com";
    let (status, _, head) = cse_with(&server, "OPTIONS", "/v1/cse/unwrap", None, &[google, "access-control-request-method: POST"]);
    assert_eq!(status, 204);
    assert!(head.contains("access-control-allow-origin: https://client-side-encryption.google.com"), "{head}");
    assert!(head.contains("access-control-allow-methods:") && head.contains("post"), "{head}");
    assert_eq!(cse_with(&server, "OPTIONS", "/v1/cse/unwrap", None, &["origin: https://evil.example.com"]).0, 403);
    let (_, _, head) = cse_with(&server, "POST", "/v1/cse/unwrap", Some(&unwrap.to_string()), &[google]);
    assert!(head.contains("access-control-allow-origin: https://client-side-encryption.google.com"), "{head}");

    // A token refusal is audited (as unauthenticated, within its budget).
    let refused: i64 = server
        .db()
        .query_row("SELECT count(*) FROM audit WHERE principal = 'unauthenticated' AND operation = 'CseUnwrap'", [], |r| r.get(0))
        .unwrap();
    assert!(refused >= 5, "{refused}");
    // And the valid unwrap still works after all that.
    assert_eq!(post(&server, "unwrap", &unwrap).0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disable_cuts_google_aws_and_grpc_callers_off_on_the_next_call() {
    use crate::xks;
    let server = Server::start();
    let mut admin = server.admin().await;
    let data = server.data().await;
    let key = kms_tests::create_key(&mut admin, "shared").await;
    let t = tenant(&server, &mut admin, &key).await;
    let credential = xks::key_store(&mut admin, "aws", "").await;
    xks::allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    let (_, wrapped) = post(&server, "wrap", &t.wrap(b"0123456789abcdef"));
    let unwrap = t.unwrap(&wrapped["wrapped_key"], "ana@example.com", "reader");
    let aws = || xks::xks(&server, "POST", &format!("/kms/xks/v1/keys/{key}/encrypt"), &xks::encrypt_body(b"x"), &credential, xks::REGION).0;
    let grpc = || {
        let request =
            pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None };
        let mut data = data.clone();
        async move { data.encrypt(request).await.map(drop).map_err(|s| s.code()) }
    };
    assert_eq!((post(&server, "unwrap", &unwrap).0, aws(), grpc().await), (200, 200, Ok(())));

    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let (status, e) = post(&server, "unwrap", &unwrap);
    assert_eq!((status, aws(), grpc().await), (403, 400, Err(tonic::Code::FailedPrecondition)), "{e}");
    assert_eq!(post(&server, "wrap", &t.wrap(b"0123456789abcdef")).0, 403);
    admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    assert_eq!(post(&server, "unwrap", &unwrap).0, 200);

    // Google alone: its principal disabled, then an issuer no longer trusted.
    admin.disable_principal(pb::PrincipalRequest { name: "cse:workspace".into() }).await.unwrap();
    assert_eq!((post(&server, "unwrap", &unwrap).0, aws()), (403, 200));
    admin.enable_principal(pb::PrincipalRequest { name: "cse:workspace".into() }).await.unwrap();
    assert_eq!(post(&server, "unwrap", &unwrap).0, 200);
    admin.remove_cse_issuer(pb::RemoveCseIssuerRequest { iss: GOOGLE.into() }).await.unwrap();
    assert_eq!(post(&server, "unwrap", &unwrap).0, 401);

    // kmsctl status shows each facade's last hour: its calls, refusals and the last refusal.
    let out = server.kmsctl(&["--json", "status"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let facade = |name: &str| status["facades"].as_array().unwrap().iter().find(|f| f["facade"] == name).cloned().unwrap_or_default();
    let (cse, xks) = (facade("cse"), facade("xks"));
    assert_eq!((cse["calls_last_hour"].as_u64(), cse["refusals_last_hour"].as_u64()), (Some(8), Some(4)), "{status}");
    assert!(cse["last_refusal"].as_str().unwrap().starts_with("401 the authorization token is from an issuer"), "{cse}");
    assert_eq!((xks["calls_last_hour"].as_u64(), xks["refusals_last_hour"].as_u64()), (Some(3), Some(1)), "{status}");
    assert!(xks["last_refusal"].as_str().unwrap().starts_with("InvalidStateException"), "{xks}");
    let text = String::from_utf8(server.kmsctl(&["status"]).stdout).unwrap();
    assert!(text.contains("Google Workspace CSE: 8 calls, 4 refused in the last hour; last refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_officer_connects_google_workspace_with_kmsctl() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "workspace").await;
    let kmsctl = |args: &[&str]| {
        let out = server.kmsctl(args);
        assert!(out.status.success(), "kmsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let url = format!("https://{}/cse", server.cse_addr);
    let shown: Value = serde_json::from_str(&kmsctl(&["--json", "cse", "show"])).unwrap();
    assert_eq!(shown["configured"], false);
    let configured: Value = serde_json::from_str(&kmsctl(&[
        "--json",
        "cse",
        "configure",
        "--kacls-url",
        &url,
        "--key",
        "alias/workspace",
        "--privileged-user",
        "admin@example.com",
    ]))
    .unwrap();
    assert_eq!((configured["key_id"].as_str(), configured["kacls_url"].as_str()), (Some(key.as_str()), Some(url.as_str())), "{configured}");
    // It granted Encrypt and Decrypt to Google's principal.
    let grants = admin.list_grants(pb::ListGrantsRequest { key_id: key.clone(), principal: "cse:workspace".into() }).await.unwrap().into_inner();
    assert_eq!(grants.grants.len(), 1);
    // Again: no second grant.
    kmsctl(&["cse", "configure", "--kacls-url", &url, "--key", &key]);
    let grants = admin.list_grants(pb::ListGrantsRequest { key_id: key.clone(), principal: "cse:workspace".into() }).await.unwrap().into_inner();
    assert_eq!(grants.grants.len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let (idp, google) = (Issuer::new(IDP, "idp-1"), Issuer::new(GOOGLE, "google-1"));
    for (issuer, token, audience) in [(&idp, "authentication", IDP_AUDIENCE), (&google, "authorization", "cse-authorization")] {
        let file = dir.path().join(format!("{token}.jwks"));
        std::fs::write(&file, &issuer.jwks).unwrap();
        kmsctl(&["cse", "issuer", "add", &issuer.iss, "--token", token, "--audience", audience, "--jwks-file", file.to_str().unwrap()]);
    }
    let shown: Value = serde_json::from_str(&kmsctl(&["--json", "cse", "show"])).unwrap();
    assert_eq!(shown["issuers"].as_array().map(Vec::len), Some(2), "{shown}");
    assert!(shown["issuers"].to_string().contains("google-1"), "the key ids are shown: {shown}");
    let text = kmsctl(&["cse", "show"]);
    assert!(text.contains(&url) && text.contains(GOOGLE), "{text}");

    // Google can now wrap through the listener at the URL's path.
    let t = Tenant { idp, google, kacls_url: url.clone() };
    let (status, _, _) = cse_with(&server, "POST", "/cse/wrap", Some(&t.wrap(b"k").to_string()), &[]);
    assert_eq!(status, 200);

    // With the owner domain set, Google's tokens for a key service another Workspace owns (its
    // admin pointed it at our URL) are refused; ours and those naming no owner are taken.
    let shown: Value =
        serde_json::from_str(&kmsctl(&["--json", "cse", "configure", "--kacls-url", &url, "--key", &key, "--owner-domain", "Example.COM"])).unwrap();
    assert_eq!(shown["owner_domain"], "example.com", "{shown}");
    assert!(kmsctl(&["cse", "show"]).contains("owner domain example.com"));
    let wrap_owned_by = |owner: Option<&str>| {
        let mut claims = t.authorization_claims("ana@example.com", "writer");
        if let Some(owner) = owner {
            claims["kacls_owner_domain"] = json!(owner);
        }
        let body = json!({"authentication": t.authentication("ana@example.com"), "authorization": t.google.sign(claims), "key": B64.encode(b"k")});
        let (status, answer, _) = cse_with(&server, "POST", "/cse/wrap", Some(&body.to_string()), &[]);
        (status, answer)
    };
    assert_eq!(wrap_owned_by(Some("example.com")).0, 200);
    assert_eq!(wrap_owned_by(None).0, 200);
    let (status, answer) = wrap_owned_by(Some("other.example"));
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap_or_default().contains("kacls_owner_domain"), "{answer}");
    let shown: Value = serde_json::from_str(&kmsctl(&["--json", "cse", "show"])).unwrap();

    // Bad input is refused with the field named, and changes nothing.
    let bad = |args: &[&str], why: &str| {
        let out = server.kmsctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && stderr.contains(why), "{args:?}: {stderr}");
    };
    bad(&["cse", "configure", "--kacls-url", "http://kacls.example.com", "--key", &key], "kacls_url");
    bad(&["cse", "configure", "--kacls-url", "https://kacls.example.com", "--key", &key, "--privileged-user", "nobody"], "privileged_users");
    bad(&["cse", "configure", "--kacls-url", "https://kacls.example.com", "--key", &key, "--owner-domain", "not a domain"], "owner_domain");
    let junk = dir.path().join("junk.jwks");
    std::fs::write(&junk, "{\"keys\": []}").unwrap();
    bad(&["cse", "issuer", "add", "x", "--token", "authorization", "--audience", "a", "--jwks-file", junk.to_str().unwrap()], "jwks");
    bad(&["cse", "issuer", "add", "x", "--token", "id", "--audience", "a", "--jwks-file", junk.to_str().unwrap()], "token");
    bad(&["cse", "issuer", "remove", "nobody"], "nobody");
    let out = server.kmsctl(&["principal", "add", "cse:other"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Google Workspace CSE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown_after: Value = serde_json::from_str(&kmsctl(&["--json", "cse", "show"])).unwrap();
    assert_eq!(shown_after["kacls_url"], shown["kacls_url"]);
    assert_eq!(shown_after["issuers"], shown["issuers"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_migrate_from_one_key_service_to_another_with_a_token_signed_in_the_hsm() {
    // The old key service (A) and the new one (B), each with its own HSM token and store; one
    // CA, so that each trusts the other's listener.
    let old = Server::start();
    let new = Server::start_with(kms_tests::Options { pki_from: Some(old.pki_dir()), ..Default::default() });
    let (mut old_admin, mut new_admin) = (old.admin().await, new.admin().await);
    kms_tests::create_key(&mut old_admin, "drive").await;
    let t = tenant(&old, &mut old_admin, "alias/drive").await;
    let dek: Vec<u8> = (100..132).collect();
    let (_, wrapped) = post(&old, "wrap", &t.wrap(&dek));
    let wrapped = wrapped["wrapped_key"].clone();

    // B: its own KACLS URL, A as a migration source, trusting Google's tokens.
    let new_url = format!("https://{}/v1/cse", new.cse_addr);
    let new_key = kms_tests::create_key(&mut new_admin, "drive").await;
    new_admin
        .configure_cse(pb::ConfigureCseRequest {
            kacls_url: new_url.clone(),
            key: new_key.clone(),
            allow_guests: false,
            privileged_users: vec![],
            migration_sources: vec![t.kacls_url.clone()],
            owner_domain: String::new(),
        })
        .await
        .unwrap();
    new_admin
        .put_cse_issuer(pb::PutCseIssuerRequest {
            iss: GOOGLE.into(),
            token: "authorization".into(),
            audiences: vec!["cse-authorization".into()],
            jwks: t.google.jwks.clone(),
            jwks_url: String::new(),
        })
        .await
        .unwrap();
    // B publishes the keys that verify its migration tokens; A trusts B, fetching them itself.
    let (status, certs, _) = cse_with(&new, "GET", "/v1/cse/certs", None, &[]);
    assert_eq!((status, &certs["keys"][0]["alg"], &certs["keys"][0]["kty"]), (200, &json!("RS256"), &json!("RSA")), "{certs}");
    let out = old.kmsctl(&[
        "--json",
        "cse",
        "issuer",
        "add",
        &new_url,
        "--token",
        "kacls",
        "--audience",
        "kacls-migration",
        "--jwks-url",
        &format!("{new_url}/certs"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let trusted = shown["issuers"].as_array().unwrap().iter().find(|i| i["token"] == "kacls").cloned().unwrap();
    assert_eq!(trusted["key_ids"], json!([certs["keys"][0]["kid"]]), "A holds B's published key: {shown}");

    // Google's migration: B rewraps A's wrapped key; A opens it for B, B wraps it under its key.
    let migrator = |kacls_url: &str| {
        let mut claims = t.authorization_claims("migrator@example.com", "migrator");
        claims["kacls_url"] = json!(kacls_url);
        t.google.sign(claims)
    };
    let rewrap = json!({"authorization": migrator(&new_url), "original_kacls_url": t.kacls_url, "wrapped_key": wrapped, "reason": "migration"});
    let (status, moved) = post(&new, "rewrap", &rewrap);
    assert_eq!((status, moved["resource_key_hash"].as_str()), (200, Some(resource_key_hash(&dek, "eu").as_str())), "{moved}");
    let mut verifier = t.authorization_claims("ana@example.com", "verifier");
    verifier["kacls_url"] = json!(new_url);
    let digest = json!({"authorization": t.google.sign(verifier), "wrapped_key": moved["wrapped_key"]});
    let (status, hash) = post(&new, "digest", &digest);
    assert_eq!((status, hash["resource_key_hash"].as_str()), (200, Some(resource_key_hash(&dek, "eu").as_str())), "B opens what it wrapped: {hash}");
    let recorded: Vec<(String, String)> = new
        .db()
        .prepare("SELECT outcome, key_id FROM audit WHERE operation = 'CseRewrap'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(recorded, vec![("allowed".to_string(), new_key.clone())]);
    let opened_for: String = old
        .db()
        .query_row("SELECT caller_context FROM audit WHERE operation = 'CsePrivilegedUnwrap' AND outcome = 'allowed'", [], |r| r.get(0))
        .unwrap();
    assert!(opened_for.contains(&new_url), "A's trail names the key service it opened the key for: {opened_for}");

    // Refused: a source the officer did not name (no call is made), and B's token replayed to A
    // for another resource.
    let elsewhere = json!({"authorization": migrator(&new_url), "original_kacls_url": "https://127.0.0.1:1/v1/cse", "wrapped_key": wrapped});
    let (status, e) = post(&new, "rewrap", &elsewhere);
    assert_eq!(status, 403, "{e}");
    assert!(e["message"].as_str().unwrap().contains("migration source"), "{e}");
    // A stops trusting B: the migration is refused by A, and B says so.
    old_admin.remove_cse_issuer(pb::RemoveCseIssuerRequest { iss: new_url.clone() }).await.unwrap();
    let (status, e) = post(&new, "rewrap", &rewrap);
    assert_eq!(status, 403, "{e}");
    assert!(e["message"].as_str().unwrap().contains("401"), "{e}");
}

/// Google rotates the key that signs its authorization tokens: the first token signed with the
/// new key makes the service fetch Google's key set again at once (audited), rather than refuse
/// Workspace until the hourly refresh; tokens naming keys nobody published cost no more than
/// one fetch a minute.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_signed_with_a_rotated_key_is_taken_after_one_fetch_of_its_issuers_key_set() {
    let server = Server::start();
    let mut admin = server.admin().await;
    kms_tests::create_key(&mut admin, "drive").await;
    let mut t = tenant(&server, &mut admin, "alias/drive").await;
    let published = Arc::new(Mutex::new(t.google.jwks.clone()));
    let (url, fetches) = publish(&server, published.clone()).await;
    admin
        .put_cse_issuer(pb::PutCseIssuerRequest {
            iss: GOOGLE.into(),
            token: "authorization".into(),
            audiences: vec!["cse-authorization".into()],
            jwks: String::new(),
            jwks_url: url,
        })
        .await
        .expect("Google's key set by URL");
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched when the officer named it");
    let dek = [7u8; 32];
    let (status, answer) = post(&server, "wrap", &t.wrap(&dek));
    assert_eq!(status, 200, "{answer}");

    // Google rotates: a new key pair, published; its first token is taken.
    t.google = Issuer::new(GOOGLE, "google-2");
    *published.lock().unwrap() = t.google.jwks.clone();
    let (status, answer) = post(&server, "wrap", &t.wrap(&dek));
    assert_eq!(status, 200, "the rotated key's token: {answer}");
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    let refreshed: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'RefreshCseIssuer'", [], |r| r.get(0)).unwrap();
    assert_eq!(refreshed, 1, "the new key set is in the trail");
    let (status, answer) = post(&server, "wrap", &t.wrap(&dek));
    assert_eq!((status, fetches.load(Ordering::SeqCst)), (200, 2), "the next token is checked with the set held: {answer}");

    // A token naming a key nobody published: refused, without another fetch within the minute.
    t.google = Issuer::new(GOOGLE, "google-made-up");
    let (status, answer) = post(&server, "wrap", &t.wrap(&dek));
    assert_eq!(status, 401, "{answer}");
    assert!(answer["message"].as_str().unwrap_or_default().contains("does not hold"), "{answer}");
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
}

/// A delegation (`delegate`): Google asks, for a user and a resource, that another of its
/// services acting for the user may wrap and unwrap that resource's keys. The key service signs
/// a delegated authentication token, checked with the keys `certs` publishes, that opens keys
/// of that resource for that delegate only.
#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_token_opens_one_resource_for_one_delegate() {
    let server = Server::start();
    let mut admin = server.admin().await;
    kms_tests::create_key(&mut admin, "drive").await;
    let t = tenant(&server, &mut admin, "alias/drive").await;
    let delegate = "meet@system.example.com";
    let dek: Vec<u8> = (0..32).collect();
    let (_, wrapped) = post(&server, "wrap", &t.wrap(&dek));
    let wrapped = wrapped["wrapped_key"].clone();

    let mut claims = t.authorization_claims("ana@example.com", "reader");
    claims["delegated_to"] = json!(delegate);
    let delegation =
        |authn: String, claims: &Value| json!({"authentication": authn, "authorization": t.google.sign(claims.clone()), "reason": "meeting"});
    let (status, answer) = post(&server, "delegate", &delegation(t.authentication("ana@example.com"), &claims));
    assert_eq!(status, 200, "{answer}");
    let delegated = answer["delegated_authentication"].as_str().unwrap().to_string();

    // A JWT of the key service's, checked here with what `certs` publishes.
    let (_, certs, _) = cse_with(&server, "GET", "/v1/cse/certs", None, &[]);
    let jwk = &certs["keys"][0];
    assert_eq!(jsonwebtoken::decode_header(&delegated).unwrap().kid.as_deref(), jwk["kid"].as_str());
    let public = jsonwebtoken::DecodingKey::from_rsa_components(jwk["n"].as_str().unwrap(), jwk["e"].as_str().unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
    validation.set_audience(&["kacls-delegate"]);
    validation.set_issuer(&[&t.kacls_url]);
    let payload = jsonwebtoken::decode::<Value>(&delegated, &public, &validation).expect("signed by the published key").claims;
    assert_eq!(
        (&payload["email"], &payload["delegated_to"], &payload["resource_name"]),
        (&json!("ana@example.com"), &json!(delegate), &json!(RESOURCE)),
        "{payload}"
    );

    // The delegate unwraps with it and its own authorization token (naming itself).
    let unwrap = |authn: &str, claims: &Value| json!({"authentication": authn, "authorization": t.google.sign(claims.clone()), "wrapped_key": wrapped, "reason": "for ana"});
    let (status, opened) = post(&server, "unwrap", &unwrap(&delegated, &claims));
    assert_eq!((status, B64.decode(opened["key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek), "{opened}");
    // Not for another delegate, another resource, or an authorization token without delegation.
    let mut other_delegate = claims.clone();
    other_delegate["delegated_to"] = json!("calendar@system.example.com");
    let mut other_resource = claims.clone();
    other_resource["resource_name"] = json!("//googleapis.com/drive/files/other");
    let mut undelegated = claims.clone();
    undelegated.as_object_mut().unwrap().remove("delegated_to");
    for (what, claims) in [("another delegate", &other_delegate), ("another resource", &other_resource), ("no delegation", &undelegated)] {
        let (status, answer) = post(&server, "unwrap", &unwrap(&delegated, claims));
        assert_eq!(status, 403, "{what}: {answer}");
    }
    // A token that only claims to be ours (signed by the identity provider's key) is refused.
    let forged = t.idp.sign(json!({"iss": t.kacls_url, "aud": "kacls-delegate", "email": "ana@example.com", "delegated_to": delegate,
                                   "resource_name": RESOURCE, "iat": now(), "exp": now() + 300}));
    let (status, answer) = post(&server, "unwrap", &unwrap(&forged, &claims));
    assert_eq!(status, 401, "{answer}");

    // A delegation names its delegate, and one user in both tokens.
    let (status, answer) = post(&server, "delegate", &delegation(t.authentication("ana@example.com"), &undelegated));
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = post(&server, "delegate", &delegation(t.authentication("bob@example.com"), &claims));
    assert_eq!(status, 403, "{answer}");

    // Audited with the user, the delegate and the resource.
    let (caller, context): (String, String) = server
        .db()
        .query_row("SELECT caller_context, context FROM audit WHERE operation = 'CseDelegate' AND outcome = 'allowed'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(caller.contains(delegate) && caller.contains("ana@example.com"), "{caller}");
    assert!(context.contains(RESOURCE), "{context}");
}

/// Runs openssl with `args` in `dir`; its standard output.
fn openssl_in(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Gmail's S/MIME keys: an administrator wraps a user's private key (PKCS#8 from openssl); the
/// user's mail has a content key decrypted (PKCS#1 v1.5 and OAEP) and a digest signed
/// (PKCS#1 v1.5 and PSS, checked by openssl) with it inside the HSM, only under a token naming
/// its public key, with the right role; takeout decrypts on the privileged path; a disabled key
/// cuts it all off; every call is audited.
#[tokio::test(flavor = "multi_thread")]
async fn gmail_decrypts_and_signs_with_a_wrapped_smime_key_inside_the_hsm() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "gmail").await;
    let t = tenant(&server, &mut admin, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    openssl_in(dir.path(), &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "user.pem"]);
    openssl_in(dir.path(), &["pkey", "-in", "user.pem", "-pubout", "-out", "public.pem"]);
    let spki = openssl_in(dir.path(), &["pkey", "-pubin", "-in", "public.pem", "-outform", "DER"]);
    let spki_hash = B64.encode(ring::digest::digest(&ring::digest::SHA256, &spki));
    let private_pem = std::fs::read_to_string(path("user.pem")).unwrap();
    assert!(private_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");

    // The administrator wraps it (only a privileged user may).
    let wrap_request = |email: &str| json!({"authentication": t.authentication(email), "perimeter_id": "eu", "private_key": private_pem});
    let (status, e) = post(&server, "wrapprivatekey", &wrap_request("ana@example.com"));
    assert_eq!(status, 403, "{e}");
    let (status, answer) = post(&server, "wrapprivatekey", &wrap_request("admin@example.com"));
    assert_eq!(status, 200, "{answer}");
    let wrapped = answer["wrapped_private_key"].as_str().unwrap().to_string();

    let authorization = |role: &str, hash: &str| {
        let mut claims = t.authorization_claims("ana@example.com", role);
        claims["spki_hash"] = json!(hash);
        claims["spki_hash_algorithm"] = json!("SHA-256");
        claims["message_id"] = json!("<msg-1@example.com>");
        t.google.sign(claims)
    };
    let decrypt = |algorithm: &str, ciphertext: &[u8], role: &str, hash: &str, wrapped: &str| {
        json!({"authentication": t.authentication("ana@example.com"), "authorization": authorization(role, hash), "algorithm": algorithm,
               "encrypted_data_encryption_key": B64.encode(ciphertext), "wrapped_private_key": wrapped, "reason": "read"})
    };
    // The sender encrypts a content key to the public key, as S/MIME does.
    let dek: Vec<u8> = (100..132).collect();
    std::fs::write(path("dek"), &dek).unwrap();
    let encrypt_to = |options: &[&str]| {
        let mut args = vec!["pkeyutl", "-encrypt", "-pubin", "-inkey", "public.pem", "-in", "dek"];
        for option in options {
            args.extend(["-pkeyopt", option]);
        }
        openssl_in(dir.path(), &args)
    };
    let pkcs1 = encrypt_to(&["rsa_padding_mode:pkcs1"]);
    let oaep = encrypt_to(&["rsa_padding_mode:oaep", "rsa_oaep_md:sha1", "rsa_mgf1_md:sha1"]);
    // A label: passed to the HSM, which SoftHSM2 2.6 ignores (it decrypts with the empty label).
    let labelled = encrypt_to(&["rsa_padding_mode:oaep", "rsa_oaep_md:sha1", "rsa_mgf1_md:sha1", "rsa_oaep_label:6d736731"]);
    let mut with_label = decrypt("RSA/ECB/OAEPwithSHA-1andMGF1Padding", &labelled, "decrypter", &spki_hash, &wrapped);
    with_label["rsa_oaep_label"] = json!(B64.encode(b"msg1"));
    let (status, answer) = post(&server, "privatekeydecrypt", &with_label);
    let opened = B64.decode(answer["data_encryption_key"].as_str().unwrap_or_default()).unwrap_or_default();
    let label_honoured = status == 200;
    assert!(label_honoured && opened == dek || status == 400 && answer["message"].as_str().unwrap().contains("does not decrypt"), "{answer}");
    with_label["rsa_oaep_label"] = json!(B64.encode(b"msg2"));
    assert_eq!(post(&server, "privatekeydecrypt", &with_label).0, 400, "another label");
    let oaep256 = encrypt_to(&["rsa_padding_mode:oaep", "rsa_oaep_md:sha256", "rsa_mgf1_md:sha256"]);
    // OAEP over SHA-256: SoftHSM2 2.6 does OAEP with SHA-1 alone, and says so precisely.
    let (status, answer) =
        post(&server, "privatekeydecrypt", &decrypt("RSA/ECB/OAEPwithSHA-256andMGF1Padding", &oaep256, "decrypter", &spki_hash, &wrapped));
    let opened = B64.decode(answer["data_encryption_key"].as_str().unwrap_or_default()).unwrap_or_default();
    let mut decrypted = 2 + usize::from(status == 200) + usize::from(label_honoured);
    assert!(
        (status == 200 && opened == dek) || (status == 400 && answer["message"].as_str().unwrap().starts_with("algorithm is refused by the HSM")),
        "{status} {answer}"
    );
    for (algorithm, ciphertext) in [("RSA/ECB/PKCS1Padding", &pkcs1), ("RSA/ECB/OAEPwithSHA-1andMGF1Padding", &oaep)] {
        let (status, answer) = post(&server, "privatekeydecrypt", &decrypt(algorithm, ciphertext, "decrypter", &spki_hash, &wrapped));
        assert_eq!(status, 200, "{algorithm}: {answer}");
        assert_eq!(B64.decode(answer["data_encryption_key"].as_str().unwrap()).unwrap(), dek, "{algorithm}");
    }

    // Signatures over a digest the client made, checked by openssl against the public key.
    let digest: Vec<u8> = ring::digest::digest(&ring::digest::SHA256, b"signed attributes").as_ref().to_vec();
    std::fs::write(path("digest"), &digest).unwrap();
    let sign = |algorithm: &str, role: &str| {
        json!({"authentication": t.authentication("ana@example.com"), "authorization": authorization(role, &spki_hash), "algorithm": algorithm,
               "digest": B64.encode(&digest), "wrapped_private_key": wrapped, "reason": "send"})
    };
    for (algorithm, options) in
        [("SHA256withRSA", &["digest:sha256"][..]), ("SHA256withRSA/PSS", &["digest:sha256", "rsa_padding_mode:pss", "rsa_pss_saltlen:32"][..])]
    {
        let (status, answer) = post(&server, "privatekeysign", &sign(algorithm, "signer"));
        assert_eq!(status, 200, "{algorithm}: {answer}");
        std::fs::write(path("signature"), B64.decode(answer["signature"].as_str().unwrap()).unwrap()).unwrap();
        let mut args = vec!["pkeyutl", "-verify", "-pubin", "-inkey", "public.pem", "-in", "digest", "-sigfile", "signature"];
        for option in options {
            args.extend(["-pkeyopt", option]);
        }
        assert!(String::from_utf8(openssl_in(dir.path(), &args)).unwrap().contains("Verified Successfully"), "{algorithm}");
    }

    // Refused: the wrong role each way, a token naming another public key, a tampered wrapped
    // key, a ciphertext for another key, an unknown algorithm, a digest of the wrong length.
    let other_hash = B64.encode([7u8; 32]);
    let mut tampered = B64.decode(&wrapped).unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    let tampered = B64.encode(tampered);
    let mut short = sign("SHA256withRSA", "signer");
    short["digest"] = json!(B64.encode([1u8; 20]));
    let mut salty = sign("SHA256withRSA/PSS", "signer");
    salty["rsa_pss_salt_length"] = json!(1000);
    let mut unnamed = t.authorization_claims("ana@example.com", "decrypter");
    unnamed["spki_hash"] = json!(null);
    let mut no_hash = decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &spki_hash, &wrapped);
    no_hash["authorization"] = json!(t.google.sign(unnamed));
    // A wrapped data key is not a wrapped private key, nor the other way round.
    let (_, data_key) = post(&server, "wrap", &t.wrap(&dek));
    let data_key = data_key["wrapped_key"].as_str().unwrap().to_string();
    let as_data_key = t.unwrap(&json!(wrapped), "ana@example.com", "reader");
    let refusals = [
        ("privatekeydecrypt", decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "signer", &spki_hash, &wrapped), 403, "role"),
        ("privatekeysign", sign("SHA256withRSA", "decrypter"), 403, "role"),
        ("privatekeydecrypt", decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &other_hash, &wrapped), 400, "wrapped_private_key does not open"),
        ("privatekeydecrypt", decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &spki_hash, &tampered), 400, "wrapped_private_key does not open"),
        ("privatekeydecrypt", decrypt("RSA/ECB/PKCS1Padding", &[1u8; 256], "decrypter", &spki_hash, &wrapped), 400, "encrypted_data_encryption_key"),
        ("privatekeydecrypt", decrypt("RSA/NONE/NoPadding", &pkcs1, "decrypter", &spki_hash, &wrapped), 400, "algorithm must be"),
        ("privatekeysign", short, 400, "SHA-256 digest"),
        ("privatekeysign", salty, 400, "rsa_pss_salt_length is at most 222 bytes"),
        ("privatekeydecrypt", no_hash, 403, "spki_hash"),
        ("privatekeydecrypt", decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &spki_hash, &data_key), 400, "wrapped_private_key does not open"),
        ("unwrap", as_data_key, 400, "wrapped_key"),
    ];
    for (operation, body, code, says) in refusals {
        let (status, e) = post(&server, operation, &body);
        assert_eq!(status, code, "{operation} {says}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{operation}: {e}");
    }

    // The key given as PKCS#1 PEM or as Base64 DER wraps as well; anything else is refused.
    let traditional = String::from_utf8(openssl_in(dir.path(), &["pkey", "-in", "user.pem", "-traditional"])).unwrap();
    let der = B64.encode(openssl_in(dir.path(), &["pkey", "-in", "user.pem", "-outform", "DER"]));
    openssl_in(dir.path(), &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", "small.pem"]);
    let small = std::fs::read_to_string(path("small.pem")).unwrap();
    let given = |key: &str| json!({"authentication": t.authentication("admin@example.com"), "private_key": key});
    let escaped = private_pem.replace('\n', "\\n");
    for key in [&traditional, &der, &escaped] {
        let (status, answer) = post(&server, "wrapprivatekey", &given(key));
        assert_eq!(status, 200, "{answer}");
        let again = answer["wrapped_private_key"].as_str().unwrap();
        let (status, answer) = post(&server, "privatekeydecrypt", &decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &spki_hash, again));
        assert_eq!((status, B64.decode(answer["data_encryption_key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek.clone()));
        decrypted += 1;
    }
    for (key, says) in [
        (small.as_str(), "1024-bit"),
        ("AAAA", "is not an RSA private key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "PUBLIC KEY"),
    ] {
        let (status, e) = post(&server, "wrapprivatekey", &given(key));
        assert_eq!(status, 400, "{e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{says}: {e}");
    }

    // Takeout: a privileged user decrypts with the public key's hash in the request.
    let privileged = |email: &str, hash: &str| {
        json!({"authentication": t.authentication(email), "algorithm": "RSA/ECB/PKCS1Padding", "encrypted_data_encryption_key": B64.encode(&pkcs1),
               "spki_hash": hash, "spki_hash_algorithm": "SHA-256", "wrapped_private_key": wrapped, "reason": "takeout"})
    };
    let (status, answer) = post(&server, "privilegedprivatekeydecrypt", &privileged("admin@example.com", &spki_hash));
    assert_eq!((status, B64.decode(answer["data_encryption_key"].as_str().unwrap_or_default()).unwrap_or_default()), (200, dek.clone()), "{answer}");
    assert_eq!(post(&server, "privilegedprivatekeydecrypt", &privileged("ana@example.com", &spki_hash)).0, 403);
    assert_eq!(post(&server, "privilegedprivatekeydecrypt", &privileged("admin@example.com", &other_hash)).0, 400);

    // No gRPC caller opens what Google's calls wrapped, whatever its grants (the workload here
    // holds every operation on the key): the context names are CSE's alone.
    let mut data = server.data().await;
    let cases = [
        (&wrapped, [("cse_private_key_spki_sha256", spki_hash.as_str()), ("cse_perimeter_id", "eu")]),
        (&data_key, [("cse_resource_name", RESOURCE), ("cse_perimeter_id", "eu")]),
    ];
    for (wrapped, pairs) in cases {
        let bytes = B64.decode(wrapped).unwrap();
        let blob = bytes[2 + usize::from(bytes[1])..].to_vec();
        let encryption_context = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let e = data
            .decrypt(pb::DecryptRequest { ciphertext_blob: blob, encryption_context, key_id: String::new(), caller_context: None })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("reserved for Google Workspace CSE"), "{e}");
    }

    // A disabled key cuts Gmail off as it cuts off every other caller.
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let (status, e) = post(&server, "privatekeydecrypt", &decrypt("RSA/ECB/PKCS1Padding", &pkcs1, "decrypter", &spki_hash, &wrapped));
    assert_eq!(status, 403, "{e}");
    assert_eq!(post(&server, "privatekeysign", &sign("SHA256withRSA", "signer")).0, 403);

    // Audited, with the message the call was for, and every refusal.
    let (caller, count): (String, i64) = server
        .db()
        .query_row("SELECT MAX(caller_context), COUNT(*) FROM audit WHERE operation = 'CsePrivateKeyDecrypt' AND outcome = 'allowed'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(count, decrypted as i64);
    assert!(caller.contains("<msg-1@example.com>") && caller.contains("ana@example.com"), "{caller}");
    let denied: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM audit WHERE operation LIKE 'Cse%PrivateKey%' AND outcome <> 'allowed'", [], |r| r.get(0))
        .unwrap();
    assert!(denied >= 10, "every refusal is audited: {denied}");
}
