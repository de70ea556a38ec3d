//! Key identifiers and aliases.

use std::fmt;
use std::str::FromStr;

/// A key's identifier: 16 random bytes, written as a UUID (`8-4-4-4-12` lowercase hex), as AWS
/// KMS and Google Cloud KMS users expect. Stored raw (16 bytes) in every ciphertext blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// Makes an id from 16 random bytes, setting the UUID version 4 and variant bits.
    pub fn from_random(mut bytes: [u8; 16]) -> KeyId {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        KeyId(bytes)
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> KeyId {
        KeyId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why a key id or alias was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    Empty,
    NotAKeyId,
    BadAlias,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdError::Empty => "is empty",
            IdError::NotAKeyId => "is neither a key id (a UUID) nor an alias (alias/NAME)",
            IdError::BadAlias => {
                "is not a valid alias: alias/NAME with NAME of 1 to 256 characters from \
                 A-Z a-z 0-9 / _ -, not starting with aws or kms"
            }
        })
    }
}

impl FromStr for KeyId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<KeyId, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let bytes = s.as_bytes();
        if bytes.len() != 36 {
            return Err(IdError::NotAKeyId);
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(IdError::NotAKeyId);
                }
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(IdError::NotAKeyId),
            };
            out[nibbles / 2] |= if nibbles.is_multiple_of(2) { v << 4 } else { v };
            nibbles += 1;
        }
        Ok(KeyId(out))
    }
}

/// An alias name, without its `alias/` prefix. The rules follow AWS KMS: 1 to 256 characters of
/// `A-Z a-z 0-9 / _ -`; names starting with `aws` or `kms` are reserved.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct AliasName(String);

impl AliasName {
    /// The longest alias name AWS KMS accepts.
    pub const MAX_LEN: usize = 256;

    /// Accepts `alias/NAME` or a bare `NAME`.
    pub fn parse(s: &str) -> Result<AliasName, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let name = s.strip_prefix("alias/").unwrap_or(s);
        let valid_chars = name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'_' | b'-'));
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || name.len() > Self::MAX_LEN || !valid_chars || lower.starts_with("aws") || lower.starts_with("kms") {
            return Err(IdError::BadAlias);
        }
        Ok(AliasName(name.to_string()))
    }

    /// The bare name, as stored.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "alias/{}", self.0)
    }
}

/// How a request names a key: by id or by alias.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KeyRef {
    Id(KeyId),
    Alias(AliasName),
}

impl FromStr for KeyRef {
    type Err = IdError;

    fn from_str(s: &str) -> Result<KeyRef, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.starts_with("alias/") {
            return AliasName::parse(s).map(KeyRef::Alias);
        }
        s.parse().map(KeyRef::Id)
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Id(id) => id.fmt(f),
            KeyRef::Alias(a) => a.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_id_round_trips_through_its_text_form() {
        let id = KeyId::from_random([0xab; 16]);
        let text = id.to_string();
        assert_eq!(text, "abababab-abab-4bab-abab-abababababab");
        assert_eq!(text.parse::<KeyId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<KeyId>(), Ok(id));
    }

    #[test]
    fn key_refs_are_ids_or_aliases() {
        let cases: &[(&str, Result<(), IdError>)] = &[
            ("", Err(IdError::Empty)),
            ("alias/app-1_x/y", Ok(())),
            ("alias/", Err(IdError::BadAlias)),
            ("alias/aws-thing", Err(IdError::BadAlias)),
            ("alias/KMS", Err(IdError::BadAlias)),
            ("alias/has space", Err(IdError::BadAlias)),
            ("alias/é", Err(IdError::BadAlias)),
            ("abababab-abab-4bab-abab-abababababab", Ok(())),
            ("abababab-abab-4bab-abab-ababababababa", Err(IdError::NotAKeyId)),
            ("abababab_abab-4bab-abab-abababababab", Err(IdError::NotAKeyId)),
            ("gbababab-abab-4bab-abab-abababababab", Err(IdError::NotAKeyId)),
            ("my-key", Err(IdError::NotAKeyId)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<KeyRef>().map(|_| ()), *want, "{text:?}");
        }
        let long = format!("alias/{}", "a".repeat(257));
        assert_eq!(long.parse::<KeyRef>(), Err(IdError::BadAlias));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<KeyRef>();
        }

        #[test]
        fn every_id_round_trips(bytes in any::<[u8; 16]>()) {
            let id = KeyId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<KeyId>(), Ok(id));
        }
    }
}
