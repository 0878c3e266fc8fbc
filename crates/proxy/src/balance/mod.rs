//! Load balancing over a set of endpoints.
//!
//! The default is power-of-two-choices over peak-EWMA latency multiplied by outstanding
//! requests (as Finagle and Linkerd do): it steers load away from slow or busy endpoints
//! quickly and probes them again as their estimate decays.

pub mod health;
pub mod outlier;

use smesh_model::LoadBalancer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// How long an endpoint that refused a connection is avoided.
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);
/// Peak-EWMA decay time constant.
const DECAY_NS: f64 = 10e9;
/// The latency assumed for an endpoint that has not answered yet: optimistic, so a new
/// endpoint is probed at once and its real latency learned from the first response.
const DEFAULT_RTT_NS: f64 = 0.0;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Live statistics of one endpoint address. Shared by every snapshot that contains the
/// address, so a reload does not forget what was learned.
#[derive(Debug)]
pub struct EndpointStats {
    outstanding: AtomicU32,
    rtt_ns: AtomicU64,
    updated_ns: AtomicU64,
    failing_until_ns: AtomicU64,
    /// Outlier detection's view of this address (used only with a BackendPolicy).
    pub outlier: crate::balance::outlier::EndpointHealth,
    /// Active health checks' verdict (written by the checker task, read here).
    pub active: crate::balance::health::ActiveHealth,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            outstanding: AtomicU32::new(0),
            rtt_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            updated_ns: AtomicU64::new(now_ns()),
            failing_until_ns: AtomicU64::new(0),
            outlier: Default::default(),
            active: Default::default(),
        }
    }
}

impl EndpointStats {
    fn decayed_rtt(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Relaxed));
        let elapsed = now.saturating_sub(self.updated_ns.load(Relaxed)) as f64;
        rtt * (-elapsed / DECAY_NS).exp()
    }

    fn observe(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_nanos() as f64;
        let elapsed = now.saturating_sub(self.updated_ns.load(Relaxed)) as f64;
        let w = (-elapsed / DECAY_NS).exp();
        let current = f64::from_bits(self.rtt_ns.load(Relaxed)) * w;
        let next = if sample > current {
            sample
        } else {
            current * w + sample * (1.0 - w)
        };
        // Two workers may race here; either value is a fine estimate.
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.updated_ns.store(now, Relaxed);
    }

    fn is_failing(&self, now: u64) -> bool {
        self.failing_until_ns.load(Relaxed) > now
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Relaxed)
    }
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    pub stats: Arc<EndpointStats>,
    /// For an endpoint fronted by a smesh proxy: the TLS name its SPIFFE identity maps to.
    /// Traffic to it then goes over mesh mTLS.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// Counts a request as outstanding on an endpoint until dropped; records its latency.
pub struct InFlight {
    stats: Arc<EndpointStats>,
    /// `now_ns()` at the start.
    started_ns: u64,
}

impl InFlight {
    pub fn start(endpoint: &Endpoint) -> Self {
        endpoint.stats.outstanding.fetch_add(1, Relaxed);
        InFlight {
            stats: endpoint.stats.clone(),
            started_ns: now_ns(),
        }
    }

    /// The endpoint answered: feed the latency into its estimate (one clock read).
    pub fn answered(&self) {
        let now = now_ns();
        let rtt = Duration::from_nanos(now.saturating_sub(self.started_ns));
        self.stats.observe(rtt, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.outstanding.fetch_sub(1, Relaxed);
    }
}

/// A failed connect moves on to another endpoint at most this many times (HTTP tries and
/// TCP connections alike).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The endpoints one request or connection could not reach, for the balancer to skip: the
/// one rule for moving on after a failed connect.
#[derive(Debug, Default)]
pub struct Unreachable(Vec<SocketAddr>);

impl Unreachable {
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Records that `endpoint` could not be reached (the balancer avoids it for a while)
    /// and says whether another endpoint of `balancer` may be tried.
    pub fn connect_failed(&mut self, endpoint: &Endpoint, balancer: &Balancer) -> bool {
        mark_failed(endpoint);
        self.0.push(endpoint.addr);
        self.0.len() < MAX_CONNECT_ATTEMPTS.min(balancer.len().max(1))
    }
}

/// The endpoint refused or failed a connection: avoid it for a while.
pub fn mark_failed(endpoint: &Endpoint) {
    avoid(endpoint, FAILURE_BACKOFF);
}

/// Avoid the endpoint for `duration` from now (never shortens an avoidance already set, e.g.
/// an outlier ejection).
pub fn avoid(endpoint: &Endpoint, duration: Duration) {
    let until = now_ns() + duration.as_nanos() as u64;
    endpoint.stats.failing_until_ns.fetch_max(until, Relaxed);
}

/// An immutable set of endpoints with its balancing algorithm.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    algorithm: LoadBalancer,
    total_weight: u64,
    uniform: bool,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(endpoints: Vec<Arc<Endpoint>>, algorithm: LoadBalancer) -> Self {
        let total_weight = endpoints.iter().map(|e| u64::from(e.weight)).sum();
        let uniform = endpoints.windows(2).all(|w| w[0].weight == w[1].weight);
        Balancer {
            endpoints,
            algorithm,
            total_weight,
            uniform,
            next: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint, skipping `exclude` (already tried by this request) and endpoints that
    /// recently failed or fail their active health checks, unless nothing else is left.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<&Arc<Endpoint>> {
        let now = now_ns();
        let usable =
            |e: &Endpoint| !exclude.contains(&e.addr) && !e.stats.is_failing(now) && !e.stats.active.is_unhealthy();
        if let Some(e) = self.pick_where(now, usable) {
            return Some(e);
        }
        // Everything is failing or excluded: prefer an untried endpoint, even a failing one.
        self.pick_where(now, |e| !exclude.contains(&e.addr))
    }

    fn pick_where(&self, now: u64, usable: impl Fn(&Endpoint) -> bool) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        let candidates = self.endpoints.iter().filter(|e| usable(e)).count();
        match candidates {
            0 => return None,
            1 => return self.endpoints.iter().find(|e| usable(e)),
            _ => {}
        }
        let all = candidates == n;
        match self.algorithm {
            LoadBalancer::RoundRobin => {
                // Try successive slots until a usable one comes up; bounded by n.
                for _ in 0..n {
                    let slot = self.next.fetch_add(1, Relaxed);
                    let e = self.weighted_slot(slot);
                    if usable(e) {
                        return Some(e);
                    }
                }
                self.endpoints.iter().find(|e| usable(e))
            }
            LoadBalancer::Random => {
                for _ in 0..n {
                    let e = self.weighted_slot(rand::random::<u64>() as usize);
                    if usable(e) {
                        return Some(e);
                    }
                }
                self.endpoints.iter().find(|e| usable(e))
            }
            LoadBalancer::Ewma | LoadBalancer::LeastRequest => {
                let (a, b) = if all {
                    two_distinct(n)
                } else {
                    let usable_idx: Vec<usize> = (0..n).filter(|&i| usable(&self.endpoints[i])).collect();
                    let (x, y) = two_distinct(usable_idx.len());
                    (usable_idx[x], usable_idx[y])
                };
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                if self.cost(ea, now) <= self.cost(eb, now) {
                    Some(ea)
                } else {
                    Some(eb)
                }
            }
        }
    }

    fn cost(&self, e: &Endpoint, now: u64) -> f64 {
        let load = f64::from(e.stats.outstanding()) + 1.0;
        let cost = match self.algorithm {
            LoadBalancer::Ewma => e.stats.decayed_rtt(now).max(1.0) * load,
            _ => load,
        };
        cost / f64::from(e.weight.max(1))
    }

    /// Maps a counter or random number onto an endpoint in proportion to weights.
    fn weighted_slot(&self, slot: usize) -> &Arc<Endpoint> {
        if self.uniform || self.total_weight == 0 {
            return &self.endpoints[slot % self.endpoints.len()];
        }
        let mut point = (slot as u64) % self.total_weight;
        for e in &self.endpoints {
            let w = u64::from(e.weight);
            if point < w {
                return e;
            }
            point -= w;
        }
        &self.endpoints[0]
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = rand::random_range(0..n);
    let mut b = rand::random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            labels: BTreeMap::new(),
            stats: Arc::default(),
            server_name: None,
        })
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let eps: Vec<_> = (1..=3).map(endpoint).collect();
        let b = Balancer::new(eps.clone(), LoadBalancer::Ewma);
        eps[0].stats.observe(Duration::from_millis(50), now_ns());
        eps[1].stats.observe(Duration::from_micros(500), now_ns());
        eps[2].stats.observe(Duration::from_micros(500), now_ns());
        let slow = (0..1000).filter(|_| b.pick(&[]).unwrap().addr.port() == 1).count();
        assert_eq!(slow, 0);
    }

    #[test]
    fn round_robin_is_even_and_weighted() {
        let b = Balancer::new((1..=3).map(endpoint).collect(), LoadBalancer::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[b.pick(&[]).unwrap().addr.port() as usize - 1] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn skips_excluded_and_failing() {
        let eps: Vec<_> = (1..=3).map(endpoint).collect();
        let b = Balancer::new(eps.clone(), LoadBalancer::Random);
        mark_failed(&eps[0]);
        for _ in 0..100 {
            let p = b.pick(&[eps[1].addr]).unwrap().addr;
            assert_eq!(p, eps[2].addr);
        }
        // Only failing endpoints left: still return one rather than nothing.
        assert_eq!(b.pick(&[eps[1].addr, eps[2].addr]).unwrap().addr, eps[0].addr);
        assert!(b.pick(&[eps[0].addr, eps[1].addr, eps[2].addr]).is_none());
    }
}
