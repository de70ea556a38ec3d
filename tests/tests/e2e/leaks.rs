//! TESTPLAN R9: the secret-leak scan. A run at trace logging that handles data keys, plaintexts,
//! random bytes, an officer's passphrase, TOTP secret and session token, and the HSM PIN; then
//! every log line, the database and its WAL, the audit export, a backup file, a reversibility
//! export, the evidence report, the events sent to syslog and kmsctl's other outputs are
//! searched for each secret, raw, in hex and in base64; the export's manifest, the report and
//! the events for an encryption context's value too.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kms_proto::v1 as pb;
use kms_tests::{Options, Server, create_key};

fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    vec![secret.to_vec(), hex.clone().into_bytes(), hex.to_uppercase().into_bytes(), B64.encode(secret).into_bytes()]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() >= 8 && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_logs_database_audit_or_cli_output() {
    let mut server = Server::start_with(Options { log: "trace", backup_key: true, ..Default::default() });
    // Every event, to a syslog socket of the test's.
    let syslog_path = server.dir.path().join("syslog.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&syslog_path).unwrap();
    let url = format!("syslog://{}", syslog_path.display());
    assert!(server.kmsctl(&["notify", "add", &url, "--min-severity", "info"]).status.success());
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "leaks").await;
    let mut data = server.data().await;
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..5 {
        let mut gdk = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                key_spec: 1,
                number_of_bytes: 0,
                encryption_context: Default::default(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        let data_key = std::mem::take(&mut gdk.plaintext);
        let mut dec = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: gdk.ciphertext_blob.clone(),
                encryption_context: Default::default(),
                key_id: String::new(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(std::mem::take(&mut dec.plaintext), data_key);
        secrets.push((format!("data key {i}"), data_key));
        let plaintext = format!("plaintext secret number {i} !!").into_bytes();
        data.encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: plaintext.clone(),
            encryption_context: Default::default(),
            caller_context: None,
        })
        .await
        .unwrap();
        secrets.push((format!("plaintext {i}"), plaintext));
        let mut random = data.generate_random(pb::GenerateRandomRequest { number_of_bytes: 32, caller_context: None }).await.unwrap().into_inner();
        secrets.push((format!("random {i}"), std::mem::take(&mut random.plaintext)));
    }
    // An officer with a passphrase, a TOTP secret and a session; a failed login too.
    let pass = "leak-test passphrase 5";
    let created = admin
        .create_officer(pb::CreateOfficerRequest { name: "eve".into(), role: "auditor".into(), passphrase: pass.into() })
        .await
        .unwrap()
        .into_inner();
    let totp = kms_tests::otpauth_secret(&created.otpauth_uri);
    let mut session = kms_proto::v1::session_client::SessionClient::new(server.channel(&server.admin_addr).await);
    let _ =
        session.login(pb::LoginRequest { name: "eve".into(), passphrase: "wrong-but-secret passphrase".into(), totp_code: "000000".into() }).await;
    let mut ok = session
        .login(pb::LoginRequest { name: "eve".into(), passphrase: pass.into(), totp_code: kms_tests::totp_now(&totp, 0) })
        .await
        .unwrap()
        .into_inner();
    let token = std::mem::take(&mut ok.session_token);
    server.admin_as(Some(&token)).await.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    secrets.push(("passphrase".into(), pass.as_bytes().to_vec()));
    secrets.push(("wrong passphrase".into(), b"wrong-but-secret passphrase".to_vec()));
    secrets.push(("TOTP secret (base32)".into(), totp.clone().into_bytes()));
    secrets.push(("TOTP secret".into(), kms_server::domain::officer::base32_decode(&totp).unwrap()));
    secrets.push(("session token".into(), token.clone().into_bytes()));
    secrets.push(("bootstrap officer session".into(), server.session.clone().into_bytes()));
    secrets.push(("bootstrap passphrase".into(), kms_tests::OFFICER_PASSPHRASE.as_bytes().to_vec()));
    secrets.push(("HSM PIN".into(), std::fs::read_to_string(&server.token.pin_file).unwrap().trim().as_bytes().to_vec()));

    // An encryption context's value: in the audit trail by design, never in an event, the
    // export's manifest or the report.
    let context_value = "context-value-that-stays-in-the-trail";
    data.encrypt(pb::EncryptRequest {
        key_id: key.clone(),
        plaintext: b"under a context".to_vec(),
        encryption_context: kms_tests::ctx(&[("project", context_value)]),
        caller_context: None,
    })
    .await
    .unwrap();

    // Outputs that must hold no secret: kmsctl's listings and the audit export.
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    for args in [
        &["--json", "key", "list"][..],
        &["--json", "audit", "list", "--limit", "1000"],
        &["audit", "export"],
        &["--json", "review"],
        &["key", "describe", "alias/leaks"],
    ] {
        let out = server.kmsctl(args);
        assert!(out.status.success(), "{args:?}");
        outputs.push((format!("kmsctl {args:?}"), [out.stdout, out.stderr].concat()));
    }
    let failed = server.kmsctl(&["key", "describe", "alias/none"]);
    outputs.push(("kmsctl error".into(), failed.stderr));
    // A backup holds every key, wrapped, and a snapshot of the database: no secret in clear.
    let backup = server.dir.path().join("leaks.kmsbak");
    let out = server.kmsctl(&["backup", "create", "--out", &backup.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    outputs.push(("backup file".into(), std::fs::read(&backup).unwrap()));
    // A reversibility export, under a customer key the security officer trusted, and the
    // evidence report: neither holds a secret nor a context value.
    let dir = server.dir.path().to_path_buf();
    let (private, public) = (dir.join("customer-key.pem"), dir.join("customer.pem"));
    let openssl = |args: &[&str]| assert!(std::process::Command::new("openssl").args(args).status().unwrap().success());
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", private.to_str().unwrap()]);
    openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    let so_pin = server.token.so_pin_file.display().to_string();
    assert!(server.server_command(&["export-key", "--so-pin-file", &so_pin, "--public-key", public.to_str().unwrap()]).unwrap().status.success());
    let bundle = dir.join("bundle");
    let out = server.kmsctl(&["export", "--to-public-key", public.to_str().unwrap(), "--out", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut no_context: Vec<(String, Vec<u8>)> = vec![("export manifest".into(), std::fs::read(bundle.join("manifest.json")).unwrap())];
    for entry in std::fs::read_dir(bundle.join("versions")).unwrap() {
        let path = entry.unwrap().path();
        no_context.push((path.display().to_string(), std::fs::read(path).unwrap()));
    }
    outputs.push(("exported audit trail".into(), std::fs::read(bundle.join("audit.jsonl")).unwrap()));
    for format in ["json", "html"] {
        let report = dir.join(format!("report.{format}"));
        assert!(server.kmsctl(&["report", "dgssi", "--format", format, "--out", report.to_str().unwrap()]).status.success());
        no_context.push((format!("evidence report ({format})"), std::fs::read(report).unwrap()));
    }
    // The events delivered to syslog so far (the export, a critical one, among them).
    syslog.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut events = Vec::new();
    let mut buffer = vec![0u8; 65_536];
    while !String::from_utf8_lossy(&events).contains("ExportKeys") {
        let n = syslog.recv(&mut buffer).expect("the events reach syslog");
        events.extend_from_slice(&buffer[..n]);
    }
    no_context.push(("syslog events".into(), events));
    // The scan finds the value where it is on purpose: the audit trail.
    assert!(outputs.iter().any(|(n, bytes)| n == "exported audit trail" && contains(bytes, context_value.as_bytes())));
    for (where_, bytes) in &no_context {
        assert!(!contains(bytes, context_value.as_bytes()), "the context value found in {where_}");
    }
    outputs.extend(no_context);
    server.stop();
    for file in ["server.log", "kms.db", "kms.db-wal"] {
        let path = server.dir.path().join(file);
        if path.exists() {
            outputs.push((file.to_string(), std::fs::read(path).unwrap()));
        }
    }
    let log = String::from_utf8_lossy(&outputs.iter().find(|(n, _)| n == "server.log").unwrap().1).to_string();
    assert!(log.lines().count() > 100, "trace logging was on");

    // The scan finds what it looks for: the session file kmsctl keeps on purpose holds a token.
    let session_file = std::fs::read(server.session_path()).unwrap();
    assert!(forms(server.session.as_bytes()).iter().any(|f| contains(&session_file, f)));

    for (name, secret) in &secrets {
        for form in forms(secret) {
            for (where_, bytes) in &outputs {
                assert!(!contains(bytes, &form), "{name} found in {where_}");
            }
        }
    }
}
