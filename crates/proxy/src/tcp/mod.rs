//! Opaque TCP forwarding: full duplex, half-close preserved, one [`ConnectionEvent`] per
//! connection.

use crate::balance::{mark_failed, Balancer};
use crate::http::errors::ProxyError;
use crate::http::pool::{connect_maybe_tls, Io};
use crate::identity::upstream::{Carry, Upstream};
use crate::identity::MeshTls;
use crate::telemetry::event::{ConnectionEvent, ConnectionKind, ConnectionSink};
use crate::telemetry::metrics::TcpMetrics;
use http::Version;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Connects to an endpoint of `balancer`, moving on to another one when a connect fails.
/// Endpoints fronted by a smesh proxy are reached over mesh mTLS when this proxy has an
/// identity; the peer must present the identity the control plane announced for it.
pub async fn connect_any(
    balancer: &Balancer,
    timeout: Duration,
    tls: Option<&MeshTls>,
) -> Result<(Box<dyn Io>, SocketAddr), (ProxyError, String)> {
    if balancer.is_empty() {
        return Err((ProxyError::NoEndpoints, "no endpoints".into()));
    }
    let mut tried = Vec::new();
    let mut last_error = String::new();
    while tried.len() < MAX_CONNECT_ATTEMPTS {
        let Some(endpoint) = balancer.pick(&tried) else { break };
        let upstream = Upstream::new(endpoint, tls, Version::HTTP_11, Carry::Tcp);
        match connect_maybe_tls(upstream.addr, timeout, upstream.mesh.as_ref()).await {
            Ok(io) => return Ok((io.into_inner(), endpoint.addr)),
            Err(e) => last_error = format!("{}: {e}", endpoint.addr),
        }
        mark_failed(endpoint);
        tried.push(endpoint.addr);
    }
    Err((ProxyError::ConnectFailed, last_error))
}

/// An opaque connection about to be spliced, and where it is reported when it closes.
pub struct Connection {
    pub kind: ConnectionKind,
    pub direction: &'static str,
    pub client: SocketAddr,
    pub peer: Option<Arc<str>>,
    pub destination: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    pub metrics: TcpMetrics,
    pub report: Arc<dyn ConnectionSink>,
}

impl Connection {
    /// Copies both ways until both sides are done; an EOF from one side is passed on as a
    /// write shutdown to the other, so half-closed connections keep working.
    pub async fn splice<A, B>(self, mut client: A, mut upstream: B)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        self.metrics.opened.inc();
        let start = Instant::now();
        let (from_client, to_client, error) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((from_client, to_client)) => (from_client, to_client, None),
            Err(e) => {
                tracing::debug!(error = %e, "tcp connection ended with an error");
                (0, 0, Some(e.to_string()))
            }
        };
        let event = ConnectionEvent {
            kind: self.kind,
            direction: self.direction,
            client: self.client,
            peer: self.peer,
            destination: self.destination,
            upstream: self.upstream,
            bytes_from_client: from_client,
            bytes_to_client: to_client,
            duration: start.elapsed(),
            error,
        };
        self.metrics.record(&event);
        self.report.connection_done(&event);
    }
}
