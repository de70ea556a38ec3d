//! Webhook and syslog delivery: on the node that runs the background jobs, each subscription is
//! sent the events after its cursor (the last audit record it has had), at and above its
//! severity, as one signed HTTPS POST (or one syslog message each, to the host's syslog socket:
//! `Event::syslog_message`); the cursor moves only once the receiver answered 2xx, so that a
//! receiver down or a node restarted loses no event (a receiver may get one twice, after a
//! failover: events carry the record's sequence number to drop repeats by). A receiver that
//! fails is retried after 1, 2, 4, ... up to 300 seconds.
//!
//! The POST's body: `{"subscription": ID, "events": [...]}`; its header `kms-signature`:
//! `t=UNIX_TIME,v1=HEX(HMAC-SHA256(secret, "UNIX_TIME." + body))`.

use std::time::Duration;

use crate::api::Shared;
use crate::clock::now;
use crate::service::events::{Severity, signature};
use crate::store::SubscriptionRecord;

/// How often the deliverer looks for events.
const EVERY: Duration = Duration::from_secs(1);
/// The most records read for one delivery.
const PAGE: i64 = 500;
/// The most deliveries to one subscription in one pass: a busy trail (thousands of data-plane
/// calls a second) is caught up with, a page at a time.
const PAGES_PER_PASS: usize = 50;
/// The longest wait before retrying a failing receiver, in seconds.
const MAX_BACKOFF: i64 = 300;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "kms-signature";

/// Delivers to every subscription that is due, every second, until `shutdown`.
pub async fn deliver_loop(shared: Shared, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if !shared.kms.leading() {
            continue;
        }
        let kms = shared.kms.clone();
        let due = match tokio::task::spawn_blocking(move || kms.subscriptions()).await {
            Ok(Ok(all)) => all.into_iter().filter(|s| s.next_attempt_at <= now()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the notification subscriptions failed");
                continue;
            }
            Err(_) => continue,
        };
        for mut s in due {
            for _ in 0..PAGES_PER_PASS {
                match deliver(&shared, s).await {
                    Ok(Some(next)) => s = next,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "a notification delivery could not be recorded");
                        break;
                    }
                }
            }
        }
    }
}

/// One delivery to `s`, and its outcome recorded; the subscription as it stands after it, if
/// a full page was delivered (more may be waiting).
async fn deliver(shared: &Shared, mut s: SubscriptionRecord) -> Result<Option<SubscriptionRecord>, String> {
    let min = Severity::parse(&s.min_severity).unwrap_or(Severity::Info);
    let (kms, cursor) = (shared.kms.clone(), s.cursor);
    let (events, last) =
        tokio::task::spawn_blocking(move || kms.events_after(cursor, PAGE)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let events: Vec<_> = events.into_iter().filter(|e| e.severity >= min).collect();
    if !events.is_empty() {
        let failed = match crate::service::events::syslog_socket(&s.url) {
            Some(path) => {
                let (path, messages) = (path.to_string(), events.iter().map(|e| e.syslog_message()).collect::<Vec<_>>());
                tokio::task::spawn_blocking(move || to_syslog(&path, &messages)).await.map_err(|e| e.to_string())?.err()
            }
            None => {
                let body = serde_json::json!({"subscription": s.id, "events": events}).to_string().into_bytes();
                let (kms, record) = (shared.kms.clone(), s.clone());
                let secret = tokio::task::spawn_blocking(move || kms.subscription_secret(&record))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let header = signature(secret.expose_secret(), now(), &body).ok_or("the webhook's secret cannot key an HMAC")?;
                let headers = [(SIGNATURE_HEADER, header), ("kms-subscription", s.id.clone())];
                match crate::facade::https::call(&shared.outgoing_ca, &s.url, Some(body), &headers).await {
                    Ok((status, _)) if status.is_success() => None,
                    Ok((status, _)) => Some(format!("the receiver answered {status}")),
                    Err(e) => Some(e),
                }
            }
        };
        if let Some(why) = failed {
            s.failures += 1;
            s.next_attempt_at = now() + (1i64 << s.failures.clamp(0, 9)).min(MAX_BACKOFF);
            s.last_error = why;
            tracing::warn!(subscription = %s.id, error = %s.last_error, failures = s.failures, "a notification delivery failed; it is retried");
            note(shared, &s).await?;
            return Ok(None);
        }
        s.delivered += events.len() as i64;
    } else if last == s.cursor {
        return Ok(None);
    }
    let full = last - s.cursor >= PAGE;
    (s.cursor, s.failures, s.next_attempt_at, s.last_error) = (last, 0, now(), String::new());
    note(shared, &s).await?;
    Ok(full.then_some(s))
}

async fn note(shared: &Shared, s: &SubscriptionRecord) -> Result<(), String> {
    let (kms, s) = (shared.kms.clone(), s.clone());
    tokio::task::spawn_blocking(move || kms.note_delivery(&s)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// Sends each message as one datagram to the syslog socket at `path`.
fn to_syslog(path: &str, messages: &[Vec<u8>]) -> Result<(), String> {
    let socket = std::os::unix::net::UnixDatagram::unbound().map_err(|e| format!("syslog socket: {e}"))?;
    for m in messages {
        socket.send_to(m, path).map_err(|e| format!("syslog {path}: {e}"))?;
    }
    Ok(())
}
