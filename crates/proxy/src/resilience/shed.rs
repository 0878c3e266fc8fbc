//! Load shedding (a BackendPolicy's `adaptiveConcurrency`): a concurrency limit per upstream
//! Service, learned from the Service's latency, and admission by request priority.
//!
//! Every try to the Service asks [`ConcurrencyLimiter::admit`] first: a request of priority
//! `p` is admitted while the tries in flight (from this proxy, all workers) are below `p`'s
//! share of the limit (critical: all of it; normal and sheddable: `normalPercent` and
//! `sheddablePercent`), else it gets a fast 503. So as the upstream saturates, sheddable
//! requests are refused first, then normal ones, and critical ones last.
//!
//! The limit follows the gradient between the upstream's no-load latency (the baseline) and
//! its latency now, in the spirit of Netflix's Gradient2 and Envoy's adaptive concurrency.
//! Each try's latency (to the response headers) goes into the current window; the try that
//! closes a window (`sampleWindow`, and at least [`MIN_SAMPLES`] answers) moves the limit:
//!
//! ```text
//! gradient = clamp(tolerance x baseline / window average, 0.5, tolerance)
//! falling:  limit = limit x gradient                              (at once: protect first)
//! rising:   limit = limit + SMOOTHING x (limit x gradient - limit)  (gently)
//! ```
//!
//! so the limit settles where the upstream's average latency is about `tolerance` times its
//! no-load latency, i.e. with a short queue in front of it. The baseline is the lowest window
//! average seen. A window that used less than half the limit says nothing about the limit
//! and does not move it. When no window has come within [`CONFIRM`] of the baseline for
//! `baselineInterval` (the Service got slower, or a long overload), the baseline is measured
//! again: an unsaturated window is taken as it is; under saturation non-critical requests are
//! held to `minLimit` until [`MIN_SAMPLES`] tries started after that moment have answered, so
//! the upstream's queue drains, and their average becomes the baseline.
//!
//! The request path does one atomic load and one compare-and-swap to admit and a few atomic
//! adds to report; the once-a-window update takes a mutex with `try_lock` (never waits).

use prometheus::{Gauge, IntCounter};
use smesh_model::{AdaptiveConcurrency, Priority};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex, TryLockError};
use std::time::Instant;

/// The request header that carries a priority: `critical`, `normal` or `sheddable`.
pub const PRIORITY_HEADER: http::HeaderName = http::HeaderName::from_static("smesh-priority");

/// Answers a window needs before it moves the limit (and a re-measured baseline needs).
pub const MIN_SAMPLES: u64 = 5;
/// The most the limit falls in one window.
const MIN_GRADIENT: f64 = 0.5;
/// How much of a rise is taken per window.
const SMOOTHING: f64 = 0.2;
/// A window average within this factor of the baseline confirms it.
pub const CONFIRM: f64 = 1.1;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the process' epoch, plus one so that 0 can mean "none".
fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64 + 1
}

/// A request's priority: the `smesh-priority` header, at most the rule's `priority` (a
/// route marked `normal` cannot be made critical by its clients; one marked `critical` can
/// be lowered by them); without a header, the rule's priority, else `normal`. An unknown
/// header value is ignored.
pub fn request_priority(headers: Option<&http::HeaderMap>, route: Option<Priority>) -> Priority {
    let claimed = headers
        .and_then(|h| h.get(PRIORITY_HEADER))
        .and_then(|v| Priority::parse(v.as_bytes()));
    match claimed {
        Some(p) => p.min(route.unwrap_or(Priority::Critical)),
        None => route.unwrap_or_default(),
    }
}

/// Handles resolved once per policy.
pub struct ShedMetrics {
    /// `smesh_load_shed_total{service,priority}`, indexed by [`index`].
    pub shed: [IntCounter; 3],
    pub limit: Gauge,
    pub baseline: Gauge,
}

fn index(p: Priority) -> usize {
    match p {
        Priority::Critical => 0,
        Priority::Normal => 1,
        Priority::Sheddable => 2,
    }
}

struct Estimator {
    limit: f64,
    /// No-load latency in nanoseconds (0: nothing measured yet).
    baseline: f64,
    /// When a window last confirmed (or set) the baseline.
    baseline_seen: u64,
}

pub struct ConcurrencyLimiter {
    /// What it was built from: a reload with the same settings keeps the learned limit.
    pub spec: AdaptiveConcurrency,
    min: f64,
    max: f64,
    tolerance: f64,
    window_ns: u64,
    baseline_interval_ns: u64,
    normal: f64,
    sheddable: f64,
    /// The current limit (`f64` bits).
    limit: AtomicU64,
    in_flight: AtomicU32,
    /// The current window: when it may close, its latencies, its highest concurrency.
    window_end: AtomicU64,
    sum_ns: AtomicU64,
    count: AtomicU64,
    peak: AtomicU32,
    /// While the baseline is measured again: when that began (0: not measuring).
    probe_since: AtomicU64,
    estimator: Mutex<Estimator>,
    metrics: ShedMetrics,
}

impl ConcurrencyLimiter {
    pub fn new(spec: &AdaptiveConcurrency, metrics: ShedMetrics) -> Self {
        Self::new_at(spec, metrics, now_ns())
    }

    fn new_at(spec: &AdaptiveConcurrency, metrics: ShedMetrics, now: u64) -> Self {
        let initial = f64::from(spec.initial_limit());
        let window_ns = spec
            .sample_window
            .unwrap_or(AdaptiveConcurrency::DEFAULT_SAMPLE_WINDOW)
            .as_nanos() as u64;
        let percent = |v: Option<u32>, default: u32| f64::from(v.unwrap_or(default).clamp(1, 100)) / 100.0;
        metrics.limit.set(initial);
        ConcurrencyLimiter {
            spec: spec.clone(),
            min: f64::from(spec.min_limit()),
            max: f64::from(spec.max_limit().max(spec.min_limit())),
            tolerance: spec
                .tolerance
                .unwrap_or(AdaptiveConcurrency::DEFAULT_TOLERANCE)
                .clamp(1.0, 10.0),
            window_ns,
            baseline_interval_ns: spec
                .baseline_interval
                .unwrap_or(AdaptiveConcurrency::DEFAULT_BASELINE_INTERVAL)
                .as_nanos() as u64,
            normal: percent(spec.normal_percent, AdaptiveConcurrency::DEFAULT_NORMAL_PERCENT),
            sheddable: percent(spec.sheddable_percent, AdaptiveConcurrency::DEFAULT_SHEDDABLE_PERCENT),
            limit: AtomicU64::new(initial.to_bits()),
            in_flight: AtomicU32::new(0),
            window_end: AtomicU64::new(now + window_ns),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
            peak: AtomicU32::new(0),
            probe_since: AtomicU64::new(0),
            estimator: Mutex::new(Estimator {
                limit: initial,
                baseline: 0.0,
                baseline_seen: now,
            }),
            metrics,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        f64::from_bits(self.limit.load(Relaxed))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Tries in flight below which a request of this priority is admitted.
    pub fn ceiling(&self, p: Priority) -> f64 {
        let limit = self.limit();
        // While the baseline is measured again, only critical requests use the whole limit.
        let base = if self.probe_since.load(Relaxed) != 0 {
            self.min.min(limit)
        } else {
            limit
        };
        match p {
            Priority::Critical => limit,
            Priority::Normal => base * self.normal,
            Priority::Sheddable => base * self.sheddable,
        }
    }

    /// A slot for one try, or `None` (counted as shed) when the request's priority has no
    /// room left under the limit.
    pub fn admit(&self, p: Priority) -> Option<Permit<'_>> {
        self.admit_at(p, now_ns())
    }

    fn admit_at(&self, p: Priority, now: u64) -> Option<Permit<'_>> {
        let ceiling = self.ceiling(p);
        let mut current = self.in_flight.load(Relaxed);
        loop {
            if f64::from(current) >= ceiling {
                self.metrics.shed[index(p)].inc();
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(current, current + 1, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.peak.fetch_max(current + 1, Relaxed);
        Some(Permit {
            limiter: self,
            started: now,
        })
    }

    /// One try's latency, from its admission to its answer.
    fn sample(&self, started: u64, now: u64) {
        let probe = self.probe_since.load(Relaxed);
        if probe != 0 && started < probe {
            // Sent before the queue drained: says nothing about no-load latency.
            return;
        }
        self.sum_ns.fetch_add(now.saturating_sub(started), Relaxed);
        let count = self.count.fetch_add(1, Relaxed) + 1;
        let end = self.window_end.load(Relaxed);
        if count >= MIN_SAMPLES
            && (now >= end || probe != 0)
            && self
                .window_end
                .compare_exchange(end, now + self.window_ns, Relaxed, Relaxed)
                .is_ok()
        {
            self.update(now);
        }
    }

    /// Closes the window: moves the baseline and the limit.
    fn update(&self, now: u64) {
        let mut est = match self.estimator.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        let sum = self.sum_ns.swap(0, Relaxed);
        let count = self.count.swap(0, Relaxed);
        let peak = self.peak.swap(self.in_flight.load(Relaxed), Relaxed);
        if count == 0 {
            return;
        }
        let average = sum as f64 / count as f64;
        let stale = now.saturating_sub(est.baseline_seen) > self.baseline_interval_ns;
        let saturated = f64::from(peak) * 2.0 >= est.limit;
        if self.probe_since.load(Relaxed) != 0 || (stale && !saturated) || est.baseline == 0.0 {
            // A re-measurement (after draining, or from a window that did not press on the
            // limit), or the first window.
            self.probe_since.store(0, Relaxed);
            est.baseline = average;
            est.baseline_seen = now;
        } else if average <= est.baseline * CONFIRM {
            est.baseline = est.baseline.min(average);
            est.baseline_seen = now;
        } else if stale {
            // Measure again with the queue drained; this window's average is not used.
            self.probe_since.store(now, Relaxed);
            return;
        }
        self.metrics.baseline.set(est.baseline / 1e9);
        if !saturated {
            return;
        }
        let gradient = (self.tolerance * est.baseline / average).clamp(MIN_GRADIENT, self.tolerance);
        let target = est.limit * gradient;
        let next = if target < est.limit {
            target
        } else {
            est.limit + SMOOTHING * (target - est.limit)
        };
        est.limit = next.clamp(self.min, self.max);
        self.limit.store(est.limit.to_bits(), Relaxed);
        self.metrics.limit.set(est.limit);
    }

    #[cfg(test)]
    fn baseline(&self) -> f64 {
        self.estimator.lock().unwrap().baseline
    }

    #[cfg(test)]
    fn probing(&self) -> bool {
        self.probe_since.load(Relaxed) != 0
    }
}

/// One try's slot under the limit; released when dropped.
pub struct Permit<'a> {
    limiter: &'a ConcurrencyLimiter,
    started: u64,
}

impl Permit<'_> {
    /// The upstream answered (or the try timed out): its latency feeds the limit.
    pub fn answered(self) {
        self.limiter.sample(self.started, now_ns());
    }

    #[cfg(test)]
    fn answered_at(self, now: u64) {
        self.limiter.sample(self.started, now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    fn metrics() -> ShedMetrics {
        let c = || IntCounter::new("shed", "shed").unwrap();
        ShedMetrics {
            shed: [c(), c(), c()],
            limit: Gauge::new("limit", "limit").unwrap(),
            baseline: Gauge::new("baseline", "baseline").unwrap(),
        }
    }

    fn spec(initial: u32, tolerance: f64) -> AdaptiveConcurrency {
        AdaptiveConcurrency {
            initial_limit: Some(initial),
            tolerance: Some(tolerance),
            baseline_interval: Some(Duration::from_secs(5)),
            ..Default::default()
        }
    }

    #[test]
    fn priority_from_header_and_route() {
        let mut h = http::HeaderMap::new();
        assert_eq!(request_priority(None, None), Priority::Normal);
        assert_eq!(request_priority(Some(&h), Some(Priority::Critical)), Priority::Critical);
        h.insert(PRIORITY_HEADER, "critical".parse().unwrap());
        assert_eq!(request_priority(Some(&h), None), Priority::Critical);
        // the route is a ceiling: clients cannot raise themselves above it ...
        assert_eq!(request_priority(Some(&h), Some(Priority::Normal)), Priority::Normal);
        assert_eq!(
            request_priority(Some(&h), Some(Priority::Sheddable)),
            Priority::Sheddable
        );
        // ... but may lower themselves
        h.insert(PRIORITY_HEADER, "Sheddable".parse().unwrap());
        assert_eq!(
            request_priority(Some(&h), Some(Priority::Critical)),
            Priority::Sheddable
        );
        h.insert(PRIORITY_HEADER, "urgent".parse().unwrap());
        assert_eq!(request_priority(Some(&h), Some(Priority::Critical)), Priority::Critical);
        assert_eq!(request_priority(Some(&h), None), Priority::Normal);
    }

    #[test]
    fn lower_priorities_are_refused_first() {
        let l = ConcurrencyLimiter::new_at(&spec(10, 1.5), metrics(), MS);
        let mut held = Vec::new();
        // sheddable up to 50% of 10, normal up to 90%, critical up to the limit
        while let Some(p) = l.admit_at(Priority::Sheddable, MS) {
            held.push(p);
        }
        assert_eq!(held.len(), 5);
        while let Some(p) = l.admit_at(Priority::Normal, MS) {
            held.push(p);
        }
        assert_eq!(held.len(), 9);
        assert!(l.admit_at(Priority::Sheddable, MS).is_none());
        while let Some(p) = l.admit_at(Priority::Critical, MS) {
            held.push(p);
        }
        assert_eq!(held.len(), 10);
        assert_eq!(l.metrics.shed[index(Priority::Sheddable)].get(), 2);
        assert_eq!(l.metrics.shed[index(Priority::Normal)].get(), 1);
        assert_eq!(l.metrics.shed[index(Priority::Critical)].get(), 1);
        held.truncate(4);
        assert_eq!(l.in_flight(), 4);
        assert!(l.admit_at(Priority::Sheddable, MS).is_some(), "room again below 5");
        drop(held);
        assert_eq!(l.in_flight(), 0);
    }

    /// What a [`simulate`] run saw from `measure_from` on.
    struct Run {
        critical: Vec<u64>,
        refused: HashMap<Priority, u64>,
        offered: HashMap<Priority, u64>,
    }

    /// A discrete-event run against an upstream that serves `servers` tries at once, each
    /// taking `service(t)`, queueing the rest in order. Arrivals are evenly spaced per
    /// priority, from `from` to `until` (nanoseconds).
    fn simulate(
        l: &ConcurrencyLimiter,
        servers: usize,
        service: impl Fn(u64) -> u64,
        rates: &[(Priority, f64)],
        from: u64,
        until: u64,
        measure_from: u64,
    ) -> Run {
        let mut free: BinaryHeap<Reverse<u64>> = (0..servers).map(|_| Reverse(from)).collect();
        let mut arrivals: Vec<(u64, Priority)> = Vec::new();
        for &(p, rate) in rates {
            let gap = (1e9 / rate) as u64;
            let mut t = from + gap / 2;
            while t < until {
                arrivals.push((t, p));
                t += gap;
            }
        }
        arrivals.sort();
        let mut done: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut permits: HashMap<usize, (Permit<'_>, u64, Priority)> = HashMap::new();
        let mut run = Run {
            critical: Vec::new(),
            refused: HashMap::new(),
            offered: HashMap::new(),
        };
        let finish = |done: &mut BinaryHeap<Reverse<(u64, usize)>>,
                      permits: &mut HashMap<usize, (Permit<'_>, u64, Priority)>,
                      run: &mut Run,
                      now: u64| {
            while let Some(Reverse((t, id))) = done.peek().copied() {
                if t > now {
                    break;
                }
                done.pop();
                let (permit, sent, p) = permits.remove(&id).unwrap();
                permit.answered_at(t);
                if p == Priority::Critical && sent >= measure_from {
                    run.critical.push(t - sent);
                }
            }
        };
        for (id, (t, p)) in arrivals.into_iter().enumerate() {
            finish(&mut done, &mut permits, &mut run, t);
            if t >= measure_from {
                *run.offered.entry(p).or_default() += 1;
            }
            match l.admit_at(p, t) {
                Some(permit) => {
                    let Reverse(at) = free.pop().unwrap();
                    let end = t.max(at) + service(t);
                    free.push(Reverse(end));
                    done.push(Reverse((end, id)));
                    permits.insert(id, (permit, t, p));
                }
                None if t >= measure_from => *run.refused.entry(p).or_default() += 1,
                None => {}
            }
        }
        finish(&mut done, &mut permits, &mut run, u64::MAX);
        run
    }

    fn p99(v: &mut [u64]) -> u64 {
        v.sort();
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    }

    #[test]
    fn converges_under_overload_and_keeps_critical_latency() {
        // 4 at once, 40 ms each: 100 tries/s. Offered: 50/s critical + 250/s sheddable (3x).
        let l = ConcurrencyLimiter::new_at(&spec(8, 1.25), metrics(), 1);
        let service = |_| 40 * MS;
        // unloaded: critical alone
        let mut alone = simulate(&l, 4, service, &[(Priority::Critical, 50.0)], 1, 4000 * MS, 1);
        assert_eq!(p99(&mut alone.critical), 40 * MS);
        assert!((l.baseline() - 40e6).abs() < 1.0, "{}", l.baseline());
        let rates = [(Priority::Critical, 50.0), (Priority::Sheddable, 250.0)];
        let mut run = simulate(&l, 4, service, &rates, 4000 * MS, 14_000 * MS, 4000 * MS);
        let limit = l.limit();
        let p99 = p99(&mut run.critical);
        let refused = |p| run.refused.get(&p).copied().unwrap_or(0);
        let offered = |p| run.offered.get(&p).copied().unwrap_or(0);
        println!(
            "limit {limit:.2}, critical p99 {} ms, refused critical {}/{}, sheddable {}/{}",
            p99 / MS,
            refused(Priority::Critical),
            offered(Priority::Critical),
            refused(Priority::Sheddable),
            offered(Priority::Sheddable)
        );
        assert!(p99 <= 80 * MS, "critical p99 {} ms", p99 / MS);
        assert_eq!(refused(Priority::Critical), 0);
        assert!(refused(Priority::Sheddable) * 10 >= offered(Priority::Sheddable) * 6);
        // the upstream stays busy: sheddable fills what critical leaves
        let served = offered(Priority::Sheddable) - refused(Priority::Sheddable);
        assert!(served >= 400, "{served} sheddable served in 10 s");
        assert!((4.0..=14.0).contains(&limit), "{limit}");
    }

    #[test]
    fn a_slower_upstream_is_measured_again_instead_of_starved() {
        let l = ConcurrencyLimiter::new_at(&spec(20, 1.5), metrics(), 1);
        // 4 at once, 40 ms each (100/s); from 5 s on 100 ms each (40/s), for good
        let rates = [(Priority::Critical, 10.0), (Priority::Normal, 200.0)];
        let service = |t: u64| if t < 5000 * MS { 40 * MS } else { 100 * MS };
        simulate(&l, 4, service, &rates, 1, 5000 * MS, 1);
        assert!((l.baseline() - 40e6).abs() < 5e6, "{}", l.baseline());
        let mut probes = 0;
        let mut served = 0;
        for s in 5..25u64 {
            let was = l.probing();
            let r = simulate(
                &l,
                4,
                service,
                &rates,
                s * 1000 * MS,
                (s + 1) * 1000 * MS,
                s * 1000 * MS,
            );
            probes += usize::from(!was && l.probing());
            if s >= 20 {
                served += r.offered[&Priority::Normal] - r.refused.get(&Priority::Normal).copied().unwrap_or(0);
            }
        }
        println!(
            "limit {:.2}, baseline {:.1} ms, {probes} re-measurements, {served} normal served in the last 5 s",
            l.limit(),
            l.baseline() / 1e6
        );
        // the baseline followed the upstream, so the limit did not collapse to minLimit and
        // normal requests get what critical ones leave of the 40/s (about 30/s)
        assert!(probes >= 1);
        assert!(
            (90e6..130e6).contains(&l.baseline()),
            "baseline {} ms",
            l.baseline() / 1e6
        );
        assert!(l.limit() >= 4.0, "limit {}", l.limit());
        assert!(served >= 120, "{served} normal requests served in the last 5 s");
    }

    #[test]
    fn an_idle_limit_does_not_grow_and_the_window_waits_for_samples() {
        let l = ConcurrencyLimiter::new_at(&spec(20, 1.5), metrics(), 1);
        // one at a time: never half the limit, so nothing moves it
        let mut t = 1;
        for _ in 0..200 {
            let p = l.admit_at(Priority::Normal, t).unwrap();
            t += 10 * MS;
            p.answered_at(t);
        }
        assert_eq!(l.limit(), 20.0);
        assert!((l.baseline() - 10e6).abs() < 1.0);
        // fewer than MIN_SAMPLES answers never close a window
        let l = ConcurrencyLimiter::new_at(&spec(20, 1.5), metrics(), 1);
        for i in 0..MIN_SAMPLES - 1 {
            l.admit_at(Priority::Normal, 1)
                .unwrap()
                .answered_at(1000 * MS * (i + 1));
        }
        assert_eq!(l.baseline(), 0.0);
    }
}
