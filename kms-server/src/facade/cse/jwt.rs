//! The two JSON Web Tokens on every Google Workspace CSE call ("Authentication tokens",
//! "Authorization tokens" in Google's KACLS reference): the customer identity provider's, saying
//! who the user is, and Google's, saying what the user may do with which resource. Each is
//! checked against a configured issuer: its key set (JWKS), its audiences, its expiry.
//!
//! Only asymmetric signatures are taken (RS256, RS384, RS512, PS256, ES256, ES384), each with a
//! key of its own family from the issuer's set, chosen by the token's `kid`: `none`, HMAC and a
//! key of another family are refused, so that a public key can never be used as an HMAC secret.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// How far `exp` and `iat` may be off the proxy's clock.
pub const LEEWAY_SECONDS: u64 = 60;

const ALLOWED: [Algorithm; 6] = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384];

/// Why a token was refused (never the token or a claim's value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refused(which: &str, why: impl std::fmt::Display) -> Refused {
    Refused(format!("the {which} token {why}"))
}

/// One trusted issuer: its `iss`, the audiences its tokens may name, its keys.
#[derive(Debug, Clone)]
pub struct Issuer {
    pub iss: String,
    pub audiences: Vec<String>,
    pub keys: JwkSet,
}

impl Issuer {
    /// An issuer whose keys are the JWKS document `jwks` (RFC 7517 JSON).
    pub fn new(iss: &str, audiences: &[&str], jwks: &str) -> Result<Issuer, String> {
        let keys: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("the key set of {iss} is not a JWKS: {e}"))?;
        if keys.keys.is_empty() {
            return Err(format!("the key set of {iss} holds no key"));
        }
        if audiences.is_empty() {
            return Err(format!("{iss} needs at least one audience"));
        }
        Ok(Issuer { iss: iss.to_string(), audiences: audiences.iter().map(|a| a.to_string()).collect(), keys })
    }
}

/// The claims every token must carry besides its own.
#[derive(Debug, Deserialize)]
struct Times {
    iat: Option<i64>,
}

/// Checks `token` (the `which` token: "authentication" or "authorization") against the issuer
/// among `issuers` it names, at `now` (Unix seconds), and returns its claims.
pub fn verify<C: DeserializeOwned>(which: &str, token: &str, issuers: &[Issuer], now: i64) -> Result<C, Refused> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| refused(which, "is not a JWT"))?;
    if !ALLOWED.contains(&header.alg) {
        return Err(refused(which, format!("is signed with {:?}; only RS256, RS384, RS512, PS256, ES256 and ES384 are taken", header.alg)));
    }
    // The issuer is read unverified to choose its keys; the signature is then checked with
    // them, and the claim again against the chosen issuer.
    let iss = unverified_issuer(token).ok_or_else(|| refused(which, "names no issuer"))?;
    let issuer = issuers
        .iter()
        .find(|i| i.iss == iss)
        .ok_or_else(|| refused(which, format!("is from an issuer this service does not trust ({})", printable(&iss))))?;
    let kid = header.kid.as_deref().ok_or_else(|| refused(which, "names no key (kid)"))?;
    let jwk = issuer.keys.find(kid).ok_or_else(|| refused(which, format!("names a key its issuer's set does not hold ({})", printable(kid))))?;
    if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)) {
        return Err(refused(which, "names a key that is not an RSA or EC public key"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| refused(which, "names a key that cannot be read"))?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECONDS;
    validation.set_issuer(&[&issuer.iss]);
    validation.set_audience(&issuer.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => refused(which, "has expired"),
            ErrorKind::InvalidAudience => refused(which, "is for another audience"),
            ErrorKind::InvalidSignature => refused(which, "has a signature that does not verify"),
            ErrorKind::InvalidAlgorithm => refused(which, "is signed with an algorithm its key is not for"),
            ErrorKind::MissingRequiredClaim(claim) => refused(which, format!("has no {claim} claim")),
            _ => refused(which, "cannot be read"),
        }
    })?;
    let times: Times = serde_json::from_value(data.claims.clone()).map_err(|_| refused(which, "has an iat that is not a number"))?;
    if times.iat.is_some_and(|iat| iat > now + LEEWAY_SECONDS as i64) {
        return Err(refused(which, "was issued in the future"));
    }
    serde_json::from_value(data.claims).map_err(|e| {
        refused(
            which,
            format!("lacks a claim this call needs or has one of the wrong type ({})", e.to_string().split(" at line").next().unwrap_or_default()),
        )
    })
}

/// A public key of the service's signing key pairs as a JWK (RS256), its `kid` the first 16
/// bytes of the modulus's SHA-256, so that it names the key whichever node publishes it.
pub fn jwk(key: &crate::hsm::RsaPublicKey) -> serde_json::Value {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    serde_json::json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid(key),
                       "n": B64URL.encode(&key.modulus), "e": B64URL.encode(&key.exponent)})
}

pub fn kid(key: &crate::hsm::RsaPublicKey) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sha2::Sha256::digest(&key.modulus)[..16])
}

/// A JWT of `claims` signed RS256 by `sign` (the HSM, with the key `kid` names).
pub fn sign_rs256<E>(claims: &serde_json::Value, kid: &str, sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>) -> Result<String, E> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
    let signature = sign(input.as_bytes())?;
    Ok(format!("{input}.{}", B64URL.encode(signature)))
}

/// The trusted issuer `token` names, when the key it names (`kid`) is not in that issuer's set:
/// the issuer may have rotated its keys since its set was fetched. Read unverified, to decide
/// whether to fetch the set again; the token is then verified as any other.
pub fn unknown_key_issuer(token: &str, issuers: &[Issuer]) -> Option<String> {
    let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
    let iss = unverified_issuer(token)?;
    let issuer = issuers.iter().find(|i| i.iss == iss)?;
    issuer.keys.find(&kid).is_none().then_some(iss)
}

/// The `iss` claim of a token, unverified.
pub fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_string)
}

/// A value quoted back in a refusal: printable ASCII, at most 128 characters.
fn printable(s: &str) -> String {
    s.chars().take(128).map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    /// An ES256 key pair made for a test: its signing key and its JWKS.
    pub(crate) struct TestIssuer {
        pub(crate) iss: String,
        pkcs8: Vec<u8>,
        pub(crate) jwks: String,
    }

    impl TestIssuer {
        pub(crate) fn new(iss: &str, kid: &str) -> TestIssuer {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap().as_ref().to_vec();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
            let point = pair.public_key().as_ref();
            let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                                         "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65])}]});
            TestIssuer { iss: iss.to_string(), pkcs8, jwks: jwks.to_string() }
        }

        pub(crate) fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(kid.to_string());
            encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[derive(Debug, Deserialize)]
    struct Claims {
        email: String,
    }

    #[test]
    fn a_token_is_taken_from_its_issuer_with_its_key_audience_and_times_and_nothing_else() {
        let idp = TestIssuer::new("https://idp.example.com", "k1");
        let other = TestIssuer::new("https://idp.example.com", "k1");
        let issuers = [Issuer::new(&idp.iss, &["kacls"], &idp.jwks).unwrap()];
        let t = now();
        let claims = |aud: &str, exp: i64, iat: i64| json!({"iss": idp.iss, "aud": aud, "exp": exp, "iat": iat, "email": "ana@example.com"});
        let good = idp.sign("k1", &claims("kacls", t + 300, t));
        assert_eq!(verify::<Claims>("authentication", &good, &issuers, t).unwrap().email, "ana@example.com");

        let cases = [
            (idp.sign("k1", &claims("other", t + 300, t)), "another audience"),
            (idp.sign("k1", &claims("kacls", t - 300, t - 600)), "expired"),
            (idp.sign("k1", &claims("kacls", t + 900, t + 600)), "in the future"),
            (idp.sign("k2", &claims("kacls", t + 300, t)), "does not hold"),
            (other.sign("k1", &claims("kacls", t + 300, t)), "does not verify"),
            (
                TestIssuer::new("https://evil.example.com", "k1")
                    .sign("k1", &json!({"iss": "https://evil.example.com", "aud": "kacls", "exp": t + 300})),
                "does not trust",
            ),
            (idp.sign("k1", &json!({"iss": idp.iss, "aud": "kacls", "email": "x"})), "no exp"),
            ("not.a.token".to_string(), "not a JWT"),
        ];
        for (token, why) in cases {
            let e = verify::<Claims>("authentication", &token, &issuers, t).unwrap_err();
            assert!(e.0.contains(why), "{why}: {e}");
            assert!(e.0.starts_with("the authentication token"), "{e}");
        }
        // A token without the claim the call needs.
        let bare = idp.sign("k1", &json!({"iss": idp.iss, "aud": "kacls", "exp": t + 300}));
        assert!(verify::<Claims>("authentication", &bare, &issuers, t).unwrap_err().0.contains("lacks a claim"));
    }

    #[test]
    fn only_a_trusted_issuers_token_naming_a_key_it_does_not_hold_asks_for_its_set_again() {
        let idp = TestIssuer::new("https://idp.example.com", "k1");
        let issuers = [Issuer::new(&idp.iss, &["kacls"], &idp.jwks).unwrap()];
        let claims = json!({"iss": idp.iss, "aud": "kacls", "exp": now() + 300});
        assert_eq!(unknown_key_issuer(&idp.sign("k2", &claims), &issuers), Some(idp.iss.clone()));
        assert_eq!(unknown_key_issuer(&idp.sign("k1", &claims), &issuers), None, "a key it holds");
        let stranger = TestIssuer::new("https://evil.example.com", "k9");
        assert_eq!(unknown_key_issuer(&stranger.sign("k9", &json!({"iss": stranger.iss})), &issuers), None, "an issuer not trusted");
        assert_eq!(unknown_key_issuer("not.a.token", &issuers), None);
    }

    #[test]
    fn hmac_and_none_are_refused_even_with_the_issuers_key_material() {
        let idp = TestIssuer::new("https://idp.example.com", "k1");
        let issuers = [Issuer::new(&idp.iss, &["kacls"], &idp.jwks).unwrap()];
        let claims = json!({"iss": idp.iss, "aud": "kacls", "exp": now() + 300, "email": "ana@example.com"});
        // HS256 keyed with the public key's JWKS text: a classic confusion attack.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let forged = encode(&header, &claims, &EncodingKey::from_secret(idp.jwks.as_bytes())).unwrap();
        assert!(verify::<Claims>("authorization", &forged, &issuers, now()).unwrap_err().0.contains("HS256"));
        let none = format!("{}.{}.", B64URL.encode(br#"{"alg":"none","kid":"k1"}"#), B64URL.encode(claims.to_string()));
        assert!(verify::<Claims>("authorization", &none, &issuers, now()).is_err());
        // A symmetric key in the issuer's set is never used.
        let jwks = json!({"keys": [{"kty": "oct", "kid": "k1", "k": B64URL.encode(b"secret")}]}).to_string();
        let issuers = [Issuer::new(&idp.iss, &["kacls"], &jwks).unwrap()];
        let token = idp.sign("k1", &claims);
        assert!(verify::<Claims>("authorization", &token, &issuers, now()).unwrap_err().0.contains("not an RSA or EC"));
    }
}
