//! Upstream connections, owned by the worker thread that uses them (as in Envoy): idle
//! HTTP/1 connections and shared HTTP/2 connections live in thread-local tables, so the
//! request path takes no lock and a connection never hops between threads.

use crate::http::body::{is_client_body_error, Body, BodyError};
use crate::http::h2_upstream;
use http::{Request, Response, Version};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustc_hash::FxHashMap;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to an upstream: plain TCP, or mesh mTLS to a peer proxy.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How connections to one upstream Service are made and kept (its BackendPolicy's
/// `connectionPool`, over the proxy's defaults).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl PoolSettings {
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_IDLE: usize = 128;

    pub fn new(connect_timeout: Duration, overrides: Option<&smesh_model::ConnectionPool>) -> Self {
        PoolSettings {
            connect_timeout: overrides.and_then(|o| o.connect_timeout).unwrap_or(connect_timeout),
            idle_timeout: overrides
                .and_then(|o| o.idle_timeout)
                .unwrap_or(Self::DEFAULT_IDLE_TIMEOUT),
            max_idle: overrides
                .and_then(|o| o.max_idle_per_endpoint)
                .map_or(Self::DEFAULT_MAX_IDLE, |n| n as usize),
        }
    }
}

/// Idle connections, each with the time it is to be closed.
// FxHash: keys are our own endpoint addresses, not attacker-chosen, and SipHash showed up
// in profiles of the request path.
type IdleH1 = FxHashMap<SocketAddr, Vec<(Instant, http1::SendRequest<Body>)>>;

thread_local! {
    static IDLE_H1: RefCell<IdleH1> = RefCell::new(FxHashMap::default());
    /// Shared HTTP/2 connections, plain and mesh mTLS (the bool), per endpoint.
    static H2: RefCell<FxHashMap<(SocketAddr, bool), h2_upstream::Connection>> = RefCell::new(FxHashMap::default());
}

pub enum SendError {
    /// No connection could be made: nothing was sent, the request is handed back.
    Connect(io::Error, Box<Request<Body>>),
    /// The request may have reached the upstream.
    Upstream(BodyError),
    /// An HTTP/2 upstream refused the stream unprocessed (GOAWAY, REFUSED_STREAM): it may be
    /// sent again on a new connection, whatever the route's retry policy.
    Refused(BodyError),
}

/// What a failed send allows next, decided by where it failed (Pingora's `RetryType`): only
/// `ByPolicy` is left to the route's retry policy and the retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Nothing reached the upstream: another endpoint, not counted as a retry.
    Elsewhere,
    /// The upstream refused it unprocessed: the same request again, not counted as a retry.
    Resend,
    /// It may have been processed: again only as the route's policy allows, read as this
    /// status.
    ByPolicy(u16),
    /// The client's own body failed: never again.
    Never,
}

impl SendError {
    pub fn retry_class(&self) -> RetryClass {
        match self {
            SendError::Connect(..) => RetryClass::Elsewhere,
            SendError::Refused(_) => RetryClass::Resend,
            SendError::Upstream(e) if is_client_body_error(&**e) => RetryClass::Never,
            SendError::Upstream(_) => RetryClass::ByPolicy(502),
        }
    }

    /// The error, and the request when none of it was sent.
    pub fn into_parts(self) -> (BodyError, Option<Box<Request<Body>>>) {
        match self {
            SendError::Connect(e, req) => (e.into(), Some(req)),
            SendError::Upstream(e) | SendError::Refused(e) => (e, None),
        }
    }
}

/// Hands an HTTP/1 connection back to the worker's idle pool when a response body is done
/// (or dropped: hyper then closes the connection if it cannot be reused, and checkout skips
/// it). A connection the pool has no room for is dropped, which closes it.
// Boxed: every response body carries one, and a `Response` is moved a few dozen times on
// its way to the client; inline it made `Body` 136 bytes instead of 48.
pub struct PoolReturn(Option<Box<(SocketAddr, http1::SendRequest<Body>, PoolSettings)>>);

impl PoolReturn {
    pub fn none() -> Self {
        PoolReturn(None)
    }

    pub fn release(&mut self) {
        if let Some(pooled) = self.0.take() {
            let (addr, sender, settings) = *pooled;
            if sender.is_closed() || settings.max_idle == 0 {
                return;
            }
            IDLE_H1.with(|idle| {
                let mut idle = idle.borrow_mut();
                let list = idle.entry(addr).or_default();
                if list.len() < settings.max_idle {
                    list.push((Instant::now() + settings.idle_timeout, sender));
                }
            });
        }
    }
}

/// Closes this worker's idle connections whose idle timeout has passed; every second until
/// `stop`. (Checkout also skips them, so this only frees the upstream's resources.)
pub async fn close_idle_forever(mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        let now = Instant::now();
        IDLE_H1.with(|idle| {
            idle.borrow_mut().retain(|_, list| {
                list.retain(|(until, sender)| *until > now && !sender.is_closed());
                !list.is_empty()
            })
        });
    }
}

impl Drop for PoolReturn {
    fn drop(&mut self) {
        self.release();
    }
}

/// How to reach a peer smesh proxy: mesh mTLS, verifying it presents `name`.
pub struct Mesh {
    pub client: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TokioIo<TcpStream>> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
}

/// The one connector: TCP, then mesh mTLS when `mesh` says so (see
/// `identity::upstream`). A failed handshake counts as a failed connect: nothing was sent,
/// so the request may go to another endpoint.
pub async fn connect_maybe_tls(
    addr: SocketAddr,
    timeout: Duration,
    mesh: Option<&Mesh>,
) -> io::Result<TokioIo<Box<dyn Io>>> {
    let stream = connect(addr, timeout).await?.into_inner();
    let Some(mesh) = mesh else {
        return Ok(TokioIo::new(Box::new(stream)));
    };
    let connector = tokio_rustls::TlsConnector::from(mesh.client.clone());
    match tokio::time::timeout(timeout, connector.connect(mesh.name.clone(), stream)).await {
        Ok(Ok(tls)) => Ok(TokioIo::new(Box::new(tls))),
        Ok(Err(e)) => Err(io::Error::other(format!("mesh TLS: {e}"))),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "mesh TLS handshake timed out")),
    }
}

fn take_idle_h1(addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
    IDLE_H1.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some((until, sender)) = list.pop() {
            if !sender.is_closed() && until > now {
                return Some(sender);
            }
        }
        None
    })
}

/// Sends `req` to `addr` over HTTP/1.1 or HTTP/2 (`version`), reusing a pooled connection
/// when there is one. `upgrade` keeps the connection out of the pool (it becomes a tunnel).
pub async fn send(
    addr: SocketAddr,
    version: Version,
    mut req: Request<Body>,
    settings: PoolSettings,
    upgrade: bool,
    mesh: Option<Mesh>,
) -> Result<Response<Body>, SendError> {
    let connect_timeout = settings.connect_timeout;
    if let Some(mesh) = mesh {
        // Between proxies: one multiplexed HTTP/2 connection, except for upgrades, which
        // need HTTP/1.1 (and become a tunnel).
        return if upgrade {
            // A connection of its own, never pooled: it becomes the tunnel.
            let io = connect_maybe_tls(addr, connect_timeout, Some(&mesh));
            Box::pin(send_on_new_h1(io, addr, req, settings, true)).await
        } else {
            send_h2(addr, req, connect_timeout, Some(&mesh)).await
        };
    }
    if version == Version::HTTP_2 {
        return send_h2(addr, req, connect_timeout, None).await;
    }
    // Pooled connections may have been closed by the peer while idle; a request that was not
    // sent on one comes back and is tried on the next, then on a fresh connection.
    while let Some(mut sender) = take_idle_h1(addr) {
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(pooled_response(resp, addr, sender, upgrade, settings)),
            Err(mut e) => match e.take_message() {
                Some(back) => req = back,
                None => return Err(SendError::Upstream(e.into_error().into())),
            },
        }
    }
    let io = connect(addr, settings.connect_timeout);
    Box::pin(send_on_new_h1(io, addr, req, settings, upgrade)).await
}

/// A request on a fresh HTTP/1.1 connection made by `connect` (all of it boxed by the
/// caller, connect included: see [`send_h2`]); a failed connect hands the request back.
/// `upgrade` keeps the connection out of the pool.
async fn send_on_new_h1<I>(
    connect: impl std::future::Future<Output = io::Result<I>>,
    addr: SocketAddr,
    req: Request<Body>,
    settings: PoolSettings,
    upgrade: bool,
) -> Result<Response<Body>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let io = match connect.await {
        Ok(io) => io,
        Err(e) => return Err(SendError::Connect(e, Box::new(req))),
    };
    let mut sender = h1_handshake(io, addr)
        .await
        .map_err(|e| SendError::Upstream(e.into()))?;
    match sender.send_request(req).await {
        Ok(resp) => Ok(pooled_response(resp, addr, sender, upgrade, settings)),
        Err(e) => Err(SendError::Upstream(e.into())),
    }
}

/// An HTTP/1.1 client connection whose connection task runs on this worker.
async fn h1_handshake<I>(io: I, addr: SocketAddr) -> Result<http1::SendRequest<Body>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new().writev(false).handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

fn pooled_response(
    resp: Response<hyper::body::Incoming>,
    addr: SocketAddr,
    sender: http1::SendRequest<Body>,
    upgrade: bool,
    settings: PoolSettings,
) -> Response<Body> {
    let back = if upgrade {
        PoolReturn::none()
    } else {
        PoolReturn(Some(Box::new((addr, sender, settings))))
    };
    resp.map(|body| Body::Upstream(body, back))
}

async fn send_h2(
    addr: SocketAddr,
    req: Request<Body>,
    connect_timeout: Duration,
    mesh: Option<&Mesh>,
) -> Result<Response<Body>, SendError> {
    let key = (addr, mesh.is_some());
    // A full connection takes no new stream: a new one replaces it in the table, and it
    // closes once its streams are done.
    let existing = H2.with(|h2| {
        h2.borrow()
            .get(&key)
            .filter(|c| !c.is_closed() && c.has_room())
            .cloned()
    });
    let req = match existing {
        Some(conn) => match conn.send(req).await {
            Ok(resp) => return Ok(resp.map(Body::H2)),
            // Closed or going away: a new connection takes it.
            Err(h2_upstream::SendFailure::NotSent(req)) => req,
            Err(failure) => return Err(h2_failure(failure)),
        },
        None => req,
    };
    // The connect path's future is large and rare: boxed, it does not weigh on every
    // request's future (which is moved as a whole).
    Box::pin(connect_h2_and_send(addr, req, connect_timeout, mesh)).await
}

async fn connect_h2_and_send(
    addr: SocketAddr,
    req: Request<Body>,
    connect_timeout: Duration,
    mesh: Option<&Mesh>,
) -> Result<Response<Body>, SendError> {
    let key = (addr, mesh.is_some());
    let io = match connect_maybe_tls(addr, connect_timeout, mesh).await {
        Ok(io) => io,
        Err(e) => return Err(SendError::Connect(e, Box::new(req))),
    };
    let conn = match h2_upstream::Connection::handshake(io.into_inner(), addr).await {
        Ok(conn) => conn,
        Err(e) => return Err(SendError::Upstream(e.into())),
    };
    H2.with(|h2| h2.borrow_mut().insert(key, conn.clone()));
    match conn.send(req).await {
        Ok(resp) => Ok(resp.map(Body::H2)),
        Err(h2_upstream::SendFailure::NotSent(_)) => {
            Err(SendError::Upstream("a new HTTP/2 connection took no stream".into()))
        }
        Err(failure) => Err(h2_failure(failure)),
    }
}

fn h2_failure<B>(failure: h2_upstream::SendFailure<B>) -> SendError {
    match failure {
        h2_upstream::SendFailure::Refused(e) => SendError::Refused(e.into()),
        h2_upstream::SendFailure::Sent(e) => SendError::Upstream(e.into()),
        h2_upstream::SendFailure::ClientBody(e) => SendError::Upstream(e),
        h2_upstream::SendFailure::NotSent(_) => SendError::Upstream("the connection took no stream".into()),
    }
}
