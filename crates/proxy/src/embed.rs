//! The mesh embedded in a program: what the `smesh` library crate is built on. The same
//! snapshot source (file or control plane), identity agent, metrics and outbound stages as
//! the sidecar, driven by calls instead of a listener and run on the caller's tokio runtime.
//!
//! This is the one module of this crate meant for another crate's use; everything it needs
//! from the rest is re-exported here, so the library depends on these names only.

use crate::app::admin::Admin;
use crate::app::health::HealthChecks;
use crate::app::source::{Source, Start};
use crate::app::workload::Workload;
use crate::http::resets::ResetLimiter;
use crate::identity::TlsHandle;
use crate::listen::http::{HttpProxy, Target};
use crate::listen::server::{ListenerSpec, Shared};
use crate::telemetry::window::Stats;
use http::{Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub use crate::app::options::ProxyOptions;
pub use crate::http::body::{Body, BodyError, ClientBody};
pub use crate::http::errors::PROXY_ERROR_HEADER;
pub use crate::listen::http::{LocalApp, LocalFuture};
pub use crate::listen::server::Limits;

/// The client address an embedded caller's requests are accounted to (rate limits by client
/// address see every call of the process as one local client).
const CALLER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// How long connections an inbound listener accepted may finish once the mesh stops.
const DRAIN: Duration = Duration::from_secs(5);

/// How often [`Embedded::configured`] looks at the flag the control-plane client sets.
const CONFIGURED_POLL: Duration = Duration::from_millis(10);

/// A running embedded mesh. Its background tasks (configuration, certificate renewal, active
/// health checks, the admin server) stop when it is dropped.
pub struct Embedded {
    shared: Arc<Shared>,
    admin: Arc<Admin>,
    stop: watch::Sender<bool>,
    /// The Service this process is, if any (its inbound traffic's label and identity).
    service: Option<Arc<str>>,
}

impl Embedded {
    /// Starts on the current tokio runtime, as `smesh proxy` would with `options` but
    /// without listeners (`outbound`, `upstreams`, `workers`, `access_log` are ignored).
    /// With `inbound` (and `advertise`): the endpoint registered for `service`, whose
    /// calls [`Embedded::serve`] takes (`app` is not used). With a control plane and a
    /// `service`, returns once the identity agent has its first certificate or knows it
    /// cannot get one. `admin`: a bound socket to serve `/metrics`, `/ready`, `/live` and
    /// `/config` on, announced to the control plane.
    pub async fn start(options: ProxyOptions, admin: Option<std::net::TcpListener>) -> Result<Embedded, String> {
        let Start {
            metrics,
            identities,
            identity,
            workload,
            config,
            trust,
        } = Start::new(&options)?;
        let tls: TlsHandle = identity.as_ref().map(|i| i.tls.clone()).unwrap_or_default();
        // Golden metrics go to the control plane: without one, nothing records them. The
        // caller's runtime threads record, sharded as a proxy's workers are.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stats = (!options.control.is_empty()).then(|| Arc::new(Stats::new(threads)));
        let shared = Arc::new(Shared {
            config: config.clone(),
            metrics: metrics.clone(),
            limits: options.limits.clone(),
            access_log: None,
            filters: None,
            connections: AtomicUsize::new(0),
            tls: tls.clone(),
            resets: Arc::new(ResetLimiter::new(options.limits.max_client_resets)),
            identities: identities.clone(),
            stats: stats.clone(),
        });
        let configured = Arc::new(AtomicBool::new(options.control.is_empty()));
        let admin_state = Arc::new(Admin {
            metrics: metrics.clone(),
            config: config.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            configured: configured.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let admin_address = match admin {
            Some(socket) => {
                // Tokio takes only non-blocking sockets.
                socket.set_nonblocking(true).map_err(|e| format!("admin socket: {e}"))?;
                let addr = socket.local_addr().map_err(|e| format!("admin socket: {e}"))?;
                tokio::spawn(admin_state.clone().serve(socket, stop_rx.clone()));
                addr.to_string()
            }
            None => String::new(),
        };
        let health = HealthChecks {
            config: config.clone(),
            metrics: metrics.clone(),
            tls: tls.clone(),
            connect_timeout: options.limits.connect_timeout,
        };
        tokio::spawn(health.run(stop_rx.clone()));
        // Frees the expired idle upstream connections of whichever runtime thread it runs
        // on at each tick; the others' are skipped and closed at their next checkout.
        tokio::spawn(crate::http::pool::close_idle_forever(stop_rx.clone()));
        let source = Source {
            options: &options,
            workload: workload.as_ref(),
            config,
            metrics,
            trust,
            identities,
            identity,
            tls,
            configured,
            admin_address,
            stats,
        };
        // The task ends on `stop`; nothing waits for it.
        drop(source.start(stop_rx).await);
        Ok(Embedded {
            shared,
            admin: admin_state,
            stop,
            service: options.service.as_deref().map(Arc::from),
        })
    }

    /// Waits until the first configuration is in place (always so with a file), at most
    /// `timeout`; whether it is.
    pub async fn configured(&self, timeout: Duration) -> bool {
        let give_up = tokio::time::Instant::now() + timeout;
        loop {
            if self.admin.configured.load(Ordering::Acquire) {
                return true;
            }
            if tokio::time::Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(CONFIGURED_POLL).await;
        }
    }

    /// One request through the outbound stages, exactly as the outbound port handles it:
    /// the Service by authority, its route, rate limits, filters, the tries (see
    /// [`crate::dispatch`]), metrics with `direction="outbound"`. The mesh's own answers
    /// carry [`PROXY_ERROR_HEADER`].
    pub async fn send<B: Into<ClientBody>>(&self, req: Request<B>) -> Response<Body> {
        let outbound = HttpProxy {
            shared: self.shared.clone(),
            target: Target::Outbound,
            direction: "outbound",
            client: CALLER,
            peer: None,
        };
        match outbound.handle(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// Serves `app` on `listener` (a bound socket) until the mesh stops, with the inbound
    /// port's stages: mesh mTLS (the peer's SPIFFE ID), the Service's authorization
    /// policies and inbound rate limit, and inbound metrics; plaintext too unless the mesh
    /// is strict. Only HTTP: a peer's opaque TCP stream is closed.
    pub fn serve(&self, listener: std::net::TcpListener, app: Arc<dyn LocalApp>) -> Result<(), String> {
        listener.set_nonblocking(true).map_err(|e| format!("listener: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("listener: {e}"))?;
        // The inbound rule of a workload at this address: its Service (or `app`) names the
        // authorization policies and the metrics; its one endpoint is never dialled.
        let workload = Workload {
            service: self.service.clone(),
            app: addr,
            app_protocol: None,
            inbound: addr,
            advertise: addr,
            labels: Default::default(),
            identity: None,
            inbound_limit: self.service.is_some(),
        };
        let spec = Arc::new(ListenerSpec {
            name: "inbound".into(),
            direction: "inbound",
            target: Target::Local(workload.inbound_rule(&self.shared.metrics), app),
            tcp_only: false,
        });
        let accept =
            crate::listen::accept::accept_loop(listener, spec, self.shared.clone(), self.stop.subscribe(), DRAIN);
        tokio::spawn(accept);
        Ok(())
    }

    /// The Prometheus text exposition, as the proxy's `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// This process's SPIFFE ID, once it has a certificate.
    pub fn spiffe_id(&self) -> Option<String> {
        self.shared.tls.load().as_ref().map(|t| t.spiffe_id.clone())
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // The control-plane client says goodbye on its way out, so the registration leaves
        // at once rather than when its lease runs out.
        let _ = self.stop.send(true);
    }
}
