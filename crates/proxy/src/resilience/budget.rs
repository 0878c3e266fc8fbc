//! Retry budgets (Finagle/Linkerd style): over a sliding window of `ttl`, retries to a
//! Service may not exceed `ratio` x its requests + `minRetriesPerSecond` x `ttl`, so retries
//! cannot multiply an outage. Lock-free: a ring of per-slice counters shared by all workers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

const SLICES: usize = 10;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

#[derive(Default)]
struct Slice {
    /// Which slice of time (now / slice length) the counters belong to.
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    slice_ns: u64,
    slices: [Slice; SLICES],
}

impl RetryBudget {
    pub fn new(b: &smesh_model::RetryBudget) -> Self {
        use smesh_model::RetryBudget as B;
        let ttl = b.ttl.unwrap_or(B::DEFAULT_TTL);
        let min = b.min_retries_per_second.unwrap_or(B::DEFAULT_MIN_RETRIES_PER_SECOND);
        RetryBudget {
            ratio: b.ratio.unwrap_or(B::DEFAULT_RATIO),
            reserve: f64::from(min) * ttl.as_secs_f64(),
            slice_ns: (ttl.as_nanos() as u64 / SLICES as u64).max(1),
            slices: Default::default(),
        }
    }

    fn now_epoch(&self) -> u64 {
        // +SLICES so that slices never used (epoch 0) always count as expired.
        EPOCH.elapsed().as_nanos() as u64 / self.slice_ns + SLICES as u64
    }

    fn current(&self, epoch: u64) -> &Slice {
        let slice = &self.slices[(epoch % SLICES as u64) as usize];
        let seen = slice.epoch.load(Relaxed);
        if seen != epoch && slice.epoch.compare_exchange(seen, epoch, Relaxed, Relaxed).is_ok() {
            // This slice last held counts from a full window ago: start it over. (A count
            // racing with the reset may be lost; the budget is an estimate.)
            slice.requests.store(0, Relaxed);
            slice.retries.store(0, Relaxed);
        }
        slice
    }

    /// A request (first try) to the Service: adds `ratio` to the budget.
    pub fn deposit(&self) {
        let epoch = self.now_epoch();
        self.current(epoch).requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn withdraw(&self) -> bool {
        let epoch = self.now_epoch();
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slices {
            if epoch - s.epoch.load(Relaxed).min(epoch) < SLICES as u64 {
                requests += s.requests.load(Relaxed);
                retries += s.retries.load(Relaxed);
            }
        }
        if (retries as f64) + 1.0 > self.ratio * requests as f64 + self.reserve {
            return false;
        }
        self.current(epoch).retries.fetch_add(1, Relaxed);
        true
    }

    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.slice_ns * SLICES as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min: u32, ttl_ms: u64) -> RetryBudget {
        RetryBudget::new(&smesh_model::RetryBudget {
            ratio: Some(ratio),
            min_retries_per_second: Some(min),
            ttl: Some(Duration::from_millis(ttl_ms)),
        })
    }

    #[test]
    fn ratio_of_requests_plus_reserve() {
        let b = budget(0.2, 10, 1000); // reserve 10
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 30); // 0.2 x 100 + 10
        b.deposit();
        b.deposit();
        b.deposit();
        b.deposit();
        b.deposit();
        assert!(b.withdraw(), "five more requests earn one more retry");
        assert!(!b.withdraw());
    }

    #[test]
    fn window_expires() {
        let b = budget(0.0, 1, 1000); // reserve 1 per window
        assert!(b.withdraw());
        assert!(!b.withdraw());
        std::thread::sleep(Duration::from_millis(1150));
        assert!(b.withdraw(), "the old retry left the window");
        assert_eq!(b.window(), Duration::from_millis(1000));
    }
}
