//! One listener on one worker: its `SO_REUSEPORT` socket, the accept loop and the drain.
//! [`crate::app::workers`] runs one accept loop per listener on every worker.

use crate::listen::server::{Connection, ListenerSpec, Shared};
use crate::shutdown::stopped;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Like [`bind`], but first makes sure nothing is listening there already: SO_REUSEPORT
/// would otherwise let a second proxy of the same user share the port silently.
pub fn bind_first(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    if probe.port() != 0 && std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "address already in use (another process is listening on it)",
        ));
    }
    bind(addr)
}

pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts until `shutdown` turns true, then closes the socket (new connections are refused)
/// and lets open connections finish, up to `drain`.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %spec.name, error = %e, "cannot use listener");
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = %spec.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if shared.resets.is_blocked(peer.ip()) {
                    // Over --max-client-resets a moment ago: refused for a while.
                    shared.metrics.connections_refused.with_label_values(&[&spec.name]).inc();
                    continue;
                }
                if shared.connections.fetch_add(1, Ordering::Relaxed) >= shared.limits.max_connections {
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
                    shared.metrics.connections_refused.with_label_values(&[&spec.name]).inc();
                    continue;
                }
                shared.metrics.connections_active.inc();
                open.fetch_add(1, Ordering::Relaxed);
                let conn = Connection { spec: spec.clone(), shared: shared.clone(), peer, open: open.clone() };
                let stop = shutdown.clone();
                tokio::spawn(async move { conn.serve(stream, stop).await });
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    // Connections see the same signal and finish their current requests; poll until they
    // are gone (shutdown path only).
    let deadline = tokio::time::Instant::now() + drain;
    while open.load(Ordering::Relaxed) > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(listener = %spec.name, open = open.load(Ordering::Relaxed), "drain timeout: closing remaining connections");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
