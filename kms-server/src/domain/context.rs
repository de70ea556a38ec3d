//! The caller's encryption context: a map of strings bound to a blob as associated data.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Most pairs in one context. AWS KMS has no published pair limit; 64 keeps the canonical form
/// and the audit record small, and no envelope-encryption library we know of uses more than a
/// handful.
pub const MAX_PAIRS: usize = 64;

/// Most bytes of keys plus values in one context. AWS KMS allows 8,192 characters; we count bytes
/// so that the bound is exact for the canonical form.
pub const MAX_TOTAL_BYTES: usize = 8192;

/// Why a context was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextError {
    TooManyPairs { pairs: usize },
    TooLarge { bytes: usize },
    EmptyKey,
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextError::TooManyPairs { pairs } => {
                write!(f, "has {pairs} pairs; at most {MAX_PAIRS} are allowed")
            }
            ContextError::TooLarge { bytes } => {
                write!(f, "has {bytes} bytes of keys and values; at most {MAX_TOTAL_BYTES} are allowed")
            }
            ContextError::EmptyKey => f.write_str("has an empty key"),
        }
    }
}

/// A validated encryption context, kept sorted by key so that the order a caller gave its pairs
/// in never matters. Keys and values are compared as exact bytes: no case folding and no Unicode
/// normalisation, so `Name` and `name`, or two spellings of `é`, are different contexts.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates a context as it arrives in a request. (Protobuf `map` fields cannot hold a key
    /// twice and prost has already checked that every string is UTF-8.)
    pub fn new(pairs: HashMap<String, String>) -> Result<Self, ContextError> {
        if pairs.len() > MAX_PAIRS {
            return Err(ContextError::TooManyPairs { pairs: pairs.len() });
        }
        let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_TOTAL_BYTES {
            return Err(ContextError::TooLarge { bytes });
        }
        if pairs.keys().any(String::is_empty) {
            return Err(ContextError::EmptyKey);
        }
        Ok(EncryptionContext(pairs.into_iter().collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The canonical bytes bound as associated data: the number of pairs, then each pair in
    /// ascending byte order of its key, every field as a big-endian u32 length and its bytes.
    /// (docs/blob-format.md.)
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let len = 4 + self.0.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        put_u32(&mut out, self.0.len());
        for (k, v) in &self.0 {
            put_u32(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            put_u32(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

/// Lengths here are bounded by `MAX_TOTAL_BYTES` and `MAX_PAIRS`, far below `u32::MAX`.
fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Result<EncryptionContext, ContextError> {
        EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn canonical_form_is_sorted_and_length_prefixed() {
        let c = ctx(&[("b", "2"), ("a", "1")]).unwrap();
        assert_eq!(
            c.canonical_bytes(),
            [&[0, 0, 0, 2][..], &[0, 0, 0, 1], b"a", &[0, 0, 0, 1], b"1", &[0, 0, 0, 1], b"b", &[0, 0, 0, 1], b"2"].concat()
        );
        assert_eq!(EncryptionContext::default().canonical_bytes(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn length_prefixes_keep_distinct_contexts_distinct() {
        let a = ctx(&[("ab", "c")]).unwrap();
        let b = ctx(&[("a", "bc")]).unwrap();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn limits_are_enforced() {
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(EncryptionContext::new(many.into_iter().collect()), Err(ContextError::TooManyPairs { pairs: 65 }));
        let big = "x".repeat(8192);
        assert_eq!(ctx(&[("k", &big)]), Err(ContextError::TooLarge { bytes: 8193 }));
        assert!(ctx(&[("k", &big[1..])]).is_ok());
        assert_eq!(ctx(&[("", "v")]), Err(ContextError::EmptyKey));
    }
}
