//! Per-client limit on HTTP/2 requests abandoned before their response (stream resets, the
//! "rapid reset" attack class).
//!
//! hyper bounds resets per connection; a client spreading a reset flood over many
//! connections would still have each reset stream relayed to an upstream one for one. Here
//! every client address has a token bucket (`--max-client-resets` per second, bursts of
//! twice that); a client that empties it has its connections closed and new ones refused
//! for [`BLOCK_FOR`]. The table is locked when a request is abandoned, when an HTTP/2
//! connection from a client that is not a mesh peer starts (to take the handle that closes it),
//! and at every connection start while some client is blocked; never per request. Keys are
//! client addresses, chosen by clients: the std (SipHash) map, not Fx.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a client that went over its limit is refused.
pub const BLOCK_FOR: Duration = Duration::from_secs(10);
/// Clients tracked at most; past that, entries with full buckets are forgotten.
const MAX_TRACKED: usize = 4096;

pub struct ResetLimiter {
    /// Resets per second a client may make (0: no limit).
    per_second: u32,
    clients: Mutex<HashMap<IpAddr, Client>>,
    /// Clients blocked right now (so connection starts skip the lock when none is).
    blocked: AtomicUsize,
}

struct Client {
    tokens: f64,
    refilled: Instant,
    blocked_until: Option<Instant>,
    /// Woken when the client is blocked: its open connections close.
    kick: Arc<Notify>,
}

impl ResetLimiter {
    pub fn new(per_second: u32) -> Self {
        ResetLimiter {
            per_second,
            clients: Mutex::new(HashMap::new()),
            blocked: AtomicUsize::new(0),
        }
    }

    fn burst(&self) -> f64 {
        f64::from(self.per_second) * 2.0
    }

    /// Whether connections from `client` are refused now.
    pub fn is_blocked(&self, client: IpAddr) -> bool {
        if self.blocked.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = clients.get_mut(&client) else {
            return false;
        };
        match entry.blocked_until {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                entry.blocked_until = None;
                self.blocked.fetch_sub(1, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    /// What wakes a connection of `client` when the client is blocked.
    pub fn kick(&self, client: IpAddr) -> Option<Arc<Notify>> {
        if self.per_second == 0 {
            return None;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        Some(self.entry(&mut clients, client).kick.clone())
    }

    /// Counts one abandoned request; true when it took the client over its limit.
    pub fn on_reset(&self, client: IpAddr) -> bool {
        if self.per_second == 0 {
            return false;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let (rate, burst) = (f64::from(self.per_second), self.burst());
        let entry = self.entry(&mut clients, client);
        let now = Instant::now();
        entry.tokens = (entry.tokens + now.duration_since(entry.refilled).as_secs_f64() * rate).min(burst);
        entry.refilled = now;
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            return false;
        }
        if entry.blocked_until.is_none() {
            self.blocked.fetch_add(1, Ordering::Relaxed);
        }
        entry.blocked_until = Some(now + BLOCK_FOR);
        entry.tokens = 0.0;
        entry.kick.notify_waiters();
        true
    }

    fn entry<'a>(&self, clients: &'a mut HashMap<IpAddr, Client>, client: IpAddr) -> &'a mut Client {
        if clients.len() >= MAX_TRACKED && !clients.contains_key(&client) {
            let burst = self.burst();
            clients.retain(|_, c| c.blocked_until.is_some() || c.tokens < burst || Arc::strong_count(&c.kick) > 1);
        }
        let burst = self.burst();
        clients.entry(client).or_insert_with(|| Client {
            tokens: burst,
            refilled: Instant::now(),
            blocked_until: None,
            kick: Arc::new(Notify::new()),
        })
    }
}

/// Counts the request as abandoned if it is dropped before [`Abandoned::answered`].
pub struct Abandoned {
    limiter: Arc<ResetLimiter>,
    client: IpAddr,
    answered: bool,
}

impl Abandoned {
    pub fn new(limiter: Arc<ResetLimiter>, client: IpAddr) -> Self {
        Abandoned {
            limiter,
            client,
            answered: false,
        }
    }

    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.answered && self.limiter.on_reset(self.client) {
            tracing::info!(client = %self.client, "client over --max-client-resets: its connections close");
        }
    }
}

/// A request's future that reports whether it was abandoned (dropped before its response).
/// A thin wrapper around an `Unpin` future (the recycled block the HTTP/2 path keeps its
/// request future in), so nothing large is moved.
pub struct Answered<F> {
    abandoned: Option<Abandoned>,
    request: F,
}

impl<F> Answered<F> {
    pub fn new(abandoned: Option<Abandoned>, request: F) -> Self {
        Answered { abandoned, request }
    }
}

impl<F: Future + Unpin> Future for Answered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = std::task::ready!(Pin::new(&mut self.request).poll(cx));
        if let Some(abandoned) = self.abandoned.take() {
            abandoned.answered();
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_its_burst_is_blocked_and_others_are_not() {
        let limiter = ResetLimiter::new(10);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let kick = limiter.kick(a).expect("limited");
        let woken = kick.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for _ in 0..20 {
            assert!(!limiter.on_reset(a), "within the burst of 20");
        }
        assert!(!limiter.is_blocked(a));
        assert!(limiter.on_reset(a), "the 21st reset in a burst goes over");
        assert!(limiter.is_blocked(a) && !limiter.is_blocked(b));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(woken.as_mut().poll(&mut cx).is_ready(), "open connections are told");
        assert!(!ResetLimiter::new(0).on_reset(a), "0 disables the limit");
    }
}
