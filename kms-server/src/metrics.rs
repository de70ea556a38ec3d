//! Prometheus metrics: counters and latency histograms kept in atomics as requests, HSM calls
//! and audit commits happen, plus gauges read from the service at scrape time, rendered in the
//! text exposition format on a listener of their own (`listen.metrics`, loopback only).
//!
//! Labels are names from a fixed set (RPC and PKCS#11 function names, status codes, key states)
//! or key ids and version numbers; never an encryption-context value, a principal's request data
//! or anything secret.

use crate::service::status::Health;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// A series' `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Latency buckets in seconds: from 100 µs (an HSM call on SoftHSM2 is ~20 µs, a request
/// ~300 µs) to AWS's external key store timeout (250 ms) and the HSM deadline (2 s).
const SECONDS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Group-commit batch sizes, in records.
const RECORDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0];

/// A cumulative histogram over fixed bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum, in millionths of the unit (microseconds for seconds).
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(), count: AtomicU64::new(0), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// A family of series keyed by their label values.
#[derive(Debug)]
struct Family<K: Ord, V> {
    series: RwLock<BTreeMap<K, Arc<V>>>,
}

impl<K: Ord + Clone, V> Family<K, V> {
    fn new() -> Self {
        Family { series: RwLock::new(BTreeMap::new()) }
    }

    fn get(&self, key: K, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(v) = self.series.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return v.clone();
        }
        self.series.write().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert_with(|| Arc::new(make())).clone()
    }

    fn snapshot(&self) -> Vec<(K, Arc<V>)> {
        self.series.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The process's metrics. One registry per process, like the PKCS#11 library it watches.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<(&'static str, &'static str), AtomicU64>,
    request_seconds: Family<&'static str, Histogram>,
    hsm_calls: Family<(&'static str, &'static str), AtomicU64>,
    hsm_seconds: Family<&'static str, Histogram>,
    audit_batch: Histogram,
    audit_commit_seconds: Histogram,
}

/// The registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        requests: Family::new(),
        request_seconds: Family::new(),
        hsm_calls: Family::new(),
        hsm_seconds: Family::new(),
        audit_batch: Histogram::new(RECORDS),
        audit_commit_seconds: Histogram::new(SECONDS),
    })
}

impl Metrics {
    /// One answered call (or one item of a batch).
    pub fn request(&self, rpc: &'static str, code: &'static str, elapsed: Duration) {
        self.requests.get((rpc, code), || AtomicU64::new(0)).fetch_add(1, Ordering::Relaxed);
        self.request_seconds.get(rpc, || Histogram::new(SECONDS)).observe(elapsed.as_secs_f64());
    }

    /// One PKCS#11 call: its function, `ok` or the error's name, and how long it took.
    pub fn hsm_call(&self, function: &'static str, result: &'static str, elapsed: Duration) {
        self.hsm_calls.get((function, result), || AtomicU64::new(0)).fetch_add(1, Ordering::Relaxed);
        self.hsm_seconds.get(function, || Histogram::new(SECONDS)).observe(elapsed.as_secs_f64());
    }

    /// One group commit of the audit writer.
    pub fn audit_commit(&self, records: usize, elapsed: Duration) {
        self.audit_batch.observe(records as f64);
        self.audit_commit_seconds.observe(elapsed.as_secs_f64());
    }

    /// The text exposition of the counters and histograms (the gauges are appended by the
    /// caller, from the service's state).
    pub fn render(&self, out: &mut String) {
        header(out, "kms_requests_total", "counter", "Calls answered, by RPC and gRPC status code (batch items count one each).");
        for ((rpc, code), n) in self.requests.snapshot() {
            let _ = writeln!(out, "kms_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} {}", n.load(Ordering::Relaxed));
        }
        header(out, "kms_request_duration_seconds", "histogram", "Time from a call's arrival to its answer, audit included.");
        for (rpc, h) in self.request_seconds.snapshot() {
            h.render(out, "kms_request_duration_seconds", &format!("rpc=\"{rpc}\""));
        }
        header(out, "kms_hsm_calls_total", "counter", "PKCS#11 calls, by function and result (ok or error).");
        for ((function, result), n) in self.hsm_calls.snapshot() {
            let _ = writeln!(out, "kms_hsm_calls_total{{function=\"{function}\",result=\"{result}\"}} {}", n.load(Ordering::Relaxed));
        }
        header(out, "kms_hsm_call_duration_seconds", "histogram", "Time of one PKCS#11 call, session checkout included.");
        for (function, h) in self.hsm_seconds.snapshot() {
            h.render(out, "kms_hsm_call_duration_seconds", &format!("function=\"{function}\""));
        }
        header(out, "kms_audit_batch_records", "histogram", "Audit records per group commit.");
        self.audit_batch.render(out, "kms_audit_batch_records", "");
        header(out, "kms_audit_commit_duration_seconds", "histogram", "Time of one group commit (insert, commit, fsync).");
        self.audit_commit_seconds.render(out, "kms_audit_commit_duration_seconds", "");
    }
}

/// The whole exposition: the counters and histograms, then gauges read from the service now
/// (it may touch the HSM and the store: call it on the blocking pool).
pub fn exposition(kms: &crate::service::Kms) -> String {
    let mut out = String::new();
    metrics().render(&mut out);
    let status = match kms.status() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the service's status could not be read");
            return out;
        }
    };
    let gauge = |out: &mut String, name: &str, help: &str| header(out, name, "gauge", help);
    gauge(&mut out, "kms_uptime_seconds", "Seconds since the service started.");
    let _ = writeln!(out, "kms_uptime_seconds {}", status.uptime_seconds);
    gauge(&mut out, "kms_hsm_up", "1 when the last HSM probe (AES-GCM under the canary key) succeeded, else 0.");
    let _ = writeln!(out, "kms_hsm_up {}", u8::from(status.probe.error.is_none()));
    gauge(&mut out, "kms_health", "The deep health check: 1 for the state it is in (ACTIVE, DEGRADED, UNAVAILABLE), 0 for the others.");
    for state in [Health::Active, Health::Degraded, Health::Unavailable] {
        let _ = writeln!(out, "kms_health{{state=\"{}\"}} {}", state.as_str(), u8::from(status.health == state));
    }
    gauge(&mut out, "kms_hsm_sessions", "HSM sessions open and checked out now.");
    let _ = writeln!(out, "kms_hsm_sessions{{state=\"open\"}} {}", status.sessions.open);
    let _ = writeln!(out, "kms_hsm_sessions{{state=\"in_use\"}} {}", status.sessions.in_use);
    gauge(&mut out, "kms_hsm_sessions_max", "The most sessions the pool opens.");
    let _ = writeln!(out, "kms_hsm_sessions_max {}", status.sessions.size);
    if let Some(copies) = status.sessions.copies {
        gauge(&mut out, "kms_hsm_session_copies", "Session copies of key versions ready for use (absent when they are off).");
        let _ = writeln!(out, "kms_hsm_session_copies {copies}");
    }
    gauge(&mut out, "kms_keys", "Keys by state.");
    for state in crate::domain::lifecycle::KeyState::ALL {
        let n = status.keys_by_state.get(state.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "kms_keys{{state=\"{state}\"}} {n}");
    }
    gauge(&mut out, "kms_key_version_encryptions", "AES-GCM encryptions counted for a key version (NIST SP 800-38D budget).");
    for u in &status.usage {
        let _ = writeln!(out, "kms_key_version_encryptions{{key_id=\"{}\",version=\"{}\"}} {}", u.key_id, u.version, u.encryptions);
    }
    gauge(&mut out, "kms_key_version_encryptions_remaining", "Encryptions a key version may still do before it refuses.");
    for u in &status.usage {
        let _ = writeln!(
            out,
            "kms_key_version_encryptions_remaining{{key_id=\"{}\",version=\"{}\"}} {}",
            u.key_id,
            u.version,
            u.limit.saturating_sub(u.encryptions)
        );
    }
    gauge(&mut out, "kms_access_review_overdue", "1 when the access review has not been signed off in the last 365 days.");
    let _ = writeln!(out, "kms_access_review_overdue {}", u8::from(status.review_overdue));
    if let Some((_, at)) = &status.last_signoff {
        gauge(&mut out, "kms_access_review_signoff_age_seconds", "Seconds since the last access-review sign-off.");
        let _ = writeln!(out, "kms_access_review_signoff_age_seconds {}", crate::service::now() - at);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 2.0, 20.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"1\"} 1\nx_bucket{a=\"b\",le=\"10\"} 2\nx_bucket{a=\"b\",le=\"+Inf\"} 3\nx_sum{a=\"b\"} 22.5\nx_count{a=\"b\"} 3\n"
        );
    }
}
