//! The domain code alone: no HSM, no I/O.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kms_server::domain::blob::{Blob, BlobHeader, IV_LEN, Iv};
use kms_server::domain::context::EncryptionContext;
use kms_server::domain::ids::KeyId;

fn context(pairs: usize) -> EncryptionContext {
    let map: HashMap<String, String> = (0..pairs).map(|i| (format!("key-{i}"), format!("value-{i}"))).collect();
    EncryptionContext::new(map).expect("a valid context")
}

fn blob(c: &mut Criterion) {
    let header = BlobHeader { key_id: KeyId::from_bytes([7; 16]), version: 3, iv: Iv([1; IV_LEN]) };
    let ciphertext = [0u8; 48];
    let encoded = Blob::encode(&header, &ciphertext);
    let mut g = c.benchmark_group("blob");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_32B_data_key", |b| b.iter(|| Blob::encode(black_box(&header), black_box(&ciphertext))));
    g.bench_function("parse_32B_data_key", |b| b.iter(|| Blob::parse(black_box(&encoded))));
    let ctx = context(4);
    g.bench_function("aad_4_pairs", |b| b.iter(|| black_box(&header).aad(black_box(&ctx))));
    g.finish();
}

fn canonical_context(c: &mut Criterion) {
    let mut g = c.benchmark_group("encryption_context");
    g.throughput(Throughput::Elements(1));
    for pairs in [1, 8, 64] {
        let map: HashMap<String, String> = (0..pairs).map(|i| (format!("key-{i}"), format!("value-{i}"))).collect();
        g.bench_function(format!("validate_and_canonicalise_{pairs}_pairs"), |b| {
            b.iter(|| EncryptionContext::new(black_box(map.clone())).map(|c| c.canonical_bytes()))
        });
    }
    g.finish();
}

criterion_group!(benches, blob, canonical_context);
criterion_main!(benches);
