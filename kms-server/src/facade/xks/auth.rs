//! SigV4 authentication of XKS requests (spec, "Authentication"): the signature must be by one of
//! the key store's access keys, for the service `kms-xks-proxy` and the key store's region, over
//! at least `host` and `x-amz-date`, made within five minutes of now. The verification itself
//! (canonical request, signing key chain, constant-time comparison) is
//! `scratchstack-aws-signature`'s.

use chrono::{DateTime, NaiveDateTime, Utc};
use scratchstack_aws_signature::{
    GetSigningKeyRequest, GetSigningKeyResponse, KSecretKey, NO_ADDITIONAL_SIGNED_HEADERS, SignatureOptions, service_for_signing_key_fn,
    sigv4_validate_request,
};

use super::wire::{ErrorName, XksError};
use crate::secret::SecretText;

/// The SigV4 service name AWS KMS signs XKS requests for.
pub const SERVICE: &str = "kms-xks-proxy";

/// How far a request's `x-amz-date` may be from now (the spec: five minutes, either way).
pub const MAX_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

fn refused(why: impl AsRef<str>) -> XksError {
    XksError::new(ErrorName::AuthenticationFailed, why)
}

/// Verifies `request`'s signature (its body is `body`) against the secrets `secret_of` gives for
/// access key ids, in `region`, at `now`. Returns the access key id that signed it.
pub async fn authenticate(
    request: &http::request::Parts,
    body: &[u8],
    region: &str,
    secret_of: impl Fn(&str) -> Option<SecretText> + Send + 'static,
    now: DateTime<Utc>,
) -> Result<String, XksError> {
    let date = request
        .headers
        .get("x-amz-date")
        .ok_or_else(|| refused("the request has no X-Amz-Date header"))?
        .to_str()
        .ok()
        .and_then(|d| NaiveDateTime::parse_from_str(d, "%Y%m%dT%H%M%SZ").ok())
        .ok_or_else(|| refused("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?
        .and_utc();
    if (now - date).abs() > MAX_SKEW {
        return Err(refused(format!("X-Amz-Date is more than {} minutes from the proxy's clock", MAX_SKEW.num_minutes())));
    }
    let mut rebuilt = http::Request::builder().method(request.method.clone()).uri(request.uri.clone()).version(request.version);
    for (name, value) in &request.headers {
        rebuilt = rebuilt.header(name, value);
    }
    // HTTP/2 carries the host in the URI's authority (`:authority`), which SigV4 signs as `host`.
    if !request.headers.contains_key(http::header::HOST)
        && let Some(authority) = request.uri.authority()
    {
        rebuilt = rebuilt.header(http::header::HOST, authority.as_str());
    }
    let rebuilt = rebuilt.body(body.to_vec()).map_err(|_| refused("the request cannot be canonicalised"))?;
    let signed_by = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let mut keys = {
        let signed_by = signed_by.clone();
        // Bound first: passed straight to `service_for_signing_key_fn` (an `FnOnce` bound), the
        // closure would be taken for `FnOnce` only, and a service must be callable again.
        let lookup = move |asked: GetSigningKeyRequest| {
            let found = secret_of(asked.access_key());
            let signer = signed_by.clone();
            async move {
                let secret: KSecretKey = found.ok_or("unknown access key")?.expose_secret().parse().map_err(|_| "unusable secret")?;
                *signer.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked.access_key().to_string());
                let key = secret.to_ksigning(asked.request_date(), asked.region(), asked.service());
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(GetSigningKeyResponse::builder().signing_key(key).build()?)
            }
        };
        service_for_signing_key_fn(lookup)
    };
    sigv4_validate_request(rebuilt, region, SERVICE, &mut keys, now, &NO_ADDITIONAL_SIGNED_HEADERS, SignatureOptions::default()).await.map_err(
        |e| {
            // The crate's message says which check failed (scope, date, signature), never a secret.
            tracing::debug!(error = %e, "SigV4 refused");
            refused(format!("the request's signature was refused: {e}"))
        },
    )?;
    let signed_by = signed_by.lock().unwrap_or_else(|p| p.into_inner()).take();
    signed_by.ok_or_else(|| refused("no access key signed the request"))
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

    #[tokio::test]
    async fn a_request_signed_with_the_key_stores_secret_is_let_in_and_nothing_else() {
        let body = br#"{"requestMetadata":{}}"#;
        let date = "20261207T101500Z";
        let ok = signed(date, "eu-west-3", SERVICE, body, SECRET);
        assert_eq!(authenticate(&ok, body, "eu-west-3", secrets, at(date)).await.unwrap(), ACCESS_KEY);
        // Four minutes off either way: still in.
        assert!(authenticate(&ok, body, "eu-west-3", secrets, at("20261207T101900Z")).await.is_ok());
        assert!(authenticate(&ok, body, "eu-west-3", secrets, at("20261207T101100Z")).await.is_ok());

        let refused = [
            ("a changed body", authenticate(&ok, br#"{"requestMetadata":{ }}"#, "eu-west-3", secrets, at(date)).await),
            ("another region", authenticate(&ok, body, "us-east-1", secrets, at(date)).await),
            ("six minutes late", authenticate(&ok, body, "eu-west-3", secrets, at("20261207T102100Z")).await),
            ("six minutes early", authenticate(&ok, body, "eu-west-3", secrets, at("20261207T100900Z")).await),
            ("an unknown access key", authenticate(&ok, body, "eu-west-3", |_: &str| None, at(date)).await),
            ("another service", authenticate(&signed(date, "eu-west-3", "kms", body, SECRET), body, "eu-west-3", secrets, at(date)).await),
            (
                "another secret",
                authenticate(&signed(date, "eu-west-3", SERVICE, body, "x".repeat(40).as_str()), body, "eu-west-3", secrets, at(date)).await,
            ),
        ];
        for (what, result) in refused {
            let e = result.expect_err(what);
            assert_eq!(e.name, ErrorName::AuthenticationFailed, "{what}: {e}");
            assert!(!e.message().contains(SECRET), "{what}: {e}");
        }
        let mut unsigned = ok.clone();
        unsigned.headers.remove("authorization");
        assert_eq!(authenticate(&unsigned, body, "eu-west-3", secrets, at(date)).await.unwrap_err().name, ErrorName::AuthenticationFailed);
    }
}
