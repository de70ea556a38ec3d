//! The gRPC contract of the key management service, package `kms.v1`.
//!
//! The `.proto` file under `kms/v1/` is the source of truth and documents every field, limit and
//! error. This crate compiles it at build time (protox, no system `protoc`) and exposes the
//! generated messages, clients and servers, plus the encoded file descriptor set that the
//! server's reflection service publishes.
//!
//! Messages that carry a plaintext (a data key, a secret, random bytes) have a `Debug` that prints
//! only the plaintext's length, so that no `{:?}` can leak one.

#![allow(missing_docs, clippy::all)]

pub mod v1 {
    tonic::include_proto!("kms.v1");

    /// The request metadata asking for a dry run of a changing admin call (`1` or `true`; `0`
    /// or `false` for none; any other value is refused), as `service KeyManagement` documents.
    pub const DRY_RUN_HEADER: &str = "kms-dry-run";
    /// The response metadata of a dry run: what the call would change (UTF-8).
    pub const DRY_RUN_ANSWER_HEADER: &str = "kms-dry-run-bin";
    /// The request metadata giving the reason for a change (printable ASCII, at most 256
    /// characters): kept with the approval request a quorum policy makes of the call.
    pub const REASON_HEADER: &str = "kms-reason";
    /// The error metadata of a call a quorum policy covers: the approval request it made.
    pub const APPROVAL_REQUEST_HEADER: &str = "kms-approval-request";
    /// The request metadata that runs an approved request whose result goes to its requester
    /// (a backup, an export, an import): the request's id.
    pub const APPROVAL_HEADER: &str = "kms-approval";

    use std::fmt;

    /// Prints `<N bytes redacted>` in place of a secret.
    struct Redacted(usize);

    impl fmt::Debug for Redacted {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "<{} bytes redacted>", self.0)
        }
    }

    impl fmt::Debug for GenerateDataKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GenerateDataKeyResponse")
                .field("key_id", &self.key_id)
                .field("key_version", &self.key_version)
                .field("plaintext", &Redacted(self.plaintext.len()))
                .field("ciphertext_blob", &self.ciphertext_blob.len())
                .field("revocation_epoch", &self.revocation_epoch)
                .finish()
        }
    }

    impl fmt::Debug for EncryptRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EncryptRequest")
                .field("key_id", &self.key_id)
                .field("plaintext", &Redacted(self.plaintext.len()))
                .field("encryption_context", &self.encryption_context)
                .finish()
        }
    }

    impl fmt::Debug for DecryptResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("DecryptResponse")
                .field("key_id", &self.key_id)
                .field("key_version", &self.key_version)
                .field("plaintext", &Redacted(self.plaintext.len()))
                .field("revocation_epoch", &self.revocation_epoch)
                .finish()
        }
    }

    impl fmt::Debug for GenerateRandomResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GenerateRandomResponse").field("plaintext", &Redacted(self.plaintext.len())).finish()
        }
    }

    impl fmt::Debug for LoginRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("LoginRequest")
                .field("name", &self.name)
                .field("passphrase", &Redacted(self.passphrase.len()))
                .field("totp_code", &Redacted(self.totp_code.len()))
                .finish()
        }
    }

    impl fmt::Debug for VoteRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("VoteRequest")
                .field("id", &self.id)
                .field("passphrase", &Redacted(self.passphrase.len()))
                .field("totp_code", &Redacted(self.totp_code.len()))
                .finish()
        }
    }

    impl fmt::Debug for CreateSubscriptionResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateSubscriptionResponse")
                .field("subscription", &self.subscription)
                .field("secret", &Redacted(self.secret.len()))
                .finish()
        }
    }

    impl fmt::Debug for LoginResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("LoginResponse")
                .field("session_token", &Redacted(self.session_token.len()))
                .field("expiration_time", &self.expiration_time)
                .field("role", &self.role)
                .finish()
        }
    }

    impl fmt::Debug for CreateOfficerRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateOfficerRequest")
                .field("name", &self.name)
                .field("role", &self.role)
                .field("passphrase", &Redacted(self.passphrase.len()))
                .finish()
        }
    }

    impl fmt::Debug for CreateOfficerResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateOfficerResponse").field("otpauth_uri", &Redacted(self.otpauth_uri.len())).finish()
        }
    }

    impl fmt::Debug for ChangePassphraseRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ChangePassphraseRequest")
                .field("current_passphrase", &Redacted(self.current_passphrase.len()))
                .field("new_passphrase", &Redacted(self.new_passphrase.len()))
                .finish()
        }
    }

    impl fmt::Debug for ReenrollTotpResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ReenrollTotpResponse").field("otpauth_uri", &Redacted(self.otpauth_uri.len())).finish()
        }
    }

    impl fmt::Debug for XksCredentialResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("XksCredentialResponse")
                .field("key_store", &self.key_store)
                .field("access_key_id", &self.access_key_id)
                .field("secret_access_key", &Redacted(self.secret_access_key.len()))
                .finish()
        }
    }

    /// Messages that carry a secret wipe it when dropped, on both sides of the wire, so a data
    /// key, a passphrase or a session token does not linger in freed memory. (The copy in the HTTP/2 buffers that gRPC
    /// encodes into is outside our reach; ARCHITECTURE.md lists it.) Because of this `Drop`,
    /// take the plaintext out with `std::mem::take(&mut response.plaintext)`.
    macro_rules! wipe_on_drop {
        ($($message:ty => $($field:ident),+;)*) => {$(
            impl Drop for $message {
                fn drop(&mut self) {
                    $(zeroize::Zeroize::zeroize(&mut self.$field);)+
                }
            }
        )*};
    }

    wipe_on_drop! {
        GenerateDataKeyResponse => plaintext;
        EncryptRequest => plaintext;
        DecryptResponse => plaintext;
        GenerateRandomResponse => plaintext;
        LoginRequest => passphrase, totp_code;
        VoteRequest => passphrase, totp_code;
        CreateSubscriptionResponse => secret;
        LoginResponse => session_token;
        CreateOfficerRequest => passphrase;
        CreateOfficerResponse => otpauth_uri;
        ChangePassphraseRequest => current_passphrase, new_passphrase;
        ReenrollTotpResponse => otpauth_uri;
        XksCredentialResponse => secret_access_key;
    }

    /// The encoded `FileDescriptorSet` of `kms.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kms_descriptor.bin"));
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn debug_of_plaintext_messages_hides_the_bytes() {
        let secret = vec![0xA5u8; 32];
        let mut gdk = GenerateDataKeyResponse::default();
        gdk.plaintext = secret.clone();
        let mut enc = EncryptRequest::default();
        enc.plaintext = secret.clone();
        let mut dec = DecryptResponse::default();
        dec.plaintext = secret.clone();
        let rendered =
            [format!("{gdk:?}"), format!("{enc:?}"), format!("{dec:?}"), format!("{:?}", GenerateRandomResponse { plaintext: secret.clone() })];
        for text in rendered {
            assert!(text.contains("<32 bytes redacted>"), "{text}");
            assert!(!text.contains("165"), "a byte value leaked: {text}");
        }
        let mut login = LoginRequest::default();
        login.name = "ana".into();
        login.passphrase = "hunter2-hunter2".into();
        login.totp_code = "123456".into();
        let text = format!("{login:?}");
        assert!(text.contains("ana") && !text.contains("hunter2") && !text.contains("123456"), "{text}");
        let mut vote = VoteRequest::default();
        vote.id = "R-1".into();
        vote.passphrase = "hunter2-hunter2".into();
        vote.totp_code = "123456".into();
        let text = format!("{vote:?}");
        assert!(text.contains("R-1") && !text.contains("hunter2") && !text.contains("123456"), "{text}");
        let mut session = LoginResponse::default();
        session.session_token = "tok-secret".into();
        assert!(!format!("{session:?}").contains("tok-secret"));
        let mut credential = XksCredentialResponse::default();
        credential.access_key_id = "KMSXACCESSKEY".into();
        credential.secret_access_key = "c2VjcmV0LXNlY3JldA==".into();
        let text = format!("{credential:?}");
        assert!(text.contains("KMSXACCESSKEY") && !text.contains("c2VjcmV0"), "{text}");
    }
}
