//! Backup files: their format, and the offline restore (`kms-server restore`).
//!
//! A backup is one file (docs/file-format.md has the byte layout):
//!
//! ```text
//! MAGIC (8) | manifest length (u32 BE) | manifest (JSON) | MAC (32) | objects | database
//! ```
//!
//! * the **manifest** says what the file holds (when, by which version, from which token, how
//!   many keys, versions and audit records) and carries the length and SHA-256 of the two
//!   sections after it;
//! * the **MAC** is HMAC-SHA-256 of the magic and the manifest, computed in the HSM with the
//!   audit key (`ServiceKey::AuditMac`), so that a file is accepted only if this service's keys
//!   made it, and a change of any bit anywhere is refused (the sections through their hashes);
//! * the **objects** section holds every live key version's HSM object and the service's own
//!   extractable keys, each wrapped in the HSM under the security officer's trusted backup key
//!   (`CKM_AES_KEY_WRAP_PAD`): no key value is ever in clear outside the HSM;
//! * the **database** is a consistent SQLite snapshot (`VACUUM INTO`): metadata, grants,
//!   officers, and the audit trail with a checkpoint signed just before the snapshot.

pub mod restore;

use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hsm::{ObjectName, ServiceKey, Wrapped};

pub use restore::{read_key_list, restore};

/// The first bytes of every backup file (format 1).
pub const MAGIC: &[u8; 8] = b"KMSBAK\x00\x01";
/// The length of the MAC after the manifest.
pub const MAC_LEN: usize = 32;
/// A manifest is a short summary; anything longer is not one of ours.
pub const MAX_MANIFEST: usize = 16 * 1024;
/// The service keys a backup carries (the health canary is not extractable and is made anew).
pub const SERVICE_KEYS: [ServiceKey; 2] = [ServiceKey::AuditMac, ServiceKey::OfficerSecrets];

/// What a backup file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Unix seconds.
    pub created_at: i64,
    pub service_version: String,
    pub token_label: String,
    pub token_serial: String,
    /// The label of the trusted key every object is wrapped under.
    pub backup_key_label: String,
    /// Keys and live versions (those with material) in the snapshot.
    pub keys: u64,
    pub live_versions: u64,
    /// The audit checkpoint signed just before the snapshot: the trail up to it is in the
    /// database section.
    pub audit_checkpoint_seq: i64,
    pub objects: Section,
    pub database: Section,
}

/// The length and SHA-256 (hex) of a section of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub count: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl Section {
    pub fn of(count: u64, bytes: u64, digest: Sha256) -> Section {
        Section { count, bytes, sha256: hex(&digest.finalize()) }
    }
}

pub use crate::domain::hex::hex;

impl Manifest {
    /// The length of the whole file whose manifest, as written, is `manifest_len` bytes long.
    pub fn file_bytes(&self, manifest_len: usize) -> u64 {
        (MAGIC.len() + 4 + manifest_len + MAC_LEN) as u64 + self.objects.bytes + self.database.bytes
    }
}

/// What the HSM signs: a domain tag (so that no audit checkpoint MAC can pass for a backup's),
/// the magic and the manifest as written.
pub fn mac_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = b"kms-backup-v1\0".to_vec();
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(manifest);
    m
}

/// Why a file is not a backup this service can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a valid backup file: {}", self.0)
    }
}

impl std::error::Error for FormatError {}

fn bad(what: impl Into<String>) -> FormatError {
    FormatError(what.into())
}

/// The head of a backup file: the manifest as written (the MAC covers these bytes), parsed, and
/// the MAC.
#[derive(Debug, Clone)]
pub struct Header {
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub mac: [u8; MAC_LEN],
}

impl Header {
    /// The bytes of the head, as the file starts: `manifest` is the JSON the MAC was made over.
    pub fn encode(manifest: &[u8], mac: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
        out.extend_from_slice(manifest);
        out.extend_from_slice(mac);
        out
    }

    /// Reads the head of a file.
    pub fn read(r: &mut impl Read) -> Result<Header, FormatError> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| bad("shorter than its magic number"))?;
        if &magic != MAGIC {
            return Err(bad("wrong magic number (not a backup, or a format this version cannot read)"));
        }
        let mut len = [0u8; 4];
        r.read_exact(&mut len).map_err(|_| bad("truncated before the manifest length"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MANIFEST {
            return Err(bad(format!("manifest length {len} is over {MAX_MANIFEST}")));
        }
        let mut manifest_bytes = vec![0u8; len];
        r.read_exact(&mut manifest_bytes).map_err(|_| bad("truncated in the manifest"))?;
        let mut mac = [0u8; MAC_LEN];
        r.read_exact(&mut mac).map_err(|_| bad("truncated in the MAC"))?;
        let manifest = Header::parse_manifest(&manifest_bytes)?;
        Ok(Header { manifest_bytes, manifest, mac })
    }

    pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, FormatError> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        if manifest.format != 1 {
            return Err(bad(format!("format {} (this version reads format 1)", manifest.format)));
        }
        Ok(manifest)
    }
}

/// One wrapped object of the objects section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedObject {
    pub what: Wrapped,
    pub wrapped: Vec<u8>,
}

impl WrappedObject {
    pub fn label(&self) -> String {
        match self.what {
            Wrapped::Version(name) => name.label(),
            Wrapped::Service(which) => which.label().to_string(),
        }
    }

    /// `u16 label length | label | u16 wrapped length | wrapped`, big-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let label = self.label();
        out.extend_from_slice(&(label.len() as u16).to_be_bytes());
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&(self.wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped);
    }
}

fn wrapped_from_label(label: &str) -> Option<Wrapped> {
    if let Some(name) = ObjectName::from_label(label) {
        return Some(Wrapped::Version(name));
    }
    SERVICE_KEYS.into_iter().find(|k| k.label() == label).map(Wrapped::Service)
}

/// Parses the objects section (already checked against its hash).
pub fn parse_objects(mut bytes: &[u8], count: u64) -> Result<Vec<WrappedObject>, FormatError> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if bytes.len() < n {
            return Err(bad(format!("objects section truncated in {what}")));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    let len = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let n = len(take(&mut bytes, 2, "a label length")?);
        let label = std::str::from_utf8(take(&mut bytes, n, "a label")?).map_err(|_| bad("an object label is not UTF-8"))?;
        let what = wrapped_from_label(label).ok_or_else(|| bad(format!("unknown object label {label:?}")))?;
        let n = len(take(&mut bytes, 2, "a wrapped length")?);
        let wrapped = take(&mut bytes, n, "a wrapped key")?.to_vec();
        out.push(WrappedObject { what, wrapped });
    }
    if out.len() as u64 != count {
        return Err(bad(format!("objects section holds {} objects; the manifest says {count}", out.len())));
    }
    Ok(out)
}

/// Reads exactly `section.bytes` bytes into `sink`, checking their SHA-256 against the manifest.
pub fn copy_checked(r: &mut impl Read, section: &Section, name: &str, sink: &mut impl io::Write) -> Result<(), FormatError> {
    let mut digest = Sha256::new();
    let mut left = section.bytes;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want]).map_err(|e| bad(format!("reading the {name}: {e}")))?;
        if n == 0 {
            return Err(bad(format!("the {name} is truncated ({} of {} bytes)", section.bytes - left, section.bytes)));
        }
        digest.update(&buf[..n]);
        sink.write_all(&buf[..n]).map_err(|e| bad(format!("writing the {name}: {e}")))?;
        left -= n as u64;
    }
    if hex(&digest.finalize()) != section.sha256 {
        return Err(bad(format!("the {name} does not match its hash in the manifest")));
    }
    Ok(())
}

/// Checks that nothing follows the last section.
pub fn expect_end(r: &mut impl Read) -> Result<(), FormatError> {
    let mut byte = [0u8; 1];
    match r.read(&mut byte) {
        Ok(0) => Ok(()),
        _ => Err(bad("bytes after the database section")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::KeyId;

    fn manifest() -> Manifest {
        let empty = Section::of(0, 0, Sha256::new());
        Manifest {
            format: 1,
            created_at: 1,
            service_version: "0.1.0".into(),
            token_label: "t".into(),
            token_serial: "s".into(),
            backup_key_label: "kms-backup-wrap".into(),
            keys: 0,
            live_versions: 0,
            audit_checkpoint_seq: 3,
            objects: empty.clone(),
            database: empty,
        }
    }

    #[test]
    fn heads_and_objects_round_trip() {
        let head = Header::encode(&serde_json::to_vec(&manifest()).unwrap(), &[7; MAC_LEN]);
        let read = Header::read(&mut &head[..]).unwrap();
        assert_eq!(read.manifest, manifest());
        assert_eq!(read.mac, [7; MAC_LEN]);

        let objects = [
            WrappedObject { what: Wrapped::Version(ObjectName { key_id: KeyId::from_bytes([3; 16]), version: 2 }), wrapped: vec![1; 40] },
            WrappedObject { what: Wrapped::Service(ServiceKey::AuditMac), wrapped: vec![2; 40] },
        ];
        let mut bytes = Vec::new();
        objects.iter().for_each(|o| o.encode(&mut bytes));
        assert_eq!(parse_objects(&bytes, 2).unwrap(), objects);
        assert!(parse_objects(&bytes, 3).is_err());
        assert!(parse_objects(&bytes[..bytes.len() - 1], 2).is_err());
    }

    #[test]
    fn every_truncation_and_a_foreign_magic_are_refused() {
        let head = Header::encode(&serde_json::to_vec(&manifest()).unwrap(), &[7; MAC_LEN]);
        for n in 0..head.len() {
            assert!(Header::read(&mut &head[..n]).is_err(), "truncated at {n}");
        }
        let mut other = head.clone();
        other[7] = 2;
        assert!(Header::read(&mut &other[..]).unwrap_err().0.contains("magic"));
    }

    #[test]
    fn a_section_must_match_its_hash_and_length() {
        let data = b"database bytes".to_vec();
        let mut digest = Sha256::new();
        digest.update(&data);
        let section = Section::of(1, data.len() as u64, digest);
        assert!(copy_checked(&mut &data[..], &section, "database", &mut io::sink()).is_ok());
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        assert!(copy_checked(&mut &flipped[..], &section, "database", &mut io::sink()).is_err());
        assert!(copy_checked(&mut &data[..5], &section, "database", &mut io::sink()).is_err());
    }
}
