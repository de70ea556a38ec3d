//! The bytes of an XKS encryption that are ours to choose: the `ciphertextMetadata` we return
//! (it names the key version, so that our rotation keeps working for AWS), the AAD the HSM
//! authenticates, and the `ciphertextDataIntegrityValue`. No I/O.
//!
//! The specification (AWS KMS XKS Proxy API v1.0.2, "Encrypt") leaves the AAD to the proxy and
//! the key manager ("should be computed as") since AWS never sees it; ours is the spec's layout
//! behind a domain label, so that no XKS request can be made to authenticate the AAD of one of
//! our gRPC blobs (or the other way round) whatever AAD and metadata it carries:
//!
//! ```text
//! "kms-xks-v1\0" || u16be(len(aad)) || aad || u8(len(metadata)) || metadata
//! ```

use sha2::{Digest, Sha256};

/// The label that starts every XKS AAD (a blob's AAD starts with its own format byte).
const DOMAIN: &[u8] = b"kms-xks-v1\0";

/// The most AAD the spec's two-byte length can frame; the listener refuses more first.
pub const MAX_AAD: usize = u16::MAX as usize;

/// The most `ciphertextMetadata` AWS accepts (decoded).
pub const MAX_METADATA: usize = 20;

/// The first byte of our `ciphertextMetadata`: its format. A later format gets another value,
/// and ciphertexts made under this one stay decryptable.
const METADATA_V1: u8 = 1;

/// Our `ciphertextMetadata`: the format byte and the key version, big-endian (5 bytes).
pub fn metadata(version: u32) -> [u8; 5] {
    let v = version.to_be_bytes();
    [METADATA_V1, v[0], v[1], v[2], v[3]]
}

/// The key version `ciphertextMetadata` names, or why it names none. Absent metadata names
/// none: every ciphertext we made carries it.
pub fn version_of(metadata: Option<&[u8]>) -> Result<u32, &'static str> {
    match metadata {
        None => Err("is missing (every ciphertext this proxy makes carries it)"),
        Some([METADATA_V1, a, b, c, d]) => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        Some([METADATA_V1, ..]) => Err("has the wrong length for its format"),
        Some(_) => Err("is not in a format this proxy makes"),
    }
}

/// The AAD the HSM authenticates for an XKS encryption under `aad` (the request's, if any) and
/// `metadata`. Both must be within `MAX_AAD` and `MAX_METADATA` (the listener checks them).
pub fn aad(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    let aad = aad.unwrap_or_default();
    debug_assert!(aad.len() <= MAX_AAD && metadata.len() <= MAX_METADATA);
    let mut out = Vec::with_capacity(DOMAIN.len() + 3 + aad.len() + metadata.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&(aad.len() as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// The `ciphertextDataIntegrityValue` (spec, Appendix C): SHA-256 over `aad || metadata || iv
/// || ciphertext || tag` as decoded, absent fields taken as empty, no lengths.
pub fn integrity_value(aad: Option<&[u8]>, metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [aad.unwrap_or_default(), metadata, iv, ciphertext, tag] {
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;

    use super::*;

    #[test]
    fn the_integrity_value_is_the_specifications_worked_example() {
        // Appendix C of the XKS Proxy API specification.
        let b = |s: &str| B64.decode(s).unwrap();
        let value = integrity_value(
            Some(b"project=nile,department=marketing"),
            &b("a2V5X3ZlcnNpb249MQ=="),
            &b("HMrlRw85cAJUd5Ax"),
            &b("ghxkK1txeDNn3q8Y"),
            &b("vBxN2ncH1oEkR8WVXpmyYQ=="),
        );
        assert_eq!(B64.encode(value), "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=");
    }

    #[test]
    fn the_metadata_names_its_version_and_nothing_else_passes() {
        assert_eq!(version_of(Some(&metadata(7))), Ok(7));
        assert_eq!(version_of(Some(&metadata(u32::MAX))), Ok(u32::MAX));
        assert!(version_of(None).is_err());
        assert!(version_of(Some(&[])).is_err());
        assert!(version_of(Some(&[1, 0, 0, 7])).is_err());
        assert!(version_of(Some(&[1, 0, 0, 0, 7, 0])).is_err());
        assert!(version_of(Some(&[2, 0, 0, 0, 7])).is_err());
    }

    #[test]
    fn the_aad_frames_both_fields_so_that_none_can_slide_into_the_other() {
        let md = metadata(1);
        assert_eq!(aad(None, &md), [DOMAIN, &[0, 0, 5], &md].concat());
        assert_eq!(aad(Some(b"ab"), &[]), [DOMAIN, &[0, 2], b"ab", &[0]].concat());
        // Absent and empty AAD are the same (the spec: an absent field has length zero).
        assert_eq!(aad(None, &md), aad(Some(b""), &md));
        // Moving a byte from the AAD to the metadata changes the framing.
        assert_ne!(aad(Some(b"ab"), b"c"), aad(Some(b"a"), b"bc"));
    }
}
