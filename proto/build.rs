//! Compiles `kms/v1/kms.proto` with protox (pure Rust, no system `protoc`) and generates the
//! tonic services. Messages that carry plaintext get no derived `Debug`: `src/lib.rs` gives them
//! a redacting one, so a `{:?}` anywhere cannot print a data key or a secret.

use prost::Message;

/// Messages with a secret field (a plaintext, a passphrase, a session token, a TOTP enrolment);
/// their `Debug` is written by hand in `src/lib.rs`.
const REDACTED: &[&str] = &[
    "kms.v1.GenerateDataKeyResponse",
    "kms.v1.EncryptRequest",
    "kms.v1.DecryptResponse",
    "kms.v1.GenerateRandomResponse",
    "kms.v1.LoginRequest",
    "kms.v1.LoginResponse",
    "kms.v1.CreateOfficerRequest",
    "kms.v1.CreateOfficerResponse",
    "kms.v1.ChangePassphraseRequest",
    "kms.v1.ReenrollTotpResponse",
    "kms.v1.XksCredentialResponse",
    "kms.v1.VoteRequest",
    "kms.v1.CreateSubscriptionResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kms");
    let fds = protox::compile(["kms/v1/kms.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kms_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().skip_debug(REDACTED.iter().copied()).compile_fds(fds)?;
    Ok(())
}
