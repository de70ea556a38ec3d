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

/// The tokens in `bucket` at `now`: what it held, refilled at the sustained rate up to the burst.
fn refilled(limit: RateLimit, bucket: &Bucket, now: Instant) -> f64 {
    (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * limit.per_second).min(limit.burst)
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

    /// How long until a bucket holding `tokens` lets a call through.
    fn wait(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64((1.0 - tokens) / self.limit.per_second)
    }

    /// Takes one call from `principal`'s bucket; when it is empty, answers how long until the
    /// next call would be allowed (the retry hint).
    pub fn take(&mut self, principal: &str, now: Instant) -> Result<(), Duration> {
        if self.limit.per_second <= 0.0 {
            return Ok(());
        }
        let burst = self.limit.burst;
        let mut bucket = self.buckets.get(principal).copied().unwrap_or(Bucket { tokens: burst, at: now });
        bucket = Bucket { tokens: refilled(self.limit, &bucket, now), at: now };
        let answer = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait(bucket.tokens))
        };
        match self.buckets.get_mut(principal) {
            Some(b) => *b = bucket,
            None => {
                self.buckets.insert(principal.to_string(), bucket);
            }
        }
        answer
    }

    /// How long `principal` would wait if it called at `now` (`None`: its call would be let
    /// through), without taking anything from its bucket: `take`'s arithmetic, read only.
    pub fn would_refuse(&self, principal: &str, now: Instant) -> Option<Duration> {
        let bucket = self.buckets.get(principal).filter(|_| self.limit.per_second > 0.0)?;
        let tokens = refilled(self.limit, bucket, now);
        (tokens < 1.0).then(|| self.wait(tokens))
    }

    /// Forgets the principals whose buckets are full again (they are as if never seen), so the
    /// map does not grow with every name ever presented.
    pub fn forget_idle(&mut self, now: Instant) {
        let limit = self.limit;
        self.buckets.retain(|_, b| refilled(limit, b, now) < limit.burst);
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
