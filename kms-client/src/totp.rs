//! TOTP codes (RFC 6238: HMAC-SHA-1, 30-second steps, six digits), for `kmsctl login --dev`,
//! which logs the development officer in from the secret `kms-server dev` wrote beside its
//! database. Real officers type the code from their authenticator app.

use hmac::{Hmac, Mac};

/// The code of a base32 secret at Unix time `now`; `None` for a malformed secret.
///
/// ```
/// // RFC 6238's SHA-1 test secret ("12345678901234567890"), at 59 s: 287082 (the last six digits
/// // of the RFC's eight).
/// assert_eq!(kms_client::totp::code("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", 59).as_deref(), Some("287082"));
/// assert_eq!(kms_client::totp::code("not base32!", 59), None);
/// ```
pub fn code(base32_secret: &str, now: u64) -> Option<String> {
    let secret = decode_base32(base32_secret.trim())?;
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&secret).ok()?;
    mac.update(&(now / 30).to_be_bytes());
    let d = mac.finalize().into_bytes();
    let o = usize::from(d[19] & 0x0f);
    let n = u32::from_be_bytes([d[o] & 0x7f, d[o + 1], d[o + 2], d[o + 3]]) % 1_000_000;
    Some(format!("{n:06}"))
}

fn decode_base32(text: &str) -> Option<Vec<u8>> {
    let (mut out, mut bits, mut n) = (Vec::new(), 0u64, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        bits = (bits << 5) | u64::from(v);
        n += 5;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    /// RFC 6238 appendix B (SHA-1, secret "12345678901234567890", last six of eight digits).
    #[test]
    fn rfc_6238() {
        let secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        assert_eq!(super::code(secret, 59).unwrap(), "287082");
        assert_eq!(super::code(secret, 1_111_111_109).unwrap(), "081804");
        assert_eq!(super::code("not base32!", 59), None);
    }
}
