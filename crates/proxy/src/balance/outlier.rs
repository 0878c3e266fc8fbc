//! Outlier detection (passive health checking, Envoy semantics): an endpoint that answers
//! `consecutive5xx` 5xx (or local failures) in a row, or `consecutiveGatewayErrors`
//! 502/503/504 (or local failures) in a row, is ejected from balancing for
//! `baseEjectionTime` x the number of its recent ejections, then returns by itself. Each
//! healthy `interval` since its last ejection ended lowers that multiplier by one. At most
//! `maxEjectionPercent` of a Service's endpoints are ejected at once (one always may be).

use crate::balance::{self, Balancer, Endpoint};
use prometheus::IntCounter;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Per endpoint address, kept in its `EndpointStats` (so it survives reloads).
#[derive(Debug, Default)]
pub struct EndpointHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejections in a row (the multiplier of the ejection time).
    ejections: AtomicU32,
    /// When the current (or last) ejection ends; 0: never ejected.
    ejected_until_ns: AtomicU64,
}

impl EndpointHealth {
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ns.load(Relaxed) > now_ns()
    }
}

pub struct OutlierDetector {
    consecutive_5xx: u32,
    consecutive_gateway: Option<u32>,
    interval: Duration,
    base: Duration,
    max_percent: u32,
    /// Every endpoint of the Service (subsets included), for the ejection cap.
    endpoints: Arc<Balancer>,
    ejections: IntCounter,
}

impl OutlierDetector {
    pub fn new(o: &smesh_model::OutlierDetection, endpoints: Arc<Balancer>, ejections: IntCounter) -> Self {
        use smesh_model::OutlierDetection as D;
        OutlierDetector {
            consecutive_5xx: o.consecutive5xx.unwrap_or(D::DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway: o.consecutive_gateway_errors,
            interval: o.interval.unwrap_or(D::DEFAULT_INTERVAL),
            base: o.base_ejection_time.unwrap_or(D::DEFAULT_BASE_EJECTION_TIME),
            max_percent: o.max_ejection_percent.unwrap_or(D::DEFAULT_MAX_EJECTION_PERCENT),
            endpoints,
            ejections,
        }
    }

    /// Records the outcome of one try: an HTTP status, or 502/503/504 for local failures.
    pub fn observe(&self, endpoint: &Endpoint, status: u16) {
        let h = &endpoint.stats.outlier;
        if status < 500 {
            if h.consecutive_5xx.load(Relaxed) != 0 {
                h.consecutive_5xx.store(0, Relaxed);
            }
            if h.consecutive_gateway.load(Relaxed) != 0 {
                h.consecutive_gateway.store(0, Relaxed);
            }
            return;
        }
        let n5 = h.consecutive_5xx.fetch_add(1, Relaxed) + 1;
        let gateway = matches!(status, 502..=504);
        let ngw = if gateway {
            h.consecutive_gateway.fetch_add(1, Relaxed) + 1
        } else {
            h.consecutive_gateway.store(0, Relaxed);
            0
        };
        if n5 >= self.consecutive_5xx || self.consecutive_gateway.is_some_and(|t| ngw >= t) {
            self.eject(endpoint);
        }
    }

    fn eject(&self, endpoint: &Endpoint) {
        let h = &endpoint.stats.outlier;
        let now = now_ns();
        let until = h.ejected_until_ns.load(Relaxed);
        if until > now {
            return;
        }
        let all = self.endpoints.endpoints();
        let ejected = all.iter().filter(|e| e.stats.outlier.is_ejected()).count();
        let cap = (all.len() * self.max_percent as usize / 100).max(1);
        if ejected >= cap {
            return;
        }
        // The multiplier decays by one per healthy interval since the last ejection ended.
        let healthy = if until == 0 { 0 } else { now - until };
        let decay = (healthy / self.interval.as_nanos().max(1) as u64).min(u32::MAX as u64) as u32;
        let times = h.ejections.load(Relaxed).saturating_sub(decay) + 1;
        let longest = self.base.max(smesh_model::OutlierDetection::MAX_EJECTION_TIME);
        let duration = self.base.saturating_mul(times).min(longest);
        let next = now + duration.as_nanos() as u64;
        // Another worker may be ejecting the same endpoint: only one wins.
        if h.ejected_until_ns
            .compare_exchange(until, next, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        h.ejections.store(times, Relaxed);
        h.consecutive_5xx.store(0, Relaxed);
        h.consecutive_gateway.store(0, Relaxed);
        balance::avoid(endpoint, duration);
        self.ejections.inc();
        tracing::info!(endpoint = %endpoint.addr, ejection = times, duration = ?duration, "outlier ejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smesh_model::LoadBalancer;
    use std::net::SocketAddr;

    fn endpoints(n: u16) -> Arc<Balancer> {
        let eps = (1..=n)
            .map(|p| {
                Arc::new(Endpoint {
                    addr: SocketAddr::from(([127, 0, 0, 1], p)),
                    weight: 1,
                    labels: Default::default(),
                    stats: Arc::default(),
                    server_name: None,
                })
            })
            .collect();
        Arc::new(Balancer::new(eps, LoadBalancer::RoundRobin))
    }

    fn detector(b: &Arc<Balancer>, base_ms: u64, pct: u32) -> OutlierDetector {
        OutlierDetector::new(
            &smesh_model::OutlierDetection {
                consecutive5xx: Some(3),
                consecutive_gateway_errors: Some(2),
                interval: Some(Duration::from_secs(60)),
                base_ejection_time: Some(Duration::from_millis(base_ms)),
                max_ejection_percent: Some(pct),
            },
            b.clone(),
            IntCounter::new("x", "x").unwrap(),
        )
    }

    #[test]
    fn ejects_after_consecutive_errors_and_returns() {
        let b = endpoints(3);
        let d = detector(&b, 50, 100);
        let e = &b.endpoints()[0];
        d.observe(e, 500);
        d.observe(e, 500);
        d.observe(e, 200); // resets
        d.observe(e, 500);
        d.observe(e, 500);
        assert!(!e.stats.outlier.is_ejected());
        d.observe(e, 500);
        assert!(e.stats.outlier.is_ejected());
        assert_eq!(d.ejections.get(), 1);
        // the balancer skips it while ejected
        assert!((0..30).all(|_| b.pick(&[]).unwrap().addr != e.addr));
        std::thread::sleep(Duration::from_millis(70));
        assert!(!e.stats.outlier.is_ejected());
        // gateway errors: two in a row; the second ejection lasts twice as long
        d.observe(e, 503);
        d.observe(e, 504);
        assert!(e.stats.outlier.is_ejected());
        assert_eq!(e.stats.outlier.ejections.load(Relaxed), 2);
        std::thread::sleep(Duration::from_millis(70));
        assert!(e.stats.outlier.is_ejected(), "second ejection is 100 ms");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!e.stats.outlier.is_ejected());
    }

    #[test]
    fn caps_ejections() {
        let b = endpoints(4);
        let d = detector(&b, 10_000, 50);
        for e in b.endpoints() {
            for _ in 0..3 {
                d.observe(e, 500);
            }
        }
        let ejected = b.endpoints().iter().filter(|e| e.stats.outlier.is_ejected()).count();
        assert_eq!(ejected, 2);
        // a low percentage still allows one
        let b = endpoints(3);
        let d = detector(&b, 10_000, 10);
        for e in b.endpoints() {
            for _ in 0..3 {
                d.observe(e, 500);
            }
        }
        assert_eq!(b.endpoints().iter().filter(|e| e.stats.outlier.is_ejected()).count(), 1);
    }
}
