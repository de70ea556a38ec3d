//! Officers and auditors on the admin plane (TESTPLAN R11, the officer half): multi-factor
//! login, sessions, roles, lockout, and that nothing on the admin plane works without them.

use kms_proto::v1 as pb;
use kms_proto::v1::session_client::SessionClient;
use kms_tests::{OFFICER, Server, otpauth_secret, totp_now};
use tonic::Code;

async fn login(server: &Server, name: &str, passphrase: &str, code: &str) -> Result<pb::LoginResponse, tonic::Status> {
    let mut session = SessionClient::new(server.channel(&server.admin_addr).await);
    session
        .login(pb::LoginRequest { name: name.into(), passphrase: passphrase.into(), totp_code: code.into() })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_on_the_admin_plane_works_without_a_session() {
    let server = Server::start();
    for token in [None, Some("not-a-session"), Some("00")] {
        let mut admin = server.admin_as(token).await;
        let e = admin.list_keys(pb::ListKeysRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e}");
        let e = admin.create_key(pb::CreateKeyRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let channel = server.channel(&server.admin_addr).await;
    let e = kms_proto::v1::audit_log_client::AuditLogClient::new(channel).verify_audit(pb::VerifyAuditRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let db = server.db();
    let keys: i64 = db.query_row("SELECT COUNT(*) FROM keys", [], |r| r.get(0)).unwrap();
    assert_eq!(keys, 0, "no key was created");
    let denied: i64 =
        db.query_row("SELECT COUNT(*) FROM audit WHERE status = 'UNAUTHENTICATED' AND principal = 'unauthenticated'", [], |r| r.get(0)).unwrap();
    assert_eq!(denied, 7, "every refusal is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn login_needs_the_passphrase_and_a_fresh_totp_code() {
    let server = Server::start();
    let pass = "auditor passphrase 1";
    let secret = kms_tests::add_officer(&server, "ana", "auditor", pass).await;
    let stored: String = server.db().query_row("SELECT passphrase_hash FROM officers WHERE name = 'ana'", [], |r| r.get(0)).unwrap();
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
    assert!(!stored.contains(pass));

    let wrong = [
        ("ana", "wrong passphrase!!", totp_now(&secret, 0)),
        ("ana", pass, "000000".to_string()),
        ("ana", pass, totp_now(&secret, -3)),
        ("nobody", pass, totp_now(&secret, 0)),
    ];
    for (name, p, code) in &wrong {
        let e = login(&server, name, p, code).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{name}");
        assert_eq!(e.message(), "invalid name, passphrase or TOTP code", "one message for every failure");
    }
    let code = totp_now(&secret, 0);
    let ok = login(&server, "ana", pass, &code).await.unwrap();
    assert_eq!(ok.role, "auditor");
    assert_eq!(ok.session_token.len(), 64);
    let replay = login(&server, "ana", pass, &code).await.unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated, "a code is good once");

    // Failed logins are audited under the name they claimed.
    let failures: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Login' AND outcome = 'denied' AND principal = 'ana'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(failures, 4);

    // An auditor reads but changes nothing.
    let mut auditor = server.admin_as(Some(&ok.session_token)).await;
    auditor.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    let e = auditor.create_key(pb::CreateKeyRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = auditor.create_principal(pb::PrincipalRequest { name: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let channel = server.channel(&server.admin_addr).await;
    let bearer = kms_client::Bearer::new(Some(&ok.session_token)).unwrap();
    let v = kms_proto::v1::audit_log_client::AuditLogClient::new(kms_client::AdminChannel::new(channel, bearer))
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok);

    // Disabling an officer ends their session at once.
    server.admin().await.disable_officer(pb::DisableOfficerRequest { name: "ana".into() }).await.unwrap();
    let e = auditor.list_keys(pb::ListKeysRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = server.admin().await.disable_officer(pb::DisableOfficerRequest { name: OFFICER.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "officers cannot disable themselves");
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_lock_the_officer_out() {
    let server = Server::start();
    let pass = "officer passphrase 2";
    let secret = kms_tests::add_officer(&server, "bo", "officer", pass).await;
    for _ in 0..5 {
        let e = login(&server, "bo", "not the passphrase", &totp_now(&secret, 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let e = login(&server, "bo", pass, &totp_now(&secret, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("locked until"), "{}", e.message());
    let listed = server.admin().await.list_officers(pb::ListOfficersRequest {}).await.unwrap().into_inner();
    let bo = listed.officers.iter().find(|o| o.name == "bo").unwrap();
    assert!(bo.locked_until > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn passphrase_change_and_totp_reenrolment() {
    let server = Server::start();
    let (old, new) = ("first passphrase 3", "second passphrase 3");
    let secret = kms_tests::add_officer(&server, "cy", "officer", old).await;
    let s = login(&server, "cy", old, &totp_now(&secret, 0)).await.unwrap();
    let mut cy = server.admin_as(Some(&s.session_token)).await;
    let e = cy
        .change_passphrase(pb::ChangePassphraseRequest { current_passphrase: "wrong passphrase 3".into(), new_passphrase: new.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = cy.change_passphrase(pb::ChangePassphraseRequest { current_passphrase: old.into(), new_passphrase: "short".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    cy.change_passphrase(pb::ChangePassphraseRequest { current_passphrase: old.into(), new_passphrase: new.into() }).await.unwrap();
    let fresh = cy.reenroll_totp(pb::ReenrollTotpRequest {}).await.unwrap().into_inner();
    let fresh = otpauth_secret(&fresh.otpauth_uri);
    assert_ne!(fresh, secret);
    // The old passphrase and the old secret no longer work; the new ones do (next step, as the
    // current one was used).
    assert!(login(&server, "cy", old, &totp_now(&fresh, 1)).await.is_err());
    assert!(login(&server, "cy", new, &totp_now(&secret, 1)).await.is_err());
    login(&server, "cy", new, &totp_now(&fresh, 1)).await.unwrap();
}

#[test]
fn kmsctl_login_officer_add_and_logout() {
    let server = Server::start();
    let dir = server.dir.path();
    let pass_file = dir.join("dee.pass");
    std::fs::write(&pass_file, "dee's passphrase 4").unwrap();
    let out = server.kmsctl(&["--json", "officer", "add", "dee", "--role", "officer", "--passphrase-file", pass_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = otpauth_secret(added["otpauth_uri"].as_str().unwrap());

    // dee logs in with kmsctl into a session file of their own.
    let session = dir.join("dee.session");
    let as_dee = |args: &[&str]| server.kmsctl_with_session(&session, args);
    let code = totp_now(&secret, 0);
    // The session's end in the officer's time zone and locale, and the minutes left.
    let out = server
        .kmsctl_command(&session, &["login", "--name", "dee", "--passphrase-file", pass_file.to_str().unwrap(), "--totp", &code])
        .env("LC_ALL", "fr_FR.UTF-8")
        .env("TZ", "Africa/Casablanca")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    let french_days = ["lun.", "mar.", "mer.", "jeu.", "ven.", "sam.", "dim."];
    assert!(said.starts_with("logged in as dee (officer) until ") && french_days.iter().any(|d| said.contains(d)), "{said}");
    assert!(said.trim_end().ends_with("(in 15 minutes)"), "{said}");
    // --json keeps the Unix time.
    let code = totp_now(&secret, 1);
    let out = as_dee(&["--json", "login", "--name", "dee", "--passphrase-file", pass_file.to_str().unwrap(), "--totp", &code]);
    let logged: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now + 14 * 60..=now + 15 * 60).contains(&logged["expiration_time"].as_i64().unwrap()), "{logged}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&session).unwrap().permissions().mode() & 0o777, 0o600);
    let out = as_dee(&["--json", "key", "create", "--alias", "dees"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = as_dee(&["--json", "officer", "list"]);
    let officers: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(officers.as_array().unwrap().len(), 2);
    let out = as_dee(&["logout"]);
    assert!(out.status.success());
    assert!(!session.exists());
    let out = as_dee(&["key", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    // The audit names dee for what dee did.
    let by_dee: i64 =
        server.db().query_row("SELECT COUNT(*) FROM audit WHERE principal = 'dee' AND operation = 'CreateKey'", [], |r| r.get(0)).unwrap();
    assert_eq!(by_dee, 1);
}
