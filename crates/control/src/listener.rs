//! The control plane's accept loop: plaintext or TLS, HTTP/1.1 (admin API, KV) and HTTP/2
//! (gRPC for proxies) on one port. Each request carries the client address and, on TLS
//! connections with a verified client certificate, the client's [`PeerCertificate`].

use crate::tls::{peer_certificate, PeerCertificate};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` until `stop` turns true, then lets open requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ServerConfig>>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let (done_tx, mut done_rx) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, acceptor, watcher, done) = (app.clone(), acceptor.clone(), graceful.watcher(), done_tx.clone());
        tokio::spawn(async move {
            connection(stream, peer, app, acceptor, watcher).await;
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    // Open connections are told to finish; every connection task holds `done` until it ends.
    let wait = async {
        graceful.shutdown().await;
        let _ = done_rx.wait_for(|_| false).await;
    };
    let _ = tokio::time::timeout(grace, wait).await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    graceful: Watcher,
) {
    let Some(acceptor) = acceptor else {
        return serve_connection(TokioIo::new(stream), peer, None, app, graceful).await;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(peer_certificate);
    serve_connection(TokioIo::new(tls), peer, certificate, app, graceful).await;
}

/// Serves one connection's requests, each with the connection's facts added.
async fn serve_connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    certificate: Option<PeerCertificate>,
    app: Router,
    graceful: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(c) = &certificate {
            req.extensions_mut().insert(c.clone());
        }
        let mut app = app.clone();
        async move { app.call(req.map(axum::body::Body::new)).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, service).into_owned();
    let _ = graceful.watch(conn).await;
}
