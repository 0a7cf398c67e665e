//! Token buckets per key (a peer id, a remote address): the request rate limits of the
//! libp2p event loop and of the daemons' gRPC servers.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Keys remembered at most; past it, full buckets (idle keys) are forgotten.
const MAX_TRACKED: usize = 65_536;

/// One token bucket per key: `rate` tokens a second, at most `burst` held.
pub struct RateBuckets<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> RateBuckets<K> {
    /// Buckets refilling at `rate` a second up to `burst` (at least 1); none when `rate`
    /// is not positive (no limit).
    pub fn new(rate: f64, burst: u32) -> Option<Self> {
        (rate > 0.0).then(|| RateBuckets {
            rate,
            burst: (burst as f64).max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Tokens added a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Tokens held at most.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Takes a token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: &K) -> bool {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_TRACKED && !m.contains_key(key) {
            m.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = m.entry(key.clone()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
