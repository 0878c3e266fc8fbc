//! Circuit breaking (Envoy semantics, per proxy): limits on requests, busy connections and
//! retries in flight to one Service. Over a limit a request waits in a bounded pending queue
//! or, when that is full (or has no room configured), fails at once with 503
//! `smesh-proxy-error: circuit open`.

use prometheus::IntCounter;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use tokio::sync::Notify;

pub struct CircuitBreaker {
    max_requests: u32,
    max_connections: u32,
    max_pending: u32,
    max_retries: u32,
    requests: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    released: Notify,
    pub overflows: Overflows,
}

/// `smesh_circuit_breaker_overflows_total{service,kind}` handles.
pub struct Overflows {
    pub requests: IntCounter,
    pub connections: IntCounter,
    pub pending: IntCounter,
    pub retries: IntCounter,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Requests,
    Connections,
    Pending,
}

impl Overflow {
    pub fn describe(self) -> &'static str {
        match self {
            Overflow::Requests => "maxRequests reached",
            Overflow::Connections => "maxConnections reached",
            Overflow::Pending => "maxPendingRequests reached",
        }
    }
}

/// Holds a request (and, for HTTP/1.1, a connection) slot until dropped.
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    connection: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let b = self.breaker;
        b.requests.fetch_sub(1, SeqCst);
        if self.connection {
            b.connections.fetch_sub(1, SeqCst);
        }
        if b.pending.load(SeqCst) > 0 {
            b.released.notify_waiters();
        }
    }
}

/// Holds a retry slot until dropped.
pub struct RetryPermit<'a>(&'a CircuitBreaker);

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, SeqCst);
    }
}

impl CircuitBreaker {
    pub fn new(c: &smesh_model::CircuitBreaker, overflows: Overflows) -> Self {
        CircuitBreaker {
            max_requests: c.max_requests.unwrap_or(u32::MAX),
            max_connections: c.max_connections.unwrap_or(u32::MAX),
            max_pending: c.max_pending_requests.unwrap_or(0),
            max_retries: c.max_retries.unwrap_or(u32::MAX),
            requests: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            released: Notify::new(),
            overflows,
        }
    }

    fn try_take(&self, connection: bool) -> Result<Permit<'_>, Overflow> {
        if self.requests.fetch_add(1, SeqCst) >= self.max_requests {
            self.requests.fetch_sub(1, SeqCst);
            return Err(Overflow::Requests);
        }
        if connection && self.connections.fetch_add(1, SeqCst) >= self.max_connections {
            self.connections.fetch_sub(1, SeqCst);
            self.requests.fetch_sub(1, SeqCst);
            return Err(Overflow::Connections);
        }
        Ok(Permit {
            breaker: self,
            connection,
        })
    }

    /// A slot for one try; `connection`: the try needs an HTTP/1.1 connection of its own.
    /// Waits (while the caller's deadline allows) when the pending queue has room.
    pub async fn admit(&self, connection: bool) -> Result<Permit<'_>, Overflow> {
        let hit = match self.try_take(connection) {
            Ok(p) => return Ok(p),
            Err(hit) => hit,
        };
        if self.pending.fetch_add(1, SeqCst) >= self.max_pending {
            self.pending.fetch_sub(1, SeqCst);
            let kind = if self.max_pending == 0 { hit } else { Overflow::Pending };
            match kind {
                Overflow::Requests => self.overflows.requests.inc(),
                Overflow::Connections => self.overflows.connections.inc(),
                Overflow::Pending => self.overflows.pending.inc(),
            }
            return Err(kind);
        }
        // Leaves the queue however the wait ends (admitted, or cancelled by a timeout).
        struct Queued<'a>(&'a AtomicU32);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        let _queued = Queued(&self.pending);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(p) = self.try_take(connection) {
                return Ok(p);
            }
            notified.await;
        }
    }

    /// A slot for one retry, or `None` (counted) when `maxRetries` are in flight.
    pub fn retry(&self) -> Option<RetryPermit<'_>> {
        if self.retries.fetch_add(1, SeqCst) >= self.max_retries {
            self.retries.fetch_sub(1, SeqCst);
            self.overflows.retries.inc();
            return None;
        }
        Some(RetryPermit(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn breaker(spec: smesh_model::CircuitBreaker) -> CircuitBreaker {
        let c = || IntCounter::new("x", "x").unwrap();
        CircuitBreaker::new(
            &spec,
            Overflows {
                requests: c(),
                connections: c(),
                pending: c(),
                retries: c(),
            },
        )
    }

    #[tokio::test]
    async fn fails_fast_over_max_requests() {
        let b = breaker(smesh_model::CircuitBreaker {
            max_requests: Some(2),
            ..Default::default()
        });
        let p1 = b.admit(false).await.unwrap();
        let _p2 = b.admit(false).await.unwrap();
        assert_eq!(b.admit(false).await.err(), Some(Overflow::Requests));
        assert_eq!(b.overflows.requests.get(), 1);
        drop(p1);
        assert!(b.admit(false).await.is_ok());
    }

    #[tokio::test]
    async fn connections_and_retries() {
        let b = breaker(smesh_model::CircuitBreaker {
            max_connections: Some(1),
            max_retries: Some(1),
            ..Default::default()
        });
        let _c = b.admit(true).await.unwrap();
        assert_eq!(b.admit(true).await.err(), Some(Overflow::Connections));
        // HTTP/2 tries do not hold a connection of their own.
        assert!(b.admit(false).await.is_ok());
        let r = b.retry();
        assert!(r.is_some());
        assert!(b.retry().is_none());
        drop(r);
        assert!(b.retry().is_some());
        assert_eq!(b.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn pending_requests_wait_for_a_slot() {
        let b = std::sync::Arc::new(breaker(smesh_model::CircuitBreaker {
            max_requests: Some(1),
            max_pending_requests: Some(1),
            ..Default::default()
        }));
        let first = b.admit(false).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.admit(false).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // the queue (1) is full now
        assert_eq!(b.admit(false).await.err(), Some(Overflow::Pending));
        drop(first);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(b.pending.load(SeqCst), 0);
    }
}
