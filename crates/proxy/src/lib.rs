//! smesh data plane.
//!
//! The request path, in order: [`listen::accept`] accepts on a worker, [`listen::detect`]
//! picks the protocol, [`listen::http`] routes with the [`config::snapshot`]'s
//! [`route::rule`] table, [`balance`] picks an endpoint, [`http::pool`] sends on a
//! worker-owned upstream connection; [`tcp`] handles opaque streams. [`telemetry`] observes
//! it; [`config::reload`], [`config::control`] and [`app::admin`] run on the main thread.
//!
//! One folder per concern, layered so that no two folders import each other
//! (`scripts/check-imports crates/proxy/src folders`, run by `scripts/test`), highest first:
//!
//! - `lib.rs`: process wiring ([`run`]): the listeners and the snapshot source.
//! - [`app`]: the workers that run the listeners (threads, runtimes, sockets, drain), and
//!   what the process runs beside them: the admin server, the active health checker.
//! - [`listen`]: accept, connection handling, protocol detection, the HTTP handler
//!   (`forward`, the tries).
//! - [`config`]: the snapshot (lookups and builder), inbound authorization, the file and
//!   control-plane sources.
//! - [`route`]: rules, filters, faults, mirrors.
//! - [`resilience`]: retry policy, circuit breaking, retry budget, shedding, rate limits,
//!   deadlines.
//! - [`tcp`]: opaque forwarding and its connector.
//! - [`identity`]: mesh TLS, the identity table (by service and by TLS server name), the
//!   identity agent, the control-plane transport.
//! - [`balance`]: balancer, endpoint state (incl. health and outlier state), outlier detection.
//! - [`http`]: building blocks without policy: the one body type, headers, error responses,
//!   replay, the upstream connection pools and the HTTP/2 client, upstream request building.
//! - [`telemetry`]: metrics and the access log.
//! - [`shutdown`]: the stop signal every background loop watches.

pub mod app;
pub mod balance;
pub mod config;
#[cfg(test)]
mod fuzz_tests;
pub mod http;
pub mod identity;
pub mod listen;
pub mod resilience;
pub mod route;
pub mod shutdown;
pub mod tcp;
pub mod telemetry;

use app::{admin, health};
use config::{control, reload, snapshot};
use identity::control_tls;
use telemetry::{access_log, metrics};

use crate::app::workers::{Listener, Workers};
use crate::balance::{Balancer, Endpoint};
use crate::listen::http::Target;
use crate::listen::server::{ListenerSpec, Shared};
use crate::route::rule::{Rule, WeightedBackend};
use crate::shutdown::wait_for_signal;
use arc_swap::ArcSwap;
use smesh_model::LoadBalancer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub use listen::server::Limits;

/// Everything `smesh proxy` is told on its command line.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// A static configuration file (watched); or
    pub config: Option<PathBuf>,
    /// control-plane URLs to get configuration and endpoints from.
    pub control: Vec<String>,
    /// Labels of the endpoint this proxy registers (with `service` and `app`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The address other proxies reach this one's inbound listener at; default: the inbound
    /// address, with an unspecified IP replaced by 127.0.0.1.
    pub advertise: Option<SocketAddr>,
    /// Lease TTL asked for the registered endpoint (None: the control plane's default).
    pub lease_ttl: Option<Duration>,
    /// Configuration snapshots larger than this are refused.
    pub max_config_bytes: usize,
    /// Join token for this proxy's first certificate (with `control` and `service`).
    pub join_token: Option<String>,
    /// CA certificates (PEM) that an `https://` control plane's certificate is checked against.
    pub control_ca: Option<PathBuf>,
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub app: Option<SocketAddr>,
    /// What the local app speaks (`http` = HTTP/1.1, `http2`, `grpc`); `None`: what the
    /// client spoke.
    pub app_protocol: Option<smesh_model::Protocol>,
    /// The name inbound traffic is labelled with in metrics.
    pub service: Option<String>,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    pub workers: usize,
    pub access_log: Option<String>,
    pub drain_timeout: Duration,
    pub limits: Limits,
}

/// Runs the proxy until SIGTERM or SIGINT, then drains. Errors are start-up errors
/// (bad configuration, an address in use) and are meant for the user as they are.
pub fn run(options: ProxyOptions) -> Result<(), String> {
    let metrics = metrics::Metrics::new();
    // A proxy in front of an app enforces its Service's BackendPolicy `rateLimit` inbound.
    let local_service = options
        .service
        .as_deref()
        .filter(|_| options.inbound.is_some() && options.app.is_some());
    let empty = snapshot::Snapshot::serving(local_service);
    let snapshot = match (&options.config, options.control.is_empty()) {
        (Some(path), true) => {
            let items = reload::load(path)?;
            let snapshot = snapshot::Snapshot::build(&items, &empty, &metrics, "outbound");
            metrics.config_generation.set(snapshot.generation as i64);
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            for (name, _) in &options.upstreams {
                if snapshot.service(name).is_none() {
                    return Err(format!(
                        "--upstream {name}=...: no Service named {name:?} in {}",
                        path.display()
                    ));
                }
            }
            snapshot
        }
        (None, false) => empty,
        (Some(_), false) => return Err("give either --config FILE or --control URL, not both".into()),
        (None, true) => {
            return Err("give --config FILE (static configuration) or --control URL (a control plane)".into())
        }
    };
    let config = Arc::new(ArcSwap::from_pointee(snapshot));
    let control_trust = match &options.control_ca {
        Some(path) => Some(control_tls::ControlTrust::load(path).map_err(|e| format!("--control-ca: {e}"))?),
        None => None,
    };
    for url in &options.control {
        let parsed = control_tls::ControlUrl::parse(url).map_err(|e| format!("--control: {e}"))?;
        if parsed.tls && control_trust.is_none() {
            return Err(format!(
                "--control {url}: an https:// control plane needs --control-ca FILE (its CA, e.g. the control plane's DIR/ca.pem)"
            ));
        }
    }

    let mut specs: Vec<(SocketAddr, ListenerSpec)> = Vec::new();
    if let Some(addr) = options.outbound {
        specs.push((
            addr,
            ListenerSpec {
                name: "outbound".into(),
                direction: "outbound",
                target: Target::Outbound,
                tcp_only: false,
            },
        ));
    }
    if let (Some(addr), Some(app)) = (options.inbound, options.app) {
        let label = options.service.clone().unwrap_or_else(|| "app".into());
        let rule = inbound_rule(app, &label, &metrics, options.app_protocol);
        specs.push((
            addr,
            ListenerSpec {
                name: "inbound".into(),
                direction: "inbound",
                target: Target::Inbound(rule),
                tcp_only: false,
            },
        ));
    }
    for (name, addr) in &options.upstreams {
        specs.push((
            *addr,
            ListenerSpec {
                name: format!("upstream:{name}"),
                direction: "outbound",
                target: Target::Upstream(Arc::from(name.as_str())),
                tcp_only: false,
            },
        ));
    }
    if specs.is_empty() {
        return Err("nothing to listen on: give --outbound, --inbound with --app, or --upstream".into());
    }

    // Bind everything up front so an address in use is a start-up error.
    let listeners = specs
        .into_iter()
        .map(|(addr, spec)| Listener {
            addr,
            spec: Arc::new(spec),
        })
        .collect();
    let workers = Workers::bind(listeners, options.workers)?;
    let admin_socket = crate::listen::accept::bind_first(options.admin)
        .map_err(|e| format!("cannot listen on admin {}: {e}", options.admin))?;

    let (access_log, flusher) = match &options.access_log {
        Some(dest) => {
            let (log, thread) = access_log::AccessLog::start(dest, metrics.access_log_dropped.clone())
                .map_err(|e| format!("cannot open access log {dest}: {e}"))?;
            (Some(log), Some(thread))
        }
        None => (None, None),
    };
    // The identity table holds this proxy's one identity (`--service`), certified later if
    // the control plane gives it a certificate; requests leaving the proxy present it.
    let identities = Arc::new(identity::table::Identities::default());
    let identity = options.service.as_deref().map(|service| identities.add(service));
    let tls: identity::TlsHandle = identity.as_ref().map(|i| i.tls.clone()).unwrap_or_default();
    let shared = Arc::new(Shared {
        config: config.clone(),
        metrics: metrics.clone(),
        limits: options.limits.clone(),
        access_log,
        connections: AtomicUsize::new(0),
        tls: tls.clone(),
        resets: Arc::new(crate::http::resets::ResetLimiter::new(options.limits.max_client_resets)),
        identities: identities.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker_count = workers.count();
    let addresses: Vec<_> = workers
        .listeners()
        .iter()
        .map(|l| (l.spec.name.clone(), l.addr))
        .collect();
    let running = workers.start(shared.clone(), stop_rx.clone(), options.drain_timeout)?;

    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    main.block_on(async {
        let ready = Arc::new(AtomicBool::new(false));
        let configured = Arc::new(AtomicBool::new(options.control.is_empty()));
        let admin = Arc::new(admin::Admin {
            metrics: metrics.clone(),
            config: config.clone(),
            ready: ready.clone(),
            configured: configured.clone(),
        });
        let admin_task = tokio::spawn(admin.serve(admin_socket, stop_rx.clone()));
        // Active health checks: one task per checked endpoint, on this runtime.
        let health = health::HealthChecks {
            config: config.clone(),
            metrics: metrics.clone(),
            tls: tls.clone(),
            connect_timeout: options.limits.connect_timeout,
        };
        let health_task = tokio::spawn(health.run(stop_rx.clone()));
        let config_task = match &options.config {
            Some(path) => {
                let watcher = reload::ConfigFile {
                    path: path.clone(),
                    config: config.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(watcher.watch(stop_rx.clone()))
            }
            None => {
                // The identity first, so the endpoint is announced with it.
                let renewals = match identity {
                    Some(identity) => {
                        let agent = identity::IdentityAgent {
                            urls: options.control.clone(),
                            trust: control_trust.clone(),
                            identity,
                            identities: identities.clone(),
                            join_token: options.join_token.clone(),
                            metrics: metrics.clone(),
                        };
                        agent.start(stop_rx.clone()).await
                    }
                    None => None,
                };
                drop(renewals);
                let spiffe_id = tls.load().as_ref().map(|t| t.spiffe_id.clone()).unwrap_or_default();
                let client = control::ControlClient {
                    urls: options.control.clone(),
                    trust: control_trust.clone(),
                    identity: tls.clone(),
                    identities: identities.clone(),
                    hello: hello(&options, spiffe_id),
                    config: config.clone(),
                    metrics: metrics.clone(),
                    configured: configured.clone(),
                    max_config_bytes: options.max_config_bytes,
                };
                tokio::spawn(client.run(stop_rx.clone()))
            }
        };
        for (name, addr) in &addresses {
            tracing::info!(listener = %name, %addr, "listening");
        }
        tracing::info!(admin = %options.admin, workers = worker_count, "smesh proxy ready");
        ready.store(true, Ordering::Release);
        wait_for_signal().await;
        tracing::info!(drain_timeout = ?options.drain_timeout, "shutting down: draining connections");
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let _ = config_task.await;
        let _ = health_task.await;
        // The admin port stays up while workers drain, then closes with them.
        let _ = tokio::task::spawn_blocking(move || running.join()).await;
        let _ = admin_task.await;
    });
    drop(shared);
    if let Some(flusher) = flusher {
        let _ = flusher.join();
    }
    tracing::info!("stopped");
    Ok(())
}

/// What this proxy tells the control plane about itself.
fn hello(options: &ProxyOptions, identity: String) -> smesh_api::v1::Hello {
    let service = options.service.clone().unwrap_or_default();
    let endpoint = match (options.app, options.inbound) {
        (Some(_), Some(inbound)) if !service.is_empty() => {
            let mut addr = options.advertise.unwrap_or(inbound);
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            Some(smesh_api::v1::Endpoint {
                service: service.clone(),
                address: addr.to_string(),
                labels: options.labels.clone().into_iter().collect(),
                weight: 0,
                identity,
            })
        }
        _ => None,
    };
    let name = if service.is_empty() {
        "proxy".to_string()
    } else {
        service
    };
    smesh_api::v1::Hello {
        proxy_id: format!("{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        endpoint,
        lease_ttl_ms: options.lease_ttl.map_or(0, |d| d.as_millis() as u64),
        applied_version: 0,
    }
}

/// The inbound side's one "route": everything to the local app.
fn inbound_rule(
    app: SocketAddr,
    label: &str,
    metrics: &Arc<metrics::Metrics>,
    protocol: Option<smesh_model::Protocol>,
) -> Arc<Rule> {
    let endpoint = Arc::new(Endpoint {
        addr: app,
        weight: 1,
        labels: Default::default(),
        stats: Arc::default(),
        server_name: None,
    });
    let balancer = Arc::new(Balancer::new(vec![endpoint], LoadBalancer::RoundRobin));
    Arc::new(Rule::new(
        "inbound",
        vec![WeightedBackend {
            weight: 1,
            service: Arc::from(label),
            balancer,
            protocol,
            policy: None,
        }],
        Default::default(),
        None,
        Arc::new(metrics.route("inbound", label, "inbound")),
    ))
}
