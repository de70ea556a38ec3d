//! The wrapped-blob format (docs/blob-format.md).
//!
//! ```text
//! offset  size  field
//!  0       3    magic "kms" (6B 6D 73)
//!  3       1    format version, 1
//!  4       1    algorithm, 1 = AES-256-GCM in the HSM, 96-bit IV, 128-bit tag
//!  5      16    key id (the UUID's 16 bytes)
//! 21       4    key version, big-endian, >= 1
//! 25      12    IV
//! 37       n    ciphertext, then the 16-byte tag
//! ```
//!
//! The associated data of the AES-GCM operation is the whole 37-byte header followed by the
//! canonical encryption context (`EncryptionContext::canonical_bytes`), so changing any header
//! byte, or presenting another context, makes the tag check fail inside the HSM.

use std::fmt;

use super::context::EncryptionContext;
use super::ids::KeyId;

pub const MAGIC: [u8; 3] = *b"kms";
pub const FORMAT_VERSION: u8 = 1;
/// AES-256-GCM with a 96-bit IV and a 128-bit tag, the key held in the HSM.
pub const ALG_AES256_GCM_HSM: u8 = 1;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const HEADER_LEN: usize = 3 + 1 + 1 + 16 + 4 + IV_LEN;
/// The largest plaintext Encrypt accepts (the AWS KMS limit).
pub const MAX_PLAINTEXT: usize = 4096;
/// The largest blob Decrypt accepts (the AWS KMS limit for a ciphertext blob).
pub const MAX_BLOB: usize = 6144;

/// A 96-bit AES-GCM IV. Made only by the service, from the HSM's random generator.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Iv(pub [u8; IV_LEN]);

/// The header of a blob: which key and version, and the IV.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BlobHeader {
    pub key_id: KeyId,
    pub version: u32,
    pub iv: Iv,
}

impl BlobHeader {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..3].copy_from_slice(&MAGIC);
        h[3] = FORMAT_VERSION;
        h[4] = ALG_AES256_GCM_HSM;
        h[5..21].copy_from_slice(self.key_id.as_bytes());
        h[21..25].copy_from_slice(&self.version.to_be_bytes());
        h[25..37].copy_from_slice(&self.iv.0);
        h
    }

    /// The associated data for this header and a context.
    pub fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        let mut aad = self.to_bytes().to_vec();
        aad.extend_from_slice(&context.canonical_bytes());
        aad
    }
}

/// Why a blob could not be parsed. The reason is for the log and for tests; the caller only
/// ever sees the one uniform decrypt error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobError {
    TooShort,
    TooLong,
    BadMagic,
    UnknownFormat,
    UnknownAlgorithm,
    ZeroVersion,
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobError::TooShort => "shorter than a header and a tag",
            BlobError::TooLong => "longer than 6,144 bytes",
            BlobError::BadMagic => "bad magic",
            BlobError::UnknownFormat => "unknown format version",
            BlobError::UnknownAlgorithm => "unknown algorithm",
            BlobError::ZeroVersion => "key version 0",
        })
    }
}

/// A parsed blob: its header and the ciphertext with its tag.
#[derive(Debug, PartialEq, Eq)]
pub struct Blob<'a> {
    pub header: BlobHeader,
    pub ciphertext: &'a [u8],
}

impl<'a> Blob<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Blob<'a>, BlobError> {
        if bytes.len() > MAX_BLOB {
            return Err(BlobError::TooLong);
        }
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(BlobError::TooShort);
        }
        let (h, ciphertext) = bytes.split_at(HEADER_LEN);
        if h[0..3] != MAGIC {
            return Err(BlobError::BadMagic);
        }
        if h[3] != FORMAT_VERSION {
            return Err(BlobError::UnknownFormat);
        }
        if h[4] != ALG_AES256_GCM_HSM {
            return Err(BlobError::UnknownAlgorithm);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[5..21]);
        let mut version = [0u8; 4];
        version.copy_from_slice(&h[21..25]);
        let version = u32::from_be_bytes(version);
        if version == 0 {
            return Err(BlobError::ZeroVersion);
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&h[25..37]);
        Ok(Blob { header: BlobHeader { key_id: KeyId::from_bytes(id), version, iv: Iv(iv) }, ciphertext })
    }

    /// Concatenates a header and the HSM's ciphertext-and-tag into a blob.
    pub fn encode(header: &BlobHeader, ciphertext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(ciphertext);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> BlobHeader {
        BlobHeader { key_id: KeyId::from_bytes([7; 16]), version: 3, iv: Iv([9; IV_LEN]) }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let blob = Blob::encode(&header(), &[1; 48]);
        assert_eq!(blob.len(), HEADER_LEN + 48);
        let parsed = Blob::parse(&blob).unwrap();
        assert_eq!(parsed.header, header());
        assert_eq!(parsed.ciphertext, &[1; 48]);
    }

    #[test]
    fn malformed_blobs_are_refused() {
        let good = Blob::encode(&header(), &[0; TAG_LEN]);
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        let mut zero_version = good.clone();
        zero_version[21..25].copy_from_slice(&[0; 4]);
        let cases: Vec<(Vec<u8>, BlobError)> = vec![
            (good[..good.len() - 1].to_vec(), BlobError::TooShort),
            (vec![], BlobError::TooShort),
            (vec![0; MAX_BLOB + 1], BlobError::TooLong),
            (with(0, b'K'), BlobError::BadMagic),
            (with(3, 2), BlobError::UnknownFormat),
            (with(4, 0), BlobError::UnknownAlgorithm),
            (zero_version, BlobError::ZeroVersion),
        ];
        for (bytes, want) in cases {
            assert_eq!(Blob::parse(&bytes), Err(want));
        }
    }

    #[test]
    fn aad_is_header_then_canonical_context() {
        let ctx = EncryptionContext::default();
        let aad = header().aad(&ctx);
        assert_eq!(&aad[..HEADER_LEN], &header().to_bytes());
        assert_eq!(&aad[HEADER_LEN..], &[0, 0, 0, 0]);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The first golden vector of tests/fixtures/v1/golden.json, field by field, as
    /// docs/blob-format.md walks through it.
    #[test]
    fn golden_vector_layout_and_aad() {
        let blob = unhex(concat!(
            "6b6d73",
            "01",
            "01",
            "fd82eaa232344dfb9c804f2880bb3942",
            "00000001",
            "b608588f54b41da84a047032",
            "03e1f9c93db537280c98a0e7dc68bac7ccdb772d7277adc9db1b8a17f18f2ec3",
            "5a6dc2ec1c60d0bd0d502f9fc52c5107",
        ));
        let parsed = Blob::parse(&blob).unwrap();
        assert_eq!(parsed.header.key_id.to_string(), "fd82eaa2-3234-4dfb-9c80-4f2880bb3942");
        assert_eq!(parsed.header.version, 1);
        assert_eq!(parsed.header.iv, Iv(unhex("b608588f54b41da84a047032").try_into().unwrap()));
        assert_eq!(parsed.ciphertext.len(), 32 + TAG_LEN);
        let ctx =
            EncryptionContext::new([("n".to_string(), "1".to_string()), ("app".to_string(), "golden".to_string())].into_iter().collect()).unwrap();
        assert_eq!(
            parsed.header.aad(&ctx),
            unhex(concat!(
                "6b6d730101fd82eaa232344dfb9c804f2880bb394200000001b608588f54b41da84a047032",
                "00000002",
                "00000003",
                "617070",
                "00000006",
                "676f6c64656e",
                "00000001",
                "6e",
                "00000001",
                "31",
            ))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100_000))]
        #[test]
        fn parse_never_panics_and_accepts_only_well_formed(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(blob) = Blob::parse(&bytes) {
                prop_assert_eq!(Blob::encode(&blob.header, blob.ciphertext), bytes);
            }
        }
    }
}
