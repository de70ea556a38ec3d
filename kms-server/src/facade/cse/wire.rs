//! Google Workspace CSE's JSON and rules (the KACLS reference): the requests, the two tokens'
//! claims and the checks between them, the wrapped key's envelope, the resource key hash, and
//! the structured error. No I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::hsm::{OaepHash, RsaPrivateOp};
use crate::secret::SecretText;

/// The prefix of the encryption context names the wrapped keys are bound to; reserved for this
/// facade (no gRPC call may name one).
pub const CONTEXT_PREFIX: &str = "cse_";

/// The most bytes of a data encryption key Google wraps.
pub const MAX_KEY: usize = 128;
/// The most bytes of a wrapped key, a resource name, a perimeter id, a reason.
pub const MAX_WRAPPED_KEY: usize = 1024;
pub const MAX_RESOURCE_NAME: usize = 128;
pub const MAX_PERIMETER_ID: usize = 128;
pub const MAX_REASON: usize = 1024;

/// The structured error reply: `{"code", "message", "details"}`, `code` the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CseError {
    pub code: u16,
    pub message: String,
    pub details: String,
}

impl CseError {
    pub fn new(code: u16, message: impl Into<String>) -> CseError {
        let message: String = message.into().chars().take(512).map(|c| if c.is_control() { '?' } else { c }).collect();
        CseError { code, message, details: String::new() }
    }

    /// Malformed JSON, Base64 or sizes.
    pub fn bad_request(message: impl Into<String>) -> CseError {
        CseError::new(400, message)
    }

    /// A token that is missing, malformed, unsigned by a trusted issuer or expired.
    pub fn unauthenticated(message: impl Into<String>) -> CseError {
        CseError::new(401, message)
    }

    /// Valid tokens that do not allow the call: another user, role, resource or KACLS.
    pub fn forbidden(message: impl Into<String>) -> CseError {
        CseError::new(403, message)
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The authentication token's claims this service reads (the IdP's).
#[derive(Debug, Clone, Deserialize)]
pub struct Authentication {
    pub email: String,
    /// The user's Google Workspace address when `email` is another (compared instead of it).
    #[serde(default)]
    pub google_email: Option<String>,
    #[serde(default)]
    pub delegated_to: Option<String>,
    #[serde(default)]
    pub resource_name: Option<String>,
}

/// The authorization token's claims (Google's).
#[derive(Debug, Clone, Deserialize)]
pub struct Authorization {
    pub email: String,
    /// Empty when absent (a delegation's token may name none; every other use needs one).
    #[serde(default)]
    pub role: String,
    pub resource_name: String,
    pub kacls_url: String,
    #[serde(default)]
    pub perimeter_id: Option<String>,
    /// `google` (also when absent), `google-visitor` or `customer-idp`.
    #[serde(default)]
    pub email_type: Option<String>,
    #[serde(default)]
    pub delegated_to: Option<String>,
    /// The Google Workspace domain the token says owns the key service it was made for.
    #[serde(default)]
    pub kacls_owner_domain: Option<String>,
    /// Gmail's: the SHA-256 (`spki_hash_algorithm`) of the public key whose private key the
    /// call may use, standard Base64, and the message it is for.
    #[serde(default)]
    pub spki_hash: Option<String>,
    #[serde(default)]
    pub spki_hash_algorithm: Option<String>,
    #[serde(default)]
    pub message_id: Option<String>,
}

/// What a call does with a key, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Wrap,
    Unwrap,
    Digest,
    Rewrap,
    /// A delegation (`delegate`): the delegate's own calls are checked against their own
    /// authorization tokens, so the reference names no role for it.
    Delegate,
    /// Gmail's `privatekeydecrypt` and `privatekeysign`.
    PrivateKeyDecrypt,
    PrivateKeySign,
}

impl Use {
    /// The roles Google's authorization token may name for this use (`None`: any).
    fn roles(self) -> Option<&'static [&'static str]> {
        match self {
            Use::Wrap => Some(&["writer", "upgrader"]),
            Use::Unwrap => Some(&["writer", "reader"]),
            Use::Digest => Some(&["verifier"]),
            Use::Rewrap => Some(&["migrator"]),
            Use::Delegate => None,
            Use::PrivateKeyDecrypt => Some(&["decrypter"]),
            Use::PrivateKeySign => Some(&["signer"]),
        }
    }
}

/// `POST wrap`.
#[derive(Debug, Deserialize)]
pub struct WrapRequest {
    pub authentication: SecretText,
    pub authorization: SecretText,
    pub key: SecretText,
    #[serde(default)]
    pub reason: String,
}

/// `POST unwrap`.
#[derive(Debug, Deserialize)]
pub struct UnwrapRequest {
    pub authentication: SecretText,
    pub authorization: SecretText,
    pub wrapped_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST digest`.
#[derive(Debug, Deserialize)]
pub struct DigestRequest {
    pub authorization: SecretText,
    pub wrapped_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST rewrap`.
#[derive(Debug, Deserialize)]
pub struct RewrapRequest {
    pub authorization: SecretText,
    pub original_kacls_url: String,
    pub wrapped_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST delegate`.
#[derive(Debug, Deserialize)]
pub struct DelegateRequest {
    pub authentication: SecretText,
    pub authorization: SecretText,
    #[serde(default)]
    pub reason: String,
}

/// `POST privilegedwrap`: a domain administrator's bulk import of existing files.
#[derive(Debug, Deserialize)]
pub struct PrivilegedWrapRequest {
    pub authentication: SecretText,
    pub key: SecretText,
    pub resource_name: String,
    #[serde(default)]
    pub perimeter_id: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST privilegedunwrap`.
#[derive(Debug, Deserialize)]
pub struct PrivilegedUnwrapRequest {
    pub authentication: SecretText,
    pub resource_name: String,
    pub wrapped_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST wrapprivatekey`: a key service administrator's (the authentication token alone).
#[derive(Debug, Deserialize)]
pub struct WrapPrivateKeyRequest {
    pub authentication: SecretText,
    #[serde(default)]
    pub perimeter_id: String,
    /// PEM (`RSA PRIVATE KEY` or unencrypted `PRIVATE KEY`), or Base64 of either's DER.
    pub private_key: SecretText,
}

/// `POST privatekeydecrypt`.
#[derive(Debug, Deserialize)]
pub struct PrivateKeyDecryptRequest {
    pub authentication: SecretText,
    pub authorization: SecretText,
    pub algorithm: String,
    pub encrypted_data_encryption_key: String,
    #[serde(default)]
    pub rsa_oaep_label: String,
    pub wrapped_private_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST privatekeysign`.
#[derive(Debug, Deserialize)]
pub struct PrivateKeySignRequest {
    pub authentication: SecretText,
    pub authorization: SecretText,
    pub algorithm: String,
    pub digest: String,
    #[serde(default)]
    pub rsa_pss_salt_length: Option<u32>,
    pub wrapped_private_key: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST privilegedprivatekeydecrypt`: the authentication token alone, the public key's hash
/// in the request.
#[derive(Debug, Deserialize)]
pub struct PrivilegedPrivateKeyDecryptRequest {
    pub authentication: SecretText,
    pub algorithm: String,
    pub encrypted_data_encryption_key: String,
    #[serde(default)]
    pub rsa_oaep_label: String,
    pub spki_hash: String,
    #[serde(default)]
    pub spki_hash_algorithm: Option<String>,
    pub wrapped_private_key: String,
    #[serde(default)]
    pub reason: String,
}

/// The most bytes of a wrapped private key (8 KB of Base64), of an RSA ciphertext (1 KB) and
/// of a digest to sign.
pub const MAX_WRAPPED_PRIVATE_KEY: usize = 6 * 1024;
pub const MAX_RSA_CIPHERTEXT: usize = 1024;
pub const MAX_DIGEST: usize = 128;
/// PSS's salt when the request names none: the digest's length (RFC 8017's recommendation).
const PSS_SALT: u32 = 32;

/// A decryption `algorithm` names: RSAES-PKCS1-v1_5, or RSAES-OAEP with its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decryption {
    Pkcs1,
    Oaep { hash: OaepHash, label: Vec<u8> },
}

impl Decryption {
    pub fn op<'a>(&'a self, ciphertext: &'a [u8]) -> RsaPrivateOp<'a> {
        match self {
            Decryption::Pkcs1 => RsaPrivateOp::DecryptPkcs1 { ciphertext },
            Decryption::Oaep { hash, label } => RsaPrivateOp::DecryptOaep { hash: *hash, label, ciphertext },
        }
    }
}

/// The decryption `algorithm` names (case-insensitively), with OAEP's `label` (Base64; ignored
/// for PKCS#1 v1.5).
pub fn decryption(algorithm: &str, label: &str) -> Result<Decryption, CseError> {
    let hash = match algorithm.to_ascii_uppercase().as_str() {
        "RSA/ECB/PKCS1PADDING" => return Ok(Decryption::Pkcs1),
        "RSA/ECB/OAEPWITHSHA-1ANDMGF1PADDING" => OaepHash::Sha1,
        "RSA/ECB/OAEPWITHSHA-256ANDMGF1PADDING" => OaepHash::Sha256,
        _ => {
            return Err(CseError::bad_request(
                "algorithm must be RSA/ECB/PKCS1Padding, RSA/ECB/OAEPwithSHA-1andMGF1Padding or RSA/ECB/OAEPwithSHA-256andMGF1Padding",
            ));
        }
    };
    let label = if label.is_empty() { Vec::new() } else { decode("rsa_oaep_label", label, MAX_RSA_CIPHERTEXT)? };
    Ok(Decryption::Oaep { hash, label })
}

/// A signature `algorithm` names, over a SHA-256 digest: RSASSA-PKCS1-v1_5, or RSASSA-PSS with
/// its salt's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    Pkcs1,
    Pss { salt: usize },
}

impl Signing {
    pub fn op(self, digest: &[u8]) -> RsaPrivateOp<'_> {
        match self {
            Signing::Pkcs1 => RsaPrivateOp::SignPkcs1Sha256 { digest },
            Signing::Pss { salt } => RsaPrivateOp::SignPssSha256 { digest, salt },
        }
    }
}

/// The signature `algorithm` names (case-insensitively), PSS's salt `salt` bytes (32 when not
/// given; ignored otherwise).
pub fn signing(algorithm: &str, salt: Option<u32>) -> Result<Signing, CseError> {
    match algorithm.to_ascii_uppercase().as_str() {
        "SHA256WITHRSA" => Ok(Signing::Pkcs1),
        "SHA256WITHRSA/PSS" | "SHA256WITHRSAANDMGF1" | "RSASSA-PSS" => Ok(Signing::Pss { salt: salt.unwrap_or(PSS_SALT) as usize }),
        _ => Err(CseError::bad_request("algorithm must be SHA256withRSA or SHA256withRSA/PSS (also SHA256withRSAandMGF1, RSASSA-PSS)")),
    }
}

/// The SHA-256 digest (Base64) a signature is asked over.
pub fn sha256_digest(digest: &str) -> Result<Vec<u8>, CseError> {
    let digest = decode("digest", digest, MAX_DIGEST)?;
    if digest.len() != 32 {
        return Err(CseError::bad_request("digest must be a SHA-256 digest (32 bytes)"));
    }
    Ok(digest)
}

/// The public key hash a Gmail call names (standard Base64 of a SHA-256 digest), in the one
/// spelling private keys are wrapped under.
pub fn spki_hash(hash: Option<&str>, algorithm: Option<&str>) -> Result<String, CseError> {
    if algorithm.is_some_and(|a| !a.eq_ignore_ascii_case("SHA-256")) {
        return Err(CseError::bad_request("spki_hash_algorithm must be SHA-256"));
    }
    let hash = hash.ok_or_else(|| CseError::forbidden("the call names no public key (spki_hash)"))?;
    match B64.decode(hash) {
        Ok(digest) if digest.len() == 32 => Ok(B64.encode(digest)),
        _ => Err(CseError::bad_request("spki_hash must be the standard Base64 of a SHA-256 digest")),
    }
}

/// The encryption context a user's private key is wrapped under: its public key's hash and the
/// perimeter, under a name no wrapped data key's context has (so neither opens as the other).
pub fn private_key_context(spki_hash: &str, perimeter_id: &str) -> std::collections::HashMap<String, String> {
    [("cse_private_key_spki_sha256", spki_hash), ("cse_perimeter_id", perimeter_id)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Reads a request's JSON (unknown fields are ignored: Google adds fields over time).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CseError> {
    serde_json::from_slice(body).map_err(|e| {
        let why = e.to_string();
        CseError::bad_request(format!("the request is not the JSON this call takes ({})", why.split(" at line").next().unwrap_or_default()))
    })
}

/// `reason`: at most `MAX_REASON` bytes, logged and audited as given.
pub fn check_reason(reason: &str) -> Result<(), CseError> {
    if reason.len() > MAX_REASON {
        return Err(CseError::bad_request(format!("reason is over {MAX_REASON} bytes")));
    }
    Ok(())
}

/// The checks between the two tokens and this service (the KACLS reference, "Encrypt and
/// decrypt data"): the same user (case-insensitively; the IdP's `google_email` when it has
/// one), the same delegation, a role that allows `what`, this service's own URL, and guests
/// only where allowed.
pub fn check_tokens(authn: Option<&Authentication>, authz: &Authorization, what: Use, kacls_url: &str, guests: bool) -> Result<(), CseError> {
    if let Some(authn) = authn {
        let user = authn.google_email.as_deref().unwrap_or(&authn.email);
        if !user.eq_ignore_ascii_case(&authz.email) {
            return Err(CseError::forbidden("the authentication and authorization tokens are for different users"));
        }
        if let Some(delegate) = &authn.delegated_to {
            if matches!(what, Use::PrivateKeyDecrypt | Use::PrivateKeySign) {
                return Err(CseError::forbidden("a delegated authentication token does not open private keys"));
            }
            let same = authz.delegated_to.as_deref().is_some_and(|d| d.eq_ignore_ascii_case(delegate))
                && authn.resource_name.as_deref() == Some(authz.resource_name.as_str());
            if !same {
                return Err(CseError::forbidden("the authentication token's delegation does not match the authorization token's"));
            }
        }
    }
    if what == Use::Delegate && (authz.delegated_to.as_deref().is_none_or(str::is_empty) || authz.resource_name.is_empty()) {
        return Err(CseError::forbidden("the authorization token names no delegate (delegated_to) or no resource_name"));
    }
    if what.roles().is_some_and(|roles| !roles.contains(&authz.role.as_str())) {
        return Err(CseError::forbidden(format!("the role {:?} does not allow {what:?}", authz.role.chars().take(32).collect::<String>())));
    }
    if authz.kacls_url.trim_end_matches('/') != kacls_url.trim_end_matches('/') {
        return Err(CseError::forbidden("the authorization token is for another key service (kacls_url)"));
    }
    match authz.email_type.as_deref() {
        None | Some("google") => {}
        Some("google-visitor" | "customer-idp") if guests => {}
        Some(_) => return Err(CseError::forbidden("guest access (email_type) is not allowed by this key service")),
    }
    if authz.resource_name.len() > MAX_RESOURCE_NAME || authz.perimeter_id.as_ref().is_some_and(|p| p.len() > MAX_PERIMETER_ID) {
        return Err(CseError::bad_request(format!("resource_name and perimeter_id are at most {MAX_RESOURCE_NAME} bytes")));
    }
    Ok(())
}

/// The owner check (the reference's `kacls_owner_domain`): a token naming an owner other than
/// `owner` (this key service's Workspace domain, when the officer set one) was made for someone
/// else's Workspace pointed at this service's URL.
pub fn check_owner(authz: &Authorization, owner: Option<&str>) -> Result<(), CseError> {
    match (authz.kacls_owner_domain.as_deref(), owner) {
        (Some(named), Some(owner)) if !named.eq_ignore_ascii_case(owner) => {
            Err(CseError::forbidden("the authorization token is for a key service another Google Workspace domain owns (kacls_owner_domain)"))
        }
        _ => Ok(()),
    }
}

/// Decodes Base64 `field`, at most `max` bytes.
pub fn decode(field: &str, text: &str, max: usize) -> Result<Vec<u8>, CseError> {
    let bytes = B64.decode(text).map_err(|_| CseError::bad_request(format!("{field} is not Base64")))?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(CseError::bad_request(format!("{field} must be 1 to {max} bytes")));
    }
    Ok(bytes)
}

/// The wrapped key Google keeps: our blob, whose AAD binds the resource name and the perimeter
/// id, behind the perimeter id in clear (a call must know which perimeter to check before it
/// can open the blob):
///
/// ```text
/// 0x01 || u8 len(perimeter_id) || perimeter_id || blob
/// ```
pub fn envelope(perimeter_id: &str, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + perimeter_id.len() + blob.len());
    out.push(1);
    out.push(perimeter_id.len() as u8);
    out.extend_from_slice(perimeter_id.as_bytes());
    out.extend_from_slice(blob);
    out
}

/// The perimeter id and the blob of a wrapped key.
pub fn open_envelope(wrapped: &[u8]) -> Result<(String, &[u8]), CseError> {
    let bad = || CseError::bad_request("wrapped_key was not made by this key service");
    let [1, len, rest @ ..] = wrapped else { return Err(bad()) };
    let len = usize::from(*len);
    if rest.len() <= len {
        return Err(bad());
    }
    let perimeter = std::str::from_utf8(&rest[..len]).map_err(|_| bad())?;
    Ok((perimeter.to_string(), &rest[len..]))
}

/// The encryption context a wrapped key's blob is bound to.
pub fn context_pairs(resource_name: &str, perimeter_id: &str) -> std::collections::HashMap<String, String> {
    [("cse_resource_name", resource_name), ("cse_perimeter_id", perimeter_id)].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The resource key hash (the KACLS reference, "Resource key hash"): HMAC-SHA256 keyed with the
/// data encryption key over `"ResourceKeyDigest:" resource_name ":" perimeter_id`.
pub fn resource_key_hash(dek: &[u8], resource_name: &str, perimeter_id: &str) -> Result<[u8; 32], CseError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(dek).map_err(|_| CseError::bad_request("the key cannot key an HMAC"))?;
    mac.update(format!("ResourceKeyDigest:{resource_name}:{perimeter_id}").as_bytes());
    Ok(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn the_resource_key_hash_is_googles_test_vectors() {
        let cases = [
            (
                "6a68079290123ed8f23c845cc8bda91cd961c0246b79446662919e336920cbef",
                "//googleapis.com/testcase/hJB0PzRI7nl79LC18qaV8WMDCBALBSs9BREcq79MfVw",
                "",
                "4d9aafeb06cd0e812d0f3c10f18573a5aee4c86300a104fad9b258f0b71bd813",
            ),
            (
                "05b62b91cb66f19e27789fb69eb680fac113a70a120178d6cfa6b1b4cb11bb95",
                "//googleapis.com/testcase/od8yfZiS5ZF2RN27X4ClalsV6LobL2FwKRk4qOJxWdE",
                "perimeter1",
                "1b6231a171bc10ef99dd3b08f0742620811a59191570284d32b674c531cc2da5",
            ),
        ];
        for (dek, resource, perimeter, want) in cases {
            assert_eq!(resource_key_hash(&hex(dek), resource, perimeter).unwrap().to_vec(), hex(want), "{resource}");
        }
    }

    #[test]
    fn the_envelope_gives_back_its_perimeter_and_blob_and_refuses_anything_else() {
        let wrapped = envelope("eu-only", b"BLOB");
        assert_eq!(open_envelope(&wrapped).unwrap(), ("eu-only".to_string(), &b"BLOB"[..]));
        assert_eq!(open_envelope(&envelope("", b"B")).unwrap(), (String::new(), &b"B"[..]));
        for bad in [&b""[..], &[2, 0, 1], &[1, 5, b'a'], &[1, 1, b'a'], &[1, 1, 0xff, 1]] {
            assert_eq!(open_envelope(bad).unwrap_err().code, 400, "{bad:?}");
        }
    }

    fn authz(role: &str) -> Authorization {
        Authorization {
            email: "Ana@Example.com".into(),
            role: role.into(),
            resource_name: "//googleapis.com/drive/files/1".into(),
            kacls_url: "https://kacls.example.com/cse".into(),
            perimeter_id: None,
            email_type: None,
            delegated_to: None,
            kacls_owner_domain: None,
            spki_hash: None,
            spki_hash_algorithm: None,
            message_id: None,
        }
    }

    #[test]
    fn a_token_for_a_key_service_another_domain_owns_is_refused() {
        let owned = |domain: &str| Authorization { kacls_owner_domain: Some(domain.into()), ..authz("reader") };
        assert!(check_owner(&owned("Example.com"), Some("example.com")).is_ok());
        assert!(check_owner(&authz("reader"), Some("example.com")).is_ok(), "a token naming no owner");
        assert!(check_owner(&owned("other.example"), None).is_ok(), "no owner domain set");
        let e = check_owner(&owned("other.example"), Some("example.com")).unwrap_err();
        assert_eq!(e.code, 403);
        assert!(e.message.contains("kacls_owner_domain"), "{}", e.message);
    }

    #[test]
    fn a_delegation_needs_a_delegate_and_a_resource_but_no_role() {
        let authn = Authentication { email: "ana@example.com".into(), google_email: None, delegated_to: None, resource_name: None };
        let url = "https://kacls.example.com/cse";
        let delegating = Authorization { delegated_to: Some("meet@example.com".into()), ..authz("") };
        assert!(check_tokens(Some(&authn), &delegating, Use::Delegate, url, false).is_ok());
        let e = check_tokens(Some(&authn), &authz("writer"), Use::Delegate, url, false).unwrap_err();
        assert!(e.message.contains("delegated_to"), "{}", e.message);
        assert!(check_tokens(Some(&authn), &delegating, Use::Unwrap, url, false).is_err(), "no role: no unwrap");
    }

    #[test]
    fn the_tokens_must_agree_with_each_other_and_with_this_service() {
        let authn = Authentication { email: "ana@example.com".into(), google_email: None, delegated_to: None, resource_name: None };
        let url = "https://kacls.example.com/cse/";
        assert!(check_tokens(Some(&authn), &authz("writer"), Use::Wrap, url, false).is_ok());
        assert!(check_tokens(Some(&authn), &authz("reader"), Use::Unwrap, url, false).is_ok());
        let refusals = [
            (check_tokens(Some(&authn), &authz("reader"), Use::Wrap, url, false), "does not allow"),
            (check_tokens(Some(&authn), &authz("upgrader"), Use::Unwrap, url, false), "does not allow"),
            (
                check_tokens(Some(&Authentication { email: "bob@example.com".into(), ..authn.clone() }), &authz("writer"), Use::Wrap, url, false),
                "different users",
            ),
            (check_tokens(Some(&authn), &authz("writer"), Use::Wrap, "https://other.example.com", false), "kacls_url"),
            (
                check_tokens(Some(&authn), &Authorization { email_type: Some("google-visitor".into()), ..authz("reader") }, Use::Unwrap, url, false),
                "guest",
            ),
            (
                check_tokens(
                    Some(&Authentication { delegated_to: Some("svc@example.com".into()), ..authn.clone() }),
                    &authz("reader"),
                    Use::Unwrap,
                    url,
                    false,
                ),
                "delegation",
            ),
        ];
        for (result, why) in refusals {
            let e = result.unwrap_err();
            assert_eq!(e.code, 403, "{why}");
            assert!(e.message.contains(why), "{why}: {}", e.message);
        }
        // The IdP's google_email is what is compared, when it has one.
        let aliased = Authentication { email: "ana@corp.example".into(), google_email: Some("ana@example.com".into()), ..authn };
        assert!(check_tokens(Some(&aliased), &authz("writer"), Use::Wrap, url, false).is_ok());
        assert!(
            check_tokens(Some(&aliased), &Authorization { email_type: Some("customer-idp".into()), ..authz("reader") }, Use::Unwrap, url, true)
                .is_ok()
        );
    }

    #[test]
    fn gmails_algorithm_names_map_to_the_hsms_mechanisms_and_nothing_else_does() {
        let label = B64.encode(b"L");
        assert_eq!(decryption("RSA/ECB/PKCS1Padding", "not base64, and ignored").unwrap(), Decryption::Pkcs1);
        assert_eq!(
            decryption("rsa/ecb/oaepwithsha-256andmgf1padding", &label).unwrap(),
            Decryption::Oaep { hash: OaepHash::Sha256, label: b"L".to_vec() }
        );
        assert_eq!(decryption("RSA/ECB/OAEPwithSHA-1andMGF1Padding", "").unwrap(), Decryption::Oaep { hash: OaepHash::Sha1, label: vec![] });
        assert_eq!(decryption("RSA/ECB/OAEPwithSHA-1andMGF1Padding", "!").unwrap_err().code, 400);
        assert_eq!(decryption("RSA/ECB/NoPadding", "").unwrap_err().code, 400);
        assert_eq!(signing("SHA256withRSA", Some(5)).unwrap(), Signing::Pkcs1);
        assert_eq!(signing("SHA256withRSA/PSS", None).unwrap(), Signing::Pss { salt: 32 });
        assert_eq!(signing("RSASSA-PSS", Some(0)).unwrap(), Signing::Pss { salt: 0 });
        assert_eq!(signing("SHA1withRSA", None).unwrap_err().code, 400);
        assert_eq!(sha256_digest(&B64.encode([1u8; 32])).unwrap(), vec![1u8; 32]);
        assert_eq!(sha256_digest(&B64.encode([1u8; 20])).unwrap_err().code, 400);
    }

    #[test]
    fn a_public_key_hash_is_sha256_in_standard_base64() {
        let hash = B64.encode([1u8; 32]);
        assert_eq!(spki_hash(Some(&hash), Some("sha-256")).unwrap(), hash);
        assert_eq!(spki_hash(Some(&hash), None).unwrap(), hash);
        assert_eq!(spki_hash(None, None).unwrap_err().code, 403);
        assert_eq!(spki_hash(Some(&hash), Some("SHA-1")).unwrap_err().code, 400);
        assert_eq!(spki_hash(Some(&B64.encode([1u8; 20])), None).unwrap_err().code, 400);
        assert_eq!(spki_hash(Some("not base64!"), None).unwrap_err().code, 400);
        assert_ne!(private_key_context(&hash, ""), context_pairs(&hash, ""), "a wrapped data key never opens as a private key");
    }
}
