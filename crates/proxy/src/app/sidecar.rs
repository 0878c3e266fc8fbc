//! `smesh proxy`, the sidecar mode: one proxy in front of one application instance. Wiring
//! only: the snapshot source (a file or the control plane), the identity table with one
//! entry, one [`Workload`], the listeners, the admin server, handed to the [`Workers`].

use crate::app::admin::Admin;
use crate::app::health::HealthChecks;
use crate::app::options::ProxyOptions;
use crate::app::workers::{Listener, Workers};
use crate::app::workload::Workload;
use crate::config::control::ControlClient;
use crate::config::reload::{self, ConfigFile};
use crate::config::snapshot::Snapshot;
use crate::http::resets::ResetLimiter;
use crate::identity::control_tls::{ControlTrust, ControlUrl};
use crate::identity::table::Identities;
use crate::identity::{IdentityAgent, TlsHandle};
use crate::listen::accept::bind_first;
use crate::listen::http::Target;
use crate::listen::server::{ListenerSpec, Shared};
use crate::shutdown::wait_for_signal;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Stats;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Runs the proxy until SIGTERM or SIGINT, then drains. Errors are start-up errors
/// (bad configuration, an address in use) and are meant for the user as they are.
pub fn run(options: ProxyOptions) -> Result<(), String> {
    let metrics = Metrics::new();
    // The table holds the sidecar's one identity (`--service`), certified later if the
    // control plane gives it a certificate.
    let identities = Arc::new(Identities::default());
    let identity = options.service.as_deref().map(|service| identities.add(service));
    let workload = Workload::sidecar(&options, &identities);
    let config = Arc::new(ArcSwap::from_pointee(first_snapshot(
        &options,
        workload.as_ref(),
        &metrics,
    )?));
    let control_trust = control_trust(&options)?;

    let listeners = listeners(&options, workload.as_ref(), &metrics);
    if listeners.is_empty() {
        return Err("nothing to listen on: give --outbound, --inbound with --app, or --upstream".into());
    }
    let workers = Workers::bind(listeners, options.workers)?;
    let admin_socket =
        bind_first(options.admin).map_err(|e| format!("cannot listen on admin {}: {e}", options.admin))?;

    let (access_log, flusher) = match &options.access_log {
        Some(dest) => {
            let (log, thread) = AccessLog::start(dest, metrics.access_log_dropped.clone())
                .map_err(|e| format!("cannot open access log {dest}: {e}"))?;
            (Some(log), Some(thread))
        }
        None => (None, None),
    };
    // Requests leaving this proxy present its workload's identity.
    let tls: TlsHandle = identity.as_ref().map(|i| i.tls.clone()).unwrap_or_default();
    // Golden metrics go to the control plane: without one, nothing records them.
    let stats = (!options.control.is_empty()).then(|| Arc::new(Stats::new(workers.count())));
    let shared = Arc::new(Shared {
        config: config.clone(),
        metrics: metrics.clone(),
        limits: options.limits.clone(),
        access_log,
        filters: None,
        connections: AtomicUsize::new(0),
        tls: tls.clone(),
        resets: Arc::new(ResetLimiter::new(options.limits.max_client_resets)),
        identities: identities.clone(),
        stats: stats.clone(),
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
        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            config: config.clone(),
            ready: ready.clone(),
            configured: configured.clone(),
        });
        let admin_task = tokio::spawn(admin.serve(admin_socket, stop_rx.clone()));
        // Active health checks: one task per checked endpoint, on this runtime.
        let health = HealthChecks {
            config: config.clone(),
            metrics: metrics.clone(),
            tls: tls.clone(),
            connect_timeout: options.limits.connect_timeout,
        };
        let health_task = tokio::spawn(health.run(stop_rx.clone()));
        let config_task = match &options.config {
            Some(path) => {
                let watcher = ConfigFile {
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
                        let agent = IdentityAgent {
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
                let client = ControlClient {
                    urls: options.control.clone(),
                    trust: control_trust.clone(),
                    identity: tls.clone(),
                    identities: identities.clone(),
                    hello: hello(&options, workload.as_ref(), spiffe_id),
                    config: config.clone(),
                    metrics: metrics.clone(),
                    configured: configured.clone(),
                    max_config_bytes: options.max_config_bytes,
                    stats: stats.clone(),
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

/// The snapshot served from the start: the configuration file's, or an empty one until the
/// control plane sends the first. A proxy in front of an app enforces its Service's
/// BackendPolicy `rateLimit` inbound.
fn first_snapshot(
    options: &ProxyOptions,
    workload: Option<&Workload>,
    metrics: &Arc<Metrics>,
) -> Result<Snapshot, String> {
    let empty = Snapshot::serving(workload.and_then(Workload::limited_service));
    match (&options.config, options.control.is_empty()) {
        (Some(path), true) => {
            let items = reload::load(path)?;
            let snapshot = Snapshot::build(&items, &empty, metrics, "outbound");
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
            Ok(snapshot)
        }
        (None, false) => Ok(empty),
        (Some(_), false) => Err("give either --config FILE or --control URL, not both".into()),
        (None, true) => Err("give --config FILE (static configuration) or --control URL (a control plane)".into()),
    }
}

/// The CA an `https://` control plane is checked against; required when one is given.
fn control_trust(options: &ProxyOptions) -> Result<Option<ControlTrust>, String> {
    let trust = match &options.control_ca {
        Some(path) => Some(ControlTrust::load(path).map_err(|e| format!("--control-ca: {e}"))?),
        None => None,
    };
    for url in &options.control {
        let parsed = ControlUrl::parse(url).map_err(|e| format!("--control: {e}"))?;
        if parsed.tls && trust.is_none() {
            return Err(format!(
                "--control {url}: an https:// control plane needs --control-ca FILE (its CA, e.g. the control plane's DIR/ca.pem)"
            ));
        }
    }
    Ok(trust)
}

/// Outbound (by Host), the workload's inbound, and one port per `--upstream`.
fn listeners(options: &ProxyOptions, workload: Option<&Workload>, metrics: &Arc<Metrics>) -> Vec<Listener> {
    let outbound = |name: String, target: Target| ListenerSpec {
        name,
        direction: "outbound",
        target,
        tcp_only: false,
    };
    let mut listeners = Vec::new();
    if let Some(addr) = options.outbound {
        let spec = Arc::new(outbound("outbound".into(), Target::Outbound));
        listeners.push(Listener { addr, spec });
    }
    if let Some(workload) = workload {
        listeners.push(workload.listener(metrics));
    }
    for (name, addr) in &options.upstreams {
        let spec = outbound(format!("upstream:{name}"), Target::Upstream(Arc::from(name.as_str())));
        listeners.push(Listener {
            addr: *addr,
            spec: Arc::new(spec),
        });
    }
    listeners
}

/// What this proxy tells the control plane about itself: its workload's endpoint, if any.
fn hello(options: &ProxyOptions, workload: Option<&Workload>, identity: String) -> smesh_api::v1::Hello {
    let service = options.service.clone().unwrap_or_default();
    let name = if service.is_empty() {
        "proxy".to_string()
    } else {
        service
    };
    smesh_api::v1::Hello {
        proxy_id: format!("{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        endpoint: workload.and_then(|w| w.endpoint(identity)),
        lease_ttl_ms: options.lease_ttl.map_or(0, |d| d.as_millis() as u64),
        applied_version: 0,
        admin_address: options.admin.to_string(),
    }
}
