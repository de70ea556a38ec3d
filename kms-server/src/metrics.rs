//! Prometheus metrics, on the Prometheus project's own client (`prometheus-client`): counters
//! and latency histograms updated as requests, HSM calls and audit commits happen, and gauges
//! set at scrape time from the service's state ([`Gauges`], which the caller reads from the
//! service's status: this module knows nothing of the service). Served in the Prometheus text
//! format on a listener of its own (`listen.metrics`, loopback only).
//!
//! Labels are names from a fixed set (RPC and PKCS#11 function names, status codes, key states)
//! or key ids and version numbers; never an encryption-context value, a principal's request data
//! or anything secret.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Latency buckets in seconds: from 100 µs (an HSM call on SoftHSM2 is ~20 µs, a request
/// ~300 µs) to AWS's external key store timeout (250 ms) and the HSM deadline (2 s).
const SECONDS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Group-commit batch sizes, in records.
const RECORDS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0];

/// Makes the latency histogram of each new series of a family.
#[derive(Debug, Clone, Copy)]
struct Latency;

impl MetricConstructor<Histogram> for Latency {
    fn new_metric(&self) -> Histogram {
        Histogram::new(SECONDS)
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];
type OwnedLabels = Vec<(&'static str, String)>;

/// The state-derived values a scrape shows, read by the caller from the service's status.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub uptime_seconds: u64,
    /// Whether the last HSM probe succeeded.
    pub hsm_up: bool,
    /// Every health state with whether the service is in it now.
    pub health: Vec<(&'static str, bool)>,
    pub sessions_open: usize,
    pub sessions_in_use: usize,
    pub sessions_max: usize,
    /// Session copies ready for use; `None` when they are off (the series is then absent).
    pub session_copies: Option<usize>,
    /// Every key state with its number of keys.
    pub keys_by_state: Vec<(&'static str, u64)>,
    /// Per key version with material: key id, version, encryptions counted, encryption limit.
    pub versions: Vec<(String, u32, u64, u64)>,
    pub review_overdue: bool,
    /// Seconds since the last access-review sign-off; `None` before the first.
    pub signoff_age_seconds: Option<i64>,
    /// Whether the audit trail verified the last time the service checked it.
    pub audit_verified: bool,
    /// The last audit record verified.
    pub audit_verified_through: u64,
    /// Seconds since the whole trail was last verified; `None` before the first full check.
    pub audit_full_check_age_seconds: Option<i64>,
    /// Whether this node runs the background jobs.
    pub leader: bool,
}

/// The process's metrics. One registry per process, like the PKCS#11 library it watches.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels<2>, Counter>,
    request_seconds: Family<Labels<1>, Histogram, Latency>,
    hsm_calls: Family<Labels<2>, Counter>,
    hsm_seconds: Family<Labels<1>, Histogram, Latency>,
    audit_batch: Histogram,
    audit_commit_seconds: Histogram,
    gauges: GaugeFamilies,
    /// Scrapes set the gauges, then encode: one at a time.
    scrape: Mutex<()>,
}

/// The gauges, each a family so that a series can be absent (no labels, no series) or go away
/// (a destroyed key version's usage).
#[derive(Debug, Default)]
struct GaugeFamilies {
    uptime: Family<OwnedLabels, Gauge>,
    hsm_up: Family<OwnedLabels, Gauge>,
    health: Family<OwnedLabels, Gauge>,
    sessions: Family<OwnedLabels, Gauge>,
    sessions_max: Family<OwnedLabels, Gauge>,
    session_copies: Family<OwnedLabels, Gauge>,
    keys: Family<OwnedLabels, Gauge>,
    encryptions: Family<OwnedLabels, Gauge>,
    remaining: Family<OwnedLabels, Gauge>,
    review_overdue: Family<OwnedLabels, Gauge>,
    signoff_age: Family<OwnedLabels, Gauge>,
    audit_verified: Family<OwnedLabels, Gauge>,
    audit_verified_through: Family<OwnedLabels, Gauge>,
    audit_full_check_age: Family<OwnedLabels, Gauge>,
    leader: Family<OwnedLabels, Gauge>,
}

/// The registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn gauge(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(Latency),
            hsm_calls: Family::default(),
            hsm_seconds: Family::new_with_constructor(Latency),
            audit_batch: Histogram::new(RECORDS),
            audit_commit_seconds: Histogram::new(SECONDS),
            gauges: GaugeFamilies::default(),
            scrape: Mutex::new(()),
        };
        // Metrics are handles onto shared values: the registry encodes what the clones kept in
        // `m` record. (The client appends `_total` to counters and a full stop to help texts.)
        let mut r = Registry::default();
        r.register("kms_requests", "Calls answered, by RPC and gRPC status code (batch items count one each)", m.requests.clone());
        r.register("kms_request_duration_seconds", "Time from a call's arrival to its answer, audit included", m.request_seconds.clone());
        r.register("kms_hsm_calls", "PKCS#11 calls, by function and result (ok or error)", m.hsm_calls.clone());
        r.register("kms_hsm_call_duration_seconds", "Time of one PKCS#11 call, session checkout included", m.hsm_seconds.clone());
        r.register("kms_audit_batch_records", "Audit records per group commit", m.audit_batch.clone());
        r.register("kms_audit_commit_duration_seconds", "Time of one group commit (insert, commit, fsync)", m.audit_commit_seconds.clone());
        let g = &m.gauges;
        r.register("kms_uptime_seconds", "Seconds since the service started", g.uptime.clone());
        r.register("kms_hsm_up", "1 when the last HSM probe (AES-GCM under the canary key) succeeded, else 0", g.hsm_up.clone());
        r.register(
            "kms_health",
            "The deep health check: 1 for the state it is in (ACTIVE, DEGRADED, UNAVAILABLE), 0 for the others",
            g.health.clone(),
        );
        r.register("kms_hsm_sessions", "HSM sessions open and checked out now", g.sessions.clone());
        r.register("kms_hsm_sessions_max", "The most sessions the pool opens", g.sessions_max.clone());
        r.register("kms_hsm_session_copies", "Session copies of key versions ready for use (absent when they are off)", g.session_copies.clone());
        r.register("kms_keys", "Keys by state", g.keys.clone());
        r.register("kms_key_version_encryptions", "AES-GCM encryptions counted for a key version (NIST SP 800-38D budget)", g.encryptions.clone());
        r.register("kms_key_version_encryptions_remaining", "Encryptions a key version may still do before it refuses", g.remaining.clone());
        r.register("kms_access_review_overdue", "1 when the access review has not been signed off in the last 365 days", g.review_overdue.clone());
        r.register("kms_access_review_signoff_age_seconds", "Seconds since the last access-review sign-off", g.signoff_age.clone());
        r.register(
            "kms_audit_verified",
            "1 when the audit trail verified the last time the service checked it (chain, checkpoints, MACs), 0 when it did not",
            g.audit_verified.clone(),
        );
        r.register("kms_audit_verified_through_record", "The last audit record the service has verified", g.audit_verified_through.clone());
        r.register(
            "kms_audit_full_check_age_seconds",
            "Seconds since the service last checked the whole audit trail, whatever it found (absent before the first time)",
            g.audit_full_check_age.clone(),
        );
        r.register(
            "kms_leader",
            "1 on the node that runs the background jobs (sweeps, retention), 0 on the others; 1 on a single node",
            g.leader.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// One answered call (or one item of a batch).
    pub fn request(&self, rpc: &'static str, code: &'static str, elapsed: Duration) {
        self.requests.get_or_create(&[("rpc", rpc), ("code", code)]).inc();
        self.request_seconds.get_or_create(&[("rpc", rpc)]).observe(elapsed.as_secs_f64());
    }

    /// One PKCS#11 call: its function, `ok` or the error's name, and how long it took.
    pub fn hsm_call(&self, function: &'static str, result: &'static str, elapsed: Duration) {
        self.hsm_calls.get_or_create(&[("function", function), ("result", result)]).inc();
        self.hsm_seconds.get_or_create(&[("function", function)]).observe(elapsed.as_secs_f64());
    }

    /// One group commit of the audit writer.
    pub fn audit_commit(&self, records: usize, elapsed: Duration) {
        self.audit_batch.observe(records as f64);
        self.audit_commit_seconds.observe(elapsed.as_secs_f64());
    }

    /// The whole exposition: the counters and histograms, and the gauges of `gauges` (`None`
    /// when the service's state could not be read: the gauges are then left out).
    pub fn exposition(&self, gauges: Option<&Gauges>) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.set(gauges);
        let mut out = String::new();
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics: the exposition could not be encoded");
        }
        out
    }

    fn set(&self, gauges: Option<&Gauges>) {
        let f = &self.gauges;
        for family in [
            &f.uptime,
            &f.hsm_up,
            &f.health,
            &f.sessions,
            &f.sessions_max,
            &f.session_copies,
            &f.keys,
            &f.encryptions,
            &f.remaining,
            &f.review_overdue,
            &f.signoff_age,
            &f.audit_verified,
            &f.audit_verified_through,
            &f.audit_full_check_age,
            &f.leader,
        ] {
            family.clear();
        }
        let Some(g) = gauges else { return };
        let set = |family: &Family<OwnedLabels, Gauge>, labels: OwnedLabels, value: i64| {
            family.get_or_create(&labels).set(value);
        };
        set(&f.uptime, vec![], gauge(g.uptime_seconds));
        set(&f.hsm_up, vec![], i64::from(g.hsm_up));
        for (state, now) in &g.health {
            set(&f.health, vec![("state", state.to_string())], i64::from(*now));
        }
        set(&f.sessions, vec![("state", "open".into())], gauge(g.sessions_open));
        set(&f.sessions, vec![("state", "in_use".into())], gauge(g.sessions_in_use));
        set(&f.sessions_max, vec![], gauge(g.sessions_max));
        if let Some(copies) = g.session_copies {
            set(&f.session_copies, vec![], gauge(copies));
        }
        for (state, n) in &g.keys_by_state {
            set(&f.keys, vec![("state", state.to_string())], gauge(*n));
        }
        for (key_id, version, encryptions, limit) in &g.versions {
            let labels = vec![("key_id", key_id.clone()), ("version", version.to_string())];
            set(&f.encryptions, labels.clone(), gauge(*encryptions));
            set(&f.remaining, labels, gauge(limit.saturating_sub(*encryptions)));
        }
        set(&f.review_overdue, vec![], i64::from(g.review_overdue));
        if let Some(age) = g.signoff_age_seconds {
            set(&f.signoff_age, vec![], age);
        }
        set(&f.audit_verified, vec![], i64::from(g.audit_verified));
        set(&f.audit_verified_through, vec![], gauge(g.audit_verified_through));
        if let Some(age) = g.audit_full_check_age_seconds {
            set(&f.audit_full_check_age, vec![], age);
        }
        set(&f.leader, vec![], i64::from(g.leader));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series names and label layout dashboards and `docs/alerts.yml` rely on.
    #[test]
    fn the_exposition_keeps_the_series_names_and_labels() {
        let m = Metrics::new();
        m.request("Encrypt", "OK", Duration::from_micros(300));
        m.request("Encrypt", "OK", Duration::from_millis(3));
        m.hsm_call("C_Encrypt", "ok", Duration::from_micros(20));
        m.audit_commit(2, Duration::from_micros(150));
        let gauges = Gauges {
            hsm_up: true,
            health: vec![("ACTIVE", true), ("DEGRADED", false)],
            keys_by_state: vec![("Enabled", 1)],
            versions: vec![("k\"1".into(), 1, 10, 100)],
            audit_verified: true,
            audit_verified_through: 42,
            ..Gauges::default()
        };
        let out = m.exposition(Some(&gauges));
        for line in [
            "# TYPE kms_requests_total counter",
            "kms_requests_total{rpc=\"Encrypt\",code=\"OK\"} 2",
            "kms_request_duration_seconds_count{rpc=\"Encrypt\"} 2",
            "kms_request_duration_seconds_bucket{rpc=\"Encrypt\",le=\"0.0005\"} 1",
            "kms_hsm_calls_total{function=\"C_Encrypt\",result=\"ok\"} 1",
            "kms_audit_batch_records_count 1",
            "kms_audit_commit_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kms_hsm_up 1",
            "kms_health{state=\"DEGRADED\"} 0",
            "kms_keys{state=\"Enabled\"} 1",
            // Label values are escaped.
            "kms_key_version_encryptions_remaining{key_id=\"k\\\"1\",version=\"1\"} 90",
            "kms_audit_verified 1",
            "kms_audit_verified_through_record 42",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
        assert!(!out.contains("kms_hsm_session_copies "), "an absent gauge has no series");
        // A state that cannot be read leaves the gauges out, and the counters in.
        let out = m.exposition(None);
        assert!(out.contains("kms_requests_total{") && !out.contains("kms_hsm_up "));
    }
}
