//! SigV4 authentication of XKS requests (spec, "Authentication"; AWS's "Signature Version 4
//! signing process"): the signature must be by one of the key store's access keys, for the
//! service `kms-xks-proxy` and the key store's region, over at least `host` and `x-amz-date`,
//! made within five minutes of now. HMAC-SHA256 and the constant-time check are the `hmac`
//! crate's; this module builds the canonical request and the string to sign.

use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::wire::{ErrorName, XksError};
use crate::secret::SecretText;

/// The SigV4 service name AWS KMS signs XKS requests for.
pub const SERVICE: &str = "kms-xks-proxy";

/// How far a request's `x-amz-date` may be from now (the spec: five minutes, either way).
pub const MAX_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

fn refused(why: impl AsRef<str>) -> XksError {
    XksError::new(ErrorName::AuthenticationFailed, why)
}

use crate::domain::hex::hex;

fn hmac(key: &[u8], data: &[u8]) -> Result<Hmac<Sha256>, XksError> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| XksError::new(ErrorName::Internal, "HMAC refused its key"))?;
    mac.update(data);
    Ok(mac)
}

/// SigV4's URI encoding: every byte but the unreserved characters, as `%XX` in upper case.
fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
/// Signature=...` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    day: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix(ALGORITHM)?.trim_start();
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, v) = part.trim().split_once('=')?;
        match name {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed_headers = Some(v),
            "Signature" => signature = Some(v),
            _ => return None,
        }
    }
    let scope: Vec<&str> = credential?.split('/').collect();
    let [access_key_id, day, region, service, "aws4_request"] = scope.as_slice() else { return None };
    Some(Authorization { access_key_id, day, region, service, signed_headers: signed_headers?, signature: signature? })
}

/// The canonical request (SigV4's first step) of `request` with `body`, over `signed_headers`.
fn canonical_request(request: &http::request::Parts, body: &[u8], signed_headers: &str) -> Result<String, XksError> {
    let path = request.uri.path();
    // Each segment encoded once more (non-S3 services: the path as sent is encoded again).
    let uri = if path.is_empty() { "/".to_string() } else { path.split('/').map(uri_encode).collect::<Vec<_>>().join("/") };
    let mut query: Vec<(String, String)> = request
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(k), uri_encode(v))
        })
        .collect();
    query.sort();
    let query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let mut headers = String::new();
    for name in signed_headers.split(';') {
        let values: Vec<String> = match (name, request.headers.get_all(name).iter().count()) {
            // HTTP/2 carries the host in the URI's authority (`:authority`), which SigV4 signs as `host`.
            ("host", 0) => request.uri.authority().map(|a| vec![a.as_str().to_string()]).unwrap_or_default(),
            _ => request
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().map(|v| v.split_whitespace().collect::<Vec<_>>().join(" ")))
                .collect::<Result<_, _>>()
                .map_err(|_| refused(format!("the signed header {name} is not text")))?,
        };
        if values.is_empty() {
            return Err(refused(format!("the signed header {name} is not in the request")));
        }
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!("{}\n{uri}\n{query}\n{headers}\n{signed_headers}\n{}", request.method, hex(&Sha256::digest(body))))
}

/// The access key id a request's `Authorization` header names, if it is well formed.
pub fn access_key_id(request: &http::request::Parts) -> Option<&str> {
    let header = request.headers.get("authorization")?.to_str().ok()?;
    parse_authorization(header).map(|a| a.access_key_id)
}

/// Verifies `request`'s signature (its body is `body`) against the secrets `secret_of` gives for
/// access key ids, in `region`, at `now`. Returns the access key id that signed it.
pub fn authenticate(
    request: &http::request::Parts,
    body: &[u8],
    region: &str,
    secret_of: impl Fn(&str) -> Option<SecretText>,
    now: DateTime<Utc>,
) -> Result<String, XksError> {
    let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization").ok_or_else(|| refused("the request has no Authorization header"))?;
    let auth = parse_authorization(auth)
        .ok_or_else(|| refused(format!("the Authorization header is not {ALGORITHM} Credential=..., SignedHeaders=..., Signature=...")))?;
    let stamp = header("x-amz-date").ok_or_else(|| refused("the request has no X-Amz-Date header"))?;
    let date = NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").map_err(|_| refused("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?.and_utc();
    if (now - date).abs() > MAX_SKEW {
        return Err(refused(format!("X-Amz-Date is more than {} minutes from the proxy's clock", MAX_SKEW.num_minutes())));
    }
    if !stamp.starts_with(auth.day) || auth.day.len() != 8 {
        return Err(refused("the credential's date is not X-Amz-Date's"));
    }
    if auth.region != region {
        return Err(refused(format!("signed for another region than this key store's ({region})")));
    }
    if auth.service != SERVICE {
        return Err(refused(format!("signed for another service than {SERVICE}")));
    }
    let signed: Vec<&str> = auth.signed_headers.split(';').collect();
    if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err(refused("SignedHeaders must include host and x-amz-date"));
    }
    let Some(secret) = secret_of(auth.access_key_id) else {
        return Err(refused("the access key is not one of this key store's"));
    };
    let canonical = canonical_request(request, body, auth.signed_headers)?;
    let signature = (auth.signature.len() == 64)
        .then(|| (0..32).map(|i| u8::from_str_radix(&auth.signature[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>())
        .flatten()
        .ok_or_else(|| refused("the signature is not 64 hexadecimal digits"))?;
    signing_mac(secret.expose_secret(), stamp, region, &canonical)?
        .verify_slice(&signature)
        .map_err(|_| refused("the signature does not match the request"))?;
    Ok(auth.access_key_id.to_string())
}

/// The HMAC whose output is the signature of `canonical` (a canonical request) made at `stamp`
/// (`YYYYMMDDTHHMMSSZ`) in `region` with `secret`: SigV4's string to sign, under its derived
/// signing key.
fn signing_mac(secret: &str, stamp: &str, region: &str, canonical: &str) -> Result<Hmac<Sha256>, XksError> {
    let day = stamp.get(..8).ok_or_else(|| refused("X-Amz-Date is too short"))?;
    let to_sign = format!("{ALGORITHM}\n{stamp}\n{day}/{region}/{SERVICE}/aws4_request\n{}", hex(&Sha256::digest(canonical.as_bytes())));
    let prefixed = zeroize::Zeroizing::new(format!("AWS4{secret}"));
    let mut key = hmac(prefixed.as_bytes(), day.as_bytes())?.finalize().into_bytes();
    for part in [region, SERVICE, "aws4_request"] {
        key = hmac(&key, part.as_bytes())?.finalize().into_bytes();
    }
    hmac(&key, to_sign.as_bytes())
}

/// Signs `request` (with `body`) as AWS KMS does, over `host` and `x-amz-date`: sets
/// `x-amz-date` to `now` and `authorization`. For the load generator (`xks-load`); the tests
/// sign with curl, independently of this module.
pub fn sign(
    request: &mut http::request::Parts,
    body: &[u8],
    region: &str,
    access_key_id: &str,
    secret: &str,
    now: DateTime<Utc>,
) -> Result<(), XksError> {
    let stamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let header = |v: &str| http::HeaderValue::from_str(v).map_err(|_| XksError::new(ErrorName::Validation, "a header that is not text"));
    request.headers.insert("x-amz-date", header(&stamp)?);
    let signed_headers = "host;x-amz-date";
    let canonical = canonical_request(request, body, signed_headers)?;
    let signature = hex(&signing_mac(secret, &stamp, region, &canonical)?.finalize().into_bytes());
    let credential = format!("{access_key_id}/{}/{region}/{SERVICE}/aws4_request", &stamp[..8]);
    request
        .headers
        .insert("authorization", header(&format!("{ALGORITHM} Credential={credential}, SignedHeaders={signed_headers}, Signature={signature}"))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS's SigV4 documentation example secret (not a real credential).
    const ACCESS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn secrets(id: &str) -> Option<SecretText> {
        (id == ACCESS_KEY).then(|| SecretText::new(SECRET.to_string()))
    }

    /// A request signed here by the crate's own reference computation would prove nothing; this
    /// one is signed by hand from the SigV4 algorithm's definition (see `sign`).
    fn signed(date: &str, region: &str, service: &str, body: &[u8], secret: &str) -> http::request::Parts {
        let auth = sign(date, region, service, body, secret);
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri("/example/kms/xks/v1/keys/k1/metadata")
            .header("host", "xks.example.com")
            .header("x-amz-date", date)
            .header("content-type", "application/json")
            .header("authorization", auth)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    fn sign(date: &str, region: &str, service: &str, body: &[u8], secret: &str) -> String {
        use sha2::{Digest, Sha256};
        fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
            // HMAC-SHA256 (RFC 2104), written out so that the test does not reuse the code it tests.
            let mut k = [0u8; 64];
            k[..key.len()].copy_from_slice(key);
            let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
            let inner = Sha256::new().chain_update(pad(0x36)).chain_update(data).finalize();
            Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().to_vec()
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let day = &date[..8];
        let canonical = format!(
            "POST\n/example/kms/xks/v1/keys/k1/metadata\n\nhost:xks.example.com\nx-amz-date:{date}\n\nhost;x-amz-date\n{}",
            hex(&Sha256::digest(body))
        );
        let scope = format!("{day}/{region}/{service}/aws4_request");
        let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut key = hmac(format!("AWS4{secret}").as_bytes(), day.as_bytes());
        for part in [region, service, "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, SignedHeaders=host;x-amz-date, Signature={signature}")
    }

    fn at(s: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ").unwrap().and_utc()
    }

    #[test]
    fn a_request_signed_with_the_key_stores_secret_is_let_in_and_nothing_else() {
        let body = br#"{"requestMetadata":{}}"#;
        let date = "20261207T101500Z";
        let ok = signed(date, "eu-west-3", SERVICE, body, SECRET);
        assert_eq!(authenticate(&ok, body, "eu-west-3", secrets, at(date)).unwrap(), ACCESS_KEY);
        // Four minutes off either way: still in.
        assert!(authenticate(&ok, body, "eu-west-3", secrets, at("20261207T101900Z")).is_ok());
        assert!(authenticate(&ok, body, "eu-west-3", secrets, at("20261207T101100Z")).is_ok());

        let refused = [
            ("a changed body", authenticate(&ok, br#"{"requestMetadata":{ }}"#, "eu-west-3", secrets, at(date))),
            ("another region", authenticate(&ok, body, "us-east-1", secrets, at(date))),
            ("six minutes late", authenticate(&ok, body, "eu-west-3", secrets, at("20261207T102100Z"))),
            ("six minutes early", authenticate(&ok, body, "eu-west-3", secrets, at("20261207T100900Z"))),
            ("an unknown access key", authenticate(&ok, body, "eu-west-3", |_: &str| None, at(date))),
            ("another service", authenticate(&signed(date, "eu-west-3", "kms", body, SECRET), body, "eu-west-3", secrets, at(date))),
            (
                "another secret",
                authenticate(&signed(date, "eu-west-3", SERVICE, body, "x".repeat(40).as_str()), body, "eu-west-3", secrets, at(date)),
            ),
        ];
        for (what, result) in refused {
            let e = result.expect_err(what);
            assert_eq!(e.name, ErrorName::AuthenticationFailed, "{what}: {e}");
            assert!(!e.message().contains(SECRET), "{what}: {e}");
        }
        // `sign` (the load generator's) makes the hand signer's signature.
        let mut ours = ok.clone();
        ours.headers.remove("authorization");
        super::sign(&mut ours, body, "eu-west-3", ACCESS_KEY, SECRET, at(date)).unwrap();
        assert_eq!(ours.headers["authorization"], ok.headers["authorization"]);
        let mut unsigned = ok.clone();
        unsigned.headers.remove("authorization");
        assert_eq!(authenticate(&unsigned, body, "eu-west-3", secrets, at(date)).unwrap_err().name, ErrorName::AuthenticationFailed);
    }
}
