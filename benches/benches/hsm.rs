//! The HSM layer alone, on SoftHSM2 through cryptoki: the physical limit of the service.
//!
//! `encrypt_32B` and `decrypt_32B` are AES-GCM under a key version, as the service uses it:
//! under its session copy (the default, `hsm.session_copies`) and under its token object (with
//! copies off, or before the copy is made); `data_plane_work` is what one GenerateDataKey costs
//! the HSM: a 12-byte IV and a 32-byte data key from the generator, then AES-GCM of the data key.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kms_benches::{on_threads, softhsm_process};
use kms_server::domain::blob::Iv;
use kms_server::domain::ids::KeyId;
use kms_server::hsm::pkcs11::{Pkcs11Hsm, create_backup_key};
use kms_server::hsm::{Hsm, HsmError, KeyHandle, ObjectName};
use kms_server::secret::Pin;

/// Opens the token with session copies on (they need the backup key pair) and returns it with a
/// key version whose copy is in use.
fn with_copy(token: &hsm_sim::Token, pin: &Pin) -> (std::sync::Arc<Pkcs11Hsm>, KeyHandle) {
    let so_pin = Pin::new(std::fs::read_to_string(&token.so_pin_file).expect("SO PIN file").trim().to_string());
    create_backup_key(&token.module, &token.label, pin, &so_pin).expect("the backup key pair");
    let hsm = std::sync::Arc::new(Pkcs11Hsm::open(&token.module, &token.label, pin, 4).expect("the token opens"));
    let version = hsm.generate_key(&ObjectName { key_id: KeyId::from_bytes([8; 16]), version: 1 }).expect("a key version");
    assert!(session_copy_in_use(&hsm, version).expect("session copies"));
    (hsm, version)
}

/// Turns session copies on for `hsm` (a copy at most) and waits, at most 5 s, until `key`'s copy
/// is in use, as the service's own key versions are under load; `false` when the token holds no
/// backup key pair to make one with. Every warm-up encryption draws a fresh IV: AES-GCM must
/// never see an IV twice under one key.
fn session_copy_in_use(hsm: &std::sync::Arc<Pkcs11Hsm>, key: KeyHandle) -> Result<bool, HsmError> {
    if !hsm.start_session_copies(1)? {
        return Ok(false);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while hsm.sessions().copies != Some(1) {
        if Instant::now() > until {
            return Err(HsmError::Setup { reason: "the session copy was not made within 5 s".into() });
        }
        let mut iv = [0u8; 12];
        hsm.random(&mut iv)?;
        hsm.encrypt(key, &Iv(iv), b"", &[0; 32])?;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(true)
}

fn hsm(c: &mut Criterion) {
    let token = softhsm_process("kms-bench-hsm");
    let pin = Pin::new(std::fs::read_to_string(&token.pin_file).expect("PIN file").trim().to_string());
    let (hsm, copied) = with_copy(&token, &pin);
    let token_object = hsm.generate_key(&ObjectName { key_id: KeyId::from_bytes([9; 16]), version: 1 }).expect("a key version");
    let iv = Iv([3; 12]);

    let mut g = c.benchmark_group("hsm");
    g.throughput(Throughput::Elements(1));
    for threads in [1, 2] {
        g.bench_function(format!("random_32B/{threads}_threads"), |b| {
            b.iter_custom(|n| {
                on_threads(threads, n, || {
                    let mut out = [0u8; 32];
                    hsm.random(&mut out).expect("random");
                    black_box(out);
                })
            })
        });
        // The token object is never copied: the one copy allowed went to `copied`.
        for (object, version) in [("session_copy", copied), ("token_object", token_object)] {
            let blob = hsm.encrypt(version, &iv, b"aad", &[7; 32]).expect("encrypt");
            g.bench_function(format!("encrypt_32B/{object}/{threads}_threads"), |b| {
                b.iter_custom(|n| on_threads(threads, n, || drop(black_box(hsm.encrypt(version, &iv, b"aad", &[7; 32]).expect("encrypt")))))
            });
            g.bench_function(format!("decrypt_32B/{object}/{threads}_threads"), |b| {
                b.iter_custom(|n| on_threads(threads, n, || drop(black_box(hsm.decrypt(version, &iv, b"aad", &blob).expect("decrypt")))))
            });
            g.bench_function(format!("data_plane_work/{object}/{threads}_threads"), |b| {
                b.iter_custom(|n| {
                    on_threads(threads, n, || {
                        let mut fresh = [0u8; 44];
                        hsm.random(&mut fresh).expect("random");
                        let iv = Iv(fresh[..12].try_into().expect("12 bytes"));
                        drop(black_box(hsm.encrypt(version, &iv, b"aad", &fresh[12..]).expect("encrypt")));
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, hsm);
criterion_main!(benches);
