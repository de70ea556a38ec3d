//! Types that hold secrets.
//!
//! Each is wiped when dropped, has no `Clone`, `Display` or `Serialize`, and its `Debug` prints
//! only a length. Reaching the bytes takes an explicit, greppable call: `expose_secret`.

use std::fmt;

use zeroize::Zeroizing;

/// Secret bytes: a data key in clear, a decrypted plaintext, random bytes for a caller.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// A zero-filled buffer of `len` bytes, to be written in place.
    pub fn zeroed(len: usize) -> Self {
        SecretBytes(Zeroizing::new(vec![0; len]))
    }

    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Moves the bytes out, for a response message that wipes itself on drop (`kms-proto`).
    pub fn into_exposed_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes>)", self.0.len())
    }
}

/// A secret read as text from a file or an environment variable at startup: the HSM user PIN,
/// the PostgreSQL password.
pub struct SecretText(Zeroizing<String>);

/// The HSM user PIN.
pub type Pin = SecretText;

impl SecretText {
    /// Takes the secret, without the trailing newline a file usually has.
    pub fn new(mut text: String) -> Self {
        while text.ends_with('\n') || text.ends_with('\r') {
            text.pop();
        }
        SecretText(Zeroizing::new(text))
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A second copy, also wiped on drop: for the HSM layer, which keeps the PIN to log in again
    /// after the HSM lost the login. No `Clone`, so that every copy is deliberate.
    pub fn clone_secret(&self) -> SecretText {
        SecretText(self.0.clone())
    }
}

/// A secret field of a request's JSON (a bearer token, a data key in Base64, a private key): taken
/// as it is, wiped when dropped, redacted in `Debug`.
impl<'de> serde::Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| SecretText(Zeroizing::new(s)))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_only_the_length() {
        let key = SecretBytes::new(vec![0x41; 32]);
        assert_eq!(format!("{key:?}"), "SecretBytes(<32 bytes>)");
        let pin = Pin::new("123456\n".to_string());
        assert_eq!(format!("{pin:?}"), "SecretText(<redacted>)");
        assert_eq!(pin.expose_secret(), "123456");
    }
}
