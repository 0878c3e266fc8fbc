//! One connection, from accept to close: mesh TLS or plaintext, protocol detection, then HTTP
//! (hyper) or opaque TCP. Also what every connection shares ([`Shared`]) and what a listener
//! is ([`ListenerSpec`]). Connections run on the worker that accepted them (docs/architecture.md,
//! "Workers"; see [`crate::app::workers`]).

use crate::balance::Balancer;
use crate::config::snapshot::Snapshot;
use crate::http::head_timeout::{Handling, HeadTimeout, Heads};
use crate::http::recycle::Recycled;
use crate::http::resets::{Abandoned, Answered, ResetLimiter};
use crate::identity::table::Identities;
use crate::identity::TlsHandle;
use crate::listen::detect::{complete_tls_record, detect, Detected, PrefixedIo};
use crate::listen::http::{HttpProxy, Target};
use crate::shutdown::stopped;
use crate::tcp;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Stats;
use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Limits on what clients may use. All configurable from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// From the first byte of an HTTP/1 request head to its end.
    pub header_read_timeout: Duration,
    pub max_retry_body_bytes: u64,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// HTTP/2 requests a client may abandon per second (stream resets) before its
    /// connections are closed (see `resets.rs`); 0: no limit.
    pub max_client_resets: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            max_retry_body_bytes: 64 * 1024,
            detect_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            max_concurrent_streams: 1024,
            max_client_resets: 200,
        }
    }
}

/// How long a connection closed for its client's resets may finish streams in flight.
const KICKED_DRAIN: Duration = Duration::from_secs(1);

impl crate::telemetry::event::ConnectionSink for Shared {
    fn connection_done(&self, event: &crate::telemetry::event::ConnectionEvent) {
        if let Some(stats) = &self.stats {
            stats.record_connection(event);
        }
        if let Some(log) = &self.access_log {
            log.record_connection(event);
        }
        for filter in self.filters.iter().flat_map(|f| f.iter()) {
            filter.connection_done(event);
        }
    }
}

/// State shared by every worker: read-mostly, never locked on the request path.
pub struct Shared {
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub access_log: Option<AccessLog>,
    /// Extensions that see every request and connection (none in `smesh proxy` yet).
    pub filters: Option<crate::filter::Filters>,
    pub connections: AtomicUsize,
    /// The mesh identity requests leaving this proxy present, once it has one (a sidecar:
    /// its workload's, also in `identities`).
    pub tls: TlsHandle,
    /// Abandoned requests per client address.
    pub resets: Arc<ResetLimiter>,
    /// Every identity this proxy serves mesh TLS for, chosen by the name the client sent.
    pub identities: Arc<Identities>,
    /// The golden-metric window, when a control plane collects it.
    pub stats: Option<Arc<Stats>>,
}

pub struct ListenerSpec {
    /// `outbound`, `inbound` or `upstream:<service>`: used in logs and metrics.
    pub name: String,
    pub direction: &'static str,
    pub target: Target,
    /// For TCP on this listener (inbound: the app; upstream: resolved per connection).
    pub tcp_only: bool,
}

/// One accepted connection; counted in `open` and in [`Shared::connections`] until dropped.
pub(super) struct Connection {
    pub(super) spec: Arc<ListenerSpec>,
    pub(super) shared: Arc<Shared>,
    pub(super) peer: SocketAddr,
    /// Open connections of this listener, for draining.
    pub(super) open: Arc<AtomicUsize>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.connections_active.dec();
    }
}

impl Connection {
    pub(super) async fn serve(self, mut stream: TcpStream, stop: watch::Receiver<bool>) {
        let _ = stream.set_nodelay(true);
        let limits = &self.shared.limits;
        let (protocol, prefix) = if self.spec.tcp_only || self.upstream_is_tcp() {
            (Detected::Opaque, bytes::Bytes::new())
        } else {
            match detect(&mut stream, limits.detect_timeout).await {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "read failed during detection");
                    return;
                }
            }
        };
        // A destination declared HTTP gets HTTP: bytes that are not recognised in time (a
        // slow start, an extension method) are parsed by hyper, which answers 400 to what it
        // cannot read, instead of being spliced through unparsed past routes, filters and
        // method/path authorization rules.
        // So does the outbound port, which has nowhere to send opaque bytes: an extension
        // method (PURGE, PROPFIND) is served rather than dropped. A client that sent nothing
        // there is still closed at once.
        let protocol = match protocol {
            Detected::Opaque if self.http_declared() => Detected::Http1,
            Detected::Opaque if matches!(self.spec.target, Target::Outbound) && !prefix.is_empty() => Detected::Http1,
            other => other,
        };
        let mut prefix = prefix;
        if matches!(self.spec.target, Target::Inbound(_) | Target::Local(..)) {
            let strict = self.shared.config.load().mtls == smesh_model::MtlsMode::Strict;
            match (protocol, self.shared.identities.server()) {
                (Detected::Tls, Some(server)) => {
                    // A peer proxy's ClientHello names one of this proxy's identities; an
                    // app's own TLS (permissive mode only) goes to the app untouched.
                    prefix = complete_tls_record(&mut stream, prefix, limits.detect_timeout).await;
                    if strict || self.shared.identities.is_mesh_hello(&prefix) != Some(false) {
                        self.shared.metrics.inbound_connections[0].inc();
                        return self.serve_mesh(PrefixedIo::new(prefix, stream), server, stop).await;
                    }
                }
                (_, _) if strict => {
                    // Strict mTLS: nothing but mesh TLS from peers on the inbound port.
                    self.shared
                        .metrics
                        .proxy_error(self.spec.direction, "plaintext refused");
                    tracing::debug!(peer = %self.peer, "plaintext connection refused: mtls is strict");
                    return;
                }
                _ => {}
            }
            self.shared.metrics.inbound_connections[1].inc();
        }
        let io = PrefixedIo::new(prefix, stream);
        match protocol {
            Detected::Http1 => self.serve_http(io, false, None, stop).await,
            Detected::Http2 => self.serve_http(io, true, None, stop).await,
            // Application TLS and everything else is passed through untouched.
            Detected::Tls | Detected::Opaque => {
                if self.tcp_allowed(None) {
                    self.forward_tcp(io, None).await
                }
            }
        }
    }

    /// Terminates mesh mTLS from a peer proxy, presenting the identity it named, then serves
    /// what its ALPN says.
    async fn serve_mesh(
        &self,
        io: PrefixedIo<TcpStream>,
        server: Arc<rustls::ServerConfig>,
        stop: watch::Receiver<bool>,
    ) {
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(io);
        let stream = match tokio::time::timeout(self.shared.limits.idle_timeout, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.shared
                    .metrics
                    .proxy_error(self.spec.direction, "tls handshake failed");
                tracing::debug!(peer = %self.peer, error = %e, "mesh TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let (_, session) = stream.get_ref();
        let peer = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::identity::peer_identity);
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let peer: Option<Arc<str>> = peer.map(Arc::from);
        match alpn.as_deref() {
            Some(crate::identity::ALPN_H2) => self.serve_http(stream, true, peer, stop).await,
            Some(crate::identity::ALPN_HTTP1) => self.serve_http(stream, false, peer, stop).await,
            Some(crate::identity::ALPN_TCP) => {
                if self.tcp_allowed(peer.as_deref()) {
                    self.forward_tcp(stream, peer).await
                }
            }
            _ => tracing::debug!(peer = %self.peer, "mesh TLS connection without a known ALPN"),
        }
    }

    async fn serve_http<I>(&self, io: I, h2: bool, peer: Option<Arc<str>>, mut stop: watch::Receiver<bool>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.shared.limits;
        let proxy = HttpProxy {
            shared: self.shared.clone(),
            target: self.spec.target.clone(),
            direction: self.spec.direction,
            client: self.peer,
            peer,
        };
        let result = if h2 {
            // Each HTTP/2 stream runs in a task of its own: boxing the request future makes
            // the moves into that task pointer-sized (callgrind: 38.0k -> 34.5k instructions
            // per h2c request). HTTP/1 serves requests in place and does better unboxed.
            // The box's block is recycled by the worker (see `recycle.rs`).
            // A stream reset before its response counts against the client's
            // --max-client-resets; over it, `kicked` closes this connection. A mesh peer (a
            // proxy that verified itself) relays its own clients' resets, already limited
            // there, for many clients at once: it is not limited here.
            let limited = proxy.peer.is_none();
            let kicked = if limited {
                self.shared.resets.kick(self.peer.ip())
            } else {
                None
            };
            let resets = self.shared.resets.clone();
            let client = self.peer.ip();
            let service = service_fn(move |req| {
                let abandoned = limited.then(|| Abandoned::new(resets.clone(), client));
                Answered::new(abandoned, Recycled::new_with(|| proxy.clone().handle(req)))
            });
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
                .max_concurrent_streams(limits.max_concurrent_streams)
                .keep_alive_interval(Some(limits.idle_timeout / 2))
                .serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let kicked = async {
                match kicked {
                    Some(kick) => kick.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = kicked => {
                    // GOAWAY, and a moment for the client's streams in flight; then closed.
                    self.shared.metrics.proxy_error(self.spec.direction, "client resets");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(KICKED_DRAIN, conn).await;
                    return;
                }
            }
        } else {
            // hyper's header timer bounds the wait for a head, idle time included
            // (`--idle-timeout`); `--header-read-timeout` runs from a head's first byte.
            let heads = Arc::new(Heads::default());
            let io = HeadTimeout::new(io, heads.clone(), limits.header_read_timeout);
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let connect = req.method() == hyper::Method::CONNECT;
                Handling::new(heads.head_complete(), connect, proxy.clone().handle(req))
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .writev(false)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .header_read_timeout(limits.idle_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }

    /// Authorization of an opaque TCP connection to the local app (inbound only): a denied
    /// connection is closed.
    fn tcp_allowed(&self, peer: Option<&str>) -> bool {
        let (Target::Inbound(rule) | Target::Local(rule, _)) = &self.spec.target else {
            return true;
        };
        let snapshot = self.shared.config.load();
        crate::config::authz::decide_inbound(&snapshot, &self.shared.metrics, rule, peer, None, None)
            .is_none_or(|d| d.allowed())
    }

    /// Whether this listener's destination is declared HTTP (http, http2 or grpc).
    fn http_declared(&self) -> bool {
        use smesh_model::Protocol;
        let declared = match &self.spec.target {
            Target::Inbound(rule) => rule.backends.first().and_then(|b| b.protocol),
            // An application in this process is called over HTTP only.
            Target::Local(..) => Some(Protocol::Http),
            Target::Upstream(name) => self.shared.config.load().service(name).and_then(|s| s.protocol(None)),
            Target::Outbound => None,
        };
        matches!(declared, Some(Protocol::Http | Protocol::Http2 | Protocol::Grpc))
    }

    /// A `--upstream` port for a service declared `protocol: tcp` skips detection, so
    /// server-speaks-first protocols connect at once.
    fn upstream_is_tcp(&self) -> bool {
        match &self.spec.target {
            Target::Upstream(name) => self
                .shared
                .config
                .load()
                .service(name)
                .is_some_and(|s| s.protocol(None) == Some(smesh_model::Protocol::Tcp)),
            _ => false,
        }
    }

    /// `peer`: the verified identity of a peer proxy (mesh mTLS).
    async fn forward_tcp<I>(&self, io: I, peer: Option<Arc<str>>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let snapshot;
        let (service, balancer): (&str, &Balancer) = match &self.spec.target {
            Target::Inbound(rule) => ("app", &rule.backends[0].balancer),
            Target::Upstream(name) => {
                snapshot = self.shared.config.load_full();
                match snapshot.service(name) {
                    Some(s) => (name, &s.balancer),
                    None => {
                        self.shared.metrics.proxy_error(self.spec.direction, "unknown service");
                        return;
                    }
                }
            }
            Target::Local(..) => {
                // The application in this process takes HTTP calls, not byte streams.
                self.shared.metrics.proxy_error(self.spec.direction, "no destination");
                return;
            }
            Target::Outbound => {
                // Without a destination (no SO_ORIGINAL_DST yet) opaque TCP cannot be routed.
                self.shared.metrics.proxy_error(self.spec.direction, "no destination");
                return;
            }
        };
        let tls = self.shared.tls.load_full();
        let (upstream, addr) =
            match tcp::connect_any(service, balancer, self.shared.limits.connect_timeout, tls.as_deref()).await {
                Ok(connected) => connected,
                Err(failure) => {
                    tracing::debug!(service, %failure, "tcp connect failed");
                    self.shared
                        .metrics
                        .proxy_error(self.spec.direction, failure.error.reason());
                    return;
                }
            };
        use crate::telemetry::event::{ConnectionEvent, ConnectionKind};
        let mut event = ConnectionEvent::start(ConnectionKind::Tcp, self.spec.direction, self.peer, peer);
        event.destination = Some(Arc::from(service));
        event.upstream = Some(addr);
        let connection = tcp::Connection {
            event,
            metrics: self.shared.metrics.tcp(self.spec.direction, service),
            report: self.shared.clone(),
        };
        connection.splice(io, upstream).await;
    }
}
