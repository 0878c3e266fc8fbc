//! The control-plane client: one gRPC stream to any control replica. It registers this
//! proxy's endpoint, applies each pushed snapshot (or nacks it and keeps the old one), and
//! reconnects with jittered backoff, serving the last good configuration meanwhile. While
//! connected it also pushes each closed golden-metric window (`crate::telemetry::window`).

use crate::config::snapshot::Snapshot;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::{Stats, WINDOW};
use arc_swap::ArcSwap;
use smesh_api::transport::{grpc_channel, ControlTrust};
use smesh_api::v1::discovery_client::DiscoveryClient;
use smesh_api::v1::{proxy_message, Ack, ConfigSnapshot, Goodbye, Hello, ProxyMessage};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct ControlClient {
    /// Control replicas, tried in turn.
    pub urls: Vec<String>,
    /// For `https://` control planes; the stream presents this proxy's certificate.
    pub trust: Option<ControlTrust>,
    pub identity: crate::identity::TlsHandle,
    /// Every identity this process holds: each trusts the bundle the control plane pushes.
    pub identities: Arc<crate::identity::table::Identities>,
    pub hello: Hello,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// Set once the first snapshot is applied.
    pub configured: Arc<AtomicBool>,
    /// Snapshots larger than this are refused (nacked).
    pub max_config_bytes: usize,
    /// The golden-metric window this client closes and pushes.
    pub stats: Option<Arc<Stats>>,
}

enum End {
    Stopped,
    /// The stream broke; `bool`: after it had delivered configuration.
    Lost(String, bool),
    /// The control plane does not accept this proxy (no or the wrong certificate).
    Refused(String),
    /// The control plane ended the stream with the certificate that opened it.
    CertificateExpired,
}

impl ControlClient {
    /// Runs until `stop` turns true; then says goodbye so the endpoint leaves at once.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = MIN_BACKOFF;
        let mut next = 0usize;
        loop {
            let url = self.urls[next % self.urls.len()].clone();
            next += 1;
            match self.session(&url, &mut stop).await {
                End::Stopped => return,
                End::CertificateExpired => {
                    tracing::info!(control = %url, "stream ended with its certificate; reconnecting with the current one");
                    backoff = MIN_BACKOFF;
                    continue;
                }
                End::Refused(why) => {
                    tracing::error!(control = %url, reason = %why, "the control plane refused this proxy");
                }
                End::Lost(why, worked) => {
                    tracing::warn!(control = %url, reason = %why, "control plane unavailable; serving the last configuration");
                    // A stream that worked starts the backoff over.
                    if worked {
                        backoff = MIN_BACKOFF;
                    }
                }
            }
            // Full jitter, so a restarted control plane is not hit by every proxy at once.
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }

    async fn session(&mut self, url: &str, stop: &mut watch::Receiver<bool>) -> End {
        let identity = self.identity.load_full();
        let channel = match grpc_channel(url, self.trust.as_ref(), identity.as_deref()).await {
            Ok(c) => c,
            Err(e) => return End::Lost(e, false),
        };
        let (tx, rx) = mpsc::channel(8);
        let hello = ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(self.hello.clone())),
        };
        if tx.send(hello).await.is_err() {
            return End::Lost("stream closed".into(), false);
        }
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(self.max_config_bytes.max(4 << 20));
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) if matches!(e.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                return End::Refused(e.message().to_string());
            }
            Err(e) => return End::Lost(format!("stream: {}", e.message()), false),
        };
        tracing::info!(control = %url, "connected to the control plane");
        let mut worked = false;
        // What was recorded while disconnected is dropped: a window covers its 10 s only.
        let (mut window_start, mut window_end) = window_bounds();
        if let Some(stats) = &self.stats {
            stats.close(0);
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(window_end), if self.stats.is_some() => {
                    // Sent even when empty: the control plane counts the time it has windows
                    // for, and a quiet proxy is then seen as quiet rather than gone.
                    let window = self.stats.as_ref().map(|s| s.close(window_start)).unwrap_or_default();
                    (window_start, window_end) = window_bounds();
                    if tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Stats(window)) }).await.is_err() {
                        return End::Lost("stream closed".into(), worked);
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(snapshot)) => {
                        let ack = self.apply(snapshot);
                        worked = true;
                        if tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Ack(ack)) }).await.is_err() {
                            return End::Lost("stream closed".into(), worked);
                        }
                    }
                    Ok(None) => return End::Lost("stream ended".into(), worked),
                    Err(e) if e.code() == tonic::Code::Unauthenticated && worked => return End::CertificateExpired,
                    Err(e) => return End::Lost(format!("stream: {}", e.message()), worked),
                },
                _ = crate::shutdown::stopped(stop) => {
                    let _ = tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Goodbye(Goodbye {})) }).await;
                    drop(tx);
                    // Let the goodbye reach the control plane before the connection goes.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    }).await;
                    return End::Stopped;
                }
            }
        }
    }

    /// Trusts the roots the control plane pushes (a CA rotation adds one, a retirement
    /// removes the old): every identity's TLS configurations are rebuilt with them.
    fn apply_trust_bundle(&self, bundle: &str) {
        if bundle.is_empty() {
            return;
        }
        match self.identities.apply_bundle(bundle) {
            Ok(true) => tracing::info!(roots = next_roots(bundle), "trust bundle updated"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "trust bundle from the control plane rejected; keeping the previous one")
            }
        }
    }

    /// Validates and installs a snapshot; the ack says whether it was taken.
    fn apply(&mut self, snapshot: ConfigSnapshot) -> Ack {
        self.apply_trust_bundle(&snapshot.trust_bundle_pem);
        let version = snapshot.version;
        let nack = |error: String| {
            tracing::error!(version, %error, "configuration from the control plane rejected; keeping the previous one");
            Ack {
                version,
                accepted: false,
                error,
            }
        };
        let yaml = match unpack(&snapshot, self.max_config_bytes) {
            Ok(yaml) => yaml,
            Err(error) => {
                self.metrics.config_reloads.with_label_values(&["rejected"]).inc();
                return nack(error);
            }
        };
        let source = format!("control-plane snapshot {version}");
        let Ok(text) = std::str::from_utf8(&yaml) else {
            self.metrics.config_reloads.with_label_values(&["rejected"]).inc();
            return nack("snapshot is not UTF-8".into());
        };
        match smesh_model::load(&source, text) {
            Ok(items) => {
                let previous = self.config.load();
                let next = Snapshot::build(&items, &previous, &self.metrics, "outbound");
                self.metrics.config_generation.set(next.generation as i64);
                self.config.store(Arc::new(next));
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                self.hello.applied_version = version;
                self.configured.store(true, Ordering::Release);
                tracing::info!(version, resources = items.len(), "configuration applied");
                Ack {
                    version,
                    accepted: true,
                    error: String::new(),
                }
            }
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["rejected"]).inc();
                nack(e.to_string())
            }
        }
    }
}

/// The wall-clock window open now: its start (Unix ms) and when it closes. Windows are
/// aligned to their length, so every proxy's windows line up at the control plane.
fn window_bounds() -> (u64, tokio::time::Instant) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let length = WINDOW.as_millis() as u64;
    let start = now - now % length;
    let left = Duration::from_millis(start + length - now);
    (start, tokio::time::Instant::now() + left)
}

fn next_roots(bundle: &str) -> usize {
    bundle.matches("-----BEGIN CERTIFICATE-----").count()
}

/// The snapshot's YAML, decompressed if it came gzip-compressed; never more than `limit`
/// bytes (a snapshot over this proxy's limit, or a decompression bomb, is refused).
fn unpack(snapshot: &ConfigSnapshot, limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let too_big = |size: String| format!("snapshot of {size} bytes is over this proxy's --max-config-bytes {limit}");
    if snapshot.resources_yaml_gzip.is_empty() {
        if snapshot.resources_yaml.len() > limit {
            return Err(too_big(snapshot.resources_yaml.len().to_string()));
        }
        return Ok(snapshot.resources_yaml.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(snapshot.resources_yaml_gzip.as_ref())
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("snapshot does not decompress: {e}"))?;
    if out.len() > limit {
        return Err(too_big(format!("more than {limit}")));
    }
    Ok(out)
}
