//! The control plane's state: a revisioned, watchable, transactional key/value store with
//! leases (the etcd v3 model). Two implementations share these semantics: [`embedded`]
//! (a single redb file, the default) and [`etcd`] (a real etcd v3 cluster, for HA).
//!
//! Every successful write gets the next store-wide revision. A key remembers the revision
//! that created it and the one that last modified it. A watch delivers, in revision order,
//! every change under a prefix after a given revision. A key written with a lease is deleted
//! (with a delete event) when the lease expires or is revoked.

pub mod embedded;
pub mod etcd;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;

pub type Revision = u64;
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// 0 when the key has no lease.
    pub lease: LeaseId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// `revision` is the revision of the deletion; `prev` the value that was deleted.
    Delete {
        key: String,
        revision: Revision,
        prev: KeyValue,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    /// Deletes every key under the prefix.
    DeletePrefix {
        prefix: String,
    },
}

/// A condition a transaction checks before writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals this; 0 means the key must not exist.
    ModRevision { key: String, equals: Revision },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// False when a compare failed: nothing was written.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if nothing was written).
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A watch asked for history that is no longer kept: list again and watch from there.
    Compacted {
        oldest: Revision,
    },
    LeaseNotFound(LeaseId),
    /// The backing storage failed (I/O, corruption, an unreachable cluster).
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Compacted { oldest } => write!(f, "revision compacted; oldest kept is {oldest}"),
            StoreError::LeaseNotFound(id) => write!(f, "lease {id:x} not found"),
            StoreError::Backend(e) => write!(f, "store backend: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Changes delivered by a watch: batches of events, each batch from one revision.
/// The channel closes if the store shuts down; an `Err` ends the watch.
pub type WatchReceiver = mpsc::Receiver<Result<Vec<Event>, StoreError>>;

pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> StoreFuture<'_, Option<KeyValue>>;

    /// Every key under `prefix` (sorted by key) and the revision they were read at.
    fn list(&self, prefix: &str) -> StoreFuture<'_, (Vec<KeyValue>, Revision)>;

    /// If every compare holds, applies every op atomically under one new revision.
    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> StoreFuture<'_, TxnOutcome>;

    /// Every change under `prefix` with a revision greater than `after`, then live changes.
    fn watch(&self, prefix: &str, after: Revision) -> StoreFuture<'_, WatchReceiver>;

    /// A lease that expires `ttl` after its last keep-alive.
    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId>;

    /// Renews a lease; `LeaseNotFound` if it already expired.
    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, ()>;

    /// Ends a lease now, deleting its keys.
    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()>;

    /// The current revision.
    fn revision(&self) -> StoreFuture<'_, Revision>;
}

/// Convenience wrappers over [`Store::txn`].
pub async fn put(store: &dyn Store, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
    let op = Op::Put {
        key: key.to_string(),
        value,
        lease,
    };
    Ok(store.txn(Vec::new(), vec![op]).await?.revision)
}

pub async fn delete(store: &dyn Store, key: &str) -> Result<Revision, StoreError> {
    Ok(store
        .txn(Vec::new(), vec![Op::Delete { key: key.to_string() }])
        .await?
        .revision)
}
