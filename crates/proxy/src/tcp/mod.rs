//! Opaque TCP forwarding: full duplex, half-close preserved, one [`ConnectionEvent`] per
//! connection.

use crate::balance::{Balancer, Unreachable};
use crate::http::errors::{Cause, Failure, ProxyError};
use crate::http::pool::{connect_maybe_tls, Io};
use crate::identity::upstream::{Carry, Upstream};
use crate::identity::MeshTls;
use crate::telemetry::event::{ConnectionEvent, ConnectionSink};
use crate::telemetry::metrics::TcpMetrics;
use http::Version;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// Connects to an endpoint of `balancer`, moving on to another one when a connect fails.
/// Endpoints fronted by a smesh proxy are reached over mesh mTLS when this proxy has an
/// identity; the peer must present the identity the control plane announced for it.
pub async fn connect_any(
    service: &str,
    balancer: &Balancer,
    timeout: Duration,
    tls: Option<&MeshTls>,
) -> Result<(Box<dyn Io>, SocketAddr), Failure> {
    if balancer.is_empty() {
        return Err(Failure::new(
            ProxyError::NoEndpoints,
            Cause::NoEndpoints(service.into()),
        ));
    }
    let mut unreachable = Unreachable::default();
    while let Some(endpoint) = balancer.pick(unreachable.addrs()) {
        let upstream = Upstream::new(endpoint, tls, Version::HTTP_11, Carry::Tcp);
        let error = match connect_maybe_tls(upstream.addr, timeout, upstream.mesh.as_ref()).await {
            Ok(io) => return Ok((io.into_inner(), endpoint.addr)),
            Err(e) => e,
        };
        if !unreachable.connect_failed(endpoint, balancer) {
            let cause = Cause::Connect(endpoint.addr, error.into());
            return Err(Failure::new(ProxyError::ConnectFailed, cause));
        }
    }
    let cause = Cause::NoReachableEndpoint(service.into());
    Err(Failure::new(ProxyError::ConnectFailed, cause))
}

/// An opaque connection about to be spliced: its event so far (who, where to), and where
/// that event is reported when the connection closes.
pub struct Connection {
    pub event: ConnectionEvent,
    pub metrics: TcpMetrics,
    pub report: Arc<dyn ConnectionSink>,
}

impl Connection {
    /// Copies both ways until both sides are done; an EOF from one side is passed on as a
    /// write shutdown to the other, so half-closed connections keep working.
    pub async fn splice<A, B>(mut self, mut client: A, mut upstream: B)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        self.metrics.opened.inc();
        let start = Instant::now();
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((from_client, to_client)) => {
                self.event.bytes_from_client = from_client;
                self.event.bytes_to_client = to_client;
            }
            Err(e) => {
                // tokio does not say how much was copied before the error: counted as 0.
                tracing::debug!(error = %e, "tcp connection ended with an error");
                self.event.error = Some(e.to_string());
            }
        }
        self.event.duration = start.elapsed();
        self.metrics.record(&self.event);
        self.report.connection_done(&self.event);
    }
}
