//! Abuse limits shared by the HTTP surfaces: a token bucket per caller (transmitter or API client),
//! and the answer a refused request gets.
//!
//! Limits are keyed by the *authenticated* caller's configured name, never by anything the request
//! chooses, so the set of buckets is bounded by the config and an attacker cannot grow it.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Requests per second with a burst allowance, per caller.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: DashMap<String, Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            per_sec: per_sec.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            buckets: DashMap::new(),
        }
    }

    /// Takes one request from `caller`'s bucket, or says how long until one is available.
    pub fn acquire(&self, caller: &str) -> Result<(), Duration> {
        self.acquire_at(caller, Instant::now())
    }

    fn acquire_at(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let mut bucket = match self.buckets.get_mut(caller) {
            Some(b) => b,
            None => self.buckets.entry(caller.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }
}

/// Whole seconds for `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(10.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.acquire_at("a", t0).is_ok());
        }
        let wait = limiter.acquire_at("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another caller has its own bucket.
        assert!(limiter.acquire_at("b", t0).is_ok());
        // 100 ms later one more request fits, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.acquire_at("a", t1).is_ok());
        assert!(limiter.acquire_at("a", t1).is_err());
        // Idle time refills up to the burst only.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.acquire_at("a", t2).is_ok());
        }
        assert!(limiter.acquire_at("a", t2).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
