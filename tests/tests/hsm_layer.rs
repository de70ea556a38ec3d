//! The HSM layer alone (`kms_server::hsm::Pkcs11Hsm`) on SoftHSM2: AES-GCM under a key version
//! round-trips and binds its associated data, reconciliation finds each version once, and a
//! destroyed version neither encrypts nor decrypts any more.
//!
//! PKCS#11 is initialised once per process and SoftHSM2 reads its configuration from the
//! environment at that moment, so the test provisions a token and re-runs itself in a child
//! process with `SOFTHSM2_CONF` set; the child does the work.

use kms_server::domain::blob::Iv;
use kms_server::domain::ids::KeyId;
use kms_server::hsm::pkcs11::Pkcs11Hsm;
use kms_server::hsm::{Hsm, HsmError, ObjectName};
use kms_server::secret::Pin;

const CHILD: &str = "KMS_HSM_LAYER_CHILD";

#[test]
fn key_versions_encrypt_decrypt_and_die_on_destroy() {
    if std::env::var_os(CHILD).is_none() {
        let dir = tempfile::tempdir().unwrap();
        let token = hsm_sim::Token::open_or_provision(&dir.path().join("softhsm"), "kms-hsm-layer").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "key_versions_encrypt_decrypt_and_die_on_destroy", "--nocapture"])
            .env(CHILD, &token.module)
            .env("KMS_HSM_LAYER_PIN", &token.pin_file)
            .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "the child ran no test:\n{stdout}");
        return;
    }
    let module = std::path::PathBuf::from(std::env::var_os(CHILD).unwrap());
    let pin = Pin::new(std::fs::read_to_string(std::env::var_os("KMS_HSM_LAYER_PIN").unwrap()).unwrap().trim().to_string());
    let hsm = Pkcs11Hsm::open(&module, "kms-hsm-layer", &pin, 2).unwrap();

    let name = ObjectName { key_id: KeyId::from_bytes([7; 16]), version: 1 };
    let key = hsm.generate_key(&name).unwrap();
    let iv = Iv([1; 12]);
    let sealed = hsm.encrypt(key, &iv, b"aad", b"data key bytes").unwrap();
    assert_eq!(sealed.len(), 14 + 16, "ciphertext and a 128-bit tag");
    assert_eq!(hsm.decrypt(key, &iv, b"aad", &sealed).unwrap().expose_secret(), b"data key bytes");
    assert_eq!(hsm.decrypt(key, &iv, b"other", &sealed).unwrap_err(), HsmError::DecryptFailed);
    assert_eq!(hsm.decrypt(key, &Iv([2; 12]), b"aad", &sealed).unwrap_err(), HsmError::DecryptFailed);

    // Startup reconciliation sees one object per key version.
    let found = hsm.find_keys().unwrap();
    assert_eq!(found.iter().filter(|(n, _)| *n == name).count(), 1, "{found:?}");

    hsm.destroy(key).unwrap();
    assert!(matches!(hsm.encrypt(key, &iv, b"aad", b"x"), Err(HsmError::Unavailable { .. })));
    assert!(hsm.decrypt(key, &iv, b"aad", &sealed).is_err());
    assert!(hsm.find_keys().unwrap().iter().all(|(n, _)| *n != name));
}
