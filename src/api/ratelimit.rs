//! Per-caller token buckets on the token endpoint, so one runaway service cannot starve the
//! others. In process (per replica): with N replicas a caller gets up to N times the rate.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SHARDS: usize = 16;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by caller id.
pub struct CallerLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<Arc<str>, Bucket, foldhash::fast::RandomState>>>,
    hasher: foldhash::fast::RandomState,
}

impl CallerLimiter {
    /// `rate` requests per second with bursts of `burst`; `rate == 0` disables the limit.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }

    /// Takes one request from the caller's bucket, or says how many seconds until one frees.
    pub fn check(&self, caller: &Arc<str>) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut shard = self.shards[self.hasher.hash_one(caller) as usize % SHARDS]
            .lock()
            .expect("limiter shard");
        let now = Instant::now();
        if shard.len() > 100_000 {
            // Forget full, idle buckets rather than grow without bound.
            let (rate, burst) = (self.rate, self.burst);
            shard.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        if !shard.contains_key(caller) {
            shard.insert(
                caller.clone(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let b = shard.get_mut(caller).expect("inserted above");
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_limits_per_caller() {
        let l = CallerLimiter::new(1, 3);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        for _ in 0..3 {
            assert!(l.check(&a).is_ok());
        }
        assert_eq!(l.check(&a), Err(1));
        assert!(l.check(&b).is_ok(), "other callers are not affected");
    }

    #[test]
    fn zero_rate_disables() {
        let l = CallerLimiter::new(0, 0);
        let a: Arc<str> = Arc::from("a");
        for _ in 0..10_000 {
            assert!(l.check(&a).is_ok());
        }
    }
}
