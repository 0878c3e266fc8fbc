//! The etcd store: the [`Store`] model on an etcd v3 cluster, for control planes that run as several replicas.
//!
//! The client is generated from `proto/etcd.proto` (the subset of etcd's gRPC API used here). Every smesh key
//! is stored as `prefix + key` (e.g. `/smesh` + `/mesh/resources/Service/a`); the prefix is added and stripped
//! here, the way etcd's own `namespace` client package does it. Revisions, create and mod revisions and lease
//! ids are etcd's own.
//!
//! Mapping of the model:
//! - `get` / `list` / `revision`: linearizable `Range` requests. `list` pages through the prefix
//!   [`LIST_PAGE`] keys at a time, every page pinned to the revision of the first, so the result is one
//!   consistent snapshot and its revision.
//! - `txn`: one etcd `Txn`. `Compare::ModRevision { equals }` is an etcd `MOD == equals` compare; etcd treats a
//!   missing key as having mod revision 0, so `equals: 0` means "must not exist", as in the embedded store.
//!   `Op::DeletePrefix` is a `DeleteRange` over `[prefix, prefix + 1)`. `TxnOutcome::revision` is the
//!   response header's revision.
//! - `watch`: one bidirectional `Watch` stream per call, created with `start_revision = after + 1` and
//!   `prev_kv`, so `Event::Delete` carries the deleted value. Each response is split into one batch per
//!   revision (etcd never splits a revision across responses when fragmenting is off, as here).
//! - leases: `LeaseGrant` (TTL rounded up to whole seconds, at least 1; etcd may raise it to its minimum
//!   TTL), `LeaseRevoke`, and `keep_alive` as one request/response on a short-lived `LeaseKeepAlive` stream
//!   (etcd's `KeepAliveOnce`). etcd answers TTL <= 0 for a lease it does not know: `LeaseNotFound`.
//!
//! Failover. There is one lazily connected gRPC channel per endpoint and a shared "preferred" endpoint.
//! A call goes to the preferred endpoint; when it fails without an answer from etcd (no connection,
//! a broken connection, no answer within [`REQUEST_TIMEOUT`], or etcd saying it has no leader), the
//! preferred endpoint moves on to the next one and the call is retried there, cycling through the endpoints
//! with a growing pause after each full round, for up to [`CALL_BUDGET`]. Errors etcd answers with (a failed
//! precondition, an unknown lease, a too-large request) are not retried. Whether a retry is safe depends on
//! the call:
//! - reads, unconditional transactions and lease calls are idempotent in effect, so they are retried after
//!   any of those failures. A repeated unconditional write may have been applied twice (two revisions, same
//!   final state); the revision reported is the one of the attempt that answered.
//! - conditional transactions (with compares) are retried only when the request provably never reached etcd
//!   (the connection could not be made) or etcd refused it before proposing it ("no leader", "proposal
//!   dropped", "too many requests"). After a request that got no answer they fail with
//!   `StoreError::Backend` saying the outcome is unknown: a retry could report a failed compare for a write
//!   that in fact succeeded. A write that got no answer is never reported as a success.
//!
//! Watches survive the loss of a member: when the stream breaks (or etcd cancels it, e.g. because the member
//! lost its leader: the stream is opened with etcd's `hasleader` metadata for that), the watch is re-created
//! on the next endpoint from the revision after the last one delivered. Events at or below that revision are
//! dropped if they come again, so there is no gap and no duplicate. If that revision has been compacted, the
//! watch ends with `Err(Compacted { oldest })`; after [`WATCH_GIVE_UP`] without any member accepting the
//! watch it ends with `Err(Backend)`.
//!
//! Differences from the embedded store:
//! - `watch` from a compacted revision returns a receiver whose first item is `Err(Compacted)` (etcd reports
//!   compaction on the stream after creating the watch) instead of failing the call itself. History goes
//!   back to etcd's last compaction, not to the last restart. A slow reader is not ended with `Compacted`:
//!   the stream is simply not read until there is room (etcd buffers, and may itself cancel the watch).
//! - A transaction may not touch the same key twice in etcd. Several `Put`/`Delete` ops on one key are
//!   reduced to the last one (same final state; one event instead of several; a `Delete` followed by a `Put`
//!   keeps the old create revision). A `Put` inside a `DeletePrefix` of the same transaction is refused by
//!   etcd ("duplicate key given in txn request", as `Backend`).
//! - Lease TTLs have a granularity of one second, and etcd enforces a minimum TTL (about 1.5 x its election
//!   timeout). Expiry is etcd's: a lease is deleted within about half a second after its deadline.
//! - A `Delete` event whose previous value etcd no longer has (compacted) carries an empty `prev` with
//!   revisions 0.
//! - Keys under the prefix that are not UTF-8 (written by something else) are skipped with a warning.
//!   The prefix is used verbatim: with prefix `/smesh`, a foreign key `/smeshy` is inside the prefix too.

#[allow(clippy::all, clippy::pedantic, dead_code, missing_docs)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use super::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, StoreFuture, TxnOutcome, WatchReceiver,
};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// How long to wait for a TCP connection to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one attempt of a call may take before it counts as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call keeps trying the endpoints before it fails.
const CALL_BUDGET: Duration = Duration::from_secs(15);
/// How long a broken watch keeps trying to resume before it ends with an error.
const WATCH_GIVE_UP: Duration = Duration::from_secs(60);
/// Pause after a full round of failed endpoints; doubles up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Keys per `Range` page in `list`.
const LIST_PAGE: i64 = 1000;
/// Largest response accepted (tonic's default of 4 MiB is too small for a big watch batch).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Batches a watch may have unread before it stops reading from etcd.
const WATCH_BUFFER: usize = 1024;
/// etcd's gRPC metadata asking a member to refuse (and cancel) streams while it has no leader.
const REQUIRE_LEADER: (&str, &str) = ("hasleader", "true");
/// Messages of errors etcd returns before proposing a request: it was not applied.
const REFUSED_BEFORE_PROPOSAL: &[&str] = &[
    "etcdserver: no leader",
    "raft proposal dropped",
    "etcdserver: too many requests",
    "etcdserver: not capable",
];

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How a failed attempt may be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request never reached etcd, or etcd refused it before proposing it: always safe to retry.
    NotSent,
    /// No answer (broken connection, timeout, etcd timed out): it may or may not have been applied.
    Unknown,
    /// etcd answered with an error: retrying would not help.
    Final,
}

/// Which failures a call retries on another endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, unconditional writes, lease calls: repeating them is harmless.
    Always,
    /// Conditional transactions: only when the request provably did not take effect.
    IfNotSent,
}

/// The status text with its chain of causes ("tcp connect error: Connection refused ...").
fn describe(status: &Status) -> String {
    let mut text = format!("{} ({:?})", status.message(), status.code());
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let _ = write!(text, ": {err}");
        source = err.source();
    }
    text
}

fn classify(status: &Status) -> Failure {
    let mut source = std::error::Error::source(status);
    // Statuses sent by etcd come from the response trailers and have no source; ours (transport) do.
    let local = source.is_some();
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return Failure::NotSent;
        }
        source = err.source();
    }
    if local {
        return Failure::Unknown;
    }
    let message = status.message();
    if REFUSED_BEFORE_PROPOSAL.iter().any(|m| message.contains(m)) {
        return Failure::NotSent;
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => Failure::Unknown,
        _ => Failure::Final,
    }
}

fn is_lease_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound && status.message().contains("lease not found")
}

/// Why a call failed.
enum Failed {
    /// etcd answered with an error.
    Rejected {
        /// "etcd URL: what: status", for error messages.
        context: String,
        status: Status,
        /// An earlier attempt of the same call got no answer (so it may have taken effect).
        after_unknown: bool,
    },
    Error(StoreError),
}

impl From<Failed> for StoreError {
    fn from(failed: Failed) -> Self {
        match failed {
            Failed::Rejected { context, .. } => StoreError::Backend(context),
            Failed::Error(e) => e,
        }
    }
}

struct Member {
    url: String,
    channel: Channel,
}

/// The endpoints and which one calls go to first.
struct Cluster {
    members: Vec<Member>,
    preferred: AtomicUsize,
}

impl Cluster {
    /// Moves the preferred endpoint past `from` (unless another call already did).
    fn rotate(&self, from: usize) {
        let next = (from + 1) % self.members.len();
        let _ = self
            .preferred
            .compare_exchange(from, next, Ordering::SeqCst, Ordering::SeqCst);
    }

    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, attempt: F) -> Result<T, Failed>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_at(what, retry, CALL_BUDGET, attempt)
            .await
            .map(|(value, _)| value)
    }

    /// Runs `attempt` against the preferred endpoint, failing over as the module documentation describes.
    /// Also returns the index of the endpoint that answered.
    async fn call_at<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        budget: Duration,
        mut attempt: F,
    ) -> Result<(T, usize), Failed>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0usize;
        // Failures since the last pause.
        let mut round = 0usize;
        let mut after_unknown = false;
        loop {
            let index = self.preferred.load(Ordering::SeqCst) % self.members.len();
            let member = &self.members[index];
            let (failure, error) = match tokio::time::timeout(REQUEST_TIMEOUT, attempt(member.channel.clone())).await {
                Ok(Ok(value)) => return Ok((value, index)),
                Ok(Err(status)) => {
                    let failure = classify(&status);
                    let context = format!("etcd {}: {what}: {}", member.url, describe(&status));
                    if failure == Failure::Final {
                        return Err(Failed::Rejected {
                            context,
                            status,
                            after_unknown,
                        });
                    }
                    (failure, context)
                }
                Err(_) => (
                    Failure::Unknown,
                    format!("etcd {}: {what}: no answer within {REQUEST_TIMEOUT:?}", member.url),
                ),
            };
            self.rotate(index);
            if failure == Failure::Unknown {
                if retry == Retry::IfNotSent {
                    return Err(Failed::Error(StoreError::Backend(format!(
                        "{error}; the request got no answer, so it may or may not have been applied"
                    ))));
                }
                after_unknown = true;
            }
            failures += 1;
            round += 1;
            if started.elapsed() >= budget {
                return Err(Failed::Error(StoreError::Backend(format!(
                    "{error} (gave up after {failures} attempts over {:.1?} on {} endpoint(s))",
                    started.elapsed(),
                    self.members.len()
                ))));
            }
            tracing::debug!(endpoint = %member.url, what, error = %error, "etcd call failed; trying the next endpoint");
            if round >= self.members.len() {
                round = 0;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Where smesh keys live in etcd.
#[derive(Clone)]
struct Namespace {
    prefix: Vec<u8>,
}

impl Namespace {
    fn key(&self, key: &str) -> Vec<u8> {
        let mut full = self.prefix.clone();
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// `(key, range_end)` covering every key under `prefix`.
    fn range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(prefix);
        let end = prefix_end(&start);
        if start.is_empty() {
            // etcd's spelling of "every key": key and range_end both "\0".
            (vec![0], end)
        } else {
            (start, end)
        }
    }

    /// The smesh key of an etcd key, if it is under the prefix and UTF-8.
    fn strip(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_slice())?;
        match std::str::from_utf8(rest) {
            Ok(key) => Some(key.to_string()),
            Err(_) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a non-UTF-8 etcd key under the smesh prefix");
                None
            }
        }
    }

    fn decode(&self, kv: pb::KeyValue) -> Option<KeyValue> {
        Some(KeyValue {
            key: self.strip(&kv.key)?,
            value: kv.value,
            create_revision: revision(kv.create_revision),
            mod_revision: revision(kv.mod_revision),
            lease: lease_from_etcd(kv.lease),
        })
    }

    fn event(&self, event: pb::Event) -> Option<Event> {
        let kind = event.r#type();
        let kv = event.kv?;
        match kind {
            pb::event::EventType::Put => self.decode(kv).map(Event::Put),
            pb::event::EventType::Delete => {
                let key = self.strip(&kv.key)?;
                let prev = event.prev_kv.and_then(|prev| self.decode(prev)).unwrap_or(KeyValue {
                    key: key.clone(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: 0,
                    lease: 0,
                });
                Some(Event::Delete {
                    key,
                    revision: revision(kv.mod_revision),
                    prev,
                })
            }
        }
    }
}

/// The smallest key greater than every key starting with `prefix` ("\0" when there is none: all keys).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd revisions are positive int64s.
fn revision(rev: i64) -> Revision {
    u64::try_from(rev).unwrap_or(0)
}

fn to_etcd_revision(rev: Revision) -> Result<i64> {
    i64::try_from(rev).map_err(|_| StoreError::Backend(format!("revision {rev} is out of etcd's range")))
}

/// Lease ids are int64 in etcd; the bits are kept as they are.
fn lease_from_etcd(id: i64) -> LeaseId {
    id as u64
}

fn lease_to_etcd(id: LeaseId) -> i64 {
    id as i64
}

fn header_revision(header: Option<&pb::ResponseHeader>, what: &str) -> Result<Revision> {
    header
        .map(|h| revision(h.revision))
        .ok_or_else(|| StoreError::Backend(format!("etcd: {what}: response without a header")))
}

fn kv_client(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn lease_client(channel: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A unary request with a deadline etcd can see too.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

/// A streaming request whose member must have a leader.
fn leader_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(REQUIRE_LEADER.0, MetadataValue::from_static(REQUIRE_LEADER.1));
    request
}

/// Ops reduced to at most one `Put`/`Delete` per key (the last), which etcd requires.
fn last_op_per_key(ops: &[Op]) -> Vec<&Op> {
    let mut seen = HashSet::new();
    let mut kept: Vec<&Op> = ops
        .iter()
        .rev()
        .filter(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => seen.insert(key.as_str()),
            Op::DeletePrefix { .. } => true,
        })
        .collect();
    kept.reverse();
    kept
}

/// The smesh store on an etcd v3 cluster. See the module documentation.
pub struct EtcdStore {
    cluster: Arc<Cluster>,
    namespace: Namespace,
    /// Dropped with the store, which ends the watch tasks (their receivers then close).
    shutdown: watch::Sender<()>,
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`; `host:port` means http) and keeps every
    /// key under `prefix`. Fails if no endpoint answers within the call budget.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Arc<EtcdStore>, StoreError> {
        let mut members = Vec::new();
        for url in endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let url = if url.contains("://") {
                url.to_string()
            } else {
                format!("http://{url}")
            };
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| StoreError::Backend(format!("invalid etcd endpoint {url:?}: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                // Notice a dead peer on an idle watch stream (etcd accepts pings every 5 s or slower).
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            members.push(Member {
                channel: endpoint.connect_lazy(),
                url,
            });
        }
        if members.is_empty() {
            return Err(StoreError::Backend("no etcd endpoint given".into()));
        }
        let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
        let (shutdown, _) = watch::channel(());
        let store = Arc::new(EtcdStore {
            cluster: Arc::new(Cluster {
                members,
                preferred: AtomicUsize::new(0),
            }),
            namespace: Namespace {
                prefix: prefix.as_bytes().to_vec(),
            },
            shutdown,
        });
        let revision = store
            .current_revision()
            .await
            .map_err(|e| StoreError::Backend(format!("cannot reach etcd at {}: {e}", urls.join(","))))?;
        tracing::info!(endpoints = %urls.join(","), prefix, revision, "etcd store connected");
        Ok(store)
    }

    /// Compacts etcd's history up to `revision` (maintenance, and tests of `Compacted`). Watches from before
    /// it then end with `Compacted`.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let message = pb::CompactionRequest {
            revision: to_etcd_revision(revision)?,
            physical: true,
        };
        self.cluster
            .call("compact", Retry::Always, |ch| async move {
                kv_client(ch).compact(request(message)).await.map(|_| ())
            })
            .await
            .map_err(StoreError::from)
    }

    async fn range(&self, message: pb::RangeRequest) -> Result<pb::RangeResponse> {
        self.cluster
            .call("range", Retry::Always, |ch| {
                let message = message.clone();
                async move {
                    kv_client(ch)
                        .range(request(message))
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
            .map_err(StoreError::from)
    }

    async fn current_revision(&self) -> Result<Revision> {
        let (key, _) = self.namespace.range("");
        let response = self
            .range(pb::RangeRequest {
                key,
                count_only: true,
                ..Default::default()
            })
            .await?;
        header_revision(response.header.as_ref(), "range")
    }

    async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let (mut key, range_end) = self.namespace.range(prefix);
        let mut at = 0i64;
        let mut out = Vec::new();
        loop {
            let response = self
                .range(pb::RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    limit: LIST_PAGE,
                    revision: at,
                    sort_order: pb::range_request::SortOrder::Ascend as i32,
                    sort_target: pb::range_request::SortTarget::Key as i32,
                    ..Default::default()
                })
                .await?;
            if at == 0 {
                at = response.header.as_ref().map_or(0, |h| h.revision);
                if at <= 0 {
                    return Err(StoreError::Backend("etcd: range: response without a revision".into()));
                }
            }
            let more = response.more;
            let Some(last) = response.kvs.last().map(|kv| kv.key.clone()) else {
                break;
            };
            out.extend(response.kvs.into_iter().filter_map(|kv| self.namespace.decode(kv)));
            if !more {
                break;
            }
            key = last;
            key.push(0);
        }
        Ok((out, revision(at)))
    }

    fn txn_request(&self, compares: &[Compare], ops: &[Op]) -> Result<pb::TxnRequest> {
        let mut compare = Vec::with_capacity(compares.len());
        for c in compares {
            let Compare::ModRevision { key, equals } = c;
            compare.push(pb::Compare {
                result: pb::compare::CompareResult::Equal as i32,
                target: pb::compare::CompareTarget::Mod as i32,
                key: self.namespace.key(key),
                target_union: Some(pb::compare::TargetUnion::ModRevision(to_etcd_revision(*equals)?)),
                range_end: Vec::new(),
            });
        }
        let success = last_op_per_key(ops)
            .into_iter()
            .map(|op| {
                let request = match op {
                    Op::Put { key, value, lease } => pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: self.namespace.key(key),
                        value: value.clone(),
                        lease: lease_to_etcd(*lease),
                        prev_kv: false,
                    }),
                    Op::Delete { key } => pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: self.namespace.key(key),
                        ..Default::default()
                    }),
                    Op::DeletePrefix { prefix } => {
                        let (key, range_end) = self.namespace.range(prefix);
                        pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                            key,
                            range_end,
                            prev_kv: false,
                        })
                    }
                };
                pb::RequestOp { request: Some(request) }
            })
            .collect();
        Ok(pb::TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        })
    }

    async fn run_txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome> {
        let message = self.txn_request(&compares, &ops)?;
        let retry = if compares.is_empty() {
            Retry::Always
        } else {
            Retry::IfNotSent
        };
        let result = self
            .cluster
            .call("txn", retry, |ch| {
                let message = message.clone();
                async move {
                    kv_client(ch)
                        .txn(request(message))
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await;
        match result {
            Ok(response) => Ok(TxnOutcome {
                succeeded: response.succeeded,
                revision: header_revision(response.header.as_ref(), "txn")?,
            }),
            Err(Failed::Rejected { status, .. }) if is_lease_not_found(&status) => {
                let lease = ops
                    .iter()
                    .find_map(|op| match op {
                        Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                        _ => None,
                    })
                    .unwrap_or(0);
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(failed) => Err(failed.into()),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        // Whole seconds, rounded up: a lease never expires before the TTL asked for.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let message = pb::LeaseGrantRequest {
            ttl: i64::try_from(secs.max(1)).unwrap_or(i64::MAX),
            id: 0,
        };
        let response = self
            .cluster
            .call("lease grant", Retry::Always, |ch| async move {
                lease_client(ch)
                    .lease_grant(request(message))
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        if !response.error.is_empty() {
            return Err(StoreError::Backend(format!("etcd: lease grant: {}", response.error)));
        }
        if response.id == 0 {
            return Err(StoreError::Backend(
                "etcd: lease grant: no lease id in the answer".into(),
            ));
        }
        Ok(lease_from_etcd(response.id))
    }

    async fn keep_lease_alive(&self, lease: LeaseId) -> Result<()> {
        let id = lease_to_etcd(lease);
        let result = self
            .cluster
            .call("lease keep-alive", Retry::Always, |ch| async move {
                let (tx, rx) = mpsc::channel(1);
                tx.try_send(pb::LeaseKeepAliveRequest { id })
                    .map_err(|_| Status::internal("cannot queue the keep-alive request"))?;
                let mut responses = lease_client(ch)
                    .lease_keep_alive(leader_request(ReceiverStream::new(rx)))
                    .await?
                    .into_inner();
                let response = responses
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("keep-alive stream closed without an answer"))?;
                drop(tx);
                Ok(response)
            })
            .await;
        match result {
            Ok(response) if response.ttl > 0 => Ok(()),
            Ok(_) => Err(StoreError::LeaseNotFound(lease)),
            Err(Failed::Rejected { status, .. }) if is_lease_not_found(&status) => {
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(failed) => Err(failed.into()),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let message = pb::LeaseRevokeRequest {
            id: lease_to_etcd(lease),
        };
        let result = self
            .cluster
            .call("lease revoke", Retry::Always, |ch| async move {
                lease_client(ch).lease_revoke(request(message)).await.map(|_| ())
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            // An earlier attempt without an answer may have revoked it: either way it is gone.
            Err(Failed::Rejected {
                status, after_unknown, ..
            }) if is_lease_not_found(&status) => {
                if after_unknown {
                    Ok(())
                } else {
                    Err(StoreError::LeaseNotFound(lease))
                }
            }
            Err(failed) => Err(failed.into()),
        }
    }

    async fn start_watch(&self, prefix: &str, after: Revision) -> Result<WatchReceiver> {
        let start = to_etcd_revision(after)?
            .checked_add(1)
            .ok_or_else(|| StoreError::Backend(format!("watch revision {after} is out of etcd's range")))?;
        let (key, range_end) = self.namespace.range(prefix);
        let watcher = Watcher {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            key,
            range_end,
            next: start,
        };
        let stream = watcher.open(CALL_BUDGET).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let shutdown = self.shutdown.subscribe();
        tokio::spawn(async move { watcher.run(stream, tx, shutdown).await });
        Ok(rx)
    }
}

/// An open etcd watch stream. `_requests` keeps the request side open: closing it would end the stream.
struct WatchStream {
    _requests: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
    member: usize,
}

/// One `Store::watch`: follows the etcd watch, re-creating it on another member when it breaks.
struct Watcher {
    cluster: Arc<Cluster>,
    namespace: Namespace,
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The first revision not delivered yet.
    next: i64,
}

type WatchSender = mpsc::Sender<Result<Vec<Event>, StoreError>>;

enum Flow {
    Continue,
    Stop,
    Reconnect(String),
}

impl Watcher {
    /// Creates the etcd watch from `self.next` on the first member that accepts it.
    async fn open(&self, budget: Duration) -> Result<WatchStream> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: self.key.clone(),
                range_end: self.range_end.clone(),
                start_revision: self.next,
                prev_kv: true,
                ..Default::default()
            })),
        };
        let result = self
            .cluster
            .call_at("watch", Retry::Always, budget, |ch| {
                let create = create.clone();
                async move {
                    let (tx, rx) = mpsc::channel(1);
                    tx.try_send(create)
                        .map_err(|_| Status::internal("cannot queue the watch request"))?;
                    let mut responses = WatchClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .watch(leader_request(ReceiverStream::new(rx)))
                        .await?
                        .into_inner();
                    // The first answer says whether the watch was created.
                    match responses.message().await? {
                        Some(r) if r.created && !r.canceled => Ok((tx, responses)),
                        Some(r) if r.canceled && r.cancel_reason.contains("no leader") => {
                            Err(Status::unavailable(format!("watch refused: {}", r.cancel_reason)))
                        }
                        Some(r) => Err(Status::invalid_argument(format!(
                            "watch not created: {}",
                            if r.cancel_reason.is_empty() {
                                "unexpected first answer"
                            } else {
                                r.cancel_reason.as_str()
                            }
                        ))),
                        None => Err(Status::unavailable("watch stream closed before the watch was created")),
                    }
                }
            })
            .await;
        match result {
            Ok(((requests, responses), member)) => Ok(WatchStream {
                _requests: requests,
                responses,
                member,
            }),
            Err(failed) => Err(failed.into()),
        }
    }

    async fn run(mut self, mut stream: WatchStream, tx: WatchSender, mut shutdown: watch::Receiver<()>) {
        loop {
            let message = tokio::select! {
                message = stream.responses.message() => message,
                _ = tx.closed() => return,
                _ = shutdown.changed() => return,
            };
            let reason = match message {
                Ok(Some(response)) => match self.handle(response, &tx).await {
                    Flow::Continue => continue,
                    Flow::Stop => return,
                    Flow::Reconnect(reason) => reason,
                },
                Ok(None) => "the stream ended".to_string(),
                Err(status) => describe(&status),
            };
            let url = &self.cluster.members[stream.member].url;
            tracing::warn!(endpoint = %url, revision = self.next, reason = %reason, "etcd watch interrupted; resuming it");
            self.cluster.rotate(stream.member);
            let reopened = tokio::select! {
                reopened = self.open(WATCH_GIVE_UP) => reopened,
                _ = tx.closed() => return,
                _ = shutdown.changed() => return,
            };
            match reopened {
                Ok(reopened) => {
                    let url = &self.cluster.members[reopened.member].url;
                    tracing::info!(endpoint = %url, revision = self.next, "etcd watch resumed");
                    stream = reopened;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// Delivers one response's events, one batch per revision, skipping revisions already delivered.
    async fn handle(&mut self, response: pb::WatchResponse, tx: &WatchSender) -> Flow {
        if response.compact_revision > 0 {
            let oldest = revision(response.compact_revision);
            let _ = tx.send(Err(StoreError::Compacted { oldest })).await;
            return Flow::Stop;
        }
        if response.canceled {
            return Flow::Reconnect(format!("etcd canceled the watch: {}", response.cancel_reason));
        }
        let mut batch = Vec::new();
        let mut batch_revision = 0i64;
        for event in response.events {
            let rev = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if rev < self.next {
                continue;
            }
            if rev != batch_revision {
                if !self.flush(&mut batch, batch_revision, tx).await {
                    return Flow::Stop;
                }
                batch_revision = rev;
            }
            if let Some(event) = self.namespace.event(event) {
                batch.push(event);
            }
        }
        if !self.flush(&mut batch, batch_revision, tx).await {
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// Sends the batch of `rev` (if any) and moves past it; false if the receiver is gone.
    async fn flush(&mut self, batch: &mut Vec<Event>, rev: i64, tx: &WatchSender) -> bool {
        if rev <= 0 {
            return true;
        }
        self.next = self.next.max(rev + 1);
        if batch.is_empty() {
            return true;
        }
        tx.send(Ok(std::mem::take(batch))).await.is_ok()
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> StoreFuture<'_, Option<KeyValue>> {
        let key = self.namespace.key(key);
        Box::pin(async move {
            let response = self
                .range(pb::RangeRequest {
                    key,
                    ..Default::default()
                })
                .await?;
            Ok(response.kvs.into_iter().find_map(|kv| self.namespace.decode(kv)))
        })
    }

    fn list(&self, prefix: &str) -> StoreFuture<'_, (Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        Box::pin(async move { self.list_prefix(&prefix).await })
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> StoreFuture<'_, TxnOutcome> {
        Box::pin(self.run_txn(compares, ops))
    }

    fn watch(&self, prefix: &str, after: Revision) -> StoreFuture<'_, WatchReceiver> {
        let prefix = prefix.to_string();
        Box::pin(async move { self.start_watch(&prefix, after).await })
    }

    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        Box::pin(self.grant(ttl))
    }

    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(self.keep_lease_alive(lease))
    }

    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(self.revoke(lease))
    }

    fn revision(&self) -> StoreFuture<'_, Revision> {
        Box::pin(self.current_revision())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/smesh/a"), b"/smesh/b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
        let ns = Namespace {
            prefix: b"/smesh".to_vec(),
        };
        assert_eq!(ns.range("/mesh/"), (b"/smesh/mesh/".to_vec(), b"/smesh/mesh0".to_vec()));
        assert_eq!(ns.strip(b"/smesh/mesh/x").as_deref(), Some("/mesh/x"));
        assert_eq!(ns.strip(b"/other"), None);
        let empty = Namespace { prefix: Vec::new() };
        assert_eq!(empty.range(""), (vec![0], vec![0]));
    }

    #[test]
    fn duplicate_keys_keep_the_last_op() {
        let put = |k: &str, v: &str| Op::Put {
            key: k.into(),
            value: v.into(),
            lease: 0,
        };
        let ops = vec![
            put("/a", "1"),
            put("/b", "1"),
            Op::Delete { key: "/a".into() },
            Op::DeletePrefix { prefix: "/p/".into() },
            put("/a", "2"),
        ];
        let kept = last_op_per_key(&ops);
        assert_eq!(kept, vec![&ops[1], &ops[3], &ops[4]]);
    }

    #[test]
    fn transport_failures_are_classified() {
        assert_eq!(
            classify(&Status::unavailable("etcdserver: no leader")),
            Failure::NotSent
        );
        assert_eq!(classify(&Status::unknown("raft proposal dropped")), Failure::NotSent);
        assert_eq!(
            classify(&Status::unavailable("etcdserver: request timed out")),
            Failure::Unknown
        );
        assert_eq!(
            classify(&Status::invalid_argument(
                "etcdserver: duplicate key given in txn request"
            )),
            Failure::Final
        );
        assert_eq!(
            classify(&Status::not_found("etcdserver: requested lease not found")),
            Failure::Final
        );
    }
}
