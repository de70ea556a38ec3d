//! Notifications: a webhook receiver run by the test (HTTPS, the server's development CA) gets
//! each event at and above its subscription's severity and nothing below, signed, and after a
//! server restart in the middle of failed deliveries, nothing is lost; `kmsctl events watch`
//! streams them; officers change a kind's severity.

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use kms_proto::v1 as pb;
use kms_tests::{Server, eventually};
use serde_json::Value;

/// What the receiver got: each POST's signature header and body.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String)>>>);

impl Received {
    fn events(&self) -> Vec<Value> {
        let posts = self.0.lock().unwrap().clone();
        posts.iter().flat_map(|(_, body)| serde_json::from_str::<Value>(body).unwrap()["events"].as_array().unwrap().clone()).collect()
    }

    fn kinds(&self) -> Vec<String> {
        self.events().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
    }
}

/// An HTTPS webhook receiver on 127.0.0.1 with the server's development certificate; answers
/// 503 while `down` is set.
async fn receiver(server: &Server, down: Arc<std::sync::atomic::AtomicBool>) -> (String, Received) {
    let received = Received::default();
    let got = received.clone();
    let addr = kms_tests::https_endpoint(server, move |request: hyper::Request<hyper::body::Incoming>| {
        let (got, down) = (got.clone(), down.clone());
        async move {
            let signature = request.headers().get("kms-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let status = if down.load(std::sync::atomic::Ordering::SeqCst) {
                503
            } else {
                got.0.lock().unwrap().push((signature, String::from_utf8_lossy(&body).into_owned()));
                200
            };
            hyper::Response::builder().status(status).body(Full::new(Bytes::new())).unwrap()
        }
    })
    .await;
    (format!("https://{addr}/hook"), received)
}

/// Checks `kms-signature: t=T,v1=HEX` against the body and the secret.
fn signed(signature: &str, body: &str, secret: &str) -> bool {
    let Some((t, v1)) = signature.strip_prefix("t=").and_then(|s| s.split_once(",v1=")) else { return false };
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body.as_bytes());
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    want == v1
}

fn ok(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_gets_each_event_at_its_severity_signed_and_none_is_lost_across_a_restart() {
    let mut server = Server::start();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, received) = receiver(&server, down.clone()).await;
    let added = ok(&server.kmsctl(&["--json", "notify", "add", &url, "--min-severity", "warning"]));
    let secret = added["secret"].as_str().unwrap().to_string();
    let mut admin = server.admin().await;
    let a = kms_tests::create_key(&mut admin, "a").await;
    let b = kms_tests::create_key(&mut admin, "b").await;
    admin.disable_key(pb::DisableKeyRequest { key_id: a.clone() }).await.unwrap();
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: b.clone() }).await.unwrap();
    eventually("three events delivered", Duration::from_secs(20), || received.kinds().len() >= 3);
    let events = received.events();
    // The subscription's own creation first (a configuration change: warning).
    assert_eq!(received.kinds(), ["CreateSubscription", "DisableKey", "MarkKeyCompromised"], "CreateKey (info) is below: {events:?}");
    assert_eq!((events[1]["severity"].as_str(), events[2]["severity"].as_str()), (Some("warning"), Some("critical")));
    assert_eq!(events[2]["key_id"], Value::from(b.clone()));
    for (signature, body) in received.0.lock().unwrap().iter() {
        assert!(signed(signature, body, &secret), "a valid signature: {signature}");
        assert!(!signed(signature, body, "another secret"));
    }

    // The receiver fails: deliveries are retried, the failure shows; the server restarts in
    // the middle; nothing is lost once the receiver is back.
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let c = kms_tests::create_key(&mut admin, "c").await;
    admin.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: c.clone(), pending_window_days: 7 }).await.unwrap();
    eventually("a failed delivery noted", Duration::from_secs(20), || {
        ok(&server.kmsctl(&["--json", "notify", "list"]))["subscriptions"][0]["failures"].as_i64().unwrap_or(0) > 0
    });
    drop(admin);
    server.stop();
    server.restart();
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("the events held back delivered", Duration::from_secs(60), || received.kinds().len() >= 4);
    let kinds = received.kinds();
    assert_eq!(kinds, ["CreateSubscription", "DisableKey", "MarkKeyCompromised", "ScheduleKeyDestruction"], "each once, in order");
    let seqs: Vec<i64> = received.events().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let listed = ok(&server.kmsctl(&["--json", "notify", "list"]));
    assert_eq!((listed["subscriptions"][0]["failures"].as_i64(), listed["subscriptions"][0]["delivered"].as_i64()), (Some(0), Some(4)), "{listed}");

    // Officers change a kind's severity: key creation now reaches this subscription.
    ok(&server.kmsctl(&["notify", "severity", "CreateKey", "critical"]));
    let mut admin = server.admin().await;
    kms_tests::create_key(&mut admin, "d").await;
    eventually("CreateKey delivered", Duration::from_secs(20), || received.kinds().contains(&"CreateKey".to_string()));
    assert!(!server.kmsctl(&["notify", "severity", "NoSuchKind", "critical"]).status.success());
    assert!(!server.kmsctl(&["notify", "add", "http://insecure.example.com/hook"]).status.success());
    let bodies = format!("{:?}", received.0.lock().unwrap());
    assert!(!bodies.contains("context") && !bodies.contains(&secret), "no context, no secret in an event");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auditor_watches_critical_events_as_they_happen() {
    let server = Server::start();
    let mut admin = server.admin().await;
    let key = kms_tests::create_key(&mut admin, "w").await;
    let mut watch = server
        .kmsctl_command(&server.session_path(), &["--json", "events", "watch", "--min-severity", "critical"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    admin.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key.clone() }).await.unwrap();
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("an event streamed");
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (event["kind"].as_str(), event["severity"].as_str()),
        (Some("MarkKeyCompromised"), Some("critical")),
        "the warning (DisableKey) is below: {event}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hsm_failing_and_coming_back_are_events_and_a_store_hiccup_is_not() {
    let server = Server::start();
    let count = |kind: &str| -> i64 { server.db().query_row("SELECT COUNT(*) FROM audit WHERE operation = ?1", [kind], |r| r.get(0)).unwrap() };
    // The probe's canary encryption fails (the probe runs every second in tests).
    server.hsm_fault(Some("C_Encrypt CKR_DEVICE_ERROR"));
    eventually("HsmUnavailable recorded", Duration::from_secs(20), || count("HsmUnavailable") == 1);
    server.hsm_fault(None);
    eventually("HsmAvailable recorded", Duration::from_secs(20), || count("HsmAvailable") == 1);
    assert_eq!(count("HsmUnavailable"), 1, "one event per change, not one per probe");
    let severities = ok(&server.kmsctl(&["--json", "notify", "list"]))["severities"].clone();
    assert_eq!((severities["HsmUnavailable"].as_str(), severities["HsmAvailable"].as_str()), (Some("critical"), Some("info")));
}

/// A syslog subscription: one RFC 5424 message per event at and above its severity, to the
/// host's syslog socket (here one the test binds), with no secret to keep.
#[tokio::test(flavor = "multi_thread")]
async fn syslog_gets_one_rfc5424_message_per_event_at_its_severity() {
    let server = Server::start();
    let path = server.dir.path().join("log.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let url = format!("syslog://{}", path.display());
    let added = ok(&server.kmsctl(&["--json", "notify", "add", &url, "--min-severity", "warning"]));
    assert_eq!(added["secret"], "", "{added}");
    for bad in ["syslog://relative/path", "syslog://", "ftp://example.com/"] {
        assert!(!server.kmsctl(&["notify", "add", bad]).status.success(), "{bad}");
    }
    let mut admin = server.admin().await;
    let a = kms_tests::create_key(&mut admin, "a").await;
    admin.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: a.clone() }).await.unwrap();
    let mut messages = Vec::new();
    let mut buffer = vec![0u8; 65_536];
    while messages.len() < 2 {
        let n = socket.recv(&mut buffer).expect("a syslog message within 20 s");
        messages.push(String::from_utf8(buffer[..n].to_vec()).unwrap());
    }
    // authpriv (10): warning = 84, crit = 82; CreateKey (info) is below the subscription's.
    assert!(messages[0].starts_with("<84>1 ") && messages[0].contains(" kms-server - CreateSubscription - {"), "{}", messages[0]);
    assert!(messages[1].starts_with("<82>1 ") && messages[1].contains(" kms-server - MarkKeyCompromised - {"), "{}", messages[1]);
    let json: Value = serde_json::from_str(&messages[1][messages[1].find('{').unwrap()..]).unwrap();
    assert_eq!((json["key_id"].as_str(), json["severity"].as_str()), (Some(a.as_str()), Some("critical")));
    let listed = ok(&server.kmsctl(&["--json", "notify", "list"]));
    assert_eq!(listed["subscriptions"][0]["delivered"].as_i64(), Some(2), "{listed}");
}
