//! Local rate limits (the `RateLimit` HTTPRoute filter): token buckets shared by every worker
//! of the proxy, kept as GCRA "theoretical arrival times" (one `u64` per bucket, which is a
//! token bucket of `burst` tokens refilled at `requestsPerSecond`).
//!
//! A route-wide limit is one atomic updated with a compare-and-swap. Per-key limits (source,
//! header value) keep their buckets in 16 mutex-guarded shards whose critical section is one
//! hash lookup and a little arithmetic; their number is capped (`maxKeys`): a full shard first
//! drops idle keys (a full bucket loses nothing when forgotten), then the key with the most
//! tokens. Excess requests get 429 with `retry-after` (gRPC: RESOURCE_EXHAUSTED).

use crate::http::body::Body;
use crate::http::errors::ProxyError;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use prometheus::IntCounter;
use smesh_model::{NamedKey, RateLimitKey};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the process' epoch, plus one second so that 0 (a fresh bucket) is
/// always in the past.
fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64 + 1_000_000_000
}

const SHARDS: usize = 16;

/// GCRA: a bucket whose theoretical arrival time is `tat` takes one token at `now`.
/// `Ok(new tat)`, or `Err(nanoseconds until a token is there)`.
fn take(tat: u64, now: u64, interval: u64, limit: u64) -> Result<u64, u64> {
    let next = tat.max(now) + interval;
    let ahead = next - now;
    if ahead > limit {
        Err(ahead - limit)
    } else {
        Ok(next)
    }
}

enum Key {
    Route,
    Source,
    Header(HeaderName),
}

/// Key -> theoretical arrival time.
type Shard = Mutex<HashMap<Box<[u8]>, u64>>;

enum Buckets {
    One(AtomicU64),
    Keyed {
        shards: Box<[Shard; SHARDS]>,
        per_shard: usize,
        hasher: RandomState,
    },
}

/// One `RateLimit` filter's state. Shared by all workers; carried over a reload that leaves
/// the filter unchanged.
pub struct RateLimiter {
    pub spec: smesh_model::RateLimit,
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now a bucket's arrival time may run: `burst` tokens.
    limit: u64,
    key: Key,
    buckets: Buckets,
}

impl RateLimiter {
    pub fn new(spec: &smesh_model::RateLimit) -> Self {
        let interval = (1e9 / spec.requests_per_second).clamp(1.0, u64::MAX as f64 / 4.0) as u64;
        let limit = interval.saturating_mul(u64::from(spec.burst_or_default()));
        let key = match &spec.key {
            RateLimitKey::Named(NamedKey::Route) => Key::Route,
            RateLimitKey::Named(NamedKey::Source) => Key::Source,
            RateLimitKey::Header { header } => match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) => Key::Header(h),
                Err(_) => Key::Route, // validation rejects bad names
            },
        };
        let buckets = match key {
            Key::Route => Buckets::One(AtomicU64::new(0)),
            _ => {
                let max = spec.max_keys.unwrap_or(smesh_model::RateLimit::DEFAULT_MAX_KEYS) as usize;
                Buckets::Keyed {
                    shards: Box::new(std::array::from_fn(|_| Mutex::new(HashMap::new()))),
                    per_shard: max.div_ceil(SHARDS).max(1),
                    hasher: RandomState::new(),
                }
            }
        };
        RateLimiter {
            spec: spec.clone(),
            interval,
            limit,
            key,
            buckets,
        }
    }

    /// Takes a token for the request; `Err(seconds to wait)` when there is none.
    pub fn acquire(&self, headers: &HeaderMap, client: IpAddr, peer: Option<&str>) -> Result<(), u64> {
        self.acquire_at(headers, client, peer, now_ns())
    }

    fn acquire_at(&self, headers: &HeaderMap, client: IpAddr, peer: Option<&str>, now: u64) -> Result<(), u64> {
        let wait = match &self.buckets {
            Buckets::One(tat) => {
                let mut current = tat.load(Relaxed);
                loop {
                    match take(current, now, self.interval, self.limit) {
                        Ok(next) => match tat.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                            Ok(_) => return Ok(()),
                            Err(seen) => current = seen,
                        },
                        Err(wait) => break wait,
                    }
                }
            }
            Buckets::Keyed { .. } => {
                let ip;
                let key: &[u8] = match &self.key {
                    Key::Source => match peer {
                        Some(id) => id.as_bytes(),
                        None => {
                            ip = client.to_string();
                            ip.as_bytes()
                        }
                    },
                    Key::Header(name) => headers.get(name).map_or(&[][..], |v| v.as_bytes()),
                    Key::Route => &[],
                };
                match self.take_keyed(key, now) {
                    Ok(()) => return Ok(()),
                    Err(wait) => wait,
                }
            }
        };
        Err(wait.div_ceil(1_000_000_000).max(1))
    }

    fn take_keyed(&self, key: &[u8], now: u64) -> Result<(), u64> {
        let Buckets::Keyed {
            shards,
            per_shard,
            hasher,
        } = &self.buckets
        else {
            return Ok(());
        };
        let shard = &shards[(hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tat) = map.get_mut(key) {
            *tat = take(*tat, now, self.interval, self.limit)?;
            return Ok(());
        }
        let next = take(0, now, self.interval, self.limit)?;
        if map.len() >= *per_shard {
            // Idle keys have full buckets: forgetting them changes nothing.
            map.retain(|_, tat| *tat > now);
            if map.len() >= *per_shard {
                if let Some(k) = map.iter().min_by_key(|(_, tat)| **tat).map(|(k, _)| k.clone()) {
                    map.remove(&k);
                }
            }
        }
        map.insert(key.into(), next);
        Ok(())
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        match &self.buckets {
            Buckets::One(_) => 1,
            Buckets::Keyed { shards, .. } => shards.iter().map(|s| s.lock().unwrap().len()).sum(),
        }
    }
}

/// A rule's rate limits; a request must pass each.
pub struct RateLimits {
    pub limiters: Vec<Arc<RateLimiter>>,
    /// `smesh_rate_limited_total{service,route}`.
    pub limited: IntCounter,
}

impl RateLimits {
    /// `Some(response)` when the request is over a limit.
    pub fn check(&self, headers: &HeaderMap, client: IpAddr, peer: Option<&str>, grpc: bool) -> Option<Response<Body>> {
        for l in &self.limiters {
            if let Err(seconds) = l.acquire(headers, client, peer) {
                self.limited.inc();
                let mut resp = ProxyError::RateLimited.response("", grpc);
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
                return Some(resp);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn limiter(rps: f64, burst: u32, key: RateLimitKey, max_keys: Option<u32>) -> RateLimiter {
        RateLimiter::new(&smesh_model::RateLimit {
            requests_per_second: rps,
            burst: Some(burst),
            key,
            max_keys,
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn bucket_math() {
        let l = limiter(100.0, 20, RateLimitKey::default(), None);
        let h = HeaderMap::new();
        let t0 = 5 * S;
        // a full bucket: the burst at once, then one token per 10 ms
        assert_eq!(
            (0..30).filter(|_| l.acquire_at(&h, ip(1), None, t0).is_ok()).count(),
            20
        );
        assert_eq!(
            l.acquire_at(&h, ip(1), None, t0),
            Err(1),
            "retry-after rounds up to 1 s"
        );
        assert!(l.acquire_at(&h, ip(1), None, t0 + 10 * MS).is_ok());
        assert!(l.acquire_at(&h, ip(1), None, t0 + 10 * MS).is_err());
        // offered 200/s for 10 s: burst + 100/s pass
        let mut ok = 0;
        for i in 0..2000u64 {
            if l.acquire_at(&h, ip(1), None, t0 + 20 * MS + i * 5 * MS).is_ok() {
                ok += 1;
            }
        }
        assert!((999..=1001).contains(&ok), "{ok}");
        // a long pause refills only up to the burst
        let later = t0 + 100 * S;
        assert_eq!(
            (0..50).filter(|_| l.acquire_at(&h, ip(1), None, later).is_ok()).count(),
            20
        );
        // slow rates: retry-after is the wait in whole seconds
        let slow = limiter(0.1, 1, RateLimitKey::default(), None);
        assert!(slow.acquire_at(&h, ip(1), None, t0).is_ok());
        assert_eq!(slow.acquire_at(&h, ip(1), None, t0 + S / 2), Err(10));
    }

    #[test]
    fn keys_by_source_and_header_and_bounds_them() {
        let l = limiter(1.0, 2, RateLimitKey::Named(NamedKey::Source), Some(32));
        let h = HeaderMap::new();
        let t0 = 5 * S;
        for n in 1..=3 {
            assert_eq!((0..5).filter(|_| l.acquire_at(&h, ip(n), None, t0).is_ok()).count(), 2);
        }
        // a mesh identity is the source when there is one
        assert!(l.acquire_at(&h, ip(1), Some("spiffe://a"), t0).is_ok());
        let by_header = limiter(
            1.0,
            1,
            RateLimitKey::Header {
                header: "x-tenant".into(),
            },
            Some(32),
        );
        let mut a = HeaderMap::new();
        a.insert("x-tenant", "a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("x-tenant", "b".parse().unwrap());
        assert!(by_header.acquire_at(&a, ip(1), None, t0).is_ok());
        assert!(by_header.acquire_at(&a, ip(2), None, t0).is_err());
        assert!(by_header.acquire_at(&b, ip(1), None, t0).is_ok());
        assert!(
            by_header.acquire_at(&h, ip(1), None, t0).is_ok(),
            "no header: one shared bucket"
        );
        assert!(by_header.acquire_at(&h, ip(2), None, t0).is_err());
        // many sources: the number of buckets stays bounded
        for i in 0..10_000u32 {
            let src = IpAddr::V4(Ipv4Addr::from(i));
            let _ = l.acquire_at(&h, src, None, t0 + u64::from(i) * MS);
        }
        assert!(l.keys() <= 32, "{} keys", l.keys());
    }

    #[test]
    fn shared_across_threads() {
        let l = Arc::new(limiter(1000.0, 50, RateLimitKey::default(), None));
        let start = Instant::now();
        let run = std::time::Duration::from_millis(500);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let h = HeaderMap::new();
                    let mut ok = 0u64;
                    while start.elapsed() < run {
                        if l.acquire(&h, ip(1), None).is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let secs = start.elapsed().as_secs_f64();
        let expected = 1000.0 * secs + 50.0;
        assert!((total as f64) <= expected + 2.0, "{total} > {expected}");
        assert!((total as f64) >= expected * 0.9, "{total} < {expected}");
    }
}
