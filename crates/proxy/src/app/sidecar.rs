//! `smesh proxy`, the sidecar mode: one proxy in front of one application instance. Wiring
//! only: the snapshot source (a file or the control plane), the identity table with one
//! entry, one [`Workload`], the listeners, the admin server, handed to the [`Workers`].

use crate::app::admin::Admin;
use crate::app::health::HealthChecks;
use crate::app::options::ProxyOptions;
use crate::app::source::{Source, Start};
use crate::app::workers::{Listener, Workers};
use crate::app::workload::Workload;
use crate::http::resets::ResetLimiter;
use crate::identity::TlsHandle;
use crate::listen::accept::bind_first;
use crate::listen::http::Target;
use crate::listen::server::{ListenerSpec, Shared};
use crate::shutdown::wait_for_signal;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Stats;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Runs the proxy until SIGTERM or SIGINT, then drains. Errors are start-up errors
/// (bad configuration, an address in use) and are meant for the user as they are.
pub fn run(options: ProxyOptions) -> Result<(), String> {
    // The table holds the sidecar's one identity.
    let Start {
        metrics,
        identities,
        identity,
        workload,
        config,
        trust: control_trust,
    } = Start::new(&options)?;

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
        let source = Source {
            options: &options,
            workload: workload.as_ref(),
            config: config.clone(),
            metrics: metrics.clone(),
            trust: control_trust.clone(),
            identities: identities.clone(),
            identity,
            tls: tls.clone(),
            configured: configured.clone(),
            admin_address: options.admin.to_string(),
            stats: stats.clone(),
        };
        let config_task = source.start(stop_rx.clone()).await;
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
