//! The Level 2 evidence report (`kmsctl report dgssi`): for each requirement of Morocco's cloud
//! framework at Level 2 that a key custodian answers for, the evidence drawn live from the
//! service (the HSM's own attributes of every key object, the officers, the review, the audit
//! trail verified now, the backups), each item pass, warn or fail with why. The document ends
//! with its SHA-256 and an HMAC of it made in the HSM (the audit checkpoints' key, under a label
//! of its own), which `kmsctl report verify` checks: an auditor can tell the report came from
//! this service unchanged.
//!
//! Nothing in it is key material, a context value or a secret: key ids, states, counts, names
//! of officers and principals, times.

use sha2::{Digest, Sha256};

use super::{Kms, now};
use crate::domain::hex::{hex, unhex};
use crate::domain::lifecycle::KeyState;
use crate::error::{Error, Result};

/// What the HSM's HMAC of a report covers: this label, then the SHA-256 of the document.
const MAC_LABEL: &[u8] = b"kms-evidence-report-v1\0";
/// The line that starts a Markdown or HTML report's signature.
const MARKER: &str = "<!-- kms evidence report: signature -->";
/// A backup older than this is a warning.
const BACKUP_STALE_SECONDS: i64 = 30 * 86_400;
/// Level 2 keeps logs at least three months.
const MIN_RETENTION_DAYS: u32 = 90;
/// OWASP's argon2id minimum (what the service sets): 19 MiB, 2 passes, 1 lane.
const ARGON2_MIN: (u32, u32, u32) = (19_456, 2, 1);

/// An item's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One requirement and its evidence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Item {
    pub id: &'static str,
    pub requirement: &'static str,
    pub verdict: Verdict,
    pub why: String,
    pub evidence: Vec<String>,
}

/// The report, as drawn from the service now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub title: &'static str,
    pub generated_at: i64,
    pub generated_by: String,
    pub service_version: &'static str,
    pub hsm_token: String,
    pub items: Vec<Item>,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.items.iter().filter(|i| i.verdict == verdict).count()
    }
}

/// A report's formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
    Html,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "" | "md" | "markdown" => Ok(Format::Markdown),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            other => Err(Error::invalid("format", format!("{other:?} is not md, json or html"))),
        }
    }
}

fn date(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map_or_else(|| t.to_string(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string())
}

fn item(id: &'static str, requirement: &'static str, verdict: Verdict, why: impl Into<String>, evidence: Vec<String>) -> Item {
    Item { id, requirement, verdict, why: why.into(), evidence }
}

/// The lifecycle operations a key's history counts.
const LIFECYCLE: [&str; 11] = [
    "CreateKey",
    "RotateKey",
    "DisableKey",
    "EnableKey",
    "MarkKeyCompromised",
    "ScheduleKeyDestruction",
    "CancelKeyDestruction",
    "DestroyKey",
    "DisableKeyVersion",
    "EnableKeyVersion",
    "DestroyKeyVersion",
];

impl Kms {
    /// Draws the report now, for `generated_by` (the officer or auditor asking).
    pub fn evidence_report(&self, generated_by: &str) -> Result<Report> {
        let token = self.hsm_token();
        let items = vec![
            self.keys_item()?,
            self.lifecycle_item()?,
            self.mfa_item()?,
            self.review_item()?,
            self.password_item()?,
            self.audit_item()?,
            self.notification_item()?,
            self.backup_item()?,
            self.reversibility_item()?,
        ];
        Ok(Report {
            title: "Level 2 evidence: client-held key management (Morocco's cloud framework, encryption keys known only to the customer)",
            generated_at: now(),
            generated_by: generated_by.to_string(),
            service_version: env!("CARGO_PKG_VERSION"),
            hsm_token: token.map_or_else(
                || "the HSM did not answer".into(),
                |t| format!("{} ({} {}, serial {})", t.label, t.manufacturer, t.model, t.serial_number),
            ),
            items,
        })
    }

    /// Every key object's protection as the HSM states it, and the backup key's.
    fn keys_item(&self) -> Result<Item> {
        let entries: Vec<_> = self.registry.read().keys.values().cloned().collect();
        let (mut checked, mut missing, mut imported_versions, mut problems) = (0, 0, 0, Vec::new());
        for entry in &entries {
            for v in entry.versions.values().filter(|v| v.record.state.has_material()) {
                let Some(handle) = v.handle else {
                    missing += 1;
                    continue;
                };
                let p = self.hsm.key_protection(handle)?;
                checked += 1;
                let name = format!("key {} version {}", entry.record.key_id, v.record.version);
                // An imported version was unwrapped into the HSM: not local, and (as the
                // standard says of unwrapped keys) not "always sensitive"; its origin says so.
                let imported = entry.record.origin == crate::domain::lifecycle::KeyOrigin::External;
                imported_versions += usize::from(imported);
                if !p.sensitive || (!p.always_sensitive && !imported) {
                    problems.push(format!("{name}: its value has been readable (CKA_SENSITIVE or CKA_ALWAYS_SENSITIVE false)"));
                }
                if p.extractable && !p.wrap_with_trusted {
                    problems.push(format!("{name}: extractable under any key (CKA_WRAP_WITH_TRUSTED false)"));
                }
                if !p.local && !imported {
                    problems.push(format!("{name}: not generated on the token (CKA_LOCAL false) and not recorded as imported"));
                }
            }
        }
        let backup = self.hsm.backup_key()?;
        let unguarded = self.hsm.backup_key_unguarded()?;
        let mut evidence = vec![
            format!(
                "{checked} key versions with material, of {} keys, read from the HSM now; {imported_versions} of them imported (origin external: \
                 BYOK or a reversibility bundle, unwrapped into the HSM)",
                entries.len()
            ),
            "every key version: CKA_SENSITIVE (its value never readable), extractable only wrapped under a key the HSM's security officer \
             marked trusted (CKA_WRAP_WITH_TRUSTED); every version made here also CKA_ALWAYS_SENSITIVE and CKA_LOCAL (generated on the \
             token), an imported one unwrapped straight into a sensitive object"
                .to_string(),
            match (backup.wrap.is_some(), backup.unwrap.is_some(), unguarded) {
                (true, true, false) => "the trusted key is the backup key pair's public half; its private half stays in the HSM and unwraps \
                                        only into objects as protected (CKA_UNWRAP_TEMPLATE)"
                    .to_string(),
                (_, _, true) => "the backup key pair has no CKA_UNWRAP_TEMPLATE: make it again (kms-server backup-key)".to_string(),
                _ => "no backup key pair on the token: no key version can leave the HSM at all".to_string(),
            },
            "the cloud facades (AWS XKS, Google Workspace CSE) and gRPC callers get ciphertexts and wrapped keys only".to_string(),
        ];
        evidence.extend(problems.iter().take(20).cloned());
        let (verdict, why) = match (problems.is_empty(), missing, unguarded) {
            (false, _, _) => (Verdict::Fail, format!("{} key objects are not protected as they must be", problems.len())),
            (_, _, true) => (Verdict::Fail, "the backup key can unwrap readable copies of keys".to_string()),
            (true, 0, false) => (Verdict::Pass, "every key object is generated and kept in the HSM, never readable".to_string()),
            (true, n, false) => (Verdict::Warn, format!("{n} live key versions have no object in the HSM (kmsctl status)")),
        };
        Ok(item("keys-in-the-hsm", "Encryption keys are known only to the customer", verdict, why, evidence))
    }

    /// Each key's lifecycle: its state, versions, rotation policy and history.
    fn lifecycle_item(&self) -> Result<Item> {
        let history = self.store.read(|tx| tx.key_histories(&LIFECYCLE))?;
        let mut entries: Vec<_> = self.registry.read().keys.values().cloned().collect();
        entries.sort_by_key(|e| (e.record.created_at, e.record.key_id.to_string()));
        let mut evidence = Vec::new();
        let mut without_rotation = 0;
        for e in &entries {
            let r = &e.record;
            let id = r.key_id.to_string();
            let events: Vec<String> = history
                .iter()
                .filter(|h| h.0 == id)
                .map(|(_, op, n, last)| if *n == 1 { format!("{op} {}", date(*last)) } else { format!("{op} ×{n} (last {})", date(*last)) })
                .collect();
            let rotation = match r.rotation_period_secs {
                0 => "no automatic rotation".to_string(),
                s => format!("rotates every {} days", s / 86_400),
            };
            if r.state == KeyState::Enabled && r.rotation_period_secs == 0 {
                without_rotation += 1;
            }
            evidence.push(format!("{id}: {}, {} versions, {rotation}; {}", r.state.as_str(), e.versions.len(), events.join(", ")));
        }
        let (verdict, why) = match without_rotation {
            0 => (Verdict::Pass, format!("{} key(s), each through the service's lifecycle, every change audited", entries.len())),
            n => (
                Verdict::Warn,
                format!("{n} enabled keys rotate only by hand (kmsctl key rotate) or at their usage limit: no rotation period was set"),
            ),
        };
        Ok(item("key-lifecycle", "The whole key lifecycle is managed and traced", verdict, why, evidence))
    }

    /// Every officer's second factor.
    fn mfa_item(&self) -> Result<Item> {
        let officers = self.officers().list()?;
        let enabled: Vec<_> = officers.iter().filter(|o| o.enabled).collect();
        let without: Vec<&str> = enabled.iter().filter(|o| o.sealed_totp.is_empty()).map(|o| o.name.as_str()).collect();
        let mut evidence: Vec<String> = officers
            .iter()
            .map(|o| {
                format!(
                    "{} ({}, {}): {}; last login {}",
                    o.name,
                    o.role.as_str(),
                    if o.enabled { "enabled" } else { "disabled" },
                    if o.sealed_totp.is_empty() { "NO second factor" } else { "passphrase + TOTP (RFC 6238), secret sealed in the HSM" },
                    o.last_login_at.map_or_else(|| "never".to_string(), date)
                )
            })
            .collect();
        evidence.push(format!(
            "sessions last {} minutes; {} failed logins lock an officer out for {} minutes",
            self.settings.session_seconds / 60,
            super::officers::MAX_FAILED_LOGINS,
            super::officers::LOCKOUT_SECONDS / 60
        ));
        let (verdict, why) = if !without.is_empty() {
            (Verdict::Fail, format!("officers without a second factor: {}", without.join(", ")))
        } else if enabled.iter().filter(|o| o.role == crate::domain::officer::Role::Officer).count() < 2 {
            (Verdict::Warn, "every administrator logs in with two factors, but one officer alone holds every power".to_string())
        } else {
            (Verdict::Pass, format!("all {} enabled officers and auditors log in with a passphrase and a TOTP code", enabled.len()))
        };
        Ok(item("mfa", "Administration is protected by multi-factor authentication", verdict, why, evidence))
    }

    /// The yearly access review.
    fn review_item(&self) -> Result<Item> {
        let review = self.access_review()?;
        let stale = review.entries.iter().filter(|e| e.enabled && e.stale).count();
        let count = |kind: &str| review.entries.iter().filter(|e| e.kind == kind).count();
        let mut evidence = vec![format!(
            "now: {} officers, {} auditors, {} principals, {} grants; {stale} enabled entries unused for 90 days (kmsctl review)",
            count("officer"),
            count("auditor"),
            count("principal"),
            count("grant")
        )];
        let (verdict, why) = match &review.last_signoff {
            None => (Verdict::Fail, "the access review has never been signed off".to_string()),
            Some((by, at)) => {
                evidence.push(format!("last signed off by {by} on {}", date(*at)));
                if review.signoff_overdue {
                    (Verdict::Fail, "the last sign-off is more than a year old".to_string())
                } else if stale > 0 {
                    (Verdict::Warn, format!("signed off within the year; {stale} entries are unused for 90 days now"))
                } else {
                    (Verdict::Pass, "signed off within the year; no unused access".to_string())
                }
            }
        };
        Ok(item("access-review", "Least privilege, reviewed at least yearly", verdict, why, evidence))
    }

    /// The officers' passphrase hashes' algorithm and parameters, as stored.
    fn password_item(&self) -> Result<Item> {
        let officers = self.officers().list()?;
        let weak: Vec<&str> = officers.iter().filter(|o| !strong_hash(&o.passphrase_hash)).map(|o| o.name.as_str()).collect();
        let evidence = vec![
            format!(
                "{} passphrases stored only as argon2id PHC strings, each with its own random salt (m={} KiB, t={}, p={}: OWASP's minimum)",
                officers.len(),
                ARGON2_MIN.0,
                ARGON2_MIN.1,
                ARGON2_MIN.2
            ),
            "TOTP secrets sealed under an HSM key; session tokens kept only as SHA-256 hashes".to_string(),
        ];
        let (verdict, why) = match weak.is_empty() {
            true => (Verdict::Pass, "every stored passphrase is a salted argon2id hash at or above OWASP's parameters".to_string()),
            false => (Verdict::Fail, format!("weaker hashes: {}", weak.join(", "))),
        };
        Ok(item("password-hashes", "Passwords are stored salted and hashed", verdict, why, evidence))
    }

    /// The audit trail verified now, its retention and its oldest record.
    fn audit_item(&self) -> Result<Item> {
        let verified = self.verify_audit()?;
        let oldest = self.store.read(|tx| tx.oldest_audit_time())?;
        let retention = self.settings.audit_retention_days;
        let mut evidence = vec![
            format!("{} records in one hash chain, {} signed checkpoints (HMAC in the HSM), verified now", verified.records, verified.checkpoints),
            match retention {
                0 => "kept forever (audit.retention_days = 0)".to_string(),
                d => format!("kept {d} days (audit.retention_days), then removed with a signed checkpoint at the cut"),
            },
            format!("oldest record kept: {}", oldest.map_or_else(|| "none".to_string(), date)),
        ];
        let (verdict, why) = if let Some(p) = &verified.problem {
            evidence.push(format!("record {}: {}", p.index, p.problem));
            (Verdict::Fail, "the audit trail does not verify".to_string())
        } else if retention != 0 && retention < MIN_RETENTION_DAYS {
            (Verdict::Fail, format!("records are kept {retention} days; Level 2 asks at least {MIN_RETENTION_DAYS}"))
        } else {
            (Verdict::Pass, "every call is recorded, the chain and its checkpoints verify, and records are kept long enough".to_string())
        };
        Ok(item("audit-trail", "Logs are kept at least three months, their integrity protected", verdict, why, evidence))
    }

    /// The webhooks events go to, their severities, and whether they are delivered.
    fn notification_item(&self) -> Result<Item> {
        let subscriptions = self.subscriptions()?;
        let mut evidence: Vec<String> = subscriptions
            .iter()
            .map(|s| {
                let state = if s.failures > 0 { format!("FAILING: {}", s.last_error) } else { "delivering".to_string() };
                format!("{} {}: {} and above, {} events delivered, {state}", s.id, s.url, s.min_severity, s.delivered)
            })
            .collect();
        evidence.push(
            "events are signed (HMAC-SHA-256 with the subscription's secret, sealed in the HSM) and delivered at least once, \
                       across restarts; severities are the officers' to change (kmsctl notify severity); Prometheus alert rules in \
                       docs/alerts.yml besides"
                .to_string(),
        );
        let failing = subscriptions.iter().filter(|s| s.failures > 0).count();
        let (verdict, why) = match (subscriptions.len(), failing) {
            (0, _) => (Verdict::Warn, "no notification subscription: incidents reach nobody unless Prometheus alerting is set up".to_string()),
            (_, 0) => (Verdict::Pass, format!("{} subscriptions receive the incidents at the severities chosen", subscriptions.len())),
            (_, n) => (Verdict::Fail, format!("{n} subscriptions are failing: incidents are not reaching them")),
        };
        Ok(item("incident-notification", "Incidents reach the customer at the severities the customer chose", verdict, why, evidence))
    }

    /// The last backup, its verification, and the backup key.
    fn backup_item(&self) -> Result<Item> {
        let (made, verified) = self.store.read(|tx| Ok((tx.last_allowed(&["CreateBackup"])?, tx.last_allowed(&["VerifyBackup"])?)))?;
        let guarded = self.hsm.backup_key()?.wrap.is_some() && !self.hsm.backup_key_unguarded()?;
        let mut evidence = vec![match guarded {
            true => "backups wrap every key version in the HSM under the trusted backup key (RSA-3072 OAEP): a backup file holds no key in clear, \
                     and opens only in an HSM holding the backup key's private half"
                .to_string(),
            false => "no usable backup key on the token (kms-server backup-key)".to_string(),
        }];
        evidence.push(match &made {
            Some((at, by)) => format!("last backup: {} by {by}", date(*at)),
            None => "no backup made".to_string(),
        });
        evidence.push(match &verified {
            Some((at, by)) => format!("last verification of a backup file: {} by {by}", date(*at)),
            None => "no backup file verified".to_string(),
        });
        let (verdict, why) = match (guarded, made) {
            (false, _) => (Verdict::Fail, "no backup can be made without the trusted backup key".to_string()),
            (true, None) => (Verdict::Fail, "no backup has been made".to_string()),
            (true, Some((at, _))) if now() - at > BACKUP_STALE_SECONDS => (Verdict::Warn, "the last backup is more than 30 days old".to_string()),
            (true, Some(_)) if verified.is_none() => (Verdict::Warn, "backups are made, but none was verified (kmsctl backup verify)".to_string()),
            (true, Some(_)) => (Verdict::Pass, "backups are recent, verified, and as protected as the keys".to_string()),
        };
        Ok(item("backups", "Backups of keys have the same protection as the keys", verdict, why, evidence))
    }

    /// The way out: the last reversibility export, and the last restore or import drill.
    fn reversibility_item(&self) -> Result<Item> {
        let (exported, restored, imported) =
            self.store.read(|tx| Ok((tx.last_allowed(&["ExportKeys"])?, tx.last_allowed(&["Restore"])?, tx.last_allowed(&["ImportKey"])?)))?;
        let last = |what: &str, record: &Option<(i64, String)>| match record {
            Some((at, _)) => format!("last {what}: {}", date(*at)),
            None => format!("no {what} recorded"),
        };
        let evidence = vec![
            last("reversibility export (kmsctl export: every key wrapped in the HSM under the customer's RSA key)", &exported),
            last("restore into an HSM", &restored),
            last("key import (kmsctl import or kmsctl key import)", &imported),
            "an export wraps with C_WrapKey only (RSA-OAEP), under a customer key the HSM's security officer made trusted for that \
             one export; OpenSSL alone unwraps it (docs/export-format.md)"
                .to_string(),
        ];
        let (verdict, why) = match (&exported, &restored) {
            (Some(_), _) => (Verdict::Pass, "the keys can be exported under the customer's own key, and were"),
            (None, Some(_)) => (Verdict::Warn, "a restore was drilled, but no reversibility export was ever made"),
            (None, None) => (Verdict::Warn, "no reversibility export nor restore drill was ever made"),
        };
        Ok(item("reversibility", "The customer can take its keys back (reversibility)", verdict, why.to_string(), evidence))
    }

    /// The HSM's HMAC of a document's SHA-256.
    fn report_mac(&self, sha: &[u8; 32]) -> Result<Vec<u8>> {
        Ok(self.hsm.mac(self.audit_mac, &[MAC_LABEL, sha].concat())?)
    }

    /// The report as a signed document in `format`.
    pub fn render_report(&self, report: &Report, format: Format) -> Result<Vec<u8>> {
        match format {
            Format::Json => {
                // What is signed is the report as `verify_report` reads it back: the value's
                // compact serialisation (its keys in serde_json's order, whatever the layout).
                let body = serde_json::to_value(report).map_err(|e| Error::invalid("report", e))?;
                let sha: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
                let mac = self.report_mac(&sha)?;
                let doc = serde_json::json!({"report": body, "sha256": hex(&sha), "signature": hex(&mac)});
                Ok(serde_json::to_vec_pretty(&doc).unwrap_or_default())
            }
            Format::Markdown | Format::Html => {
                let content = if format == Format::Html { html(report) } else { markdown(report) };
                let sha: [u8; 32] = Sha256::digest(content.as_bytes()).into();
                let mac = self.report_mac(&sha)?;
                let trailer = format!("{MARKER}\nSHA-256: {}\nSignature (HMAC-SHA-256 in the HSM): {}\n", hex(&sha), hex(&mac));
                Ok(match format {
                    Format::Html => format!("{content}{trailer}</pre></footer>\n</body>\n</html>\n"),
                    _ => format!("{content}{trailer}"),
                }
                .into_bytes())
            }
        }
    }

    /// Whether `document` is a report this service signed, unchanged; the SHA-256 it states.
    pub fn verify_report(&self, document: &[u8]) -> Result<(bool, String)> {
        let text = std::str::from_utf8(document).map_err(|_| Error::invalid("document", "is not UTF-8 text"))?;
        let not_one = || Error::invalid("document", "is not an evidence report of this service (no signature found)");
        let (content, sha_hex, mac_hex) = if text.trim_start().starts_with('{') {
            let doc: serde_json::Value = serde_json::from_str(text).map_err(|_| not_one())?;
            let field = |name: &str| doc[name].as_str().map(str::to_string).ok_or_else(not_one);
            (serde_json::to_string(&doc["report"]).map_err(|_| not_one())?, field("sha256")?, field("signature")?)
        } else {
            let at = text.rfind(MARKER).ok_or_else(not_one)?;
            let trailer = &text[at..];
            let value = |label: &str| {
                trailer.lines().find_map(|l| l.strip_prefix(label)).map(|v| v.trim().chars().take(64).collect::<String>()).ok_or_else(not_one)
            };
            (text[..at].to_string(), value("SHA-256: ")?, value("Signature (HMAC-SHA-256 in the HSM): ")?)
        };
        let sha: [u8; 32] = Sha256::digest(content.as_bytes()).into();
        if hex(&sha) != sha_hex {
            return Ok((false, hex(&sha)));
        }
        let mac = unhex(&mac_hex).ok_or_else(not_one)?;
        Ok((self.hsm.verify_mac(self.audit_mac, &[MAC_LABEL, &sha[..]].concat(), &mac)?, hex(&sha)))
    }
}

/// Whether a PHC string is argon2id at or above `ARGON2_MIN`.
fn strong_hash(phc: &str) -> bool {
    let mut parts = phc.split('$');
    let (Some(""), Some("argon2id")) = (parts.next(), parts.next()) else { return false };
    let Some(params) = parts.find(|p| p.starts_with("m=")) else { return false };
    let value = |name: &str| params.split(',').find_map(|kv| kv.strip_prefix(name)).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    value("m=") >= ARGON2_MIN.0 && value("t=") >= ARGON2_MIN.1 && value("p=") >= ARGON2_MIN.2
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Warn => "WARN",
        Verdict::Fail => "FAIL",
    }
}

fn markdown(r: &Report) -> String {
    let mut out = format!(
        "# {}\n\nGenerated {} by {} — kms-server {} — HSM token {}\n\n{} pass, {} warn, {} fail.\n\n",
        r.title,
        date(r.generated_at),
        r.generated_by,
        r.service_version,
        r.hsm_token,
        r.count(Verdict::Pass),
        r.count(Verdict::Warn),
        r.count(Verdict::Fail)
    );
    for i in &r.items {
        out.push_str(&format!("## {} — {}\n\n**{}**: {}\n\n", verdict_word(i.verdict), i.requirement, verdict_word(i.verdict), i.why));
        for e in &i.evidence {
            out.push_str(&format!("- {e}\n"));
        }
        out.push('\n');
    }
    out.push_str("---\n\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html(r: &Report) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n<style>\n\
         body {{ font-family: Georgia, serif; max-width: 52em; margin: 2em auto; color: #111; }}\n\
         h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #999; }}\n\
         .pass {{ color: #1b5e20; }} .warn {{ color: #8a5a00; }} .fail {{ color: #b71c1c; }}\n\
         .verdict {{ font-weight: bold; font-family: sans-serif; }} footer pre {{ white-space: pre-wrap; font-size: 0.8em; }}\n\
         table {{ border-collapse: collapse; }} td {{ padding: 0.2em 0.8em; border: 1px solid #ccc; }}\n\
         @media print {{ body {{ margin: 0; }} h2 {{ page-break-after: avoid; }} }}\n</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         <table><tr><td>Generated</td><td>{at}</td></tr><tr><td>By</td><td>{by}</td></tr><tr><td>Service</td><td>kms-server {version}</td></tr>\
         <tr><td>HSM token</td><td>{token}</td></tr><tr><td>Summary</td><td>{pass} pass, {warn} warn, {fail} fail</td></tr></table>\n",
        title = escape(r.title),
        at = date(r.generated_at),
        by = escape(&r.generated_by),
        version = r.service_version,
        token = escape(&r.hsm_token),
        pass = r.count(Verdict::Pass),
        warn = r.count(Verdict::Warn),
        fail = r.count(Verdict::Fail),
    );
    for i in &r.items {
        let class = verdict_word(i.verdict).to_ascii_lowercase();
        out.push_str(&format!(
            "<h2>{}</h2>\n<p><span class=\"verdict {class}\">{}</span> {}</p>\n<ul>\n",
            escape(i.requirement),
            verdict_word(i.verdict),
            escape(&i.why)
        ));
        for e in &i.evidence {
            out.push_str(&format!("<li>{}</li>\n", escape(e)));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("<footer><pre>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_parameters_are_read_from_the_phc_string() {
        assert!(strong_hash("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"));
        assert!(strong_hash("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"));
        for weak in ["$argon2id$v=19$m=4096,t=2,p=1$c2FsdA$aGFzaA", "$argon2i$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA", "$2b$12$abc", ""] {
            assert!(!strong_hash(weak), "{weak}");
        }
    }
}
