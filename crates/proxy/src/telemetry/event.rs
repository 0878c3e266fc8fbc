//! What the request path reports: one [`RequestEvent`] per HTTP request, completed when its
//! response body ends (or is dropped), and one [`ConnectionEvent`] per opaque TCP connection
//! (a TCP listener, a CONNECT tunnel, an upgraded HTTP connection).
//!
//! The request path fills a [`RequestCtx`] as it goes (route, tries, endpoint); the handler
//! turns it into the event. Consumers (metrics, the access log, `crate::filter::Filter`
//! implementations such as tap and tracing) read events; none of them is on the path of the
//! bytes.

use crate::telemetry::metrics::RouteMetrics;
use crate::telemetry::trace_context::{TraceContext, TryOutcome};
use http::{Method, Uri, Version};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything known about a request while it is handled, in the order the stages learn it.
pub struct RequestCtx {
    pub start: Instant,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub client: SocketAddr,
    /// The verified SPIFFE ID of the peer proxy, on mesh mTLS connections.
    pub peer: Option<Arc<str>>,
    /// Whether the request is a gRPC call (`content-type: application/grpc...`).
    pub grpc: bool,
    /// The request line, kept only when a consumer reports it (the access log, filters).
    pub head: Option<Box<RequestHead>>,
    /// The route that matched (inbound: the local app's): its name and metric handles.
    pub route: Option<Arc<RouteMetrics>>,
    /// The Service the last try went to (a canary split may pick another one per try).
    pub destination: Option<Arc<str>>,
    /// The whole request's deadline (the route's timeout, or the client's `grpc-timeout`).
    pub deadline: Option<Duration>,
    /// Tries sent upstream (retries, connects moved to another endpoint and refused streams
    /// sent again included).
    pub tries: u32,
    /// The endpoint of the last try.
    pub endpoint: Option<SocketAddr>,
    /// Why the proxy answered itself (an error's reason, e.g. `connect_failed`), if it did.
    pub error: Option<&'static str>,
    /// The request's trace ids and its tries' spans, only when tracing is on.
    pub trace: Option<Box<TraceContext>>,
}

/// The request line as the client sent it.
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// The authority the request was routed by (`Host` or `:authority`).
    pub authority: Option<Box<str>>,
}

impl RequestCtx {
    pub fn new(direction: &'static str, client: SocketAddr, peer: Option<Arc<str>>) -> Self {
        RequestCtx {
            start: Instant::now(),
            direction,
            client,
            peer,
            grpc: false,
            head: None,
            route: None,
            destination: None,
            deadline: None,
            tries: 0,
            endpoint: None,
            error: None,
            trace: None,
        }
    }

    /// The last try ended: noted only when the request is traced (else `outcome` is not
    /// even worked out).
    pub fn try_ended(&mut self, outcome: impl FnOnce() -> TryOutcome) {
        if let Some(trace) = &mut self.trace {
            trace.end_try(outcome());
        }
    }

    /// Records the request line (for consumers that report it, like the access log).
    pub fn keep_head<B>(&mut self, req: &http::Request<B>, authority: Option<&str>) {
        self.head = Some(Box::new(RequestHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            authority: authority.map(Box::from),
        }));
    }
}

/// How a response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every frame reached the client.
    Complete,
    /// The upstream's body failed mid-stream (the client saw a reset or a cut-off body).
    Error(String),
    /// The client went away (or the connection closed) before the body ended.
    Dropped,
}

/// One HTTP request, from its first byte to the end of its response body.
pub struct RequestEvent {
    pub ctx: RequestCtx,
    /// The status the client got.
    pub status: u16,
    /// The gRPC status, from the trailers or a trailers-only response (gRPC calls only).
    pub grpc_status: Option<u16>,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
    /// From the request's start to the response head.
    pub to_head: Duration,
    /// From the request's start to the end of the response body.
    pub to_end: Duration,
    pub end: BodyEnd,
}

impl RequestEvent {
    /// Whether the request failed as its client sees it: a 5xx, a gRPC status other than OK
    /// (or a gRPC call without one), or a body that did not end cleanly.
    pub fn is_failure(&self) -> bool {
        self.status >= 500 || (self.ctx.grpc && self.grpc_status != Some(0)) || matches!(self.end, BodyEnd::Error(_))
    }
}

/// What carried an opaque connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A TCP listener or a TCP-protocol Service.
    Tcp,
    /// An HTTP `CONNECT` tunnel.
    Connect,
    /// An HTTP connection upgraded (WebSocket or a route's `upgrades`).
    Upgrade,
}

impl ConnectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Tcp => "tcp",
            ConnectionKind::Connect => "connect",
            ConnectionKind::Upgrade => "upgrade",
        }
    }
}

/// One opaque connection, reported when both directions are done.
#[derive(Debug, Clone)]
pub struct ConnectionEvent {
    pub kind: ConnectionKind,
    pub direction: &'static str,
    pub client: SocketAddr,
    pub peer: Option<Arc<str>>,
    /// The Service it went to, when known.
    pub destination: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    /// An I/O error that ended it, if one did.
    pub error: Option<String>,
}

impl ConnectionEvent {
    /// A connection about to start: nothing copied yet.
    pub fn start(kind: ConnectionKind, direction: &'static str, client: SocketAddr, peer: Option<Arc<str>>) -> Self {
        ConnectionEvent {
            kind,
            direction,
            client,
            peer,
            destination: None,
            upstream: None,
            bytes_from_client: 0,
            bytes_to_client: 0,
            duration: Duration::ZERO,
            error: None,
        }
    }
}

/// Where finished opaque connections are reported.
pub trait ConnectionSink: Send + Sync {
    fn connection_done(&self, event: &ConnectionEvent);
}
