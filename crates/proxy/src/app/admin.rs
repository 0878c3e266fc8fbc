//! The admin port: `/metrics`, `/ready`, `/live`, `/config`.

use crate::config::snapshot::Snapshot;
use crate::http::body::Body;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub ready: Arc<AtomicBool>,
    /// False until a control-plane proxy has its first configuration.
    pub configured: Arc<AtomicBool>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: std::net::TcpListener, mut shutdown: watch::Receiver<bool>) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use admin listener");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let admin = self.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let admin = admin.clone();
                            async move { Ok::<_, Infallible>(admin.handle(req)) }
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                    });
                }
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }

    fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let (status, content_type, body) = match req.uri().path() {
            "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
            "/ready" if self.ready.load(Ordering::Acquire) && self.configured.load(Ordering::Acquire) => {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
            "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics.render()),
            "/config" => {
                let snapshot = self.config.load();
                let mut text = format!("# generation {}\n", snapshot.generation);
                text.push_str(&smesh_model::to_yaml(&snapshot.resources));
                (StatusCode::OK, "application/yaml", text)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics /ready /live /config\n".to_string(),
            ),
        };
        let mut resp = Response::new(Body::full(body));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }
}
