//! SoftHSM2 token provisioning for development and tests.
//!
//! Every development server and every test gets a token of its own: a `softhsm2.conf` pointing at
//! a private token directory, a token initialised with fresh random PINs, and the user PIN in a
//! file readable only by its owner. Nothing here is used by a production deployment, which points
//! the service at the customer's HSM module, slot and PIN instead.
//!
//! Tokens are initialised with `softhsm2-util` (shipped with Debian's `softhsm2` package) rather
//! than through PKCS#11 in this process, because SoftHSM reads `SOFTHSM2_CONF` once per process
//! and a test process must be free to open several tokens.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use zeroize::Zeroizing;

/// Where Debian, Ubuntu and source builds install the SoftHSM2 PKCS#11 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The name of the environment variable SoftHSM2 reads its configuration path from.
pub const SOFTHSM2_CONF: &str = "SOFTHSM2_CONF";

/// Why a token could not be provisioned.
#[derive(Debug)]
pub enum Error {
    /// The SoftHSM2 module or `softhsm2-util` is not installed.
    NotInstalled { what: &'static str },
    /// A file of the token could not be read or written.
    Io { path: PathBuf, source: io::Error },
    /// `softhsm2-util` failed; `stderr` is its own message (it never contains a PIN).
    Util { status: String, stderr: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotInstalled { what } => write!(
                f,
                "{what} not found: install SoftHSM2 (Debian/Ubuntu package `softhsm2`), \
                 or run `cargo xtask dev`, which installs it"
            ),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Util { status, stderr } => {
                write!(f, "softhsm2-util failed ({status}): {}", stderr.trim())
            }
        }
    }
}

impl std::error::Error for Error {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Finds the SoftHSM2 PKCS#11 module: `SOFTHSM2_MODULE` if set, else the usual install paths.
pub fn find_module() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(path));
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(Error::NotInstalled { what: "the SoftHSM2 PKCS#11 module (libsofthsm2.so)" })
}

/// A SoftHSM2 token provisioned under one directory.
///
/// Layout: `DIR/softhsm2.conf`, `DIR/tokens/` (the token's object files), `DIR/user.pin` and
/// `DIR/so.pin` (mode 0600). The service itself never reads the SO PIN: it is kept for the one
/// provisioning step that needs the security officer, making the trusted backup key
/// (`kms-server backup-key create`), which on a real HSM is a key ceremony.
#[derive(Debug, Clone)]
pub struct Token {
    /// The directory holding the configuration, the token and the PIN file.
    pub dir: PathBuf,
    /// The value to give `SOFTHSM2_CONF` in the process that opens the token.
    pub conf: PathBuf,
    /// The PKCS#11 module to load.
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    /// A file holding the user PIN, readable only by its owner.
    pub pin_file: PathBuf,
    /// A file holding the security officer's PIN, readable only by its owner.
    pub so_pin_file: PathBuf,
}

impl Token {
    /// Opens the token provisioned in `dir`, or provisions a new one there with `label`.
    pub fn open_or_provision(dir: &Path, label: &str) -> Result<Token, Error> {
        let token = Token::layout(dir, label)?;
        if token.pin_file.exists() && token.conf.exists() {
            return Ok(token);
        }
        token.provision()?;
        Ok(token)
    }

    fn layout(dir: &Path, label: &str) -> Result<Token, Error> {
        Ok(Token {
            dir: dir.to_path_buf(),
            conf: dir.join("softhsm2.conf"),
            module: find_module()?,
            label: label.to_string(),
            pin_file: dir.join("user.pin"),
            so_pin_file: dir.join("so.pin"),
        })
    }

    fn provision(&self) -> Result<(), Error> {
        let tokens = self.dir.join("tokens");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&tokens).map_err(io_err(&tokens))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&self.dir))?;
        let conf = format!(
            "# Written by hsm-sim for a development or test token.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n\
             slots.mechanisms = ALL\n\
             library.reset_on_fork = false\n",
            tokens.display()
        );
        let _ = fs::remove_file(&self.conf);
        write_private(&self.conf, conf.as_bytes())?;

        let user_pin = random_pin()?;
        let so_pin = random_pin()?;
        let output = Command::new("softhsm2-util")
            .env(SOFTHSM2_CONF, &self.conf)
            .args(["--init-token", "--free", "--label", &self.label, "--so-pin"])
            .arg(so_pin.as_str())
            .arg("--pin")
            .arg(user_pin.as_str())
            .output()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::NotInstalled { what: "softhsm2-util" },
                _ => Error::Io { path: PathBuf::from("softhsm2-util"), source: e },
            })?;
        if !output.status.success() {
            return Err(Error::Util { status: output.status.to_string(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() });
        }
        write_private(&self.so_pin_file, so_pin.as_bytes())?;
        write_private(&self.pin_file, user_pin.as_bytes())
    }
}

/// A 24-character PIN from the kernel's random generator (hex, so any token accepts it).
fn random_pin() -> Result<Zeroizing<String>, Error> {
    let path = Path::new("/dev/urandom");
    let mut bytes = Zeroizing::new([0u8; 12]);
    fs::File::open(path).and_then(|mut f| f.read_exact(bytes.as_mut())).map_err(io_err(path))?;
    let mut pin = Zeroizing::new(String::with_capacity(24));
    for b in bytes.iter() {
        pin.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        pin.push(char::from(b"0123456789abcdef"[usize::from(b & 0x0f)]));
    }
    Ok(pin)
}

/// Writes `contents` to a new file that only its owner can read (mode 0600 from creation on).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisions_a_token_with_a_private_pin_file_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::open_or_provision(dir.path(), "unit").unwrap();
        let mode = fs::metadata(&token.pin_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&token.so_pin_file).unwrap().permissions().mode() & 0o777, 0o600);
        let pin = fs::read_to_string(&token.pin_file).unwrap();
        assert_eq!(pin.len(), 24);
        assert!(fs::read_to_string(&token.conf).unwrap().contains("directories.tokendir"));
        // A second call finds the same token instead of making another.
        let again = Token::open_or_provision(dir.path(), "unit").unwrap();
        assert_eq!(fs::read_to_string(&again.pin_file).unwrap(), pin);
    }

    #[test]
    fn pins_differ_between_tokens() {
        assert_ne!(*random_pin().unwrap(), *random_pin().unwrap());
    }
}
