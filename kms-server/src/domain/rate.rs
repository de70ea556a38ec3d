//! Per-principal rate limits: a token bucket per caller, so that one workload or officer cannot
//! take the service (and the HSM behind it) from the others. No I/O: the clock is an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How fast each principal may call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// The sustained rate, in calls per second; 0 turns the limit off.
    pub per_second: f64,
    /// How many calls may come at once after a quiet spell.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every principal seen.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter { limit, buckets: HashMap::new() }
    }

    /// Takes one call from `principal`'s bucket; when it is empty, answers how long until the
    /// next call would be allowed (the retry hint).
    pub fn take(&mut self, principal: &str, now: Instant) -> Result<(), Duration> {
        let RateLimit { per_second, burst } = self.limit;
        if per_second <= 0.0 {
            return Ok(());
        }
        let bucket = match self.buckets.get_mut(principal) {
            Some(b) => b,
            None => self.buckets.entry(principal.to_string()).or_insert(Bucket { tokens: burst, at: now }),
        };
        bucket.tokens = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * per_second).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }

    /// Forgets the principals whose buckets are full again (they are as if never seen), so the
    /// map does not grow with every name ever presented.
    /// How long `principal` would wait if it called at `now` (`None`: its call would be let
    /// through), without taking anything from its bucket: the same arithmetic as `take`.
    pub fn would_refuse(&self, principal: &str, now: Instant) -> Option<Duration> {
        let RateLimit { per_second, burst } = self.limit;
        let bucket = self.buckets.get(principal).filter(|_| per_second > 0.0)?;
        let tokens = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * per_second).min(burst);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / per_second))
    }

    pub fn forget_idle(&mut self, now: Instant) {
        let RateLimit { per_second, burst } = self.limit;
        self.buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_then_a_retry_hint() {
        let mut limiter = RateLimiter::new(RateLimit { per_second: 10.0, burst: 3.0 });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("a", t0).is_ok());
        }
        assert_eq!(limiter.would_refuse("a", t0), Some(Duration::from_millis(100)));
        let wait = limiter.take("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(limiter.would_refuse("b", t0), None, "a principal that never called");
        // Another principal has its own bucket.
        assert!(limiter.take("b", t0).is_ok());
        // One call per 100 ms comes back.
        assert!(limiter.take("a", t0 + Duration::from_millis(100)).is_ok());
        assert!(limiter.take("a", t0 + Duration::from_millis(100)).is_err());
        // Buckets that filled up again are forgotten.
        limiter.forget_idle(t0 + Duration::from_secs(10));
        assert!(limiter.buckets.is_empty());
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let mut limiter = RateLimiter::new(RateLimit { per_second: 0.0, burst: 0.0 });
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| limiter.take("a", t0).is_ok()));
    }
}
