//! The load generator works against a real server (a short, bounded run; no timing asserted).

use kms_tests::{Server, create_key};

/// `kms-load` on `server`'s data plane, as its dev workload, on the key `alias/load`, reporting
/// JSON.
fn kms_load(server: &Server) -> std::process::Command {
    let mut command = std::process::Command::new(kms_tests::bin("kms-load"));
    command.args(["--data-endpoint", &format!("https://{}", server.data_addr), "--key", "alias/load", "--json", "--pki"]).arg(server.pki_dir());
    command
}

/// Runs `kms-load` against `server` with `args` (which bound the run) and returns its JSON report.
async fn run(server: &Server, args: &'static [&'static str]) -> serde_json::Value {
    let pid = server.pid().to_string();
    let mut command = kms_load(server);
    let out = tokio::task::spawn_blocking({
        let token = server.token.clone();
        move || {
            command
                .args(["--clients", "4", "--channels", "2", "--server-pid", &pid])
                .args(args)
                .arg("--hsm-module")
                .arg(&token.module)
                .args(["--hsm-token", &token.label, "--hsm-threads", "1"])
                .arg("--hsm-pin-file")
                .arg(&token.pin_file)
                .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], serde_json::json!({}));
    assert!(report["server"]["rss_kib"].as_u64().unwrap() > 0);
    assert!(report["raw_hsm"]["ops_per_second"].as_f64().unwrap() > 0.0);
    let share = report["service_share_of_hsm"].as_f64().unwrap();
    assert!(share > 0.0 && share.is_finite(), "{report}");
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn kms_load_reports_every_operation_and_the_raw_hsm_rate() {
    let server = Server::start();
    let mut admin = server.admin().await;
    create_key(&mut admin, "load").await;

    // A throwaway key a killed run left behind is cleaned up by the next run.
    server.inspect("create:kms-load:throwaway");
    // Open loop: a Poisson process of 400 calls a second on average, for one second.
    let report =
        run(&server, &["--mix", "decrypt=40,generate=30,reencrypt=20,encrypt=10", "--rate", "400", "--arrivals", "poisson", "--duration", "1"]).await;
    assert_eq!((&report["offered_rate"], &report["arrivals"]), (&serde_json::json!(400), &serde_json::json!("poisson")), "{report}");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "four operations and the total: {report}");
    let calls = results[4]["ok"].as_u64().unwrap();
    assert!((300..=500).contains(&calls), "{calls} calls offered at 400 a second for one second: {report}");
    for r in results {
        assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
        assert!(r["p50_us"].as_u64().unwrap() <= r["p99_us"].as_u64().unwrap());
    }
    // Without a backup key pair the service uses its versions' token objects: so does the raw
    // rate, on a throwaway token object that is gone after the run, with the one left before.
    assert_eq!(report["raw_hsm"]["key_object"], "token object", "{report}");
    assert_throwaway_gone(&server);

    // Batches: the two batch calls, counted per call and per data key, against the raw HSM rate
    // of the same work done the service's way: on a server with session copies, under a
    // throwaway session object. This run is bounded by a number of calls instead of a time.
    let server = Server::start_with(kms_tests::Options { backup_key: true, ..kms_tests::Options::default() });
    create_key(&mut server.admin().await, "load").await;
    let report = run(&server, &["--mix", "decrypt=50,generate=50", "--batch", "8", "--requests", "40"]).await;
    assert_eq!((&report["requests"], &report["results"][2]["ok"]), (&serde_json::json!(40), &serde_json::json!(40)), "{report}");
    assert_eq!(report["raw_hsm"]["key_object"], "session object", "{report}");
    assert_throwaway_gone(&server);
    let names: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["operation"].as_str().unwrap()).collect();
    assert_eq!(names, ["DecryptBatch", "GenerateDataKeys", "all"], "{report}");
    for r in report["results"].as_array().unwrap() {
        assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
        let (items, calls) = (r["items_per_second"].as_f64().unwrap(), r["per_second"].as_f64().unwrap());
        assert!((items - 8.0 * calls).abs() < 1e-6 * items, "{r}");
    }
    assert_eq!(report["raw_hsm"]["operation"], "C_GenerateRandom(352) + 8 C_Encrypt(AES-GCM, 32 B)");
}

/// Nothing of the raw measurement is left on the token.
fn assert_throwaway_gone(server: &Server) {
    let objects: Vec<serde_json::Value> = serde_json::from_slice(&server.inspect("list")).unwrap();
    assert!(!objects.iter().any(|o| o["label"] == "kms-load:throwaway"), "{objects:?}");
}

/// A server that stops answering cannot hold a run past its end: each call is given
/// `--timeout-ms` and then counted as DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread")]
async fn kms_load_ends_its_run_when_the_server_stops_answering() {
    let server = Server::start();
    create_key(&mut server.admin().await, "load").await;
    let mut child = kms_load(&server)
        .args(["--clients", "2", "--channels", "1", "--duration", "3", "--timeout-ms", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once calls are being answered, the server stops (SIGSTOP) until the run is over.
    kms_tests::eventually("calls answered", std::time::Duration::from_secs(30), || {
        server.metric(r#"kms_requests_total{rpc="Decrypt",code="OK"}"#).is_some()
    });
    let signal = |name: &str| assert!(std::process::Command::new("kill").arg(name).arg(server.pid().to_string()).status().unwrap().success());
    signal("-STOP");
    let ended = kms_tests::wait_for(&mut child, std::time::Duration::from_secs(60));
    signal("-CONT");
    if ended.is_none() {
        child.kill().unwrap();
        panic!("kms-load was still waiting for a stopped server a minute later");
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = report["errors"].as_object().unwrap();
    assert!(!errors.is_empty() && errors.keys().all(|e| e.ends_with(": DeadlineExceeded")), "{report}");
    assert!(report["results"].as_array().unwrap().iter().any(|r| r["operation"] == "all" && r["ok"].as_u64().unwrap() > 0), "{report}");
}
