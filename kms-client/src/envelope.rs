//! Envelope encryption of a stream of any size (docs/file-format.md).
//!
//! A fresh data key from the service encrypts the data locally with AES-256-GCM in 64 KiB
//! chunks; the wrapped data key and the encryption context travel in the header. Each chunk's
//! nonce is a random 7-byte prefix, the chunk's index (u32, big-endian) and a last-chunk flag
//! (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, 2015), and each chunk
//! authenticates the whole header as associated data, so chunks cannot be reordered, dropped,
//! truncated at a chunk boundary, or moved to another file.
//!
//! ```text
//! header: "KMSE" | version 1 | chunk size u32 | context length u32 | context (canonical form)
//!         | blob length u16 | blob (the wrapped data key) | nonce prefix (7 bytes)
//! chunks: ciphertext (chunk size bytes, the last one shorter or empty) | tag (16 bytes)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Read, Write};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 4] = b"KMSE";
pub const VERSION: u8 = 1;
/// 64 KiB chunks: large enough that the 16-byte tag is negligible, small enough to stream.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const PREFIX: usize = 7;
/// Limits that a hostile header cannot exceed (the service's own limits on contexts and blobs).
const MAX_CONTEXT_BYTES: u32 = 16 * 1024;
const MAX_CHUNK: u32 = 1 << 24;

/// Why an envelope could not be read or written.
#[derive(Debug)]
pub enum EnvelopeError {
    Io(io::Error),
    /// Not an envelope of a version this build reads.
    BadHeader(&'static str),
    /// A chunk failed authentication, or the stream was truncated or extended.
    Corrupt,
    /// The data key is not 32 bytes.
    BadDataKey,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Io(e) => write!(f, "{e}"),
            EnvelopeError::BadHeader(why) => write!(f, "not a readable envelope: {why}"),
            EnvelopeError::Corrupt => f.write_str("the encrypted data is corrupt, truncated or not from this envelope"),
            EnvelopeError::BadDataKey => f.write_str("the data key is not 32 bytes (AES-256)"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

impl From<io::Error> for EnvelopeError {
    fn from(e: io::Error) -> Self {
        EnvelopeError::Io(e)
    }
}

/// The encryption context in the same canonical form the service binds (sorted, length-prefixed).
///
/// ```
/// let ctx = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into();
/// let bytes = kms_client::envelope::canonical_context(&ctx);
/// // A count, then each key and value with its length, in key order.
/// assert_eq!(&bytes[..4], &[0, 0, 0, 2]);
/// assert_eq!(&bytes[4..9], &[0, 0, 0, 1, b'a']);
/// ```
pub fn canonical_context(ctx: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
    for (k, v) in ctx {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn parse_context(mut b: &[u8]) -> Option<BTreeMap<String, String>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    fn u32_at(b: &mut &[u8]) -> Option<usize> {
        take(b, 4).map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as usize)
    }
    let count = u32_at(&mut b)?;
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let k = u32_at(&mut b)?;
        let k = String::from_utf8(take(&mut b, k)?.to_vec()).ok()?;
        let v = u32_at(&mut b)?;
        let v = String::from_utf8(take(&mut b, v)?.to_vec()).ok()?;
        if map.insert(k, v).is_some() {
            return None;
        }
    }
    b.is_empty().then_some(map)
}

/// A parsed header: what is needed to ask the service for the data key.
#[derive(Debug, Clone)]
pub struct Header {
    pub context: BTreeMap<String, String>,
    pub wrapped_key: Vec<u8>,
    chunk: usize,
    prefix: [u8; PREFIX],
    bytes: Vec<u8>,
}

impl Header {
    /// The header of a new envelope: its context, the wrapped data key the service returned
    /// with the data key, and a random nonce prefix (fresh for every envelope).
    ///
    /// ```
    /// use kms_client::envelope::{Header, open, seal};
    /// // In a workload the data key and its wrapped form come from `DataClient::generate_data_key`.
    /// let data_key = [7u8; 32];
    /// let ctx = std::collections::BTreeMap::from([("file".to_string(), "report.pdf".to_string())]);
    /// let header = Header::new(ctx, b"wrapped data key".to_vec(), [1, 2, 3, 4, 5, 6, 7]);
    /// let mut sealed = Vec::new();
    /// seal(&header, &data_key, &mut &b"the secret report"[..], &mut sealed)?;
    ///
    /// let mut input = &sealed[..];
    /// let read = Header::read(&mut input)?; // what is needed to ask the service for the key
    /// assert_eq!(read.wrapped_key, b"wrapped data key");
    /// let mut plain = Vec::new();
    /// open(&read, &data_key, &mut input, &mut plain)?;
    /// assert_eq!(plain, b"the secret report");
    /// # Ok::<(), kms_client::envelope::EnvelopeError>(())
    /// ```
    pub fn new(context: BTreeMap<String, String>, wrapped_key: Vec<u8>, prefix: [u8; PREFIX]) -> Header {
        let ctx = canonical_context(&context);
        let mut bytes = Vec::with_capacity(24 + ctx.len() + wrapped_key.len());
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&(CHUNK as u32).to_be_bytes());
        bytes.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&ctx);
        bytes.extend_from_slice(&(wrapped_key.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&wrapped_key);
        bytes.extend_from_slice(&prefix);
        Header { context, wrapped_key, chunk: CHUNK, prefix, bytes }
    }

    /// Reads an envelope's header (see [`Header::new`] for a round trip); refuses anything
    /// that is not a version-1 envelope.
    ///
    /// ```
    /// let e = kms_client::envelope::Header::read(&mut &b"not an envelope"[..]).unwrap_err();
    /// assert!(e.to_string().contains("not"), "{e}");
    /// ```
    pub fn read(r: &mut impl Read) -> Result<Header, EnvelopeError> {
        let mut fixed = [0u8; 13];
        r.read_exact(&mut fixed).map_err(|_| EnvelopeError::BadHeader("too short"))?;
        if &fixed[0..4] != MAGIC {
            return Err(EnvelopeError::BadHeader("bad magic"));
        }
        if fixed[4] != VERSION {
            return Err(EnvelopeError::BadHeader("unknown version"));
        }
        let chunk = u32::from_be_bytes([fixed[5], fixed[6], fixed[7], fixed[8]]);
        let ctx_len = u32::from_be_bytes([fixed[9], fixed[10], fixed[11], fixed[12]]);
        if chunk == 0 || chunk > MAX_CHUNK || ctx_len > MAX_CONTEXT_BYTES {
            return Err(EnvelopeError::BadHeader("sizes out of range"));
        }
        let mut ctx = vec![0u8; ctx_len as usize];
        r.read_exact(&mut ctx).map_err(|_| EnvelopeError::BadHeader("too short"))?;
        let context = parse_context(&ctx).ok_or(EnvelopeError::BadHeader("bad encryption context"))?;
        let mut len = [0u8; 2];
        r.read_exact(&mut len).map_err(|_| EnvelopeError::BadHeader("too short"))?;
        let mut wrapped_key = vec![0u8; u16::from_be_bytes(len) as usize];
        r.read_exact(&mut wrapped_key).map_err(|_| EnvelopeError::BadHeader("too short"))?;
        let mut prefix = [0u8; PREFIX];
        r.read_exact(&mut prefix).map_err(|_| EnvelopeError::BadHeader("too short"))?;
        let mut bytes = fixed.to_vec();
        bytes.extend_from_slice(&ctx);
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&wrapped_key);
        bytes.extend_from_slice(&prefix);
        Ok(Header { context, wrapped_key, chunk: chunk as usize, prefix, bytes })
    }

    fn nonce(&self, index: u32, last: bool) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..PREFIX].copy_from_slice(&self.prefix);
        n[PREFIX..11].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        n
    }
}

fn cipher(data_key: &[u8]) -> Result<Aes256Gcm, EnvelopeError> {
    Aes256Gcm::new_from_slice(data_key).map_err(|_| EnvelopeError::BadDataKey)
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `input` to `output` under `data_key`; returns the plaintext length. Example at
/// [`Header::new`].
pub fn seal(header: &Header, data_key: &[u8], input: &mut impl BufRead, output: &mut impl Write) -> Result<u64, EnvelopeError> {
    let aead = cipher(data_key)?;
    output.write_all(&header.bytes)?;
    let mut buf = Zeroizing::new(vec![0u8; header.chunk + TAG]);
    let mut total = 0u64;
    let mut index = 0u32;
    loop {
        let n = fill(input, &mut buf[..header.chunk])?;
        let last = n < header.chunk || input.fill_buf()?.is_empty();
        let mut chunk = buf[..n].to_vec();
        aead.encrypt_in_place(Nonce::from_slice(&header.nonce(index, last)), &header.bytes, &mut chunk).map_err(|_| EnvelopeError::Corrupt)?;
        output.write_all(&chunk)?;
        total += n as u64;
        if last {
            return Ok(total);
        }
        index = index.checked_add(1).ok_or(EnvelopeError::BadHeader("too many chunks"))?;
    }
}

/// Decrypts the chunks after `header` from `input` to `output`; returns the plaintext length.
/// Nothing is written for a chunk that fails authentication, but earlier chunks may have been:
/// write to a temporary file and rename it only on success. Example at [`Header::new`]; a
/// changed byte is refused:
///
/// ```
/// use kms_client::envelope::{Header, open, seal};
/// let header = Header::new(Default::default(), b"w".to_vec(), [0; 7]);
/// let mut sealed = Vec::new();
/// seal(&header, &[9u8; 32], &mut &b"data"[..], &mut sealed)?;
/// let last = sealed.len() - 1;
/// sealed[last] ^= 1;
/// let mut input = &sealed[..];
/// let header = Header::read(&mut input)?;
/// assert!(open(&header, &[9u8; 32], &mut input, &mut Vec::new()).is_err());
/// # Ok::<(), kms_client::envelope::EnvelopeError>(())
/// ```
pub fn open(header: &Header, data_key: &[u8], input: &mut impl BufRead, output: &mut impl Write) -> Result<u64, EnvelopeError> {
    let aead = cipher(data_key)?;
    let mut buf = Zeroizing::new(vec![0u8; header.chunk + TAG]);
    let mut total = 0u64;
    let mut index = 0u32;
    loop {
        let n = fill(input, &mut buf)?;
        if n < TAG {
            return Err(EnvelopeError::Corrupt);
        }
        let last = n < buf.len() || input.fill_buf()?.is_empty();
        let mut chunk = Zeroizing::new(buf[..n].to_vec());
        aead.decrypt_in_place(Nonce::from_slice(&header.nonce(index, last)), &header.bytes, &mut *chunk).map_err(|_| EnvelopeError::Corrupt)?;
        output.write_all(&chunk)?;
        total += chunk.len() as u64;
        if last {
            return Ok(total);
        }
        index = index.checked_add(1).ok_or(EnvelopeError::Corrupt)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn round_trip(len: usize) {
        let key = [7u8; 32];
        let ctx: BTreeMap<String, String> = [("app".to_string(), "x".to_string())].into();
        let header = Header::new(ctx.clone(), vec![1, 2, 3], [9; PREFIX]);
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut sealed = Vec::new();
        seal(&header, &key, &mut Cursor::new(&data), &mut sealed).unwrap();
        let mut r = Cursor::new(&sealed);
        let parsed = Header::read(&mut r).unwrap();
        assert_eq!(parsed.context, ctx);
        assert_eq!(parsed.wrapped_key, vec![1, 2, 3]);
        let mut out = Vec::new();
        open(&parsed, &key, &mut r, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
            round_trip(len);
        }
    }

    #[test]
    fn truncation_and_tampering_are_detected() {
        let key = [7u8; 32];
        let header = Header::new(BTreeMap::new(), vec![1], [0; PREFIX]);
        let data = vec![5u8; 2 * CHUNK];
        let mut sealed = Vec::new();
        seal(&header, &key, &mut Cursor::new(&data), &mut sealed).unwrap();
        let header_len = header.bytes.len();
        let cuts = [
            sealed[..header_len + CHUNK + TAG].to_vec(), // a whole chunk dropped at a boundary
            sealed[..sealed.len() - 1].to_vec(),
            {
                let mut v = sealed.clone();
                v[header_len + 10] ^= 1;
                v
            },
            {
                let mut v = sealed.clone();
                v.push(0);
                v
            },
        ];
        for bad in cuts {
            let mut r = Cursor::new(&bad);
            let parsed = Header::read(&mut r).unwrap();
            assert!(matches!(open(&parsed, &key, &mut r, &mut Vec::new()), Err(EnvelopeError::Corrupt)));
        }
    }
}
