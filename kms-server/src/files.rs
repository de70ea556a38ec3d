//! Files and directories the service writes, private to the service's user whatever the umask.
//!
//! The database holds the audit trail (principals, officers' names, callers' user names and
//! reasons, encryption contexts) and the keys' metadata; Level 2 counts administrators'
//! identities and logs as sensitive technical data. So every file the service makes is created
//! mode 0600 and every directory 0700 (the mode is given at creation, and a umask only ever
//! removes bits from it), and the service refuses to start on a database that other accounts
//! can read (`Config::validate`).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Read and write for the owner only.
pub const PRIVATE_FILE: u32 = 0o600;
/// Everything for the owner only.
pub const PRIVATE_DIR: u32 = 0o700;

/// Makes `path` and its missing parents, each new one mode 0700 (existing ones are left as the
/// operator made them; `Config::validate` refuses a data directory others may write).
pub fn create_dir(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(path)
}

/// Creates a new file, mode 0600; fails if it exists.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(PRIVATE_FILE).open(path)
}

/// Creates or truncates a file and makes it mode 0600 (a file that existed keeps its mode when
/// opened, so it is set again).
pub fn create(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).mode(PRIVATE_FILE).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    Ok(file)
}

/// Writes a whole file, mode 0600.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    create(path)?.write_all(contents)
}

/// The permission bits of `path` when its group or other accounts have any access to it; `None`
/// when only its owner has, or when it does not exist.
pub fn exposed(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_directories_are_private_and_exposure_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir(&nested).unwrap();
        for d in [dir.path().join("a"), nested.clone()] {
            assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, PRIVATE_DIR);
        }
        let file = nested.join("f");
        write(&file, b"x").unwrap();
        assert_eq!(exposed(&file), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(exposed(&file), Some(0o644));
        write(&file, b"y").unwrap();
        assert_eq!(exposed(&file), None, "rewriting a file makes it private again");
        assert!(create_new(&file).is_err());
        assert_eq!(exposed(&dir.path().join("missing")), None);
    }
}
