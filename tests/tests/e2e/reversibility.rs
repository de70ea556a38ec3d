//! Issue 18: reversibility and BYOK. A bundle exported by instance A under instance B's import
//! parameters is imported into a fresh B, and every blob A made decrypts on B; a customer
//! unwraps an export with OpenSSL alone; key material wrapped offline under import parameters
//! becomes a key; wrong, used and expired tokens are refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use kms_proto::v1 as pb;
use kms_tests::{Server, create_key, ctx, gdk, grant_all};
use sha2::Digest;

fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn refused(out: &std::process::Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded where it must fail ({why})");
    assert!(stderr.contains(why), "expected {why:?} in: {stderr}");
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl").args(args).output().expect("openssl runs")
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The HSM's security officer's ceremony on `server` for the customer key in `pem`.
fn ceremony(server: &Server, pem: &Path) {
    let out = server.server_command(&["export-key", "--so-pin-file", &path(&server.token.so_pin_file), "--public-key", &path(pem)]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("one export can run"));
}

/// Import parameters from `server`: (token, public key file).
fn import_parameters(server: &Server, name: &str) -> (String, PathBuf) {
    let pem = server.dir.path().join(name);
    let params = ok(&server.kmsctl(&["--json", "key", "import-parameters", "--public-key-out", &path(&pem)]));
    let token = params["import_token"].as_str().unwrap().to_string();
    assert!(std::fs::read_to_string(&pem).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
    let text = String::from_utf8(openssl(&["pkey", "-pubin", "-in", &path(&pem), "-text", "-noout"]).stdout).unwrap();
    assert!(text.contains("3072 bit"), "{text}");
    (token, pem)
}

async fn decrypt(data: &mut pb::crypto_client::CryptoClient<kms_client::Channel>, blob: &[u8], n: usize) -> Result<Vec<u8>, tonic::Status> {
    let request = pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(&[("n", &n.to_string())]),
        key_id: String::new(),
        caller_context: None,
    };
    data.decrypt(request).await.map(|r| std::mem::take(&mut r.into_inner().plaintext))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_exported_by_a_into_a_fresh_b_decrypts_every_blob_a_made() {
    let a = Server::start();
    let b = Server::start();
    let mut admin = a.admin().await;
    let mut data = a.data().await;
    let keys = [create_key(&mut admin, "payroll").await, create_key(&mut admin, "hr").await];
    let mut blobs = Vec::new();
    for _round in 0..2 {
        for key in &keys {
            let n = blobs.len();
            let mut r = data.generate_data_key(gdk(key, &[("n", &n.to_string())])).await.unwrap().into_inner();
            blobs.push((std::mem::take(&mut r.ciphertext_blob), std::mem::take(&mut r.plaintext)));
        }
        admin.rotate_key(pb::RotateKeyRequest { key_id: keys[0].clone() }).await.unwrap();
    }
    admin.disable_key(pb::DisableKeyRequest { key_id: keys[1].clone() }).await.unwrap();
    // Enough keys that the bundle is larger than one message of the admin plane (64 KiB).
    const MORE: usize = 120;
    for n in 0..MORE {
        let key = pb::CreateKeyRequest { description: format!("bulk key {n}"), alias: String::new(), rotation_period_seconds: 0 };
        admin.create_key(key).await.unwrap();
    }
    let a_versions = admin.list_key_versions(pb::ListKeyVersionsRequest { key_id: keys[0].clone() }).await.unwrap().into_inner().versions;
    assert_eq!(a_versions.len(), 3);

    let (token, b_pem) = import_parameters(&b, "b-import.pem");
    let bundle = a.dir.path().join("bundle");
    let export = |out: &Path| a.kmsctl(&["--json", "export", "--to-public-key", &path(&b_pem), "--out", &path(out)]);
    refused(&export(&bundle), "kms-server export-key");
    assert!(!bundle.exists());
    ceremony(&a, &b_pem);
    let made = ok(&export(&bundle));
    assert_eq!((made["keys"].as_u64(), made["versions"].as_u64()), (Some(2 + MORE as u64), Some(4 + MORE as u64)), "{made}");
    // The trusted key served one export.
    refused(&export(&a.dir.path().join("again")), "kms-server export-key");

    // Nothing in the bundle is a key or a data key in clear, nor an encryption context value.
    let manifest = std::fs::read_to_string(bundle.join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(m["scheme"], "RSAES_OAEP_SHA_1");
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [bundle.clone(), bundle.join("versions")] {
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700, "{}", dir.display());
        }
        assert_eq!(std::fs::metadata(bundle.join("manifest.json")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert_eq!(m["audit"]["verified"], true);
    let mut files = vec![bundle.join("manifest.json"), bundle.join("audit.jsonl")];
    for entry in std::fs::read_dir(bundle.join("versions")).unwrap() {
        let file = entry.unwrap().path();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 384, "one RSA-OAEP block under RSA-3072");
        files.push(file);
    }
    for (_, plaintext) in &blobs {
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            assert!(!bytes.windows(plaintext.len()).any(|w| w == plaintext.as_slice()), "a data key is in {} in clear", file.display());
        }
    }
    let audit = std::fs::read_to_string(bundle.join("audit.jsonl")).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"ExportKeys\"")), "the export's own record is in the exported trail");

    // B refuses a token it never issued, an expired one and a malformed one, and imports nothing.
    let import = |token: &str| b.kmsctl(&["--json", "import", "--token", token, "--bundle", &path(&bundle)]);
    refused(&import("4102444800-0123456789abcdef"), "names no import parameters");
    refused(&import("1000000000-0123456789abcdef"), "expired");
    refused(&import("not-a-token"), "is not an import token");
    // A changed bundle is refused whole.
    let changed = a.dir.path().join("changed");
    kms_tests::copy_dir(&bundle, &changed).unwrap();
    let first = std::fs::read_dir(changed.join("versions")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&first, bytes).unwrap();
    refused(&b.kmsctl(&["import", "--token", &token, "--bundle", &path(&changed)]), "does not match the manifest");

    let imported = ok(&import(&token));
    let ids: Vec<&str> = imported["key_ids"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2 + MORE);
    assert!(keys.iter().all(|k| ids.contains(&k.as_str())), "{ids:?}");
    assert_eq!(imported["versions"], 4 + MORE);
    let bundle_bytes: u64 = std::fs::read_dir(bundle.join("versions")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>()
        + std::fs::metadata(bundle.join("manifest.json")).unwrap().len();
    assert!(bundle_bytes > 64 * 1024, "{bundle_bytes}");
    refused(&import(&token), "names no import parameters");

    // On B: the same keys, states, aliases and usage counts; every blob of A decrypts.
    let mut b_admin = b.admin().await;
    let described = b_admin.describe_key(pb::DescribeKeyRequest { key_id: "alias/payroll".into() }).await.unwrap().into_inner();
    assert_eq!(described.key.unwrap().key_id, keys[0]);
    let hr = b_admin.describe_key(pb::DescribeKeyRequest { key_id: keys[1].clone() }).await.unwrap().into_inner().key.unwrap();
    assert_eq!((hr.state, hr.origin.as_str()), (pb::KeyState::Disabled as i32, "external"));
    let on_a = admin.describe_key(pb::DescribeKeyRequest { key_id: keys[1].clone() }).await.unwrap().into_inner().key.unwrap();
    assert_eq!(on_a.origin, "hsm");
    let b_versions = b_admin.list_key_versions(pb::ListKeyVersionsRequest { key_id: keys[0].clone() }).await.unwrap().into_inner().versions;
    let states = |v: &[pb::KeyVersion]| v.iter().map(|v| (v.version, v.state, v.primary)).collect::<Vec<_>>();
    assert_eq!(states(&b_versions), states(&a_versions));
    // B counts what A had reserved in its store: never fewer encryptions than A made.
    for (b_version, a_version) in b_versions.iter().zip(&a_versions) {
        assert!(
            b_version.encryptions >= a_version.encryptions && b_version.encryptions > 0 || a_version.encryptions == 0,
            "{b_version:?} {a_version:?}"
        );
    }
    b_admin.enable_key(pb::EnableKeyRequest { key_id: keys[1].clone() }).await.unwrap();
    for key in &keys {
        grant_all(&mut b_admin, key).await;
    }
    let mut b_data = b.data().await;
    for (n, (blob, plaintext)) in blobs.iter().enumerate() {
        assert_eq!(&decrypt(&mut b_data, blob, n).await.unwrap(), plaintext, "blob {n} of A decrypts on B");
    }
    let audit = b.kmsctl(&["audit", "verify"]);
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_customer_unwraps_an_export_with_openssl_alone() {
    let a = Server::start();
    let mut admin = a.admin().await;
    let key = create_key(&mut admin, "ledger").await;
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    let dir = a.dir.path();
    let private = dir.join("customer-key.pem");
    let public = dir.join("customer.pem");
    ok(&openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", &path(&private)]));
    ok(&openssl(&["pkey", "-in", &path(&private), "-pubout", "-out", &path(&public)]));
    ceremony(&a, &public);
    let bundle = dir.join("bundle");
    ok(&a.kmsctl(&["export", "--to-public-key", &path(&public), "--out", &path(&bundle)]));

    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let der = openssl(&["pkey", "-pubin", "-in", &path(&public), "-outform", "DER"]).stdout;
    assert_eq!(m["public_key_sha256"].as_str().unwrap(), kms_server::domain::hex::hex(&sha2::Sha256::digest(&der)));

    let unwrap = |file: &Path| {
        openssl(&[
            "pkeyutl",
            "-decrypt",
            "-inkey",
            &path(&private),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha1",
            "-in",
            &path(file),
        ])
    };
    let mut values = Vec::new();
    for version in [1, 2] {
        let file = bundle.join("versions").join(format!("{key}.{version}.bin"));
        let out = unwrap(&file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout.len(), 32, "version {version} is an AES-256 key");
        values.push(out.stdout);
        // RSA-OAEP checks its own integrity: a changed byte does not decrypt.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[20] ^= 1;
        let tampered = dir.join("tampered.bin");
        std::fs::write(&tampered, bytes).unwrap();
        assert!(!unwrap(&tampered).status.success());
    }
    assert_ne!(values[0], values[1]);
}

/// `kmsctl key import` of wrapped material on `server`.
fn import(server: &Server, token: &str, file: &Path, scheme: &str, alias: &str) -> std::process::Output {
    server.kmsctl(&["--json", "key", "import", "--token", token, "--material", &path(file), "--wrapping-algorithm", scheme, "--alias", alias])
}

/// Key material wrapped offline with OpenSSL under import parameters (AWS's RSAES_OAEP_SHA_1)
/// becomes a new key that encrypts and decrypts; anything else is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn key_material_wrapped_offline_is_imported_as_a_key_of_external_origin() {
    let mut b = Server::start();
    let dir = b.dir.path();
    let material = dir.join("material.bin");
    std::fs::write(&material, [7u8; 32]).unwrap();
    let oaep = |pem: &Path, output: &Path| {
        ok(&openssl(&[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            &path(pem),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha1",
            "-in",
            &path(&material),
            "-out",
            &path(output),
        ]))
    };
    let (token, pem) = import_parameters(&b, "p1.pem");
    // No one with the user PIN can use the import key to unwrap a readable key.
    let attacked: serde_json::Value = serde_json::from_slice(&b.inspect(&format!("attack-import:kms-import:{token}"))).unwrap();
    assert_eq!(
        (attacked["readable"].as_bool(), attacked["exportable"].as_bool(), attacked["guarded"].as_bool()),
        (Some(false), Some(false), Some(true)),
        "{attacked}"
    );
    let wrapped = dir.join("wrapped.bin");
    oaep(&pem, &wrapped);
    refused(&import(&b, &token, &wrapped, "RSA_AES_KEY_WRAP_SHA_1", "byok-1"), "this service takes RSAES_OAEP_SHA_1");
    refused(&import(&b, &token, &material, "RSAES_OAEP_SHA_1", "byok-1"), "is 32 bytes");
    // Material wrapped under other parameters does not unwrap, and uses nothing up.
    let (other_token, _) = import_parameters(&b, "p2.pem");
    refused(&import(&b, &other_token, &wrapped, "RSAES_OAEP_SHA_1", "byok-1"), "does not unwrap");
    let one = ok(&import(&b, &token, &wrapped, "RSAES_OAEP_SHA_1", "byok-1"));
    refused(&import(&b, &token, &wrapped, "RSAES_OAEP_SHA_1", "byok-1b"), "names no import parameters");
    let (token, pem) = import_parameters(&b, "p3.pem");
    oaep(&pem, &wrapped);
    let two = ok(&import(&b, &token, &wrapped, "RSAES_OAEP_SHA_1", "byok-2"));

    let mut admin = b.admin().await;
    let mut data = b.data().await;
    for key in [&one, &two] {
        let key_id = key["key_id"].as_str().unwrap().to_string();
        grant_all(&mut admin, &key_id).await;
        let r = data.generate_data_key(gdk(&key_id, &[("n", "0")])).await.unwrap().into_inner();
        assert_eq!(decrypt(&mut data, &r.ciphertext_blob, 0).await.unwrap(), r.plaintext);
    }
    for key in [&one, &two] {
        assert_eq!(key["origin"], "external", "{key}");
    }
    // The evidence report counts them as imported, not as a problem.
    let report = b.dir.path().join("report.json");
    ok(&b.kmsctl(&["report", "dgssi", "--format", "json", "--out", &path(&report)]));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let keys_item = report["report"]["items"].as_array().unwrap().iter().find(|i| i["id"] == "keys-in-the-hsm").unwrap().clone();
    assert_eq!(keys_item["verdict"], "pass", "{keys_item}");
    assert!(keys_item.to_string().contains("2 of them imported"), "{keys_item}");
    let trail = b.kmsctl(&["audit", "export"]);
    let trail = String::from_utf8_lossy(&trail.stdout);
    assert_eq!(trail.lines().filter(|l| l.contains("\"ImportKey\"") && l.contains("origin external")).count(), 2, "{trail}");

    // Parameters a day old are refused, and removed from the HSM when new ones are made.
    let (stale, pem) = import_parameters(&b, "p4.pem");
    oaep(&pem, &wrapped);
    drop((admin, data));
    b.options.sweep_clock_offset = 24 * 3600 + 60;
    b.restart();
    b.relogin();
    refused(&import(&b, &stale, &wrapped, "RSAES_OAEP_SHA_1", "byok-late"), "expired");
    let labels = || serde_json::from_slice::<Vec<String>>(&b.inspect("labels")).unwrap();
    assert_eq!(labels().iter().filter(|l| l.contains(&stale)).count(), 2, "both halves are there until new parameters are made");
    import_parameters(&b, "p5.pem");
    assert!(!labels().iter().any(|l| l.contains(&stale)), "the expired pair is gone: {:?}", labels());
}
