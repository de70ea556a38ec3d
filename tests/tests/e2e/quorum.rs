//! Quorum (M-of-N) approvals with several officers: a covered call becomes a request, runs
//! once when M others approve it (each with their passphrase and TOTP code again), never on its
//! requester's word alone; rejection, expiry, a crash before the run, and policy changes under
//! the quorum they replace.

use std::path::PathBuf;

use kms_proto::v1 as pb;
use kms_tests::{Options, Server, totp_now};
use serde_json::Value;

/// A second officer: their name, passphrase file, TOTP secret and kmsctl session file.
struct Officer {
    name: String,
    passphrase: PathBuf,
    totp: String,
    session: PathBuf,
}

/// Adds officer `name` and logs them in (with the previous step's code, so that the current
/// one is still theirs to approve with).
async fn officer(server: &Server, name: &str) -> Officer {
    let passphrase = format!("{name}'s long passphrase 7");
    let totp = kms_tests::add_officer(server, name, "officer", &passphrase).await;
    let mut session = kms_proto::v1::session_client::SessionClient::new(server.channel(&server.admin_addr).await);
    let mut answer = session
        .login(pb::LoginRequest { name: name.into(), passphrase: passphrase.clone(), totp_code: totp_now(&totp, -1) })
        .await
        .expect("logged in")
        .into_inner();
    let token = std::mem::take(&mut answer.session_token);
    let dir = server.dir.path();
    let (passphrase_file, session_file) = (dir.join(format!("{name}.pass")), dir.join(format!("{name}.session")));
    std::fs::write(&passphrase_file, passphrase).unwrap();
    std::fs::write(&session_file, token).unwrap();
    Officer { name: name.into(), passphrase: passphrase_file, totp, session: session_file }
}

impl Officer {
    fn kmsctl(&self, server: &Server, args: &[&str]) -> std::process::Output {
        server.kmsctl_with_session(&self.session, args)
    }

    /// `kmsctl approval approve|reject ID` with this officer's credentials, the code `step` steps on.
    fn vote(&self, server: &Server, how: &str, id: &str, step: i64) -> std::process::Output {
        let code = totp_now(&self.totp, step);
        self.kmsctl(server, &["--json", "approval", how, id, "--passphrase-file", self.passphrase.to_str().unwrap(), "--totp", &code])
    }
}

fn ok(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn refused(out: &std::process::Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(why), "expected a refusal with {why:?}: {stderr}");
}

/// The request id a covered call's refusal names.
fn request_id(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("approval required"), "{stderr}");
    let at = stderr.find("request R-").expect("a request id") + "request ".len();
    stderr[at..].split_whitespace().next().unwrap().to_string()
}

/// A key's state, as `Enabled`, `PendingDestruction`, ... name it.
fn key_state(server: &Server, key: &str) -> String {
    let state = ok(&server.kmsctl(&["--json", "key", "describe", key]))["state"].as_str().unwrap().to_ascii_lowercase().replace('_', "");
    ["Enabled", "Disabled", "Compromised", "PendingDestruction", "Destroyed"].iter().find(|s| s.to_ascii_lowercase() == state).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destruction_runs_once_after_two_other_officers_approve_it_and_never_on_one_word() {
    let server = Server::start();
    // Each officer has two fresh TOTP codes to vote with (a code is good once, for one step
    // either side of the clock's).
    let (bob, carol) = (officer(&server, "bob").await, officer(&server, "carol").await);
    let (dave, erin) = (officer(&server, "dave").await, officer(&server, "erin").await);
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "ledger").await;
    ok(&server.kmsctl(&["quorum", "set", "ScheduleKeyDestruction", "--required", "2"]));
    let policies = ok(&server.kmsctl(&["--json", "quorum", "list"]));
    assert_eq!(policies[0]["required"], 2, "{policies}");

    // The call does not run: it becomes a request, with its reason.
    let out = server.kmsctl(&["--reason", "end of the ledger contract", "key", "schedule-destruction", "alias/ledger", "--pending-days", "7"]);
    let id = request_id(&out);
    assert_eq!(key_state(&server, "alias/ledger"), "Enabled");
    let shown = ok(&server.kmsctl(&["--json", "approval", "show", &id]));
    assert_eq!(
        (shown["state"].as_str(), shown["reason"].as_str(), shown["required"].as_u64()),
        (Some("pending"), Some("end of the ledger contract"), Some(2))
    );
    assert!(shown["summary"].as_str().unwrap().contains(&key), "{shown}");

    // Not by its requester, not without the officer's own second factor, not twice.
    let me = kms_tests::OFFICER_PASSPHRASE;
    let pass = server.dir.path().join("me.pass");
    std::fs::write(&pass, me).unwrap();
    let code = totp_now(&server.officer_totp, 1);
    refused(
        &server.kmsctl(&["approval", "approve", &id, "--passphrase-file", pass.to_str().unwrap(), "--totp", &code]),
        "another officer must decide",
    );
    refused(&bob.vote(&server, "approve", &id, 5), "invalid name, passphrase or TOTP code");
    let after_bob = ok(&bob.vote(&server, "approve", &id, 0));
    assert_eq!((after_bob["state"].as_str(), after_bob["votes"].as_array().map(Vec::len)), (Some("pending"), Some(1)));
    refused(&bob.vote(&server, "approve", &id, 1), "already exists");
    assert_eq!(key_state(&server, "alias/ledger"), "Enabled", "one approval is not two");

    // Carol's approval reaches the count: the call runs, once, on the arguments asked.
    let done = ok(&carol.vote(&server, "approve", &id, 0));
    assert_eq!(done["state"], "executed", "{done}");
    assert!(done["result"].as_str().unwrap().contains("PendingDestruction"), "{done}");
    assert_eq!(key_state(&server, "alias/ledger"), "PendingDestruction");
    refused(&carol.vote(&server, "approve", &id, 1), "only a pending request");
    let db = server.db();
    let ops: Vec<(String, String)> = db
        .prepare("SELECT operation, principal FROM audit WHERE operation IN ('RequestApproval', 'ApproveRequest', 'ExecuteApprovedRequest', 'ScheduleKeyDestruction') AND outcome = 'allowed' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let names: Vec<&str> = ops.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(names, ["RequestApproval", "ApproveRequest", "ApproveRequest", "ScheduleKeyDestruction", "ExecuteApprovedRequest"], "{ops:?}");
    assert_eq!(ops[3].1, format!("{} (approved request {id})", kms_tests::OFFICER));

    // A rejection: the request never runs.
    ok(&server.kmsctl(&["quorum", "set", "MarkKeyCompromised", "--required", "2"]));
    let other = kms_tests::create_key(&mut admin, "other").await;
    let id = request_id(&server.kmsctl(&["key", "compromise", "alias/other", "--yes"]));
    let rejected = ok(&bob.vote(&server, "reject", &id, 1));
    assert_eq!(rejected["state"], "rejected");
    refused(&carol.vote(&server, "approve", &id, 1), "only a pending request");
    assert_eq!(key_state(&server, &other), "Enabled");

    // Policy changes: under the quorum of the policy they replace; never beyond the officers
    // enabled.
    refused(&server.kmsctl(&["quorum", "set", "DisableOfficer", "--required", "6"]), "only 5 officers are enabled");
    refused(&server.kmsctl(&["quorum", "set", "Encrypt", "--required", "2"]), "not one a quorum can cover");
    let id = request_id(&server.kmsctl(&["quorum", "set", "ScheduleKeyDestruction", "--required", "1"]));
    ok(&dave.vote(&server, "approve", &id, 0));
    assert_eq!(ok(&erin.vote(&server, "approve", &id, 0))["state"], "executed");
    let policies = ok(&server.kmsctl(&["--json", "quorum", "list"]));
    assert!(policies.as_array().unwrap().iter().all(|p| p["operation"] != "ScheduleKeyDestruction"), "{policies}");
    ok(&server.kmsctl(&["key", "cancel-destruction", "alias/ledger"]));
    ok(&server.kmsctl(&["key", "schedule-destruction", "alias/ledger", "--pending-days", "7"]));

    // Grants and officers under quorum too; a dry run makes no request.
    ok(&server.kmsctl(&["quorum", "set", "CreateGrant", "--required", "2"]));
    ok(&server.kmsctl(&["principal", "add", "spiffe://kms.dev/workload/batch"]));
    let dry = ok(&server.kmsctl(&[
        "--json",
        "--dry-run",
        "grant",
        "create",
        "--principal",
        "spiffe://kms.dev/workload/batch",
        "--key",
        "alias/other",
        "--operations",
        "Decrypt",
    ]));
    assert!(dry.to_string().contains("approve"), "{dry}");
    assert_eq!(ok(&server.kmsctl(&["--json", "approval", "list", "--state", "pending"])).as_array().unwrap().len(), 0);
    let id = request_id(&server.kmsctl(&[
        "grant",
        "create",
        "--principal",
        "spiffe://kms.dev/workload/batch",
        "--key",
        "alias/other",
        "--operations",
        "Decrypt",
    ]));
    ok(&dave.vote(&server, "approve", &id, 1));
    let done = ok(&erin.vote(&server, "approve", &id, 1));
    assert_eq!(done["state"], "executed", "{done}");
    let grants =
        admin.list_grants(pb::ListGrantsRequest { key_id: other.clone(), principal: "spiffe://kms.dev/workload/batch".into() }).await.unwrap();
    assert_eq!(grants.into_inner().grants.len(), 1, "the approved grant, once");
    assert_eq!([&bob, &carol, &dave, &erin].map(|o| o.name.as_str()), ["bob", "carol", "dave", "erin"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_expires_unapproved_and_a_crash_before_the_run_is_recovered_by_the_sweep() {
    // The sweep's clock runs 2 days ahead: a day-old request has expired.
    let server = Server::start_with(Options { sweep_clock_offset: 2 * 86_400, ..Options::default() });
    let (bob, _carol) = (officer(&server, "bob").await, officer(&server, "carol").await);
    let mut admin = server.admin().await;
    kms_tests::create_key(&mut admin, "k").await;
    ok(&server.kmsctl(&["quorum", "set", "ScheduleKeyDestruction", "--required", "2"]));
    let id = request_id(&server.kmsctl(&["key", "schedule-destruction", "alias/k", "--pending-days", "30"]));
    let shown = ok(&server.kmsctl(&["--json", "approval", "show", &id]));
    assert_eq!(shown["state"], "expired", "{shown}");
    refused(&bob.vote(&server, "approve", &id, 0), "only a pending request");
    drop(server);

    // The node stops (kill -9) right after the approval that reached the count committed: at its
    // restart, the sweep runs the request, once.
    let mut server =
        Server::start_with(Options { sweep_clock_offset: 3600, crash_at: Some("ApproveRequest/after_commit".into()), ..Options::default() });
    let (bob, carol) = (officer(&server, "bob").await, officer(&server, "carol").await);
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "k").await;
    drop(admin);
    ok(&server.kmsctl(&["quorum", "set", "ScheduleKeyDestruction", "--required", "2"]));
    let id = request_id(&server.kmsctl(&["key", "schedule-destruction", "alias/k", "--pending-days", "30"]));
    ok(&bob.vote(&server, "approve", &id, 0));
    assert!(!carol.vote(&server, "approve", &id, 0).status.success(), "the server died before answering");
    server.options.crash_at = None;
    server.restart();
    kms_tests::eventually("the approved request run", std::time::Duration::from_secs(30), || {
        ok(&server.kmsctl(&["--json", "approval", "show", &id]))["state"] == "executed"
    });
    assert_eq!(key_state(&server, &key), "PendingDestruction");
    let runs: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM audit WHERE operation = 'ScheduleKeyDestruction' AND outcome = 'allowed'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, 1);
}

/// An operation whose result goes to its requester (here a backup file) runs when the requester
/// repeats the call with the approved request's id: once, by them alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_under_quorum_runs_once_for_its_requester_after_approval() {
    let server = Server::start_with(kms_tests::Options { backup_key: true, ..kms_tests::Options::default() });
    let (bob, carol) = (officer(&server, "bob").await, officer(&server, "carol").await);
    refused(&server.kmsctl(&["quorum", "set", "CreateBackup", "--required", "2", "--key", "alias/none"]), "concerns no one key");
    ok(&server.kmsctl(&["quorum", "set", "CreateBackup", "--required", "2"]));
    let file = server.dir.path().join("approved.kmsbak");
    let arg = file.display().to_string();
    let id = request_id(&server.kmsctl(&["backup", "create", "--out", &arg]));
    assert!(!file.exists());
    refused(&server.kmsctl(&["--approval", &id, "backup", "create", "--out", &arg]), "is pending");
    ok(&bob.vote(&server, "approve", &id, 0));
    let ready = ok(&carol.vote(&server, "approve", &id, 0));
    assert_eq!(ready["state"], "ready", "{ready}");
    assert!(!file.exists(), "approval alone sends nothing anywhere");
    refused(&bob.kmsctl(&server, &["--approval", &id, "backup", "create", "--out", &arg]), "only its requester runs it");
    ok(&server.kmsctl(&["--json", "--approval", &id, "backup", "create", "--out", &arg]));
    assert!(file.exists());
    let again = server.dir.path().join("again.kmsbak").display().to_string();
    refused(&server.kmsctl(&["--approval", &id, "backup", "create", "--out", &again]), "is executed");
    assert_eq!(ok(&server.kmsctl(&["--json", "approval", "show", &id]))["state"], "executed");
}
