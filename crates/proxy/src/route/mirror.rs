//! The `RequestMirror` filter: a copy of a share of requests goes to a shadow service,
//! fire-and-forget. The shadow's answers and failures are read and dropped, never seen by the
//! client; each worker keeps at most [`MAX_IN_FLIGHT_PER_WORKER`] mirrors in flight and drops
//! (and counts) the rest, so a slow shadow cannot hold memory or slow the client. A body kept
//! in memory is sent from there; a streamed one is copied frame by frame ([`crate::http::tee`]).

use crate::balance::{Balancer, InFlight};
use crate::http::body::Body;
use crate::http::request::{build_request, upstream_version};
use crate::http::tee::TapSender;
use crate::identity::upstream::{Carry, Upstream};
use bytes::Bytes;
use http::request::Parts;
use http::Request;
use http_body_util::BodyExt;
use prometheus::IntCounter;
use smesh_model::Protocol;
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_IN_FLIGHT_PER_WORKER: usize = 256;
/// A mirrored request (and reading its response) gives up after this long.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

pub struct Mirror {
    pub service: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub protocol: Option<Protocol>,
    pub fraction: f64,
    pub counters: MirrorCounters,
}

#[derive(Clone)]
pub struct MirrorCounters {
    /// The shadow answered (any status).
    pub sent: IntCounter,
    /// Connect/transport failure or timeout.
    pub failed: IntCounter,
    /// Not sent: too many mirrors in flight on this worker, or no endpoint.
    pub dropped: IntCounter,
    /// Not sent: the request's body could not be copied. Kept for the metric's label set;
    /// since streamed bodies are copied frame by frame nothing counts here.
    pub skipped: IntCounter,
}

struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        IN_FLIGHT.with(|n| {
            if n.get() >= MAX_IN_FLIGHT_PER_WORKER {
                None
            } else {
                n.set(n.get() + 1);
                Some(Slot)
            }
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

impl Mirror {
    /// Maybe sends a copy of the request (head as it will be forwarded). A shadow behind a
    /// smesh proxy is reached over mesh mTLS, as the primary is. For a streamed body the
    /// returned sender is to be fed the body's frames ([`crate::http::tee::Tee`]).
    pub fn send(
        &self,
        head: &Parts,
        body: &MirrorBody<'_>,
        connect_timeout: Duration,
        mesh_tls: Option<&Arc<crate::identity::MeshTls>>,
    ) -> Option<TapSender> {
        if !crate::route::fault::chance(self.fraction) {
            return None;
        }
        let Some(slot) = Slot::take() else {
            self.counters.dropped.inc();
            return None;
        };
        let Some(endpoint) = self.balancer.pick(&[]).cloned() else {
            self.counters.dropped.inc();
            return None;
        };
        let (body, tap) = match body {
            MirrorBody::Kept(bytes) => (Body::full((*bytes).clone()), None),
            MirrorBody::Streamed(size) => {
                let (sender, tap) = crate::http::tee::tap(*size);
                (Body::Tap(tap), Some(sender))
            }
        };
        let app_version = upstream_version(self.protocol, head.version, false);
        let upstream = Upstream::new(&endpoint, mesh_tls.map(|t| &**t), app_version, Carry::Http);
        let mut req = Request::new(());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.headers_mut() = head.headers.clone();
        upstream.mark(req.headers_mut());
        let (parts, ()) = req.into_parts();
        let req = build_request(parts, upstream.version, body);
        let counters = self.counters.clone();
        let settings = crate::http::pool::PoolSettings::new(connect_timeout, None);
        tokio::spawn(async move {
            let _slot = slot;
            let in_flight = InFlight::start(&endpoint);
            let exchange = async {
                let resp =
                    crate::http::pool::send(upstream.addr, upstream.version, req, settings, false, upstream.mesh)
                        .await
                        .map_err(|_| ())?;
                in_flight.answered();
                resp.into_body().collect().await.map_err(|_| ())?;
                Ok::<(), ()>(())
            };
            match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
                Ok(Ok(())) => counters.sent.inc(),
                _ => counters.failed.inc(),
            }
        });
        tap
    }
}

/// The request body as a mirror gets it.
pub enum MirrorBody<'a> {
    /// Kept in memory.
    Kept(&'a Bytes),
    /// Streamed from the client; its size hint.
    Streamed(http_body::SizeHint),
}
