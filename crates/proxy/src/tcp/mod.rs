//! Opaque TCP forwarding: full duplex, half-close preserved, bytes counted.

use crate::balance::{mark_failed, Balancer};
use crate::http::errors::ProxyError;
use crate::http::pool::Io;
use crate::identity::MeshTls;
use crate::telemetry::metrics::TcpMetrics;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

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
        match tokio::time::timeout(timeout, TcpStream::connect(endpoint.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let Some((tls, name)) = tls.zip(endpoint.server_name.clone()) else {
                    return Ok((Box::new(stream), endpoint.addr));
                };
                let connector = tokio_rustls::TlsConnector::from(tls.client_tcp.clone());
                match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
                    Ok(Ok(tls_stream)) => return Ok((Box::new(tls_stream), endpoint.addr)),
                    Ok(Err(e)) => last_error = format!("{}: mesh TLS: {e}", endpoint.addr),
                    Err(_) => last_error = format!("{}: mesh TLS handshake timed out", endpoint.addr),
                }
            }
            Ok(Err(e)) => last_error = format!("{}: {e}", endpoint.addr),
            Err(_) => last_error = format!("{}: connect timed out", endpoint.addr),
        }
        mark_failed(endpoint);
        tried.push(endpoint.addr);
    }
    Err((ProxyError::ConnectFailed, last_error))
}

/// Copies both ways until both sides are done; an EOF from one side is passed on as a
/// write shutdown to the other, so half-closed connections keep working.
pub async fn splice<A, B>(mut client: A, mut upstream: B, metrics: &TcpMetrics)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    metrics.opened.inc();
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((from_client, to_client)) => {
            metrics.read.inc_by(from_client);
            metrics.write.inc_by(to_client);
        }
        Err(e) => tracing::debug!(error = %e, "tcp connection ended with an error"),
    }
    metrics.closed.inc();
}
