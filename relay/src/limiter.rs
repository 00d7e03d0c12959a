//! Token buckets: per-peer request limits and the relay-wide wakeup
//! rate. Pure state, owned by the task that uses it; time is passed in.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// One token bucket: holds up to `burst` tokens, refilled at `rate` per
/// second; each allowed action takes one.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (it can be forgotten).
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// A token bucket per key (peer), bounded in how many it tracks: buckets
/// that have refilled are forgotten first, since a new one is the same.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: u32,
    buckets: HashMap<K, TokenBucket>,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
            max_keys: max_keys.max(1),
        }
    }

    /// Whether `key` may act now (and takes its token).
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.try_take(now);
        }
        if self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_keys {
                // Every tracked key is busy: forget one rather than refuse
                // a newcomer (connection limits bound how many there are).
                if let Some(k) = self.buckets.keys().next().cloned() {
                    self.buckets.remove(&k);
                }
            }
        }
        let mut bucket = TokenBucket::new(self.rate, self.burst, now);
        let allowed = bucket.try_take(now);
        self.buckets.insert(key.clone(), bucket);
        allowed
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
        // 10/s: one more every 100 ms.
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(110)));
        // Never more than the burst, however long it waited.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn peers_have_separate_buckets_and_tracking_is_bounded() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1.0, 2, 3);
        assert!(l.allow(&1, t0));
        assert!(l.allow(&1, t0));
        assert!(!l.allow(&1, t0));
        assert!(l.allow(&2, t0));
        for k in 3..100 {
            assert!(l.allow(&k, t0));
            assert!(l.tracked() <= 3);
        }
    }
}
