//! Where a process's snapshot comes from, shared by the sidecar and the embedded mesh (the
//! `smesh` library): the first snapshot, the control plane's trust, the Hello it sends, and
//! the task that keeps the snapshot current (a watched file, or the identity agent and then
//! the control-plane stream).

use crate::app::options::ProxyOptions;
use crate::app::workload::Workload;
use crate::config::control::ControlClient;
use crate::config::reload::{self, ConfigFile};
use crate::config::snapshot::Snapshot;
use crate::identity::control_tls::{ControlTrust, ControlUrl};
use crate::identity::table::{Identities, Identity};
use crate::identity::{IdentityAgent, TlsHandle};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Stats;
use arc_swap::ArcSwap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What every mode starts from, in this order: metrics, the identity table holding this
/// workload's identity (`--service`, certified later if the control plane gives it a
/// certificate), the workload, the first snapshot, and the control plane's trust.
pub struct Start {
    pub metrics: Arc<Metrics>,
    pub identities: Arc<Identities>,
    pub identity: Option<Arc<Identity>>,
    pub workload: Option<Workload>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub trust: Option<ControlTrust>,
}

impl Start {
    pub fn new(options: &ProxyOptions) -> Result<Self, String> {
        let metrics = Metrics::new();
        let identities = Arc::new(Identities::default());
        let identity = options.service.as_deref().map(|service| identities.add(service));
        let workload = Workload::sidecar(options, &identities);
        let snapshot = first_snapshot(options, workload.as_ref(), &metrics)?;
        Ok(Start {
            config: Arc::new(ArcSwap::from_pointee(snapshot)),
            trust: control_trust(options)?,
            metrics,
            identities,
            identity,
            workload,
        })
    }
}

/// The snapshot served from the start: the configuration file's, or an empty one until the
/// control plane sends the first. A proxy in front of an app enforces its Service's
/// BackendPolicy `rateLimit` inbound.
fn first_snapshot(
    options: &ProxyOptions,
    workload: Option<&Workload>,
    metrics: &Arc<Metrics>,
) -> Result<Snapshot, String> {
    let mut empty = Snapshot::serving(workload.and_then(Workload::limited_service));
    empty.workload = options.service.as_deref().map(std::sync::Arc::from);
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

/// What keeps one process's snapshot current.
pub struct Source<'a> {
    pub options: &'a ProxyOptions,
    pub workload: Option<&'a Workload>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub trust: Option<ControlTrust>,
    /// The process's identity table, and its own entry in it (the `--service`'s).
    pub identities: Arc<Identities>,
    pub identity: Option<Arc<Identity>>,
    /// Requests leaving the process present this identity (the entry's TLS, or none).
    pub tls: TlsHandle,
    /// Set once the first control-plane snapshot is applied.
    pub configured: Arc<AtomicBool>,
    /// The admin address announced in Hello (where /metrics is scraped); empty: none.
    pub admin_address: String,
    /// The golden-metric windows sent to the control plane; none records without one.
    pub stats: Option<Arc<Stats>>,
}

impl Source<'_> {
    /// Starts following the file or the control plane until `stop`. With a control plane,
    /// returns only once the identity agent has the first certificate (or knows it cannot
    /// get one), so the endpoint is announced with its SPIFFE ID.
    pub async fn start(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let options = self.options;
        if let Some(path) = &options.config {
            let watcher = ConfigFile {
                path: path.clone(),
                config: self.config,
                metrics: self.metrics,
            };
            return tokio::spawn(watcher.watch(stop));
        }
        // The renewals run in the background until `stop`; nothing waits for them.
        if let Some(identity) = self.identity {
            let agent = IdentityAgent {
                urls: options.control.clone(),
                trust: self.trust.clone(),
                identity,
                identities: self.identities.clone(),
                join_token: options.join_token.clone(),
                metrics: self.metrics.clone(),
            };
            drop(agent.start(stop.clone()).await);
        }
        let spiffe_id = self
            .tls
            .load()
            .as_ref()
            .map(|t| t.spiffe_id.clone())
            .unwrap_or_default();
        let client = ControlClient {
            urls: options.control.clone(),
            trust: self.trust,
            identity: self.tls,
            identities: self.identities,
            hello: hello(options, self.workload, spiffe_id, self.admin_address),
            config: self.config,
            metrics: self.metrics,
            configured: self.configured,
            max_config_bytes: options.max_config_bytes,
            stats: self.stats,
        };
        tokio::spawn(client.run(stop))
    }
}

/// What this process tells the control plane about itself: its workload's endpoint, if any.
fn hello(
    options: &ProxyOptions,
    workload: Option<&Workload>,
    identity: String,
    admin_address: String,
) -> smesh_api::v1::Hello {
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
        admin_address,
    }
}
