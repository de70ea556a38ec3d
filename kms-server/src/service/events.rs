//! Notifications: the audit trail's records that matter to the people responsible for the keys,
//! as events with a severity (defaults here; officers change them), delivered to webhooks
//! (`crate::notify`, which remembers in the store how far each has got, so that a restart loses
//! nothing) and streamed to officers and auditors who watch (`Watch`).
//!
//! An event carries what the audit record says of who did what to which key, never an
//! encryption context, a caller context, key material or a plaintext.

use serde::Serialize;

use super::{Kms, now};
use crate::audit::StoredRecord;
use crate::domain::hex::hex;
use crate::error::{Error, Result};
use crate::store::SubscriptionRecord;

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Each event kind (an audit operation, or `DeniedCalls`) and its default severity.
pub const DEFAULTS: &[(&str, Severity)] = &[
    ("HsmUnavailable", Severity::Critical),
    ("AuditVerificationFailed", Severity::Critical),
    ("MarkKeyCompromised", Severity::Critical),
    ("DestroyKey", Severity::Critical),
    ("DestroyKeyVersion", Severity::Critical),
    ("Restore", Severity::Critical),
    ("ExportKeys", Severity::Critical),
    ("ImportKey", Severity::Warning),
    ("LoginFailed", Severity::Warning),
    ("DeniedCalls", Severity::Warning),
    ("DisableKey", Severity::Warning),
    ("DisableKeyVersion", Severity::Warning),
    ("ScheduleKeyDestruction", Severity::Warning),
    ("ScheduleKeyVersionDestruction", Severity::Warning),
    ("VersionNearLimit", Severity::Warning),
    ("DisableOfficer", Severity::Warning),
    ("DisablePrincipal", Severity::Warning),
    ("RequestApproval", Severity::Warning),
    ("RejectRequest", Severity::Warning),
    ("ExpireRequest", Severity::Warning),
    ("BackupFailed", Severity::Warning),
    ("Recovery", Severity::Warning),
    ("SetQuorumPolicy", Severity::Warning),
    ("ConfigureCse", Severity::Warning),
    ("PutCseIssuer", Severity::Warning),
    ("RemoveCseIssuer", Severity::Warning),
    ("CreateXksKeyStore", Severity::Warning),
    ("AddXksCredential", Severity::Warning),
    ("RemoveXksCredential", Severity::Warning),
    ("CreateSubscription", Severity::Warning),
    ("DeleteSubscription", Severity::Warning),
    ("SetEventSeverity", Severity::Warning),
    ("HsmAvailable", Severity::Info),
    ("CreateBackup", Severity::Info),
    ("ApproveRequest", Severity::Info),
    ("ExecuteApprovedRequest", Severity::Info),
    ("ApprovedRequestReady", Severity::Info),
    ("CreateKey", Severity::Info),
    ("RotateKey", Severity::Info),
    ("EnableKey", Severity::Info),
    ("EnableKeyVersion", Severity::Info),
    ("CancelKeyDestruction", Severity::Info),
    ("CancelKeyVersionDestruction", Severity::Info),
    ("CreateGrant", Severity::Info),
    ("RevokeGrant", Severity::Info),
    ("CreatePrincipal", Severity::Info),
    ("EnablePrincipal", Severity::Info),
    ("CreateOfficer", Severity::Info),
    ("SignOffReview", Severity::Info),
    ("RefreshCseIssuer", Severity::Info),
    ("GetImportParameters", Severity::Info),
];

/// The path of the syslog socket a `syslog://` subscription names.
pub fn syslog_socket(url: &str) -> Option<&str> {
    url.strip_prefix("syslog://")
}

impl Event {
    /// The event as one RFC 5424 syslog message: facility authpriv (10); crit, warning or info;
    /// the event's own time; app name `kms-server`; message id the event's kind; the event as
    /// JSON for its message.
    pub fn syslog_message(&self) -> Vec<u8> {
        let severity = match self.severity {
            Severity::Critical => 2,
            Severity::Warning => 4,
            Severity::Info => 6,
        };
        let time = chrono::DateTime::from_timestamp(self.time, 0).map_or_else(|| "-".to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("<{}>1 {time} - kms-server - {} - {json}", 10 * 8 + severity, self.kind).into_bytes()
    }
}

/// Data-plane calls refused in one pass over the trail that make a `DeniedCalls` event.
pub const DENIED_BURST: usize = 10;

/// The data plane's and the facades' calls (a refusal of one counts towards `DeniedCalls`).
fn data_plane(operation: &str) -> bool {
    matches!(
        operation,
        "Encrypt"
            | "Decrypt"
            | "ReEncrypt"
            | "GenerateDataKey"
            | "GenerateDataKeyWithoutPlaintext"
            | "GenerateDataKeys"
            | "DecryptBatch"
            | "GenerateRandom"
    ) || operation.starts_with("Xks")
        || operation.starts_with("Cse")
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The audit record's sequence number: unique, in order (a receiver drops repeats by it).
    pub seq: i64,
    pub time: i64,
    pub kind: String,
    pub severity: Severity,
    pub principal: String,
    pub key_id: Option<String>,
    pub key_version: Option<i64>,
    pub outcome: String,
    pub detail: String,
}

/// The severities in force: the defaults, with the officers' changes.
#[derive(Debug, Clone)]
pub struct Severities(std::collections::HashMap<String, Severity>);

impl Severities {
    pub fn of(&self, kind: &str) -> Option<Severity> {
        self.0.get(kind).copied()
    }
}

/// The events among `records` (in order), the refused data-plane calls gathered into one
/// `DeniedCalls` event when there are `DENIED_BURST` or more.
pub fn events(records: &[StoredRecord], severities: &Severities) -> Vec<Event> {
    let mut out = Vec::new();
    let mut denied: Vec<&StoredRecord> = Vec::new();
    for r in records {
        if data_plane(&r.operation) {
            if r.outcome == "denied" {
                denied.push(r);
            }
            continue;
        }
        let kind = match (r.operation.as_str(), r.outcome.as_str()) {
            ("Login", "denied") => "LoginFailed",
            ("CreateBackup", "failed") => "BackupFailed",
            (_, "allowed") => r.operation.as_str(),
            _ => continue,
        };
        let Some(severity) = severities.of(kind) else { continue };
        out.push(Event {
            seq: r.seq,
            time: r.time,
            kind: kind.to_string(),
            severity,
            principal: r.principal.clone(),
            key_id: r.key_id.clone(),
            key_version: r.key_version,
            outcome: r.outcome.clone(),
            detail: r.detail.clone(),
        });
    }
    if denied.len() >= DENIED_BURST
        && let (Some(last), Some(severity)) = (denied.last(), severities.of("DeniedCalls"))
    {
        let mut principals: Vec<&str> = denied.iter().map(|r| r.principal.as_str()).collect();
        principals.sort_unstable();
        principals.dedup();
        out.push(Event {
            seq: last.seq,
            time: last.time,
            kind: "DeniedCalls".into(),
            severity,
            principal: principals.join(","),
            key_id: None,
            key_version: None,
            outcome: "denied".into(),
            detail: format!("{} data-plane calls refused (records {} to {})", denied.len(), denied[0].seq, last.seq),
        });
        out.sort_by_key(|e| e.seq);
    }
    out
}

/// What a webhook's secret is sealed with.
fn seal_aad(id: &str) -> Vec<u8> {
    format!("kms-webhook-secret:{id}").into_bytes()
}

/// The signature header's value for `body` at `time`: `t=TIME,v1=HEX(HMAC-SHA256(secret,
/// "TIME.BODY"))`, which a receiver recomputes (and whose time it checks, against replays).
pub fn signature(secret: &[u8], time: i64, body: &[u8]) -> Option<String> {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length: this does not fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(format!("{time}.").as_bytes());
    mac.update(body);
    Some(format!("t={time},v1={}", hex(&mac.finalize().into_bytes())))
}

impl Kms {
    /// The severities in force.
    pub fn event_severities(&self) -> Result<Severities> {
        let mut map: std::collections::HashMap<String, Severity> = DEFAULTS.iter().map(|(k, s)| (k.to_string(), *s)).collect();
        for (kind, severity) in self.store.read(|tx| tx.event_severities())? {
            if let Some(s) = Severity::parse(&severity) {
                map.insert(kind, s);
            }
        }
        Ok(Severities(map))
    }

    /// Changes the severity of an event kind (`None`: its default again).
    pub fn set_event_severity(&self, caller: &super::Caller, kind: &str, severity: Option<Severity>) -> Result<()> {
        if !DEFAULTS.iter().any(|(k, _)| *k == kind) {
            return Err(Error::invalid("kind", format!("{kind:?} is not an event kind")));
        }
        let what = severity.map_or("its default", Severity::as_str);
        caller.commit_point(|| format!("make {kind} events {what}"))?;
        let at = now();
        self.store.write(|tx| {
            tx.put_event_severity(kind, severity.map(Severity::as_str))?;
            tx.append_audit(&caller.audit("SetEventSeverity", None, None, format!("{kind}: {what}")), at)
        })?;
        Ok(())
    }

    /// The events after record `after`, at most `limit` records read, and the last record read.
    pub fn events_after(&self, after: i64, limit: i64) -> Result<(Vec<Event>, i64)> {
        let records: Vec<StoredRecord> = self.store.read(|tx| tx.audit_page(after, limit))?.into_iter().map(|(r, _)| r).collect();
        let last = records.last().map_or(after, |r| r.seq);
        Ok((events(&records, &self.event_severities()?), last))
    }

    /// The last record's sequence number (where a new subscription or watch starts).
    pub fn audit_end(&self) -> Result<i64> {
        Ok(self.store.read(|tx| tx.audit_head())?.last.0)
    }

    /// Subscribes `url` to the events at or above `min_severity`, from now on: an https://
    /// webhook, whose deliveries are signed with a secret returned once (and kept sealed in the
    /// HSM), or `syslog://` and the path of the host's syslog socket (`syslog:///dev/log`),
    /// which gets one RFC 5424 message per event (and no secret).
    pub fn create_subscription(&self, caller: &super::Caller, url: &str, min_severity: Severity) -> Result<(SubscriptionRecord, String)> {
        if url.len() > 1024 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid("url", "must be at most 1,024 characters, without spaces or control characters"));
        }
        match syslog_socket(url) {
            Some(path) if !path.starts_with('/') || path.len() > 100 => {
                return Err(Error::invalid("url", "must name the syslog socket's absolute path, at most 100 bytes: syslog:///dev/log"));
            }
            Some(_) => {}
            None if url.starts_with("https://") => {}
            None => return Err(Error::invalid("url", "must be an https:// URL (a webhook) or syslog:// and a socket's path (syslog:///dev/log)")),
        }
        caller.commit_point(|| format!("send {} events and above to {url}", min_severity.as_str()))?;
        let mut random = crate::secret::SecretBytes::zeroed(8 + 32);
        self.hsm.random(random.expose_secret_mut())?;
        let (id, secret) = random.expose_secret().split_at(8);
        let id = format!("S-{}", hex(id));
        let secret = zeroize::Zeroizing::new(hex(secret));
        let at = now();
        let record = SubscriptionRecord {
            id: id.clone(),
            url: url.to_string(),
            min_severity: min_severity.as_str().into(),
            sealed_secret: self.seal(&seal_aad(&id), secret.as_bytes())?,
            cursor: self.audit_end()?,
            delivered: 0,
            failures: 0,
            next_attempt_at: at,
            last_error: String::new(),
            created_at: at,
        };
        self.store.write(|tx| {
            tx.insert_subscription(&record)?;
            tx.append_audit(&caller.audit("CreateSubscription", None, None, format!("{id}: {url}, {} and above", min_severity.as_str())), at)
        })?;
        let secret = if syslog_socket(url).is_some() { String::new() } else { secret.to_string() };
        Ok((record, secret))
    }

    pub fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>> {
        Ok(self.store.read(|tx| tx.subscriptions())?)
    }

    pub fn delete_subscription(&self, caller: &super::Caller, id: &str) -> Result<()> {
        if !self.subscriptions()?.iter().any(|s| s.id == id) {
            return Err(Error::NotFound { what: format!("subscription {id}") });
        }
        caller.commit_point(|| format!("stop sending events to subscription {id}"))?;
        let at = now();
        self.store.write(|tx| {
            tx.delete_subscription(id)?;
            tx.append_audit(&caller.audit("DeleteSubscription", None, None, id.to_string()), at)
        })?;
        Ok(())
    }

    /// A subscription's secret, unsealed.
    pub fn subscription_secret(&self, s: &SubscriptionRecord) -> Result<crate::secret::SecretBytes> {
        self.unseal(&seal_aad(&s.id), &s.sealed_secret)
    }

    /// Records a delivery's outcome.
    pub fn note_delivery(&self, s: &SubscriptionRecord) -> Result<()> {
        Ok(self.store.write(|tx| tx.note_delivery(s))?)
    }

    /// Records a change of the HSM's health seen by the probe, as an event.
    pub fn record_hsm_health(&self, available: bool, detail: &str) -> Result<()> {
        let operation = if available { "HsmAvailable" } else { "HsmUnavailable" };
        self.record(&crate::audit::AuditEvent::system(operation, None, None, detail.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, operation: &str, outcome: &str) -> StoredRecord {
        StoredRecord {
            seq,
            time: 1_800_000_000 + seq,
            request_id: String::new(),
            principal: format!("p{seq}"),
            operation: operation.into(),
            key_id: None,
            key_version: None,
            context: Some("{\"tenant\":\"secret-context-value\"}".into()),
            outcome: outcome.into(),
            status: String::new(),
            detail: String::new(),
            caller_context: Some("{\"user\":\"ana\"}".into()),
        }
    }

    #[test]
    fn records_become_events_with_their_severity_and_bursts_of_refusals_one_event() {
        let severities = Severities(DEFAULTS.iter().map(|(k, s)| (k.to_string(), *s)).collect());
        let mut records = vec![
            record(1, "Encrypt", "allowed"),
            record(2, "MarkKeyCompromised", "allowed"),
            record(3, "ListKeys", "allowed"),
            record(4, "Login", "denied"),
            record(5, "DisableKey", "denied"),
        ];
        let events = events(&records, &severities);
        let kinds: Vec<(&str, Severity)> = events.iter().map(|e| (e.kind.as_str(), e.severity)).collect();
        assert_eq!(kinds, [("MarkKeyCompromised", Severity::Critical), ("LoginFailed", Severity::Warning)]);
        assert!(!format!("{events:?}").contains("secret-context-value") && !format!("{events:?}").contains("ana"));
        records.extend((10..20).map(|i| record(i, "Decrypt", "denied")));
        let burst = super::events(&records, &severities);
        assert_eq!(burst.last().map(|e| (e.kind.as_str(), e.seq)), Some(("DeniedCalls", 19)));
        assert!(Severity::Critical > Severity::Warning && Severity::Warning > Severity::Info);
    }

    #[test]
    fn the_signature_is_an_hmac_of_the_time_and_the_body() {
        let s = signature(b"key", 1_700_000_000, b"{}").unwrap();
        assert!(s.starts_with("t=1700000000,v1=") && s.len() == "t=1700000000,v1=".len() + 64, "{s}");
        assert_ne!(Some(s.clone()), signature(b"key", 1_700_000_001, b"{}"));
        assert_ne!(Some(s), signature(b"other", 1_700_000_000, b"{}"));
    }
}
