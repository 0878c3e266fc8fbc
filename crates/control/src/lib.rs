//! smesh control plane: one listen address serves gRPC for proxies (configuration and
//! endpoint push, registration) and HTTP for people and tools (admin API, KV).
//!
//! Modules: [`store`] (state), [`feed`] + [`compose`] (what proxies get), [`discovery`]
//! (the proxy streams), [`api`] (HTTP: admin API and KV), [`keys`] (the store layout),
//! [`stats`] (golden metrics the proxies push, in memory).

pub mod api;
pub mod ca;
pub mod compose;
pub mod discovery;
pub mod feed;
#[cfg(test)]
mod fuzz_tests;
pub mod identity;
pub mod keys;
pub mod listener;
pub mod registry;
pub mod stats;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub listen: SocketAddr,
    /// `embedded:DIR` or `etcd:URL[,URL...]`.
    pub store: String,
    pub admin_token_file: Option<PathBuf>,
    /// Default lease TTL for registered endpoints.
    pub lease_ttl: Duration,
    /// The SPIFFE trust domain of the identities the CA issues.
    pub trust_domain: String,
    /// A CA root to use (certificate and key PEM files); else one is made on first start.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Serve TLS (admin API and proxies) with this certificate; proxies must then
    /// authenticate with their mesh certificate.
    pub tls: Option<tls::ServingCertificate>,
}

/// Opens the store named by `spec`; also returns the data directory, if any. An etcd store keeps its
/// keys under `/smesh` and needs the cluster reachable to open.
pub async fn open_store(spec: &str) -> Result<(Arc<dyn store::Store>, Option<PathBuf>), String> {
    match spec.split_once(':') {
        Some(("embedded", dir)) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            let file = dir.join("smesh.redb");
            let store = store::embedded::EmbeddedStore::open(&file)
                .map_err(|e| format!("cannot open store in {}: {e}", dir.display()))?;
            // The store holds the CA key: owner-only.
            use std::os::unix::fs::PermissionsExt;
            for (path, mode) in [(&dir, 0o700), (&file, 0o600)] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot restrict permissions of {}: {e}", path.display()))?;
            }
            Ok((store, Some(dir)))
        }
        Some(("etcd", urls)) if !urls.is_empty() => {
            let endpoints: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
            if endpoints.iter().any(String::is_empty) {
                return Err(format!("invalid --store {spec:?}: empty etcd endpoint"));
            }
            let store = store::etcd::EtcdStore::connect(&endpoints, "/smesh")
                .await
                .map_err(|e| format!("cannot open the etcd store: {e}"))?;
            Ok((store, None))
        }
        _ => Err(format!(
            "invalid --store {spec:?}: expected embedded:DIR or etcd:URL[,URL...]"
        )),
    }
}

/// The admin token: from the given file, else from (or newly written to) `DIR/admin-token`
/// with owner-only permissions.
pub fn admin_token(file: Option<&Path>, data_dir: Option<&Path>) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = match (file, data_dir) {
        (Some(f), _) => {
            let token = std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            let token = token.trim().to_string();
            if token.is_empty() {
                return Err(format!("{}: the admin token file is empty", f.display()));
            }
            return Ok(token);
        }
        (None, Some(dir)) => dir.join("admin-token"),
        (None, None) => return Err("--admin-token-file is required with this store".into()),
    };
    if let Ok(token) = std::fs::read_to_string(&path) {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_string());
        }
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(token.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(file = %path.display(), "generated an admin token");
    Ok(token)
}

/// Runs the control plane until SIGTERM or SIGINT.
pub fn run(options: ControlOptions) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(serve(options))
}

async fn serve(options: ControlOptions) -> Result<(), String> {
    let (store, data_dir) = open_store(&options.store).await?;
    let token = admin_token(options.admin_token_file.as_deref(), data_dir.as_deref())?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let feed = feed::start(store.clone());
    let given_ca = match &options.ca {
        Some((cert, key)) => {
            let read =
                |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
            Some((read(cert)?, read(key)?))
        }
        None => None,
    };
    let first = ca::Ca::load_or_create(store.as_ref(), &options.trust_domain, given_ca).await?;
    let from_files = first.from_files;
    let ca: ca::CaHandle = Arc::new(arc_swap::ArcSwap::from_pointee(first));
    let bundle_file = data_dir.as_ref().map(|dir| dir.join("ca.pem"));
    if let Some(file) = &bundle_file {
        write_trust_bundle(file, &ca.load().bundle_pem())?;
    }
    let tls = match &options.tls {
        Some(serving) => {
            let tls = tls::ControlTls::new(&ca.load(), serving)?;
            tls.clone().keep_fresh(ca.clone());
            Some(tls)
        }
        None => {
            tracing::warn!("the control plane serves plaintext: proxies are not authenticated (use --tls)");
            None
        }
    };
    // A rotation (through any replica) reaches the signer, the TLS listener and ca.pem.
    if !from_files {
        let tls = tls.clone();
        ca::follow(store.clone(), ca.clone(), move |ca| {
            if let Some(tls) = &tls {
                tls.ca_changed(ca);
            }
            if let Some(file) = &bundle_file {
                if let Err(e) = write_trust_bundle(file, &ca.bundle_pem()) {
                    tracing::error!(error = %e, "cannot update the trust bundle file");
                }
            }
        });
    }
    let stats = Arc::new(stats::Ring::new(stats::DEFAULT_WINDOWS));
    let discovery = discovery::DiscoveryService {
        store: store.clone(),
        feed,
        default_ttl: options.lease_ttl,
        replica: options.listen.to_string(),
        authenticate: tls.is_some().then(|| options.trust_domain.clone()),
        stats: stats.clone(),
    };
    let identity = identity::IdentityService {
        store: store.clone(),
        ca: ca.clone(),
    };
    let grpc = tonic::service::Routes::new(smesh_api::v1::discovery_server::DiscoveryServer::new(discovery))
        .add_service(smesh_api::v1::identity_server::IdentityServer::new(identity))
        .into_axum_router();
    let state = Arc::new(api::ApiState {
        store,
        token,
        ca,
        stats,
    });
    let app = grpc.merge(api::routes(state)).fallback(api::not_found);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %options.listen, store = %options.store, scheme, "smesh control ready");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Proxy streams never end by themselves: open requests get a moment, then go.
    let tls = tls.map(|t| t.config.clone());
    let server = tokio::spawn(listener::serve(listener, app, tls, stop_rx, Duration::from_secs(2)));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

/// The mesh's trust bundle (public) next to the store, for clients of a TLS control plane.
fn write_trust_bundle(path: &Path, pem: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == pem) {
        return Ok(());
    }
    // Readers (the CLI, scripts) may open the file at any moment: they must see the old
    // bundle or the new one, never a truncated file, so write aside and rename over it.
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
