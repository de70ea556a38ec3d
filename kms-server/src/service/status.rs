//! The service's own state, for an operator (`kmsctl status`): the HSM's health as the last
//! probe saw it, keys by state, usage nearest the limit, what is due soon, and warnings.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::Kms;
use crate::clock::now;
use crate::domain::ids::KeyId;
use crate::domain::lifecycle::KeyState;
use crate::error::Result;
use crate::hsm::{FailedCall, SessionUse, TokenInfo};

/// How long a failed HSM call keeps the health DEGRADED.
const DEGRADED_FOR_SECONDS: i64 = 60;

/// The deep health check's verdict (AWS's external key store reports the same three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The probe succeeded and no HSM call failed in the last minute.
    Active,
    /// The probe succeeded, but HSM calls failed in the last minute.
    Degraded,
    /// The probe failed.
    Unavailable,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Active => "ACTIVE",
            Health::Degraded => "DEGRADED",
            Health::Unavailable => "UNAVAILABLE",
        }
    }
}

/// How far ahead `due_soon` looks: 30 days, the shortest pending-destruction window a key can
/// have plus margin for a monthly operations review.
const DUE_WINDOW_SECONDS: i64 = 30 * 86_400;
/// How many of the most-used versions `kmsctl status` lists (and warns about).
pub const NEAREST_LIMIT: usize = 5;
/// A version past this share of its encryption limit is worth a warning (its key rotates at the
/// rotation threshold long before; a version still climbing past it is one that cannot rotate).
const USAGE_WARNING_SHARE: f64 = 0.5;

/// What the last HSM probe found.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// Unix seconds; 0 before the first probe.
    pub at: i64,
    /// The probe's error, `None` when it succeeded.
    pub error: Option<String>,
}

/// The last probe's result, shared by the probe task and the status reader.
#[derive(Debug, Default)]
pub struct LastProbe(Mutex<Probe>);

impl LastProbe {
    pub fn set(&self, error: Option<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Probe { at: now(), error };
    }

    pub fn get(&self) -> Probe {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the cloud facades (AWS XKS, Google CSE) answered on this node in the last hour: calls
/// and refusals by minute, and the last refusal, for `kmsctl status`.
#[derive(Debug, Default)]
pub struct FacadeActivity(Mutex<BTreeMap<&'static str, Window>>);

#[derive(Debug, Default)]
struct Window {
    /// (minute, calls, refusals), oldest first, the last hour only.
    minutes: std::collections::VecDeque<(i64, u64, u64)>,
    last_refusal: Option<(i64, String)>,
}

/// One facade's last hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FacadeSummary {
    pub facade: &'static str,
    pub calls: u64,
    pub refusals: u64,
    /// When, and the error answered (the facade's own message: it quotes no request value).
    pub last_refusal: Option<(i64, String)>,
}

impl FacadeActivity {
    /// Counts a call `facade` answered at `at` (Unix seconds), refused with `refusal` if any.
    pub fn record(&self, facade: &'static str, at: i64, refusal: Option<&str>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let window = all.entry(facade).or_default();
        let minute = at.div_euclid(60);
        match window.minutes.back_mut() {
            Some(last) if last.0 == minute => {
                last.1 += 1;
                last.2 += u64::from(refusal.is_some());
            }
            _ => window.minutes.push_back((minute, 1, u64::from(refusal.is_some()))),
        }
        while window.minutes.front().is_some_and(|m| m.0 <= minute - 60) {
            window.minutes.pop_front();
        }
        if let Some(refusal) = refusal {
            window.last_refusal = Some((at, refusal.to_string()));
        }
    }

    /// Each facade's calls and refusals in the hour before `at`.
    pub fn last_hour(&self, at: i64) -> Vec<FacadeSummary> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let minute = at.div_euclid(60);
        all.iter()
            .map(|(facade, w)| {
                let recent = w.minutes.iter().filter(|m| m.0 > minute - 60);
                let (calls, refusals) = recent.fold((0, 0), |(c, r), m| (c + m.1, r + m.2));
                FacadeSummary { facade, calls, refusals, last_refusal: w.last_refusal.clone() }
            })
            .collect()
    }
}

/// One version's AES-GCM usage.
#[derive(Debug, Clone)]
pub struct VersionUsage {
    pub key_id: KeyId,
    pub version: u32,
    pub encryptions: u64,
    pub limit: u64,
}

/// Something scheduled for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueAction {
    Rotation,
    Destruction,
}

impl DueAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DueAction::Rotation => "rotation",
            DueAction::Destruction => "destruction",
        }
    }
}

/// The service's state.
#[derive(Debug, Clone)]
pub struct ServiceStatus {
    pub uptime_seconds: u64,
    pub health: Health,
    pub probe: Probe,
    /// The last failed HSM calls, newest first.
    pub hsm_failures: Vec<FailedCall>,
    /// `None` when the HSM did not answer.
    pub token: Option<TokenInfo>,
    pub sessions: SessionUse,
    pub keys_by_state: BTreeMap<&'static str, u64>,
    /// Every version that still has key material, the most used first.
    pub usage: Vec<VersionUsage>,
    pub due_soon: Vec<(KeyId, DueAction, i64)>,
    pub last_signoff: Option<(String, i64)>,
    pub review_overdue: bool,
    /// What the service's own checks of the audit trail found.
    pub audit: super::AuditHealth,
    /// Whether this node runs the background jobs (always, for one node).
    pub leader: bool,
    /// The cloud facades' last hour on this node.
    pub facades: Vec<FacadeSummary>,
    pub warnings: Vec<String>,
}

impl ServiceStatus {
    /// The gauges a metrics scrape shows, from this status.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        crate::metrics::Gauges {
            uptime_seconds: self.uptime_seconds,
            hsm_up: self.probe.error.is_none(),
            health: [Health::Active, Health::Degraded, Health::Unavailable].into_iter().map(|h| (h.as_str(), self.health == h)).collect(),
            sessions_open: self.sessions.open,
            sessions_in_use: self.sessions.in_use,
            sessions_max: self.sessions.size,
            session_copies: self.sessions.copies,
            keys_by_state: KeyState::ALL.iter().map(|s| (s.as_str(), self.keys_by_state.get(s.as_str()).copied().unwrap_or(0))).collect(),
            versions: self.usage.iter().map(|u| (u.key_id.to_string(), u.version, u.encryptions, u.limit)).collect(),
            review_overdue: self.review_overdue,
            signoff_age_seconds: self.last_signoff.as_ref().map(|(_, at)| now() - at),
            audit_verified: self.audit.problem.is_none(),
            audit_verified_through: self.audit.verified_through,
            audit_full_check_age_seconds: self.audit.last_full_check.map(|at| now() - at),
            leader: self.leader,
        }
    }
}

/// The HSM's health from the last probe (a canary encryption) and the last failed HSM calls.
fn health_of(probe: &Probe, hsm_failures: &[FailedCall], at: i64) -> Health {
    match (&probe.error, hsm_failures.first()) {
        (Some(_), _) => Health::Unavailable,
        (None, Some(last)) if at - last.at < DEGRADED_FOR_SECONDS => Health::Degraded,
        _ => Health::Active,
    }
}

impl Kms {
    /// The HSM's health as `status` reports it, without the rest of the status.
    pub fn hsm_health(&self) -> Health {
        health_of(&self.last_probe.get(), &self.hsm.recent_failures(), now())
    }

    /// The HSM token's label, maker, model and serial number, if it answers.
    pub fn hsm_token(&self) -> Option<TokenInfo> {
        self.hsm.token_info().ok()
    }

    pub fn status(&self) -> Result<ServiceStatus> {
        let at = now();
        let probe = self.last_probe.get();
        let token = self.hsm.token_info().ok();
        let limits = self.settings.limits;
        let mut keys_by_state = BTreeMap::new();
        let mut usage = Vec::new();
        let mut due_soon = Vec::new();
        for entry in self.registry.read().keys.values() {
            let r = &entry.record;
            *keys_by_state.entry(r.state.as_str()).or_insert(0) += 1;
            for v in entry.versions.values().filter(|v| v.record.state.has_material()) {
                let encryptions = v.usage.used(&limits);
                usage.push(VersionUsage { key_id: r.key_id, version: v.record.version, encryptions, limit: limits.encryption_limit });
            }
            let soon = |t: Option<i64>| t.filter(|t| *t <= at + DUE_WINDOW_SECONDS);
            if r.state == KeyState::Enabled
                && let Some(t) = soon(r.next_rotation_at)
            {
                due_soon.push((r.key_id, DueAction::Rotation, t));
            }
            if let Some(t) = soon(r.destruction_at) {
                due_soon.push((r.key_id, DueAction::Destruction, t));
            }
        }
        usage.sort_by_key(|u| std::cmp::Reverse(u.encryptions));
        due_soon.sort_by_key(|d| d.2);
        let (last_signoff, review_overdue) = self.review_signoff()?;

        let hsm_failures = self.hsm.recent_failures();
        let health = health_of(&probe, &hsm_failures, at);
        let mut warnings = Vec::new();
        if let Some(e) = &probe.error {
            warnings.push(format!("the HSM is unavailable: {e}"));
        } else if let (Health::Degraded, Some(last)) = (health, hsm_failures.first()) {
            warnings.push(format!("HSM calls failed in the last minute (the last: {} {})", last.function, last.code));
        }
        if let Some(warning) = self.backup_key_warning() {
            warnings.push(warning.into());
        }
        let audit = self.audit_health();
        if let Some(p) = &audit.problem {
            warnings.push(format!(
                "the audit trail does not verify: record {}: {} (found by the service's {} at {}); run `kmsctl audit verify`",
                p.found.index,
                p.found.problem,
                p.by.as_str(),
                p.at
            ));
        }
        if review_overdue {
            warnings.push("the access review has not been signed off in the last 365 days: run `kmsctl review`".into());
        }
        for u in usage.iter().take(NEAREST_LIMIT).filter(|u| u.encryptions as f64 >= u.limit as f64 * USAGE_WARNING_SHARE) {
            warnings.push(format!("version {} of key {} has used {} of its {} encryptions", u.version, u.key_id, u.encryptions, u.limit));
        }
        Ok(ServiceStatus {
            uptime_seconds: u64::try_from(at - self.started_at).unwrap_or(0),
            health,
            probe,
            hsm_failures,
            token,
            sessions: self.hsm.sessions(),
            keys_by_state,
            usage,
            due_soon,
            last_signoff,
            review_overdue,
            audit,
            leader: self.leading(),
            facades: self.facade_activity.last_hour(at),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facade_activity_counts_the_last_hour_only_and_keeps_the_last_refusal() {
        let activity = FacadeActivity::default();
        let t = 1_800_000_000;
        activity.record("xks", t - 3_700, Some("old"));
        activity.record("xks", t - 10, None);
        activity.record("xks", t - 5, Some("ThrottlingException"));
        activity.record("cse", t, None);
        let summary = activity.last_hour(t);
        assert_eq!(
            summary,
            vec![
                FacadeSummary { facade: "cse", calls: 1, refusals: 0, last_refusal: None },
                FacadeSummary { facade: "xks", calls: 2, refusals: 1, last_refusal: Some((t - 5, "ThrottlingException".into())) },
            ]
        );
        assert_eq!(activity.last_hour(t + 3_600)[1].calls, 0, "an hour later, nothing is recent");
    }
}
