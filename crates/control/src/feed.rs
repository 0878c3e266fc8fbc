//! The configuration feed: watches the store's mesh prefix and keeps the latest composed
//! snapshot in a `watch` channel that every proxy stream reads.

use crate::compose::compose;
use crate::keys;
use crate::store::{KeyValue, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    pub version: u64,
    pub yaml: bytes::Bytes,
    /// `yaml` gzip-compressed, once for every stream.
    pub gzip: bytes::Bytes,
    /// The CA roots proxies trust (PEM); empty before the CA has published them.
    pub trust_bundle: Arc<str>,
}

/// The newest snapshot; `None` until the store has been read once.
pub type Feed = watch::Receiver<Option<Arc<Composed>>>;

/// Starts the feed; the receiver always holds the newest snapshot.
pub fn start(store: Arc<dyn Store>) -> Feed {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            if let Err(e) = follow(store.as_ref(), &tx).await {
                tracing::warn!(error = %e, "configuration feed interrupted; re-reading the store");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

async fn follow(store: &dyn Store, tx: &watch::Sender<Option<Arc<Composed>>>) -> Result<(), StoreError> {
    let (kvs, revision) = store.list(keys::MESH).await?;
    publish(tx, revision, &kvs);
    let mut events = store.watch(keys::MESH, revision).await?;
    while let Some(batch) = events.recv().await {
        let batch = batch?;
        // Coalesce a burst of changes into one snapshot.
        let mut last = batch.last().map(|e| e.revision()).unwrap_or(revision);
        while let Ok(more) = events.try_recv() {
            if let Some(e) = more?.last() {
                last = e.revision();
            }
        }
        let (kvs, at) = store.list(keys::MESH).await?;
        publish(tx, at.max(last), &kvs);
    }
    Err(StoreError::Backend("watch ended".into()))
}

fn publish(tx: &watch::Sender<Option<Arc<Composed>>>, version: u64, kvs: &[KeyValue]) {
    let resources = compose(kvs);
    let yaml = smesh_model::to_yaml(&resources);
    let trust_bundle = kvs
        .iter()
        .find(|kv| kv.key == keys::TRUST_BUNDLE)
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    tx.send_if_modified(|current| {
        // Unchanged content (e.g. after a re-read) is not pushed again.
        if current
            .as_ref()
            .is_some_and(|c| c.yaml == yaml.as_bytes() && *c.trust_bundle == *trust_bundle)
        {
            return false;
        }
        *current = Some(Arc::new(Composed {
            version,
            gzip: gzip(yaml.as_bytes()),
            yaml: bytes::Bytes::from(yaml),
            trust_bundle: Arc::from(trust_bundle),
        }));
        true
    });
    tracing::debug!(version, "configuration snapshot composed");
}

fn gzip(data: &[u8]) -> bytes::Bytes {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 8), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    bytes::Bytes::from(encoder.finish().unwrap_or_default())
}
