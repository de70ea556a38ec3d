//! The XKS Proxy API's JSON, as AWS KMS sends and expects it (spec v1.0.2): the requests,
//! decoded and checked into what the facade acts on; the answers; the errors, each with the
//! spec's name and HTTP status. Unknown fields are ignored (AWS adds request metadata over time),
//! and so is an unknown `kmsOperation`. No I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::framing::{MAX_METADATA, integrity_value};

/// Plaintext an encryption takes (the spec asks for 4,300 bytes at least; AWS sends at most
/// 4,096 of its own callers' bytes plus its framing).
pub const MAX_PLAINTEXT: usize = 8192;
/// AAD a request may carry (the spec asks for 8,192 bytes at least).
pub const MAX_AAD: usize = 8192;
/// Characters of an ARN (the spec asks for 2,048 at least).
pub const MAX_ARN: usize = 2048;
/// Characters of any other request metadata value.
const MAX_METADATA_VALUE: usize = 2048;
/// The IV lengths the spec allows; ours are always 12 bytes.
const IV_LENS: [usize; 2] = [12, 16];
/// The tag length the spec requires.
pub const TAG_LEN: usize = 16;

/// An XKS error: the spec's name (which fixes the HTTP status) and a message for the proxy's
/// operator (AWS logs it; it never reaches AWS's callers), printable ASCII under 512 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    pub name: ErrorName,
    message: String,
}

/// The spec's error names ("Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorName {
    Validation,
    InvalidState,
    InvalidCiphertext,
    InvalidKeyUsage,
    AuthenticationFailed,
    AccessDenied,
    KeyNotFound,
    InvalidUriPath,
    Throttling,
    UnsupportedOperation,
    DependencyTimeout,
    Internal,
}

impl ErrorName {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::Validation => "ValidationException",
            ErrorName::InvalidState => "InvalidStateException",
            ErrorName::InvalidCiphertext => "InvalidCiphertextException",
            ErrorName::InvalidKeyUsage => "InvalidKeyUsageException",
            ErrorName::AuthenticationFailed => "AuthenticationFailedException",
            ErrorName::AccessDenied => "AccessDeniedException",
            ErrorName::KeyNotFound => "KeyNotFoundException",
            ErrorName::InvalidUriPath => "InvalidUriPathException",
            ErrorName::Throttling => "ThrottlingException",
            ErrorName::UnsupportedOperation => "UnsupportedOperationException",
            ErrorName::DependencyTimeout => "DependencyTimeoutException",
            ErrorName::Internal => "InternalException",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorName::Validation | ErrorName::InvalidState | ErrorName::InvalidCiphertext | ErrorName::InvalidKeyUsage => 400,
            ErrorName::AuthenticationFailed => 401,
            ErrorName::AccessDenied => 403,
            ErrorName::KeyNotFound | ErrorName::InvalidUriPath => 404,
            ErrorName::Throttling => 429,
            ErrorName::Internal => 500,
            ErrorName::UnsupportedOperation => 501,
            ErrorName::DependencyTimeout => 503,
        }
    }
}

impl XksError {
    /// The most characters a message has (the spec: fewer than 512).
    const MAX_MESSAGE: usize = 511;

    /// An error whose message is `message` made printable ASCII (anything else becomes `?`)
    /// and cut to the spec's length.
    pub fn new(name: ErrorName, message: impl AsRef<str>) -> XksError {
        let message = message.as_ref().chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).take(Self::MAX_MESSAGE).collect();
        XksError { name, message }
    }

    pub fn validation(field: &str, why: impl std::fmt::Display) -> XksError {
        XksError::new(ErrorName::Validation, format!("{field} {why}"))
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The answer's body: `{"errorName": ..., "errorMessage": ...}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"errorName": self.name.as_str(), "errorMessage": self.message})).unwrap_or_default()
    }
}

impl std::fmt::Display for XksError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name.as_str(), self.message)
    }
}

/// `requestMetadata`: who at AWS asks and why. Kept whole for the audit record (with
/// `kmsRequestId`, which correlates it with CloudTrail); `awsPrincipalArn`, `kmsViaService` and
/// `kmsOperation` are what an officer's allow-list can name.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_principal_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_source_vpc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_source_vpce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_via_service: Option<String>,
}

/// Which call a request is, for the fields `requestMetadata` must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Health,
    Metadata,
    Encrypt,
    Decrypt,
}

impl RequestMetadata {
    /// Checks the fields the spec requires of `call` and the lengths of all of them. The values
    /// themselves are not interpreted (an unknown `kmsOperation` is accepted).
    fn check(&self, call: Call) -> Result<(), XksError> {
        let fields = [
            ("awsPrincipalArn", &self.aws_principal_arn, MAX_ARN, matches!(call, Call::Metadata | Call::Encrypt | Call::Decrypt)),
            ("awsSourceVpc", &self.aws_source_vpc, MAX_METADATA_VALUE, false),
            ("awsSourceVpce", &self.aws_source_vpce, MAX_METADATA_VALUE, false),
            ("kmsKeyArn", &self.kms_key_arn, MAX_ARN, matches!(call, Call::Encrypt | Call::Decrypt)),
            ("kmsOperation", &self.kms_operation, MAX_METADATA_VALUE, true),
            ("kmsRequestId", &self.kms_request_id, MAX_METADATA_VALUE, true),
            ("kmsViaService", &self.kms_via_service, MAX_METADATA_VALUE, false),
        ];
        for (name, value, max, required) in fields {
            match value {
                None if required => return Err(XksError::validation(&format!("requestMetadata.{name}"), "is required")),
                Some(v) if v.chars().count() > max => {
                    return Err(XksError::validation(&format!("requestMetadata.{name}"), format!("is longer than {max} characters")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The metadata as the audit record keeps it (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataOnly {
    request_metadata: Option<RequestMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EncryptJson {
    request_metadata: Option<RequestMetadata>,
    plaintext: Option<crate::secret::SecretText>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    ciphertext_data_integrity_value_algorithm: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecryptJson {
    request_metadata: Option<RequestMetadata>,
    encryption_algorithm: Option<String>,
    ciphertext: Option<String>,
    ciphertext_metadata: Option<String>,
    initialization_vector: Option<String>,
    authentication_tag: Option<String>,
    additional_authenticated_data: Option<String>,
}

/// An Encrypt request, checked.
#[derive(Debug)]
pub struct EncryptRequest {
    pub metadata: RequestMetadata,
    pub plaintext: crate::secret::SecretBytes,
    pub aad: Option<Vec<u8>>,
    /// Whether the answer carries `ciphertextDataIntegrityValue`.
    pub integrity_value: bool,
}

/// A Decrypt request, checked.
#[derive(Debug)]
pub struct DecryptRequest {
    pub metadata: RequestMetadata,
    pub ciphertext: Vec<u8>,
    pub ciphertext_metadata: Option<Vec<u8>>,
    pub iv: Vec<u8>,
    pub tag: [u8; TAG_LEN],
    pub aad: Option<Vec<u8>>,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    serde_json::from_slice(body).map_err(|e| {
        // The position only: serde_json's own message can quote the value, a secret perhaps.
        let what = match e.classify() {
            serde_json::error::Category::Data => "has a field of the wrong JSON type",
            _ => "is not JSON",
        };
        XksError::new(ErrorName::Validation, format!("the request body {what} (line {}, column {})", e.line(), e.column()))
    })
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, XksError> {
    value.ok_or_else(|| XksError::validation(field, "is required"))
}

/// Decodes Base64 `field`, refusing more than `max` decoded bytes with `too_long` (the spec:
/// UnsupportedOperationException above a limit an implementation sets beyond the spec's).
fn decode(field: &str, text: &str, max: usize, too_long: ErrorName) -> Result<Vec<u8>, XksError> {
    if text.len() > max.div_ceil(3) * 4 {
        return Err(XksError::new(too_long, format!("{field} is longer than {max} bytes")));
    }
    let bytes = B64.decode(text).map_err(|_| XksError::validation(field, "is not Base64"))?;
    if bytes.len() > max {
        return Err(XksError::new(too_long, format!("{field} is longer than {max} bytes")));
    }
    Ok(bytes)
}

fn algorithm(value: Option<String>) -> Result<(), XksError> {
    match required("encryptionAlgorithm", value)?.as_str() {
        "AES_GCM" => Ok(()),
        _ => Err(XksError::validation("encryptionAlgorithm", "must be AES_GCM")),
    }
}

fn checked(metadata: Option<RequestMetadata>, call: Call) -> Result<RequestMetadata, XksError> {
    let metadata = required("requestMetadata", metadata)?;
    metadata.check(call)?;
    Ok(metadata)
}

/// The `requestMetadata` of a health or metadata request.
pub fn parse_metadata_only(body: &[u8], call: Call) -> Result<RequestMetadata, XksError> {
    checked(json::<MetadataOnly>(body)?.request_metadata, call)
}

pub fn parse_encrypt(body: &[u8]) -> Result<EncryptRequest, XksError> {
    let r: EncryptJson = json(body)?;
    let metadata = checked(r.request_metadata, Call::Encrypt)?;
    algorithm(r.encryption_algorithm)?;
    let plaintext = required("plaintext", r.plaintext)?;
    let plaintext = crate::secret::SecretBytes::new(decode("plaintext", plaintext.expose_secret(), MAX_PLAINTEXT, ErrorName::UnsupportedOperation)?);
    let aad =
        r.additional_authenticated_data.map(|a| decode("additionalAuthenticatedData", &a, MAX_AAD, ErrorName::UnsupportedOperation)).transpose()?;
    let integrity_value = match r.ciphertext_data_integrity_value_algorithm.as_deref() {
        None => false,
        Some("SHA_256") => true,
        Some(_) => return Err(XksError::validation("ciphertextDataIntegrityValueAlgorithm", "must be SHA_256")),
    };
    Ok(EncryptRequest { metadata, plaintext, aad, integrity_value })
}

pub fn parse_decrypt(body: &[u8]) -> Result<DecryptRequest, XksError> {
    let r: DecryptJson = json(body)?;
    let metadata = checked(r.request_metadata, Call::Decrypt)?;
    algorithm(r.encryption_algorithm)?;
    // A ciphertext can be no longer than the plaintext we take.
    let ciphertext = decode("ciphertext", &required("ciphertext", r.ciphertext)?, MAX_PLAINTEXT, ErrorName::UnsupportedOperation)?;
    let ciphertext_metadata = r.ciphertext_metadata.map(|m| decode("ciphertextMetadata", &m, MAX_METADATA, ErrorName::Validation)).transpose()?;
    let iv = decode("initializationVector", &required("initializationVector", r.initialization_vector)?, 16, ErrorName::Validation)?;
    if !IV_LENS.contains(&iv.len()) {
        return Err(XksError::validation("initializationVector", "must be 12 or 16 bytes"));
    }
    let tag = decode("authenticationTag", &required("authenticationTag", r.authentication_tag)?, TAG_LEN, ErrorName::Validation)?;
    let tag = <[u8; TAG_LEN]>::try_from(tag.as_slice()).map_err(|_| XksError::validation("authenticationTag", "must be 16 bytes"))?;
    let aad =
        r.additional_authenticated_data.map(|a| decode("additionalAuthenticatedData", &a, MAX_AAD, ErrorName::UnsupportedOperation)).transpose()?;
    Ok(DecryptRequest { metadata, ciphertext, ciphertext_metadata, iv, tag, aad })
}

/// The answer to an Encrypt.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptAnswer {
    ciphertext: String,
    ciphertext_metadata: String,
    initialization_vector: String,
    authentication_tag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_data_integrity_value: Option<String>,
}

impl EncryptAnswer {
    /// The answer for `ciphertext` and `tag` made under `iv`, `metadata` and the request's AAD,
    /// with the integrity value if the request asked for it.
    pub fn new(request: &EncryptRequest, metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> EncryptAnswer {
        let integrity = request.integrity_value.then(|| B64.encode(integrity_value(request.aad.as_deref(), metadata, iv, ciphertext, tag)));
        EncryptAnswer {
            ciphertext: B64.encode(ciphertext),
            ciphertext_metadata: B64.encode(metadata),
            initialization_vector: B64.encode(iv),
            authentication_tag: B64.encode(tag),
            ciphertext_data_integrity_value: integrity,
        }
    }
}

/// The answer to a GetKeyMetadata.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataAnswer {
    pub key_spec: &'static str,
    pub key_usage: Vec<&'static str>,
    pub key_status: &'static str,
}

/// The answer to a GetHealthStatus.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthAnswer {
    pub xks_proxy_fleet_size: u64,
    pub xks_proxy_vendor: &'static str,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<EkmDetail>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmDetail {
    pub id: String,
    pub model: String,
    /// `ACTIVE`, `DEGRADED` or `UNAVAILABLE`.
    pub health_status: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#""requestMetadata": {"awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice", "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:key/1234abcd", "kmsOperation": "Encrypt", "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae", "futureField": {"x": 1}}"#;

    fn encrypt(rest: &str) -> Result<EncryptRequest, XksError> {
        parse_encrypt(format!("{{{META}, {rest}}}").as_bytes())
    }

    #[test]
    fn an_encrypt_request_is_decoded_and_unknown_fields_are_ignored() {
        let r = encrypt(r#""plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": "cHJvamVjdD1uaWxl", "ciphertextDataIntegrityValueAlgorithm": "SHA_256", "extra": true"#).unwrap();
        assert_eq!(r.plaintext.expose_secret(), b"Hello");
        assert_eq!(r.aad.as_deref(), Some(&b"project=nile"[..]));
        assert!(r.integrity_value);
        assert_eq!(r.metadata.kms_request_id.as_deref(), Some("4112f4d6-db54-4af4-ae30-c55a22a8dfae"));
        // The audit keeps the metadata whole, minus fields this release does not know.
        assert!(r.metadata.to_json().contains("\"kmsRequestId\":\"4112f4d6-db54-4af4-ae30-c55a22a8dfae\""));
    }

    #[test]
    fn each_bad_field_gets_the_specs_error_and_names_the_field() {
        let cases = [
            (r#""plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_CBC""#, ErrorName::Validation, "encryptionAlgorithm"),
            (r#""encryptionAlgorithm": "AES_GCM""#, ErrorName::Validation, "plaintext"),
            (r#""plaintext": "not base64!", "encryptionAlgorithm": "AES_GCM""#, ErrorName::Validation, "plaintext"),
            (
                r#""plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "MD5""#,
                ErrorName::Validation,
                "ciphertextDataIntegrityValueAlgorithm",
            ),
            (r#""plaintext": 5, "encryptionAlgorithm": "AES_GCM""#, ErrorName::Validation, "wrong JSON type"),
        ];
        for (rest, name, field) in cases {
            let e = encrypt(rest).unwrap_err();
            assert_eq!(e.name, name, "{rest}: {e}");
            assert!(e.message().contains(field), "{rest}: {e}");
        }
        let e = parse_encrypt(
            br#"{"plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_GCM", "requestMetadata": {"kmsOperation": "Encrypt", "kmsRequestId": "1"}}"#,
        )
        .unwrap_err();
        assert!(e.message().contains("awsPrincipalArn"), "{e}");
        assert_eq!(parse_encrypt(b"{not json").unwrap_err().name, ErrorName::Validation);
        // A value of the wrong type is not quoted back (it could be a secret).
        let e = parse_encrypt(br#"{"requestMetadata": "s3cret-value"}"#).unwrap_err();
        assert!(!e.message().contains("s3cret"), "{e}");
    }

    #[test]
    fn the_specs_sizes_are_taken_and_anything_bigger_is_unsupported() {
        let at = |n: usize| B64.encode(vec![7u8; n]);
        let r = encrypt(&format!(r#""plaintext": "{}", "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": "{}""#, at(4300), at(8192)))
            .unwrap();
        assert_eq!((r.plaintext.expose_secret().len(), r.aad.map(|a| a.len())), (4300, Some(8192)));
        let e = encrypt(&format!(r#""plaintext": "{}", "encryptionAlgorithm": "AES_GCM""#, at(MAX_PLAINTEXT + 1))).unwrap_err();
        assert_eq!(e.name, ErrorName::UnsupportedOperation);
        let e = encrypt(&format!(r#""plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": "{}""#, at(8193)))
            .unwrap_err();
        assert_eq!(e.name, ErrorName::UnsupportedOperation);
        let arn = "a".repeat(MAX_ARN);
        let ok = format!(r#"{{"requestMetadata": {{"awsPrincipalArn": "{arn}", "kmsOperation": "SomeFutureOperation", "kmsRequestId": "1"}}}}"#);
        assert!(parse_metadata_only(ok.as_bytes(), Call::Metadata).is_ok());
        let long = ok.replace(&arn, &format!("{arn}a"));
        assert_eq!(parse_metadata_only(long.as_bytes(), Call::Metadata).unwrap_err().name, ErrorName::Validation);
    }

    #[test]
    fn a_decrypt_request_checks_iv_tag_and_metadata_lengths() {
        let body = |iv: &str, tag: &str, md: &str| {
            format!(
                r#"{{{META}, "encryptionAlgorithm": "AES_GCM", "ciphertext": "AAAA", "initializationVector": "{iv}", "authenticationTag": "{tag}", "ciphertextMetadata": "{md}"}}"#
            )
        };
        let (iv12, tag16) = (B64.encode([1u8; 12]), B64.encode([2u8; 16]));
        let r = parse_decrypt(body(&iv12, &tag16, "AQAAAAE=").as_bytes()).unwrap();
        assert_eq!((r.iv.len(), r.tag, r.ciphertext_metadata.as_deref()), (12, [2u8; 16], Some(&[1u8, 0, 0, 0, 1][..])));
        for (iv, tag, md, field) in [
            (B64.encode([1u8; 11]), tag16.clone(), "AQAAAAE=".to_string(), "initializationVector"),
            (iv12.clone(), B64.encode([2u8; 15]), "AQAAAAE=".to_string(), "authenticationTag"),
            (iv12.clone(), tag16.clone(), B64.encode([0u8; 21]), "ciphertextMetadata"),
        ] {
            let e = parse_decrypt(body(&iv, &tag, &md).as_bytes()).unwrap_err();
            assert_eq!(e.name, ErrorName::Validation, "{e}");
            assert!(e.message().contains(field), "{e}");
        }
    }

    #[test]
    fn error_messages_are_short_printable_ascii() {
        let e = XksError::new(ErrorName::Internal, format!("caf\u{e9}\n{}", "x".repeat(600)));
        assert!(e.message().len() < 512 && e.message().starts_with("caf??"));
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["errorName"], "InternalException");
        assert_eq!(ErrorName::InvalidUriPath.http_status(), 404);
        assert_eq!(ErrorName::UnsupportedOperation.http_status(), 501);
    }
}
