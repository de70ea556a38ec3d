//! `--dry-run` on every changing kmsctl command: checked against the live state and the
//! caller's rights, nothing written, audited as a dry run and not as a change.

use kms_tests::{Options, Server, WORKLOAD};
use serde_json::Value;

fn run(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = server.kmsctl(args);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok_json(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(server, &all);
    assert!(ok, "kmsctl {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// Everything a dry run must leave alone: the state tables, the checkpoints and the HSM's
/// objects (the audit trail gains its dry-run records only).
fn everything(server: &Server) -> String {
    let checkpoints: i64 = server.db().query_row("SELECT COUNT(*) FROM audit_checkpoints", [], |r| r.get(0)).unwrap();
    format!("{}\ncheckpoints {checkpoints}\nobjects {:?}", server.state_snapshot(), server.object_labels())
}

#[test]
fn every_changing_command_has_a_dry_run_that_changes_nothing() {
    let server = Server::start_with(Options { backup_key: true, ..Options::default() });
    let key = ok_json(&server, &["key", "create", "--alias", "payroll"])["key_id"].as_str().unwrap().to_string();
    ok_json(&server, &["key", "rotate", &key]);
    ok_json(&server, &["principal", "add", WORKLOAD]);
    let grant = ok_json(&server, &["grant", "create", "--principal", WORKLOAD, "--key", &key, "--operations", "Decrypt"])["grant_id"]
        .as_str()
        .unwrap()
        .to_string();
    ok_json(&server, &["principal", "add", "spiffe://example.org/disabled"]);
    ok_json(&server, &["principal", "disable", "spiffe://example.org/disabled"]);
    let passphrase = server.dir.path().join("new.passphrase");
    std::fs::write(&passphrase, "another correct horse battery\nanother correct horse battery\n").unwrap();
    let current = server.dir.path().join("officer.passphrase");
    let never = server.dir.path().join("never.kmsbak");
    let before = everything(&server);
    let records_before: i64 = server.db().query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0)).unwrap();

    // Each changing command, and a word its answer must carry.
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["key", "create", "--alias", "other"], "create a key named alias/other"),
        (vec!["key", "rotate", &key], "version 3"),
        (vec!["key", "disable", &key], "from Enabled to Disabled"),
        (vec!["key", "compromise", &key], "to Compromised"),
        (vec!["key", "schedule-destruction", &key, "--pending-days", "7"], "in 7 days"),
        (vec!["key", "version", "disable", &key, "1"], "version 1"),
        (vec!["key", "version", "schedule-destruction", &key, "1", "--pending-days", "30"], "in 30 days"),
        (vec!["alias", "create", "alias/more", &key], "alias/more"),
        (vec!["alias", "delete", "alias/payroll"], "delete alias/payroll"),
        (vec!["principal", "add", "spiffe://example.org/new"], "register principal spiffe://example.org/new"),
        (vec!["principal", "disable", WORKLOAD], "to Disabled"),
        (vec!["principal", "enable", "spiffe://example.org/disabled"], "to Enabled"),
        (vec!["grant", "create", "--principal", WORKLOAD, "--key", &key, "--operations", "Encrypt", "--require", "app=hr"], "app=hr"),
        (vec!["grant", "revoke", &grant], "revoke grant"),
        (vec!["officer", "add", "ana", "--role", "auditor", "--passphrase-file", passphrase.to_str().unwrap()], "auditor ana"),
        (vec!["officer", "passphrase", "--current-file", current.to_str().unwrap(), "--new-file", passphrase.to_str().unwrap()], "passphrase"),
        (vec!["officer", "reenroll-totp"], "TOTP"),
        (vec!["review", "sign-off", "--note", "dry"], "sign-off"),
        (vec!["backup", "create", "--out", never.to_str().unwrap()], "back up 1 keys and 2 live key versions"),
    ];
    for (args, word) in &cases {
        let mut all = vec!["--dry-run"];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = run(&server, &all);
        assert!(ok, "kmsctl {all:?}: {stderr}");
        assert!(stdout.starts_with("dry run: would ") && stdout.contains(word) && stdout.contains("nothing was changed"), "{all:?}: {stdout}");
        let mut json = vec!["--json", "--dry-run"];
        json.extend_from_slice(args);
        let answer = ok_json(&server, &json[1..]);
        assert_eq!(answer["dry_run"], true, "{answer}");
        assert!(answer["would"].as_str().unwrap().contains(word), "{answer}");
        assert_eq!(everything(&server), before, "kmsctl {all:?} changed something");
    }
    assert!(!never.exists() && !server.dir.path().join("never.kmsbak.partial").exists());
    // Each dry run is in the audit trail, as a dry run.
    let db = server.db();
    let dry: i64 = db.query_row("SELECT COUNT(*) FROM audit WHERE outcome = 'dry-run' AND detail LIKE 'dry run: would %'", [], |r| r.get(0)).unwrap();
    assert_eq!(dry, 2 * cases.len() as i64);
    let others: i64 = db.query_row("SELECT COUNT(*) FROM audit WHERE seq > ?1 AND outcome != 'dry-run'", [records_before], |r| r.get(0)).unwrap();
    assert_eq!(others, 0, "a dry run was audited as something else");

    // A dry run is refused exactly as the change would be.
    let (ok, _, err) = run(&server, &["--dry-run", "key", "enable", "alias/none"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, _, err) = run(&server, &["--dry-run", "alias", "create", "alias/payroll", &key]);
    assert!(!ok && err.contains("AlreadyExists"), "{err}");
    let (ok, _, err) = run(&server, &["--dry-run", "key", "version", "schedule-destruction", &key, "2"]);
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    // And a read asks for nothing to be checked.
    let (ok, _, err) = run(&server, &["--dry-run", "key", "describe", &key]);
    assert!(!ok && err.contains("changes nothing"), "{err}");
    assert_eq!(everything(&server), before);
    // Without --dry-run the same command does change things (so the comparison above can fail).
    ok_json(&server, &["key", "disable", &key]);
    assert_ne!(everything(&server), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_header_other_than_yes_or_no_is_refused_not_guessed() {
    let server = Server::start();
    let mut admin = server.admin().await;
    for (value, refused) in [("yes", true), ("TRUE", false), ("0", false), ("2", true)] {
        let mut request = tonic::Request::new(kms_proto::v1::CreateKeyRequest { alias: format!("k{}", value.len()), ..Default::default() });
        request.metadata_mut().insert("kms-dry-run", value.parse().unwrap());
        let before = server.state_snapshot();
        let answer = admin.create_key(request).await;
        match answer {
            Err(e) if refused => {
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{value}: {e:?}");
                assert!(e.message().starts_with("kms-dry-run "), "{e:?}");
                assert_eq!(server.state_snapshot(), before, "{value}: a refused header changed something");
            }
            Ok(r) if value == "TRUE" => assert!(r.metadata().get_bin("kms-dry-run-bin").is_some(), "{value}: a dry run"),
            Ok(r) => assert!(r.into_inner().key.is_some(), "{value}: the key is made"),
            other => panic!("{value}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_needs_the_callers_own_rights() {
    let server = Server::start();
    let secret = kms_tests::add_officer(&server, "audrey", "auditor", "an auditor's long passphrase").await;
    let token = kms_tests::login_officer(&server, "audrey", "an auditor's long passphrase", &secret).await;
    let session = server.dir.path().join("audrey.session");
    std::fs::write(&session, token).unwrap();
    let out = server.kmsctl_with_session(&session, &["--dry-run", "key", "create", "--alias", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"), "{}", String::from_utf8_lossy(&out.stderr));
}
