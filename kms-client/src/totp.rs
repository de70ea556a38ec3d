//! TOTP codes (RFC 6238: HMAC-SHA-1, 30-second steps, six digits), for `kmsctl login --dev`,
//! which logs the development officer in from the secret `kms-server dev` wrote beside its
//! database. Real officers type the code from their authenticator app.

/// The code of a base32 secret at Unix time `now`; `None` for a malformed secret.
///
/// ```
/// // RFC 6238's SHA-1 test secret ("12345678901234567890"), at 59 s: 287082 (the last six digits
/// // of the RFC's eight).
/// assert_eq!(kms_client::totp::code("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", 59).as_deref(), Some("287082"));
/// assert_eq!(kms_client::totp::code("not base32!", 59), None);
/// ```
pub fn code(base32_secret: &str, now: u64) -> Option<String> {
    let secret = totp_rs::Secret::try_from_base32(base32_secret.trim()).ok()?;
    let totp =
        totp_rs::Builder::new().with_algorithm(totp_rs::Algorithm::SHA1).with_digits(6).with_step_duration(30).with_secret(secret).build().ok()?;
    Some(totp.generate(now).to_string())
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
