//! TESTPLAN R2: the process aborts at each named step of each multi-step operation (the one list
//! `kms_server::hooks::CRASH_POINTS`), and after a restart the operation is wholly there or
//! wholly absent: rows and HSM objects agree, the database is intact, the audit verifies, and
//! what recovery repaired is in its log.

use std::time::Duration;

use kms_proto::v1 as pb;
use kms_server::hooks::{CRASH_POINTS, Step};
use kms_tests::{Options, Server, create_key};

#[tokio::test(flavor = "multi_thread")]
async fn every_crash_point_leaves_each_operation_wholly_there_or_wholly_absent() {
    for (operation, step) in CRASH_POINTS {
        let point = format!("{operation}/{}", step.as_str());
        let backups = matches!(*operation, "CreateBackup" | "Restore");
        let mut server = Server::start_with(Options { crash_at: Some(point.clone()), backup_key: backups, ..Options::default() });
        let backup = server.dir.path().join("crash.kmsbak");
        let backup_arg = backup.display().to_string();
        let mut admin = server.admin().await;
        let key = if *operation == "CreateKey" { None } else { Some(create_key(&mut admin, "").await) };
        let before = server.live_version_labels();

        let answered = match *operation {
            "CreateKey" => admin.create_key(pb::CreateKeyRequest::default()).await.is_ok(),
            "RotateKey" => admin.rotate_key(pb::RotateKeyRequest { key_id: key.clone().unwrap() }).await.is_ok(),
            "DisableKey" => admin.disable_key(pb::DisableKeyRequest { key_id: key.clone().unwrap() }).await.is_ok(),
            "ScheduleKeyDestruction" => admin
                .schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key.clone().unwrap(), pending_window_days: 7 })
                .await
                .is_ok(),
            "DestroyKey" => {
                // Destruction is the sweeper's: schedule it, let the window pass while the server
                // is down, and start it again (still set to crash) for the sweeper to run.
                let request = pb::ScheduleKeyDestructionRequest { key_id: key.clone().unwrap(), pending_window_days: 7 };
                admin.schedule_key_destruction(request).await.unwrap();
                server.stop();
                server.sql("UPDATE keys SET destruction_at = 1");
                server.restart();
                false
            }
            "CreateBackup" => server.kmsctl(&["backup", "create", "--out", &backup_arg]).status.success(),
            "Restore" => {
                // Back up, lose the token and the database, restore: the restore aborts. The
                // operator runs it again, unless it had committed (then it refuses to run twice).
                let out = server.kmsctl(&["backup", "create", "--out", &backup_arg]);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                server.stop();
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", server.db_path().display()));
                }
                server.replace_token_with_replica();
                let restore = |server: &Server| server.server_command(&["restore", &backup_arg, "--none-destroyed-since"]).unwrap();
                let out = restore(&server);
                assert!(!out.status.success(), "{point}: the restore finished");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains(&format!("test hook: crashing at {point}")), "{point}: aborted elsewhere:\n{stderr}");
                server.options.crash_at = None;
                let again = restore(&server);
                let committed = *step == Step::AfterCommit;
                assert_eq!(again.status.success(), !committed, "{point}: {}", String::from_utf8_lossy(&again.stderr));
                false
            }
            other => panic!("no driver for {other}"),
        };
        assert!(!answered, "{point}: the call was answered, so the crash point was never reached");
        assert!(server.wait_for_exit(Duration::from_secs(20)), "{point}: the server did not abort");
        if *operation != "Restore" {
            let log = std::fs::read_to_string(server.log_path()).unwrap();
            assert!(log.contains(&format!("test hook: crashing at {point}")), "{point}: aborted elsewhere:\n{log}");
        }

        server.options.crash_at = None;
        server.restart();
        if *operation == "Restore" {
            server.relogin(); // a restore ends every session
        }
        let after = server.live_version_labels();
        let destroyed = *operation == "DestroyKey";
        if destroyed {
            // Destruction was decided before the crash: recovery or the next sweep finishes it.
            kms_tests::eventually(&format!("{point}: destruction finished"), Duration::from_secs(20), || server.live_version_labels().is_empty());
        }
        let after = if destroyed { server.live_version_labels() } else { after };
        assert_eq!(server.object_labels(), after, "{point}: HSM objects and live rows agree");
        // Wholly there or wholly absent.
        match *operation {
            "CreateKey" | "RotateKey" => {
                let added = after.len() as i64 - before.len() as i64;
                assert!(added == 0 || added == 1, "{point}: {before:?} -> {after:?}");
                if *step == Step::AfterCommit || *step == Step::BeforeReply {
                    assert_eq!(added, 1, "{point}: a committed change is kept");
                } else {
                    assert_eq!(added, 0, "{point}: an uncommitted change is rolled back");
                }
            }
            "CreateBackup" => {
                assert_eq!(after, before, "{point}");
                let snapshot = format!("{}.snapshot", server.db_path().display());
                assert!(!std::path::Path::new(&snapshot).exists(), "{point}: the snapshot was left behind");
                assert!(!backup.exists(), "{point}: an unanswered backup left a file that looks complete");
                let audited: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'CreateBackup'", [], |r| r.get(0)).unwrap();
                assert_eq!(audited, i64::from(*step != Step::AfterHsm), "{point}: the backup is audited once it is made");
            }
            "Restore" => {
                assert_eq!(after, before, "{point}: every version restored");
                let restores: i64 = server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = 'Restore'", [], |r| r.get(0)).unwrap();
                assert_eq!(restores, 1, "{point}: one restore recorded");
            }
            "DisableKey" | "ScheduleKeyDestruction" => {
                let state: String = server.db().query_row("SELECT state FROM keys", [], |r| r.get(0)).unwrap();
                let want = if *operation == "DisableKey" { "Disabled" } else { "PendingDestruction" };
                assert_eq!(state, want, "{point}: committed before the crash, so kept");
                assert_eq!(after, before);
            }
            _ => {
                let state: String = server.db().query_row("SELECT state FROM keys", [], |r| r.get(0)).unwrap();
                assert_eq!(state, "Destroyed", "{point}");
            }
        }
        // The primary version always exists and has its object.
        let primaries: Vec<String> = {
            let db = server.db();
            let mut stmt = db.prepare("SELECT key_id || ':' || primary_version FROM keys WHERE state != 'Destroyed'").unwrap();
            stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
        };
        for p in primaries {
            assert!(after.contains(&format!("kms:{p}")), "{point}: primary {p} has no live row");
        }
        let integrity: String = server.db().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(integrity, "ok", "{point}");
        let verify = server.kmsctl(&["--json", "audit", "verify"]);
        assert!(verify.status.success(), "{point}: {}", String::from_utf8_lossy(&verify.stdout));
        // Recovery says what it repaired: an interrupted create's object, or an interrupted destroy.
        let log = std::fs::read_to_string(server.log_path()).unwrap();
        if (*operation == "CreateKey" || *operation == "RotateKey") && *step == Step::AfterHsm {
            assert!(log.contains("recovery:"), "{point}: nothing logged as repaired:\n{log}");
        }
        // The service works after the restart.
        admin = server.admin().await;
        admin.create_key(pb::CreateKeyRequest::default()).await.unwrap_or_else(|e| panic!("{point}: {e}"));
    }
}
