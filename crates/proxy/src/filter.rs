//! The request path's extension point: a [`Filter`] sees each HTTP request at fixed phases
//! and every finished request and connection. Tap, tracing and golden-metric aggregation
//! attach here; so can a library user's own code.
//!
//! Not to be confused with `crate::route::filters`, the built-in HTTPRoute filters
//! (redirects, header edits, mirrors, faults) that routes configure: those stay an enum on
//! the hot path, and run before the phases below.
//!
//! Phases, in the order a request meets them (every method does nothing by default, so a
//! filter implements only what it needs):
//! 0. [`Filter::request_received`]: the request as it arrived, before routing and admission
//!    (which may answer it without the next phases);
//! 1. [`Filter::request_head`]: once routed, admitted and within its rate limits, before
//!    the route's filters; may answer the request itself.
//! 2. [`Filter::upstream_request`]: each try's request, just before it is sent (a retry
//!    calls it again).
//! 3. [`Filter::response_head`]: the response head on its way to the client.
//! 4. [`Filter::request_done`]: the [`RequestEvent`], once the response body ended or was
//!    dropped.
//!
//! and [`Filter::connection_done`] for each opaque connection (TCP, CONNECT, upgrades).
//!
//! Filters run on the worker threads: they must not block, and a slow one slows every
//! request. A filter that ships events elsewhere hands them to a bounded queue (as the
//! access log does).

use crate::http::body::Body;
use crate::telemetry::event::{ConnectionEvent, RequestCtx, RequestEvent};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use std::sync::Arc;

pub trait Filter: Send + Sync + 'static {
    /// The request as it arrived, before routing, authorization and rate limits (which may
    /// answer it: then `request_done` follows at once). Reads only.
    fn request_received(&self, _ctx: &mut RequestCtx, _head: &ReceivedHead<'_>) {}

    /// The request head after routing; `Some` answers the request with that response
    /// instead of sending it upstream. May note what later phases need in `ctx`.
    fn request_head(&self, _ctx: &mut RequestCtx, _head: &mut Parts) -> Option<Response<Body>> {
        None
    }

    /// A try's request, just before it goes to `ctx.endpoint`.
    fn upstream_request(&self, _ctx: &mut RequestCtx, _req: &mut Request<Body>) {}

    /// The response head, before it goes to the client (also the proxy's own answers).
    fn response_head(&self, _ctx: &mut RequestCtx, _resp: &mut Response<Body>) {}

    /// The request is over: its response body ended, failed, or was dropped.
    fn request_done(&self, _event: &RequestEvent) {}

    /// An opaque connection closed.
    fn connection_done(&self, _event: &ConnectionEvent) {}
}

/// A request's head as it arrived, whatever its body (a server connection's, or an embedded
/// caller's): what [`Filter::request_received`] reads.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedHead<'a> {
    /// The request line's method,
    pub method: &'a Method,
    /// target (as sent: origin or absolute form),
    pub uri: &'a Uri,
    /// and HTTP version.
    pub version: Version,
    /// The headers as they arrived, hop-by-hop ones still in.
    pub headers: &'a HeaderMap,
}

impl<'a> ReceivedHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        ReceivedHead {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
        }
    }
}

/// The filters a proxy runs, in order. Empty by default: then no request pays for them.
pub type Filters = Arc<[Arc<dyn Filter>]>;

/// The filters one request runs: those installed when the proxy started, then those its
/// configuration snapshot adds (tracing, from the MeshConfig), which change on reloads.
#[derive(Clone, Copy, Default)]
pub struct RequestFilters<'a> {
    pub installed: &'a [Arc<dyn Filter>],
    pub configured: &'a [Arc<dyn Filter>],
}

impl<'a> RequestFilters<'a> {
    pub fn new(installed: &'a Option<Filters>, configured: &'a Option<Filters>) -> Self {
        RequestFilters {
            installed: installed.as_deref().unwrap_or_default(),
            configured: configured.as_deref().unwrap_or_default(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a Arc<dyn Filter>> {
        self.installed.iter().chain(self.configured)
    }
}
