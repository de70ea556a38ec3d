//! The AWS external key store facade (XKS Proxy API v1) through its real HTTPS listener, every
//! request signed by curl's own SigV4 (`--aws-sigv4`, the signer AWS's XKS test client uses),
//! so that the server is not only checked against its own verifier.

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kms_proto::v1 as pb;
use kms_tests::{Admin, Server};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub(crate) const REGION: &str = "eu-west-3";

/// A key store's credential.
#[derive(Clone)]
pub(crate) struct Credential {
    pub(crate) id: String,
    pub(crate) secret: String,
}

/// Sends `body` to `path` on the XKS listener, signed by curl with `credential` for `region`;
/// the HTTP status and the JSON answer.
pub(crate) fn xks(server: &Server, method: &str, path: &str, body: &Value, credential: &Credential, region: &str) -> (u16, Value) {
    xks_over(&[], server, method, path, body, credential, region)
}

/// `xks`, with more curl options (`--http1.1`).
fn xks_over(options: &[&str], server: &Server, method: &str, path: &str, body: &Value, credential: &Credential, region: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(options)
        .args(["--silent", "--show-error", "--max-time", "10", "--request", method])
        .arg("--cacert")
        .arg(server.pki_dir().join("ca.pem"))
        .args(["--aws-sigv4", &format!("aws:amz:{region}:kms-xks-proxy")])
        .args(["--user", &format!("{}:{}", credential.id, credential.secret)])
        .args(["--header", "content-type: application/json", "--data-binary", &body.to_string()])
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("https://{}{path}", server.xks_addr))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (json, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(json).unwrap_or(Value::Null))
}

pub(crate) fn metadata(operation: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/s3-writer",
        "kmsKeyArn": "arn:aws:kms:eu-west-3:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": operation,
        "kmsRequestId": format!("req-{operation}-4112f4d6"),
        "kmsViaService": "s3",
    })
}

/// An Encrypt request of `plaintext`, as AWS KMS sends it for an Encrypt.
pub(crate) fn encrypt_body(plaintext: &[u8]) -> Value {
    json!({"requestMetadata": metadata("Encrypt"), "plaintext": B64.encode(plaintext), "encryptionAlgorithm": "AES_GCM"})
}

/// The Decrypt request of what an Encrypt answered (`sealed`), with `aad` if there was one.
pub(crate) fn decrypt_body(sealed: &Value, aad: Option<&[u8]>) -> Value {
    let mut body = json!({"requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM", "ciphertext": sealed["ciphertext"],
                          "initializationVector": sealed["initializationVector"], "authenticationTag": sealed["authenticationTag"],
                          "ciphertextMetadata": sealed["ciphertextMetadata"]});
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(B64.encode(aad));
    }
    body
}

pub(crate) async fn key_store(admin: &mut Admin, name: &str, prefix: &str) -> Credential {
    let r = admin
        .create_xks_key_store(pb::CreateXksKeyStoreRequest { name: name.into(), uri_prefix: prefix.into(), region: REGION.into() })
        .await
        .expect("key store created")
        .into_inner();
    Credential { id: r.access_key_id.clone(), secret: r.secret_access_key.clone() }
}

pub(crate) async fn allow(admin: &mut Admin, store: &str, key: &str, operations: &[&str]) {
    admin
        .create_grant(pb::CreateGrantRequest {
            principal: format!("xks:{store}"),
            key_id: key.into(),
            operations: operations.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("grant created");
}

pub(crate) async fn new_key(admin: &mut Admin, alias: &str) -> String {
    admin
        .create_key(pb::CreateKeyRequest { description: String::new(), alias: alias.into(), rotation_period_seconds: 0 })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().expect("a Base64 string")).expect("Base64")
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_encrypts_and_decrypts_under_our_keys_signed_by_an_independent_signer() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "s3").await;
    let credential = key_store(&mut admin, "aws-prod", "/aws/prod").await;
    assert!((20..=30).contains(&credential.id.len()) && credential.id.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)));
    assert!((43..=64).contains(&credential.secret.len()));
    allow(&mut admin, "aws-prod", &key, &["Encrypt", "Decrypt"]).await;
    let call = |path: &str, body: Value| xks(&server, "POST", &format!("/aws/prod/kms/xks/v1{path}"), &body, &credential, REGION);

    // Health: the deep check's answer.
    let (status, health) = call("/health", json!({"requestMetadata": {"kmsRequestId": "h1", "kmsOperation": "KmsHealthCheck"}}));
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["ekmFleetDetails"][0]["healthStatus"], "ACTIVE", "{health}");
    assert_eq!(health["xksProxyFleetSize"], 1);
    // The load balancers' check: a plain GET, no signature needed, no HSM call.
    let nobody = Credential { id: "NOBODY".into(), secret: "x".into() };
    assert_eq!(xks(&server, "GET", "/ping", &json!({}), &nobody, REGION), (200, json!({"status": "ACTIVE"})));
    // HTTP/1.1 as well as HTTP/2 (the spec: the proxy must be able to fall back to 1.1).
    let body = json!({"requestMetadata": {"kmsRequestId": "h2", "kmsOperation": "KmsHealthCheck"}});
    assert_eq!(xks_over(&["--http1.1"], &server, "POST", "/aws/prod/kms/xks/v1/health", &body, &credential, REGION).0, 200);

    // Metadata: what AWS's CreateKey checks.
    let (status, meta) = call(&format!("/keys/{key}/metadata"), json!({"requestMetadata": metadata("CreateKey")}));
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta, json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}));

    // Encrypt with AAD and an integrity value; the plaintext at the spec's 4,300 bytes.
    let plaintext = vec![0x5a; 4300];
    let aad = b"bucket=payroll";
    let (status, sealed) = call(
        &format!("/keys/{key}/encrypt"),
        json!({"requestMetadata": metadata("Encrypt"), "plaintext": B64.encode(&plaintext), "encryptionAlgorithm": "AES_GCM",
               "additionalAuthenticatedData": B64.encode(aad), "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}),
    );
    assert_eq!(status, 200, "{sealed}");
    let (ct, iv, tag, md) =
        (b64(&sealed["ciphertext"]), b64(&sealed["initializationVector"]), b64(&sealed["authenticationTag"]), b64(&sealed["ciphertextMetadata"]));
    assert_eq!((ct.len(), iv.len(), tag.len()), (4300, 12, 16));
    assert_ne!(ct, plaintext);
    assert_eq!(md, [1, 0, 0, 0, 1], "the metadata names version 1");
    let cdiv: Vec<u8> = Sha256::new().chain_update(aad).chain_update(&md).chain_update(&iv).chain_update(&ct).chain_update(&tag).finalize().to_vec();
    assert_eq!(b64(&sealed["ciphertextDataIntegrityValue"]), cdiv);

    let decrypt = |sealed: &Value, aad: &[u8]| decrypt_body(sealed, Some(aad));
    let (status, opened) = call(&format!("/keys/{key}/decrypt"), decrypt(&sealed, aad));
    assert_eq!(status, 200, "{opened}");
    assert_eq!(b64(&opened["plaintext"]), plaintext);

    // Rotation: new encryptions name version 2, the old ciphertext still decrypts under 1.
    admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone() }).await.unwrap();
    let (_, sealed2) = call(&format!("/keys/{key}/encrypt"), encrypt_body(b"after rotation"));
    assert_eq!(b64(&sealed2["ciphertextMetadata"]), [1, 0, 0, 0, 2], "{sealed2}");
    assert!(sealed2.get("ciphertextDataIntegrityValue").is_none(), "not asked for: {sealed2}");
    assert_eq!(call(&format!("/keys/{key}/decrypt"), decrypt(&sealed, aad)).0, 200);
    let (status, opened2) = call(&format!("/keys/{key}/decrypt"), decrypt(&sealed2, b""));
    assert_eq!((status, b64(&opened2["plaintext"])), (200, b"after rotation".to_vec()));

    // Anything changed in the ciphertext, IV, tag, AAD or metadata: InvalidCiphertextException.
    let flip = |field: &str| {
        let mut v = sealed.clone();
        let mut bytes = b64(&v[field]);
        bytes[0] ^= 1;
        v[field] = json!(B64.encode(bytes));
        v
    };
    for (what, body) in [
        ("ciphertext", decrypt(&flip("ciphertext"), aad)),
        ("IV", decrypt(&flip("initializationVector"), aad)),
        ("tag", decrypt(&flip("authenticationTag"), aad)),
        ("AAD", decrypt(&sealed, b"bucket=payrolL")),
        ("metadata naming version 2", {
            let mut v = sealed.clone();
            v["ciphertextMetadata"] = json!(B64.encode([1, 0, 0, 0, 2]));
            decrypt(&v, aad)
        }),
    ] {
        let (status, e) = call(&format!("/keys/{key}/decrypt"), body);
        assert_eq!((status, e["errorName"].as_str()), (400, Some("InvalidCiphertextException")), "{what}: {e}");
    }

    // Every call is in the audit trail, with its request metadata.
    let recorded: Vec<(String, String, Option<String>)> = server
        .db()
        .prepare("SELECT operation, outcome, caller_context FROM audit WHERE principal = 'xks:aws-prod' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ops: Vec<&str> = recorded.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        &ops[..6],
        ["XksGetHealthStatus", "XksGetHealthStatus", "XksGetKeyMetadata", "XksEncrypt", "XksDecrypt", "XksEncrypt"],
        "{recorded:?}"
    );
    let encrypt = &recorded[3];
    assert_eq!(encrypt.1, "allowed");
    let context: Value = serde_json::from_str(encrypt.2.as_deref().unwrap()).unwrap();
    assert_eq!(context["kmsRequestId"], "req-Encrypt-4112f4d6");
    assert_eq!(context["awsPrincipalArn"], "arn:aws:iam::123456789012:role/s3-writer");
    assert!(recorded.iter().filter(|r| r.0 == "XksDecrypt").any(|r| r.1 == "denied"), "the tampered decrypts are audited: {recorded:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refusal_is_the_specs_error() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "k").await;
    let encrypt_only = new_key(&mut admin, "encrypt-only").await;
    let not_allowed = new_key(&mut admin, "not-allowed").await;
    let credential = key_store(&mut admin, "aws", "/aws").await;
    allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    allow(&mut admin, "aws", &encrypt_only, &["Encrypt"]).await;
    let post = |path: &str, body: Value| xks(&server, "POST", path, &body, &credential, REGION);
    let encrypt = encrypt_body(b"x");
    let expect = |(status, body): (u16, Value), want: (u16, &str), what: &str| {
        assert_eq!((status, body["errorName"].as_str().unwrap_or_default()), want, "{what}: {body}");
        let message = body["errorMessage"].as_str().unwrap_or_default();
        assert!(message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{what}: {message:?}");
    };

    expect(post(&format!("/elsewhere/kms/xks/v1/keys/{key}/encrypt"), encrypt.clone()), (404, "InvalidUriPathException"), "unknown prefix");
    expect(post("/aws/kms/xks/v1/keys/x/sign", encrypt.clone()), (404, "InvalidUriPathException"), "unknown call");
    let (status, _) = xks(&server, "GET", &format!("/aws/kms/xks/v1/keys/{key}/metadata"), &json!({}), &credential, REGION);
    assert_eq!(status, 405, "GET");
    let wrong = Credential { secret: "A".repeat(44), ..credential.clone() };
    expect(
        xks(&server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/encrypt"), &encrypt, &wrong, REGION),
        (401, "AuthenticationFailedException"),
        "wrong secret",
    );
    expect(
        xks(&server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/encrypt"), &encrypt, &credential, "us-east-1"),
        (401, "AuthenticationFailedException"),
        "wrong region",
    );
    expect(post("/aws/kms/xks/v1/keys/00000000-0000-4000-8000-000000000000/encrypt", encrypt.clone()), (404, "KeyNotFoundException"), "unknown key");
    expect(
        post("/aws/kms/xks/v1/keys/not-a-key-id/metadata", json!({"requestMetadata": metadata("DescribeKey")})),
        (404, "KeyNotFoundException"),
        "not a key id",
    );
    expect(
        post(&format!("/aws/kms/xks/v1/keys/{not_allowed}/encrypt"), encrypt.clone()),
        (404, "KeyNotFoundException"),
        "a key not in the key store",
    );
    expect(
        post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), json!({"requestMetadata": metadata("Encrypt"), "encryptionAlgorithm": "AES_GCM"})),
        (400, "ValidationException"),
        "no plaintext",
    );
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), json!("not an object")), (400, "ValidationException"), "malformed JSON");
    let big = encrypt_body(&[0u8; 8193]);
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), big), (501, "UnsupportedOperationException"), "oversize plaintext");
    let bad64 = json!({"requestMetadata": metadata("Encrypt"), "plaintext": "not base64!", "encryptionAlgorithm": "AES_GCM"});
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), bad64), (400, "ValidationException"), "plaintext not Base64");
    // Signed ten minutes ago (curl signs with the X-Amz-Date it is given).
    let stale = Command::new("date").args(["-u", "-d", "-10 min", "+%Y%m%dT%H%M%SZ"]).output().unwrap().stdout;
    let stale = format!("x-amz-date: {}", String::from_utf8(stale).unwrap().trim());
    let old = xks_over(&["--header", &stale], &server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/encrypt"), &encrypt, &credential, REGION);
    assert!(old.1["errorMessage"].as_str().unwrap_or_default().contains("X-Amz-Date"), "{}", old.1);
    expect(old, (401, "AuthenticationFailedException"), "a signature ten minutes old");
    // An unknown kmsOperation is accepted (forward compatibility).
    let future = json!({"requestMetadata": metadata("SomeFutureOperation"), "plaintext": B64.encode(b"x"), "encryptionAlgorithm": "AES_GCM"});
    assert_eq!(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), future).0, 200);

    // Usage: the key store may encrypt with this key, not decrypt, and metadata says so.
    let (_, meta) = post(&format!("/aws/kms/xks/v1/keys/{encrypt_only}/metadata"), json!({"requestMetadata": metadata("DescribeKey")}));
    assert_eq!(meta["keyUsage"], json!(["ENCRYPT"]), "{meta}");
    let (_, sealed) = post(&format!("/aws/kms/xks/v1/keys/{encrypt_only}/encrypt"), encrypt.clone());
    let decrypt = decrypt_body(&sealed, None);
    expect(post(&format!("/aws/kms/xks/v1/keys/{encrypt_only}/decrypt"), decrypt), (400, "InvalidKeyUsageException"), "decrypt not allowed");

    // A disabled key: InvalidStateException, and metadata reports it DISABLED; enabled again, it serves.
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), encrypt.clone()), (400, "InvalidStateException"), "disabled key");
    let (status, meta) = post(&format!("/aws/kms/xks/v1/keys/{key}/metadata"), json!({"requestMetadata": metadata("DescribeKey")}));
    assert_eq!((status, &meta["keyStatus"]), (200, &json!("DISABLED")), "{meta}");
    admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    assert_eq!(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), encrypt.clone()).0, 200);

    // A disabled key store: InvalidStateException.
    admin.disable_principal(pb::PrincipalRequest { name: "xks:aws".into() }).await.unwrap();
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), encrypt.clone()), (400, "InvalidStateException"), "disabled key store");
    admin.enable_principal(pb::PrincipalRequest { name: "xks:aws".into() }).await.unwrap();

    // Rotating the credential: a second one works at once; the first, removed, is refused at once.
    let second = admin.add_xks_credential(pb::AddXksCredentialRequest { key_store: "aws".into() }).await.unwrap().into_inner();
    let second = Credential { id: second.access_key_id.clone(), secret: second.secret_access_key.clone() };
    let third = admin.add_xks_credential(pb::AddXksCredentialRequest { key_store: "aws".into() }).await.unwrap_err();
    assert_eq!(third.code(), tonic::Code::FailedPrecondition, "at most two: {third:?}");
    assert_eq!(xks(&server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/encrypt"), &encrypt, &second, REGION).0, 200);
    admin.remove_xks_credential(pb::RemoveXksCredentialRequest { access_key_id: credential.id.clone() }).await.unwrap();
    expect(post(&format!("/aws/kms/xks/v1/keys/{key}/encrypt"), encrypt.clone()), (401, "AuthenticationFailedException"), "removed credential");
    assert_eq!(xks(&server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/encrypt"), &encrypt, &second, REGION).0, 200);

    // The key store's name is no workload's: a principal cannot be registered under it.
    let taken = admin.create_principal(pb::PrincipalRequest { name: "xks:other".into() }).await.unwrap_err();
    assert_eq!(taken.code(), tonic::Code::InvalidArgument, "{taken:?}");
    let listed = admin.list_xks_key_stores(pb::ListXksKeyStoresRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.key_stores.len(), 1);
    assert_eq!(listed.key_stores[0].credentials.iter().map(|c| c.access_key_id.clone()).collect::<Vec<_>>(), std::slice::from_ref(&second.id));
    // The secrets are nowhere in the database in clear.
    let db = server.db();
    let path = db.path().expect("a database file").to_string();
    // The file and its write-ahead log (where the last changes may still be).
    let dump: Vec<u8> = [std::fs::read(&path).unwrap(), std::fs::read(format!("{path}-wal")).unwrap_or_default()].concat();
    assert!(dump.windows(second.id.len()).any(|w| w == second.id.as_bytes()), "the file read is the database");
    assert!(!dump.windows(second.secret.len()).any(|w| w == second.secret.as_bytes()), "a secret in the database file");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_officer_narrows_a_key_to_aws_principals_and_the_key_store_is_throttled() {
    let server = Server::start_with(kms_tests::Options { principal_calls_per_second: 2.0, principal_burst: 4.0, ..Default::default() });
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "narrow").await;
    let credential = key_store(&mut admin, "aws", "").await;
    // Encrypt only for the S3 writer's role, through S3.
    admin
        .create_grant(pb::CreateGrantRequest {
            principal: "xks:aws".into(),
            key_id: key.clone(),
            operations: vec!["Encrypt".into()],
            required_encryption_context: kms_tests::ctx(&[("awsPrincipalArn", "arn:aws:iam::123456789012:role/s3-writer"), ("kmsViaService", "s3")]),
            ..Default::default()
        })
        .await
        .unwrap();
    let path = format!("/kms/xks/v1/keys/{key}/encrypt");
    let encrypt = |metadata: Value| json!({"requestMetadata": metadata, "plaintext": B64.encode(b"x"), "encryptionAlgorithm": "AES_GCM"});
    assert_eq!(xks(&server, "POST", &path, &encrypt(metadata("Encrypt")), &credential, REGION).0, 200, "the allowed role through S3");
    let mut other = metadata("Encrypt");
    other["awsPrincipalArn"] = json!("arn:aws:iam::123456789012:role/intruder");
    let (status, e) = xks(&server, "POST", &path, &encrypt(other), &credential, REGION);
    assert_eq!((status, e["errorName"].as_str()), (403, Some("AccessDeniedException")), "{e}");
    let mut direct = metadata("Encrypt");
    direct.as_object_mut().unwrap().remove("kmsViaService");
    let (status, e) = xks(&server, "POST", &path, &encrypt(direct), &credential, REGION);
    assert_eq!((status, e["errorName"].as_str()), (403, Some("AccessDeniedException")), "not through S3: {e}");

    // The key store's calls are limited like any principal's: past the burst, ThrottlingException.
    let statuses: Vec<u16> = (0..8).map(|_| xks(&server, "POST", &path, &encrypt(metadata("Encrypt")), &credential, REGION).0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let (_, e) = (0..8).map(|_| xks(&server, "POST", &path, &encrypt(metadata("Encrypt")), &credential, REGION)).find(|r| r.0 == 429).unwrap();
    assert_eq!(e["errorName"], "ThrottlingException", "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_officer_connects_aws_with_kmsctl() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "ebs").await;
    let kmsctl = |args: &[&str]| {
        let out = server.kmsctl(args);
        assert!(out.status.success(), "kmsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let endpoint = format!("https://{}", server.xks_addr);
    // Text mode prints the file the AWS console imports.
    let file: Value =
        serde_json::from_str(&kmsctl(&["xks", "create", "prod", "--uri-prefix", "/xks", "--region", REGION, "--xks-url", &endpoint])).unwrap();
    assert_eq!(file["XksProxyUriEndpoint"], json!(endpoint));
    assert_eq!(file["XksProxyUriPath"], "/xks/kms/xks/v1");
    assert_eq!(file["XksProxyConnectivity"], "PUBLIC_ENDPOINT");
    let credential = Credential {
        id: file["XksProxyAuthenticationCredential"]["AccessKeyId"].as_str().unwrap().into(),
        secret: file["XksProxyAuthenticationCredential"]["RawSecretAccessKey"].as_str().unwrap().into(),
    };
    let allowed: Value = serde_json::from_str(&kmsctl(&["--json", "xks", "allow", "prod", "--key", "alias/ebs", "--via-service", "ebs"])).unwrap();
    assert_eq!(allowed["external_key_id"], json!(key), "the alias resolves to the key id AWS binds to");
    let keys: Value = serde_json::from_str(&kmsctl(&["--json", "xks", "keys", "prod"])).unwrap();
    assert_eq!(keys[0]["operations"], json!(["Encrypt", "Decrypt"]), "{keys}");

    let path = format!("/xks/kms/xks/v1/keys/{key}/metadata");
    let mut via_ebs = metadata("CreateKey");
    via_ebs["kmsViaService"] = json!("ebs");
    let (status, meta) = xks(&server, "POST", &path, &json!({"requestMetadata": via_ebs}), &credential, REGION);
    assert_eq!((status, &meta["keyUsage"]), (200, &json!(["ENCRYPT", "DECRYPT"])), "{meta}");

    // Rotation of the credential, through kmsctl.
    let second: Value = serde_json::from_str(&kmsctl(&["--json", "xks", "credential", "add", "prod"])).unwrap();
    let second_id = second["credential"]["AccessKeyId"].as_str().unwrap().to_string();
    kmsctl(&["xks", "credential", "remove", &credential.id]);
    assert_eq!(xks(&server, "POST", &path, &json!({"requestMetadata": via_ebs}), &credential, REGION).0, 401);
    let listed: Value = serde_json::from_str(&kmsctl(&["--json", "xks", "list"])).unwrap();
    assert_eq!(listed[0]["credentials"][0]["access_key_id"], json!(second_id), "{listed}");
    assert!(!listed.to_string().contains("RawSecretAccessKey") && !listed.to_string().contains(&credential.secret), "no secret is listed");

    // Removing the key from the key store: AWS no longer finds it.
    kmsctl(&["xks", "remove", "prod", "--key", "alias/ebs"]);
    let second = Credential { id: second_id.clone(), secret: second["credential"]["RawSecretAccessKey"].as_str().unwrap().into() };
    let (status, e) = xks(&server, "POST", &path, &json!({"requestMetadata": via_ebs}), &second, REGION);
    assert_eq!((status, e["errorName"].as_str()), (404, Some("KeyNotFoundException")), "{e}");
    let out = server.kmsctl(&["xks", "remove", "prod", "--key", "alias/ebs"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nothing to remove"));

    // Bad input is refused with the field named, and changes nothing.
    let out = server.kmsctl(&["xks", "create", "Bad Name", "--region", REGION, "--xks-url", &endpoint]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("name"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = server.kmsctl(&["xks", "allow", "prod", "--key", "alias/ebs", "--operations", "sign"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--operations"), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_str(&kmsctl(&["--json", "xks", "list"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hsm_fault_is_a_retryable_error_and_an_integrity_value_is_answered_only_after_the_self_test() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "faulty").await;
    let credential = key_store(&mut admin, "aws", "").await;
    allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    let path = format!("/kms/xks/v1/keys/{key}/encrypt");
    let plain = encrypt_body(b"x");
    let mut checked = plain.clone();
    checked["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");

    // The HSM's encryption fails: 503, which AWS retries; nothing leaks in the message.
    server.hsm_fault(Some("C_Encrypt CKR_DEVICE_ERROR"));
    let (status, e) = xks(&server, "POST", &path, &plain, &credential, REGION);
    assert_eq!((status, e["errorName"].as_str()), (503, Some("DependencyTimeoutException")), "{e}");
    // Only its decryption fails: an encryption without an integrity value is answered (it
    // decrypts nothing); one with it is not, since its self-test could not decrypt it back.
    server.hsm_fault(Some("C_Decrypt CKR_DEVICE_ERROR"));
    assert_eq!(xks(&server, "POST", &path, &plain, &credential, REGION).0, 200);
    let (status, e) = xks(&server, "POST", &path, &checked, &credential, REGION);
    assert_eq!((status, e["errorName"].as_str()), (503, Some("DependencyTimeoutException")), "{e}");
    server.hsm_fault(None);
    assert_eq!(xks(&server, "POST", &path, &checked, &credential, REGION).0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_keys_lifecycle_cuts_aws_off_as_it_cuts_grpc_callers() {
    // The sweep's clock runs 8 days ahead: a destruction scheduled in 7 days happens at once.
    let server = Server::start_with(kms_tests::Options { sweep_clock_offset: 8 * 86_400, ..Default::default() });
    let mut admin = server.admin().await;
    let mut data = server.data().await;
    let key = kms_tests::create_key(&mut admin, "shared").await;
    let credential = key_store(&mut admin, "aws", "/aws").await;
    allow(&mut admin, "aws", &key, &["Encrypt", "Decrypt"]).await;
    let post = |call: &str, body: &Value| xks(&server, "POST", &format!("/aws/kms/xks/v1/keys/{key}/{call}"), body, &credential, REGION);
    let encrypt = encrypt_body(b"x");
    let (_, sealed) = post("encrypt", &encrypt);
    let decrypt = decrypt_body(&sealed, None);
    let describe = json!({"requestMetadata": metadata("DescribeKey")});
    let grpc = |data: &mut kms_proto::v1::crypto_client::CryptoClient<kms_client::Channel>| {
        let request =
            pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), encryption_context: Default::default(), caller_context: None };
        let mut data = data.clone();
        async move { data.encrypt(request).await.map(drop).map_err(|s| s.code()) }
    };
    assert_eq!(grpc(&mut data).await, Ok(()));

    // Disabled: AWS and gRPC callers refused on the next call.
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    assert_eq!(post("encrypt", &encrypt).1["errorName"], "InvalidStateException");
    assert_eq!(post("decrypt", &decrypt).1["errorName"], "InvalidStateException");
    assert_eq!(grpc(&mut data).await, Err(tonic::Code::FailedPrecondition));
    admin.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    assert_eq!(post("decrypt", &decrypt).0, 200);

    // Compromised: nothing for AWS (only a gRPC ReEncrypt out remains), metadata says DISABLED.
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key.clone() }).await.unwrap();
    assert_eq!(post("encrypt", &encrypt).1["errorName"], "InvalidStateException");
    assert_eq!(post("decrypt", &decrypt).1["errorName"], "InvalidStateException");
    assert_eq!(post("metadata", &describe).1["keyStatus"], "DISABLED");

    // Destroyed: the key is not found, as if it never was.
    admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key.clone(), pending_window_days: 7 }).await.unwrap();
    kms_tests::eventually("the key destroyed", std::time::Duration::from_secs(30), || {
        post("metadata", &describe).1["errorName"] == "KeyNotFoundException"
    });
    for (call, body) in [("encrypt", &encrypt), ("decrypt", &decrypt)] {
        let (status, e) = post(call, body);
        assert_eq!((status, e["errorName"].as_str()), (404, Some("KeyNotFoundException")), "{call}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_signatures_is_audited_within_a_budget_and_counted() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = new_key(&mut admin, "flood").await;
    let credential = key_store(&mut admin, "aws", "").await;
    let wrong = Credential { secret: "A".repeat(44), ..credential.clone() };
    // 400 requests, 16 at a time (curl takes many URLs), each signed with a wrong secret.
    let url = format!("https://{}/kms/xks/v1/keys/{key}/encrypt", server.xks_addr);
    let out = Command::new("curl")
        .args(["--silent", "--output", "/dev/null", "--parallel", "--parallel-max", "16", "--cacert"])
        .arg(server.pki_dir().join("ca.pem"))
        .args(["--aws-sigv4", &format!("aws:amz:{REGION}:kms-xks-proxy"), "--user", &format!("{}:{}", wrong.id, wrong.secret)])
        .args(["--header", "content-type: application/json", "--data-binary", &encrypt_body(b"x").to_string()])
        .args(std::iter::repeat_n(url.as_str(), 400))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refusals = |server: &Server| -> Vec<String> {
        let db = server.db();
        let mut q = db.prepare("SELECT detail FROM audit WHERE principal = 'unauthenticated' AND operation = 'XksEncrypt' ORDER BY seq").unwrap();
        q.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    let recorded = refusals(&server).len();
    assert!((100..400).contains(&recorded), "{recorded} of 400 refusals recorded one by one");
    // A refusal after the spell; then every refusal is in the trail, one by one or counted.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(xks(&server, "POST", &format!("/kms/xks/v1/keys/{key}/encrypt"), &encrypt_body(b"x"), &wrong, REGION).0, 401);
    let counted: usize = refusals(&server)
        .iter()
        .filter_map(|d| d.split_once(" (")?.1.split_once(" refusals before this one not recorded one by one)")?.0.parse::<usize>().ok())
        .sum();
    assert_eq!(recorded + counted, 400, "{recorded} recorded and {counted} counted");
}
