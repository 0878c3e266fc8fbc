//! The static configuration file: loaded at start, then re-read when it changes (polled)
//! or on SIGHUP. A bad file is rejected with its errors logged and counted; the running
//! snapshot stays.

use crate::config::snapshot::Snapshot;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use smesh_model::ConfigErrors;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub struct ConfigFile {
    pub path: PathBuf,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
}

/// Reads and validates `path`; the error text names file, document, field and reason.
pub fn load(path: &Path) -> Result<Vec<smesh_model::Sourced>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    smesh_model::load(&path.display().to_string(), &text).map_err(|e: ConfigErrors| e.to_string())
}

/// Modification time, size and inode: an editor's write-and-rename changes the inode even
/// when the time stamp (coarse on some file systems) and the size do not.
fn fingerprint(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

impl ConfigFile {
    /// Builds and installs a new snapshot from the file. Returns false if it was rejected.
    pub fn reload(&self) -> bool {
        match load(&self.path) {
            Ok(items) => {
                let previous = self.config.load();
                let next = Snapshot::build(&items, &previous, &self.metrics, "outbound");
                let generation = next.generation;
                self.config.store(Arc::new(next));
                self.metrics.config_generation.set(generation as i64);
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation, file = %self.path.display(), "configuration loaded");
                true
            }
            Err(errors) => {
                self.metrics.config_reloads.with_label_values(&["rejected"]).inc();
                for line in errors.lines() {
                    tracing::error!("configuration rejected, keeping the previous one: {line}");
                }
                false
            }
        }
    }

    /// Reloads on change or SIGHUP until shutdown.
    pub async fn watch(self, mut shutdown: watch::Receiver<bool>) {
        let mut seen = fingerprint(&self.path);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP reloads unavailable");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            };
            let now = fingerprint(&self.path);
            if forced || (now.is_some() && now != seen) {
                seen = now;
                self.reload();
            }
        }
    }
}
