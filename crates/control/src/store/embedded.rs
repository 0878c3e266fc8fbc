//! The embedded store: one redb file, one writer thread, in-memory watch history.
//!
//! Layout of the file (all tables are created by [`EmbeddedStore::open`]):
//! - `kv`: key -> record (`[version u8][create_revision u64][mod_revision u64][lease u64][value]`, little endian).
//! - `meta`: `"revision"` -> the store revision, `"format"` -> the file format version.
//! - `leases`: lease id -> ttl in milliseconds. Deadlines are not persisted: on open every lease gets a fresh
//!   deadline of now + ttl (as etcd does after a leader change), so a restart never expires leases early.
//! - `lease_keys`: (lease id, key) -> (), the index used to delete a lease's keys without a full scan.
//!
//! Writes (transactions, lease grants and revocations, expiries) all go through one writer thread. It takes
//! every queued command (group commit: up to `MAX_BATCH`), applies them in order inside one redb write
//! transaction, each command that changes keys getting its own revision, commits with
//! `Durability::Immediate`, and only then publishes the events and answers the callers. So an acknowledged
//! write is on disk, and the fsync cost is shared by concurrent writers. If a batch fails it is retried one
//! command at a time, so one bad command (e.g. a value too large for redb) does not fail its neighbours.
//!
//! Watches: the writer publishes each revision's events to the `Hub` under its mutex, in revision order,
//! appending them to a bounded history and handing them to the live watchers in the same critical section.
//! `watch` takes the same mutex to replay the history and register the watcher, so every revision is seen
//! exactly once: either it was published before the registration (then it is in the replay) or after (then it
//! is delivered live). Each watcher's channel is sized to hold its whole replay plus a live buffer; a watcher
//! that lets its live buffer fill up is ended with `Err(Compacted)` (one slot is always kept free for that
//! error) and dropped, so a slow reader never blocks the writer.
//!
//! Lease expiry also runs on the writer thread: it sleeps on its command queue until the earliest lease
//! deadline, then deletes the keys of every lease that is due under one new revision. `keep_alive` only moves
//! the in-memory deadline (no disk write): the writer may wake up early, sees the later deadline and sleeps
//! again.

use super::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, StoreFuture, TxnOutcome, WatchReceiver,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::path::Path;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<(u64, &str), ()> = TableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;

const RECORD_VERSION: u8 = 1;
const RECORD_HEADER: usize = 1 + 3 * 8;

/// Most commands applied in one redb write transaction (one fsync).
const MAX_BATCH: usize = 256;
/// When deleting an expired lease's keys fails (disk error), retry after this long rather than spin.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// Sizes of the in-memory watch machinery.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Revisions whose events are kept for watches that start in the past.
    history_revisions: usize,
    /// Cap on the events kept in total (one revision can hold many, e.g. a large DeletePrefix).
    history_events: usize,
    /// Live batches a watcher may have unread before it is ended with `Compacted`.
    watch_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            history_revisions: 10_000,
            history_events: 200_000,
            watch_buffer: 1024,
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Builds an error mapper that says which step failed.
fn backend<E: Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

fn writer_stopped() -> StoreError {
    StoreError::Backend("store writer thread is not running".to_string())
}

/// A poisoned mutex only means another thread panicked while holding it; the data it guards (watchers, lease
/// deadlines) is still usable, so carry on rather than cascade the panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `now + ttl`, without the panic `Instant + Duration` has on overflow (for absurd TTLs).
fn deadline_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

fn encode_record(create_revision: Revision, mod_revision: Revision, lease: LeaseId, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + value.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(&lease.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    if bytes.len() < RECORD_HEADER || bytes[0] != RECORD_VERSION {
        return Err(StoreError::Backend(format!(
            "corrupt record for key {key:?}: {} bytes, version byte {:?}",
            bytes.len(),
            bytes.first()
        )));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[1 + 8 * i..9 + 8 * i]);
        u64::from_le_bytes(w)
    };
    Ok(KeyValue {
        key: key.to_string(),
        value: bytes[RECORD_HEADER..].to_vec(),
        create_revision: word(0),
        mod_revision: word(1),
        lease: word(2),
    })
}

fn read_key(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<KeyValue>> {
    match table.get(key).map_err(backend("read key"))? {
        Some(guard) => Ok(Some(decode_record(key, guard.value())?)),
        None => Ok(None),
    }
}

/// Every key under `prefix`, in key order.
fn scan_prefix(table: &impl ReadableTable<&'static str, &'static [u8]>, prefix: &str) -> Result<Vec<KeyValue>> {
    let mut out = Vec::new();
    for entry in table.range(prefix..).map_err(backend("scan keys"))? {
        let (key, value) = entry.map_err(backend("scan keys"))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        out.push(decode_record(key, value.value())?);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

/// State shared by the async front end and the writer thread.
struct Shared {
    hub: Mutex<Hub>,
    /// Live leases. The writer is the only one adding or removing entries (mirroring the `leases` table);
    /// `keep_alive` only moves deadlines.
    leases: Mutex<HashMap<LeaseId, Lease>>,
}

struct Watcher {
    prefix: String,
    /// Only revisions above this are delivered (it can be in the future).
    after: Revision,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

impl Watcher {
    /// Hands one revision's events to the watcher; false when it has to go (closed, or too slow).
    fn deliver(&self, revision: Revision, events: &[Event], oldest: Revision) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if revision <= self.after {
            return true;
        }
        let batch: Vec<Event> = events
            .iter()
            .filter(|e| e.key().starts_with(&self.prefix))
            .cloned()
            .collect();
        if batch.is_empty() {
            return true;
        }
        // We are the only sender and hold the hub lock, so the capacity can only grow between this check and
        // the send. Keeping the last slot for the error means the reader always learns why the watch ended.
        if self.tx.capacity() > 1 {
            return self.tx.try_send(Ok(batch)).is_ok();
        }
        tracing::warn!(prefix = %self.prefix, revision, "store watcher too slow, ending it with Compacted");
        let _ = self.tx.try_send(Err(StoreError::Compacted { oldest }));
        false
    }
}

/// Watch history and live watchers. Everything here changes under one mutex; that is what makes
/// "replay, then live" gap-free.
struct Hub {
    /// Last published revision.
    revision: Revision,
    /// The history holds every event with a revision above this.
    floor: Revision,
    history: VecDeque<(Revision, Vec<Event>)>,
    history_events: usize,
    watchers: Vec<Watcher>,
    limits: Limits,
}

impl Hub {
    fn new(revision: Revision, limits: Limits) -> Self {
        // Nothing of the history survives a restart: it starts empty at the current revision.
        Hub {
            revision,
            floor: revision,
            history: VecDeque::new(),
            history_events: 0,
            watchers: Vec::new(),
            limits,
        }
    }

    fn oldest(&self) -> Revision {
        self.floor + 1
    }

    /// Records one revision's events and hands them to the live watchers. Called by the writer, in revision
    /// order, after the revision is durably committed.
    fn publish(&mut self, events: Vec<Event>) {
        let Some(revision) = events.first().map(Event::revision) else {
            return;
        };
        self.revision = revision;
        self.history_events += events.len();
        self.history.push_back((revision, events));
        while self.history.len() > self.limits.history_revisions.max(1)
            || (self.history_events > self.limits.history_events && self.history.len() > 1)
        {
            let Some((evicted, events)) = self.history.pop_front() else {
                break;
            };
            self.floor = evicted;
            self.history_events -= events.len();
        }
        let oldest = self.oldest();
        let Hub { history, watchers, .. } = self;
        if let Some((_, events)) = history.back() {
            watchers.retain(|w| w.deliver(revision, events, oldest));
        }
    }

    fn watch(&mut self, prefix: &str, after: Revision) -> Result<WatchReceiver> {
        if after < self.floor {
            return Err(StoreError::Compacted { oldest: self.oldest() });
        }
        let start = self.history.partition_point(|(rev, _)| *rev <= after);
        let replay: Vec<Vec<Event>> = self
            .history
            .range(start..)
            .map(|(_, events)| {
                events
                    .iter()
                    .filter(|e| e.key().starts_with(prefix))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .filter(|batch| !batch.is_empty())
            .collect();
        // Room for the whole replay, so it never counts against the live buffer.
        let (tx, rx) = mpsc::channel(replay.len() + self.limits.watch_buffer.max(2));
        for batch in replay {
            tx.try_send(Ok(batch))
                .map_err(|_| StoreError::Backend("watch replay overflowed its channel".into()))?;
        }
        self.watchers.push(Watcher {
            prefix: prefix.to_string(),
            after: after.max(self.revision),
            tx,
        });
        Ok(rx)
    }
}

/// What the writer is asked to do.
enum Request {
    Txn {
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    Grant {
        ttl: Duration,
    },
    Revoke {
        lease: LeaseId,
    },
    /// Internal: delete the keys of these leases if they are (still) past their deadline.
    Expire {
        leases: Vec<LeaseId>,
    },
}

#[derive(Debug)]
enum Answer {
    Txn(TxnOutcome),
    Lease(LeaseId),
    Done,
}

type Reply = oneshot::Sender<Result<Answer>>;

struct Cmd {
    request: Request,
    reply: Option<Reply>,
}

/// The result of one command inside a batch, held back until the batch is committed.
struct Applied {
    /// All from one new revision; empty if the command changed no key.
    events: Vec<Event>,
    answer: Result<Answer>,
}

impl Applied {
    fn answer(answer: Result<Answer>) -> Self {
        Applied {
            events: Vec::new(),
            answer,
        }
    }
}

/// How to put the lease map back if a batch does not commit.
enum Undo {
    Granted(LeaseId),
    Removed(LeaseId, Lease),
}

/// One redb write transaction's worth of commands.
struct Batch<'t, 's> {
    kv: Table<'t, &'static str, &'static [u8]>,
    leases_table: Table<'t, u64, u64>,
    lease_keys: Table<'t, (u64, &'static str), ()>,
    /// The revision after the commands applied so far.
    revision: Revision,
    /// Whether anything was written (else the transaction is aborted: no fsync for a failed compare).
    dirty: bool,
    leases: &'s Mutex<HashMap<LeaseId, Lease>>,
    undo: &'s mut Vec<Undo>,
}

impl Batch<'_, '_> {
    fn apply(&mut self, request: &Request) -> Result<Applied> {
        match request {
            Request::Txn { compares, ops } => self.txn(compares, ops),
            Request::Grant { ttl } => self.grant(*ttl),
            Request::Revoke { lease } => self.revoke(*lease),
            Request::Expire { leases } => self.expire(leases),
        }
    }

    fn txn(&mut self, compares: &[Compare], ops: &[Op]) -> Result<Applied> {
        for compare in compares {
            let Compare::ModRevision { key, equals } = compare;
            // A missing key has mod revision 0, which is how `equals: 0` means "must not exist".
            let current = read_key(&self.kv, key)?.map_or(0, |kv| kv.mod_revision);
            if current != *equals {
                let outcome = TxnOutcome {
                    succeeded: false,
                    revision: self.revision,
                };
                return Ok(Applied::answer(Ok(Answer::Txn(outcome))));
            }
        }
        // Check every lease before writing anything, so a bad lease leaves no partial transaction behind.
        let now = Instant::now();
        for op in ops {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && !self.lease_alive(*lease, now) {
                    return Ok(Applied::answer(Err(StoreError::LeaseNotFound(*lease))));
                }
            }
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => events.push(self.put(key, value, *lease, revision)?),
                Op::Delete { key } => events.extend(self.delete(key, revision)?),
                Op::DeletePrefix { prefix } => {
                    for kv in scan_prefix(&self.kv, prefix)? {
                        events.extend(self.delete(&kv.key, revision)?);
                    }
                }
            }
        }
        if !events.is_empty() {
            self.revision = revision;
            self.dirty = true;
        }
        let outcome = TxnOutcome {
            succeeded: true,
            revision: self.revision,
        };
        Ok(Applied {
            events,
            answer: Ok(Answer::Txn(outcome)),
        })
    }

    /// A lease past its deadline counts as gone even before the writer has deleted its keys.
    fn lease_alive(&self, id: LeaseId, now: Instant) -> bool {
        lock(self.leases).get(&id).is_some_and(|l| l.deadline > now)
    }

    fn put(&mut self, key: &str, value: &[u8], lease: LeaseId, revision: Revision) -> Result<Event> {
        let old = read_key(&self.kv, key)?;
        let create_revision = old.as_ref().map_or(revision, |kv| kv.create_revision);
        if let Some(old) = &old {
            if old.lease != 0 && old.lease != lease {
                self.lease_keys
                    .remove((old.lease, key))
                    .map_err(backend("update lease index"))?;
            }
        }
        if lease != 0 {
            self.lease_keys
                .insert((lease, key), ())
                .map_err(backend("update lease index"))?;
        }
        let record = encode_record(create_revision, revision, lease, value);
        self.kv.insert(key, record.as_slice()).map_err(backend("write key"))?;
        Ok(Event::Put(KeyValue {
            key: key.to_string(),
            value: value.to_vec(),
            create_revision,
            mod_revision: revision,
            lease,
        }))
    }

    fn delete(&mut self, key: &str, revision: Revision) -> Result<Option<Event>> {
        let prev = match self.kv.remove(key).map_err(backend("delete key"))? {
            Some(guard) => decode_record(key, guard.value())?,
            None => return Ok(None),
        };
        if prev.lease != 0 {
            self.lease_keys
                .remove((prev.lease, key))
                .map_err(backend("update lease index"))?;
        }
        Ok(Some(Event::Delete {
            key: key.to_string(),
            revision,
            prev,
        }))
    }

    fn grant(&mut self, ttl: Duration) -> Result<Applied> {
        let id = {
            let mut leases = lock(self.leases);
            // 63 bits, so the ids also fit etcd's signed lease ids.
            let id = loop {
                let id = rand::random::<u64>() & (i64::MAX as u64);
                if id != 0 && !leases.contains_key(&id) {
                    break id;
                }
            };
            leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: deadline_after(ttl),
                },
            );
            id
        };
        self.undo.push(Undo::Granted(id));
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.leases_table.insert(id, ttl_ms).map_err(backend("write lease"))?;
        self.dirty = true;
        Ok(Applied::answer(Ok(Answer::Lease(id))))
    }

    fn revoke(&mut self, id: LeaseId) -> Result<Applied> {
        let Some(lease) = lock(self.leases).remove(&id) else {
            return Ok(Applied::answer(Err(StoreError::LeaseNotFound(id))));
        };
        self.undo.push(Undo::Removed(id, lease));
        let events = self.drop_leases(&[id])?;
        Ok(Applied {
            events,
            answer: Ok(Answer::Done),
        })
    }

    fn expire(&mut self, ids: &[LeaseId]) -> Result<Applied> {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut leases = lock(self.leases);
            for id in ids {
                // A keep-alive may have come in since the writer picked this lease.
                if leases.get(id).is_some_and(|l| l.deadline <= now) {
                    if let Some(lease) = leases.remove(id) {
                        // If the batch fails, the lease comes back with a retry delay instead of its past deadline.
                        let retry = Lease {
                            deadline: deadline_after(EXPIRY_RETRY),
                            ..lease
                        };
                        self.undo.push(Undo::Removed(*id, retry));
                        expired.push(*id);
                    }
                }
            }
        }
        if !expired.is_empty() {
            tracing::debug!(leases = ?expired, "store leases expired");
        }
        let events = self.drop_leases(&expired)?;
        Ok(Applied {
            events,
            answer: Ok(Answer::Done),
        })
    }

    /// Removes leases from the file and deletes their keys, all under one new revision.
    fn drop_leases(&mut self, ids: &[LeaseId]) -> Result<Vec<Event>> {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for &id in ids {
            self.leases_table.remove(id).map_err(backend("delete lease"))?;
            self.dirty = true;
            let mut keys = Vec::new();
            for entry in self.lease_keys.range((id, "")..).map_err(backend("scan lease index"))? {
                let (entry, _) = entry.map_err(backend("scan lease index"))?;
                let (lease, key) = entry.value();
                if lease != id {
                    break;
                }
                keys.push(key.to_string());
            }
            for key in keys {
                match read_key(&self.kv, &key)? {
                    // `delete` also removes the index entry.
                    Some(kv) if kv.lease == id => events.extend(self.delete(&key, revision)?),
                    // A stale index entry (the key moved to another lease or is gone): just drop it.
                    _ => {
                        self.lease_keys
                            .remove((id, key.as_str()))
                            .map_err(backend("update lease index"))?;
                    }
                }
            }
        }
        if !events.is_empty() {
            self.revision = revision;
        }
        Ok(events)
    }
}

/// The single writer. Owns the revision counter; runs on its own thread.
struct Writer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    /// Last committed revision.
    revision: Revision,
    commands: std_mpsc::Receiver<Cmd>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let next_deadline = lock(&self.shared.leases).values().map(|l| l.deadline).min();
            let first = match next_deadline {
                Some(deadline) => match self
                    .commands
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(cmd) => Some(cmd),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.commands.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => break,
                },
            };
            let mut batch = Vec::new();
            let now = Instant::now();
            let due: Vec<LeaseId> = lock(&self.shared.leases)
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            if !due.is_empty() {
                batch.push(Cmd {
                    request: Request::Expire { leases: due },
                    reply: None,
                });
            }
            if let Some(cmd) = first {
                batch.push(cmd);
                while batch.len() < MAX_BATCH {
                    match self.commands.try_recv() {
                        Ok(cmd) => batch.push(cmd),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.execute(batch);
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn execute(&mut self, batch: Vec<Cmd>) {
        let requests: Vec<&Request> = batch.iter().map(|c| &c.request).collect();
        match self.commit(&requests) {
            Ok(applied) => self.publish(batch, applied),
            Err(e) if batch.len() > 1 => {
                tracing::warn!(error = %e, commands = batch.len(), "store batch failed, retrying one by one");
                for cmd in batch {
                    self.execute(vec![cmd]);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store write failed");
                for cmd in batch {
                    if let Some(reply) = cmd.reply {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Applies the requests in one write transaction and commits it; on error nothing is written and the
    /// lease map is restored.
    fn commit(&mut self, requests: &[&Request]) -> Result<Vec<Applied>> {
        let mut undo = Vec::new();
        let result = self.try_commit(requests, &mut undo);
        if result.is_err() {
            let mut leases = lock(&self.shared.leases);
            for step in undo.into_iter().rev() {
                match step {
                    Undo::Granted(id) => {
                        leases.remove(&id);
                    }
                    Undo::Removed(id, lease) => {
                        leases.insert(id, lease);
                    }
                }
            }
        }
        result
    }

    fn try_commit(&mut self, requests: &[&Request], undo: &mut Vec<Undo>) -> Result<Vec<Applied>> {
        let mut wtx = self.db.begin_write().map_err(backend("begin write transaction"))?;
        wtx.set_durability(Durability::Immediate)
            .map_err(backend("set durability"))?;
        let (applied, revision, dirty) = self.apply_all(&wtx, requests, undo)?;
        if dirty {
            wtx.commit().map_err(backend("commit"))?;
        } else {
            wtx.abort().map_err(backend("abort"))?;
        }
        self.revision = revision;
        Ok(applied)
    }

    /// Separate from `try_commit` so the tables (which borrow the transaction) are closed before the commit.
    fn apply_all(
        &self,
        wtx: &WriteTransaction,
        requests: &[&Request],
        undo: &mut Vec<Undo>,
    ) -> Result<(Vec<Applied>, Revision, bool)> {
        let mut batch = Batch {
            kv: wtx.open_table(KV).map_err(backend("open kv table"))?,
            leases_table: wtx.open_table(LEASES).map_err(backend("open leases table"))?,
            lease_keys: wtx.open_table(LEASE_KEYS).map_err(backend("open lease index"))?,
            revision: self.revision,
            dirty: false,
            leases: &self.shared.leases,
            undo,
        };
        let mut applied = Vec::with_capacity(requests.len());
        for request in requests {
            applied.push(batch.apply(request)?);
        }
        if batch.revision != self.revision {
            let mut meta = wtx.open_table(META).map_err(backend("open meta table"))?;
            meta.insert(META_REVISION, batch.revision)
                .map_err(backend("write revision"))?;
        }
        Ok((applied, batch.revision, batch.dirty))
    }

    /// After the commit: events first (so a caller that watches right after its write was acknowledged sees
    /// it), then the answers.
    fn publish(&self, batch: Vec<Cmd>, applied: Vec<Applied>) {
        let answers: Vec<Result<Answer>> = {
            let mut hub = lock(&self.shared.hub);
            applied
                .into_iter()
                .map(|a| {
                    hub.publish(a.events);
                    a.answer
                })
                .collect()
        };
        for (cmd, answer) in batch.into_iter().zip(answers) {
            if let Some(reply) = cmd.reply {
                // The caller may have given up waiting; the write stands either way (as with etcd).
                let _ = reply.send(answer);
            }
        }
    }
}

/// Creates the tables if needed, checks the format and loads the revision and the leases.
fn initialize(db: &Database) -> Result<(Revision, HashMap<LeaseId, Lease>)> {
    let wtx = db.begin_write().map_err(backend("begin write transaction"))?;
    let (revision, leases) = {
        wtx.open_table(KV).map_err(backend("open kv table"))?;
        wtx.open_table(LEASE_KEYS).map_err(backend("open lease index"))?;
        let mut meta = wtx.open_table(META).map_err(backend("open meta table"))?;
        let format = meta
            .get(META_FORMAT)
            .map_err(backend("read format"))?
            .map(|g| g.value());
        match format {
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .map_err(backend("write format"))?;
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Backend(format!(
                    "store file has format {other}, this build reads format {FORMAT_VERSION}"
                )));
            }
        }
        let revision = meta
            .get(META_REVISION)
            .map_err(backend("read revision"))?
            .map_or(0, |g| g.value());
        let table = wtx.open_table(LEASES).map_err(backend("open leases table"))?;
        let mut leases = HashMap::new();
        for entry in table.iter().map_err(backend("read leases"))? {
            let (id, ttl_ms) = entry.map_err(backend("read leases"))?;
            let ttl = Duration::from_millis(ttl_ms.value());
            leases.insert(
                id.value(),
                Lease {
                    ttl,
                    deadline: deadline_after(ttl),
                },
            );
        }
        (revision, leases)
    };
    wtx.commit().map_err(backend("commit"))?;
    Ok((revision, leases))
}

/// The default store: a single redb file. See the module documentation for the design.
pub struct EmbeddedStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    /// `None` only while dropping.
    commands: Option<std_mpsc::Sender<Cmd>>,
    writer: Option<JoinHandle<()>>,
}

impl EmbeddedStore {
    /// Opens (creating it and its directory if missing) the store file and starts the writer thread, which
    /// also expires leases. Dropping the store stops the writer and closes the file; open watches then end.
    pub fn open(path: &Path) -> Result<Arc<EmbeddedStore>, StoreError> {
        Self::open_with(path, Limits::default())
    }

    fn open_with(path: &Path, limits: Limits) -> Result<Arc<EmbeddedStore>, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Backend(format!("create directory {}: {e}", parent.display())))?;
        }
        let db = Database::create(path).map_err(|e| StoreError::Backend(format!("open {}: {e}", path.display())))?;
        let db = Arc::new(db);
        let (revision, leases) = initialize(&db)?;
        let shared = Arc::new(Shared {
            hub: Mutex::new(Hub::new(revision, limits)),
            leases: Mutex::new(leases),
        });
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            revision,
            commands: rx,
        };
        let handle = std::thread::Builder::new()
            .name("smesh-store-writer".into())
            .spawn(move || writer.run())
            .map_err(backend("start store writer thread"))?;
        tracing::debug!(path = %path.display(), revision, "embedded store opened");
        Ok(Arc::new(EmbeddedStore {
            db,
            shared,
            commands: Some(tx),
            writer: Some(handle),
        }))
    }

    async fn request(&self, request: Request) -> Result<Answer> {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands.as_ref().ok_or_else(writer_stopped)?;
        commands
            .send(Cmd {
                request,
                reply: Some(tx),
            })
            .map_err(|_| writer_stopped())?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Runs a read on the blocking pool: redb reads may hit the disk.
    fn read<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let rtx = db.begin_read().map_err(backend("begin read transaction"))?;
                f(&rtx)
            })
            .await
            .map_err(backend("read task"))?
        })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has drained it; joining means the file is closed (and
        // can be reopened) when drop returns. This blocks only for the writer's current batch.
        self.commands.take();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

fn unexpected(answer: Answer) -> StoreError {
    StoreError::Backend(format!("internal error: unexpected writer answer {answer:?}"))
}

impl Store for EmbeddedStore {
    fn get(&self, key: &str) -> StoreFuture<'_, Option<KeyValue>> {
        let key = key.to_string();
        self.read(move |rtx| {
            let table = rtx.open_table(KV).map_err(backend("open kv table"))?;
            read_key(&table, &key)
        })
    }

    fn list(&self, prefix: &str) -> StoreFuture<'_, (Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.read(move |rtx| {
            // Same snapshot for keys and revision.
            let table = rtx.open_table(KV).map_err(backend("open kv table"))?;
            let meta = rtx.open_table(META).map_err(backend("open meta table"))?;
            let revision = meta
                .get(META_REVISION)
                .map_err(backend("read revision"))?
                .map_or(0, |g| g.value());
            Ok((scan_prefix(&table, &prefix)?, revision))
        })
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> StoreFuture<'_, TxnOutcome> {
        Box::pin(async move {
            match self.request(Request::Txn { compares, ops }).await? {
                Answer::Txn(outcome) => Ok(outcome),
                other => Err(unexpected(other)),
            }
        })
    }

    fn watch(&self, prefix: &str, after: Revision) -> StoreFuture<'_, WatchReceiver> {
        let result = lock(&self.shared.hub).watch(prefix, after);
        Box::pin(std::future::ready(result))
    }

    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        Box::pin(async move {
            match self.request(Request::Grant { ttl }).await? {
                Answer::Lease(id) => Ok(id),
                other => Err(unexpected(other)),
            }
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        let result = match lock(&self.shared.leases).get_mut(&lease) {
            // Past its deadline it is expired, even if the writer has not deleted its keys yet.
            Some(l) if l.deadline > Instant::now() => {
                l.deadline = deadline_after(l.ttl);
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        };
        Box::pin(std::future::ready(result))
    }

    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            match self.request(Request::Revoke { lease }).await? {
                Answer::Done => Ok(()),
                other => Err(unexpected(other)),
            }
        })
    }

    fn revision(&self) -> StoreFuture<'_, Revision> {
        let revision = lock(&self.shared.hub).revision;
        Box::pin(std::future::ready(Ok(revision)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{delete, put};
    use tempfile::TempDir;

    fn temp_store() -> (TempDir, Arc<EmbeddedStore>) {
        temp_store_with(Limits::default())
    }

    fn temp_store_with(limits: Limits) -> (TempDir, Arc<EmbeddedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with(&dir.path().join("sub/store.redb"), limits).unwrap();
        (dir, store)
    }

    fn put_op(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            lease: 0,
        }
    }

    /// Receives the next batch, failing the test instead of hanging.
    async fn next_batch(rx: &mut WatchReceiver) -> Result<Vec<Event>, StoreError> {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("watch timed out")
            .expect("watch closed")
    }

    #[tokio::test]
    async fn put_get_list_delete_and_revisions() {
        let (_dir, store) = temp_store();
        assert_eq!(store.revision().await.unwrap(), 0);
        assert_eq!(put(&*store, "/a/1", b"one".to_vec(), 0).await.unwrap(), 1);
        assert_eq!(put(&*store, "/a/2", b"two".to_vec(), 0).await.unwrap(), 2);
        assert_eq!(put(&*store, "/b/1", b"other".to_vec(), 0).await.unwrap(), 3);
        assert_eq!(put(&*store, "/a/1", b"uno".to_vec(), 0).await.unwrap(), 4);

        let kv = store.get("/a/1").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.lease),
            (&b"uno"[..], 1, 4, 0)
        );
        assert_eq!(store.get("/missing").await.unwrap(), None);

        let (kvs, rev) = store.list("/a/").await.unwrap();
        assert_eq!(rev, 4);
        assert_eq!(
            kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
            ["/a/1", "/a/2"]
        );
        assert_eq!(store.list("").await.unwrap().0.len(), 3);

        assert_eq!(delete(&*store, "/a/1").await.unwrap(), 5);
        assert_eq!(store.get("/a/1").await.unwrap(), None);
        // Recreated: a new create revision.
        put(&*store, "/a/1", b"again".to_vec(), 0).await.unwrap();
        let kv = store.get("/a/1").await.unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (6, 6));

        // Several ops share one revision.
        let out = store
            .txn(vec![], vec![put_op("/c/1", "x"), put_op("/c/2", "y")])
            .await
            .unwrap();
        assert_eq!(
            out,
            TxnOutcome {
                succeeded: true,
                revision: 7
            }
        );
        assert_eq!(store.get("/c/2").await.unwrap().unwrap().mod_revision, 7);
        assert_eq!(store.revision().await.unwrap(), 7);
    }

    #[tokio::test]
    async fn no_op_transactions_do_not_advance_the_revision() {
        let (_dir, store) = temp_store();
        put(&*store, "/k", b"v".to_vec(), 0).await.unwrap();
        assert_eq!(delete(&*store, "/absent").await.unwrap(), 1);
        let out = store
            .txn(
                vec![],
                vec![Op::DeletePrefix {
                    prefix: "/nothing/".into(),
                }],
            )
            .await
            .unwrap();
        assert_eq!(
            out,
            TxnOutcome {
                succeeded: true,
                revision: 1
            }
        );
        assert_eq!(store.txn(vec![], vec![]).await.unwrap().revision, 1);
        assert_eq!(store.revision().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let (_dir, store) = temp_store();
        let create = |v: &str| {
            (
                vec![Compare::ModRevision {
                    key: "/k".into(),
                    equals: 0,
                }],
                vec![put_op("/k", v)],
            )
        };

        // equals 0: create only if absent.
        let (c, o) = create("first");
        assert_eq!(
            store.txn(c, o).await.unwrap(),
            TxnOutcome {
                succeeded: true,
                revision: 1
            }
        );
        let (c, o) = create("second");
        assert_eq!(
            store.txn(c, o).await.unwrap(),
            TxnOutcome {
                succeeded: false,
                revision: 1
            }
        );
        assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"first");

        // Update only from the revision we read.
        let cas = |rev, v: &str| {
            (
                vec![Compare::ModRevision {
                    key: "/k".into(),
                    equals: rev,
                }],
                vec![put_op("/k", v)],
            )
        };
        let (c, o) = cas(1, "updated");
        assert_eq!(
            store.txn(c, o).await.unwrap(),
            TxnOutcome {
                succeeded: true,
                revision: 2
            }
        );
        let (c, o) = cas(1, "stale");
        assert_eq!(
            store.txn(c, o).await.unwrap(),
            TxnOutcome {
                succeeded: false,
                revision: 2
            }
        );
        let kv = store.get("/k").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
            (&b"updated"[..], 1, 2)
        );

        // A failed compare writes none of the ops.
        let compares = vec![
            Compare::ModRevision {
                key: "/k".into(),
                equals: 2,
            },
            Compare::ModRevision {
                key: "/other".into(),
                equals: 5,
            },
        ];
        let out = store
            .txn(compares, vec![put_op("/k", "no"), put_op("/new", "no")])
            .await
            .unwrap();
        assert!(!out.succeeded);
        assert_eq!(store.get("/new").await.unwrap(), None);
        assert_eq!(store.revision().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn delete_prefix_deletes_under_one_revision() {
        let (_dir, store) = temp_store();
        for key in ["/p/a", "/p/b", "/p/c/d", "/pq", "/q"] {
            put(&*store, key, key.as_bytes().to_vec(), 0).await.unwrap();
        }
        let mut rx = store.watch("/", 5).await.unwrap();
        let out = store
            .txn(vec![], vec![Op::DeletePrefix { prefix: "/p/".into() }])
            .await
            .unwrap();
        assert_eq!(out.revision, 6);
        let keys: Vec<_> = store.list("").await.unwrap().0.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["/pq", "/q"]);

        let batch = next_batch(&mut rx).await.unwrap();
        let deleted: Vec<_> = batch.iter().map(|e| (e.key().to_string(), e.revision())).collect();
        assert_eq!(deleted, [("/p/a".into(), 6), ("/p/b".into(), 6), ("/p/c/d".into(), 6)]);
        let Event::Delete { prev, .. } = &batch[0] else {
            panic!("expected a delete: {batch:?}")
        };
        assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"/p/a"[..], 1));
    }

    #[tokio::test]
    async fn watch_with_concurrent_writers_has_no_gap_or_duplicate() {
        const WRITERS: usize = 4;
        const PUTS: usize = 40;
        let (_dir, store) = temp_store();
        put(&*store, "/w/start", vec![], 0).await.unwrap();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..PUTS {
                        put(&*store, &format!("/w/{w}/{i}"), vec![], 0).await.unwrap();
                    }
                })
            })
            .collect();
        // Start watches while the writers run, some from the present, some from a bit in the past.
        let mut watches = vec![(0, store.watch("/w/", 0).await.unwrap())];
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let now = store.revision().await.unwrap();
            let after = if i % 2 == 0 { now } else { now.saturating_sub(5) };
            watches.push((after, store.watch("/w/", after).await.unwrap()));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let last = store.revision().await.unwrap();
        assert_eq!(last, 1 + (WRITERS * PUTS) as u64);
        for (after, mut rx) in watches {
            let mut expected = after + 1;
            while expected <= last {
                let batch = next_batch(&mut rx).await.unwrap();
                // Every revision here is one put, so the revisions must be exactly after+1, after+2, ...
                assert_eq!(batch.len(), 1);
                assert_eq!(batch[0].revision(), expected, "watch after {after}");
                expected += 1;
            }
            assert!(rx.try_recv().is_err(), "nothing beyond the last revision");
        }
    }

    #[tokio::test]
    async fn watch_replays_history_then_goes_live() {
        let (_dir, store) = temp_store();
        put(&*store, "/x/1", b"a".to_vec(), 0).await.unwrap();
        put(&*store, "/y/1", b"b".to_vec(), 0).await.unwrap();
        put(&*store, "/x/2", b"c".to_vec(), 0).await.unwrap();
        delete(&*store, "/x/1").await.unwrap();

        let mut rx = store.watch("/x/", 0).await.unwrap();
        assert!(
            matches!(&next_batch(&mut rx).await.unwrap()[..], [Event::Put(kv)] if kv.key == "/x/1" && kv.mod_revision == 1)
        );
        assert!(
            matches!(&next_batch(&mut rx).await.unwrap()[..], [Event::Put(kv)] if kv.key == "/x/2" && kv.mod_revision == 3)
        );
        assert!(matches!(&next_batch(&mut rx).await.unwrap()[..],
            [Event::Delete { key, revision: 4, prev }] if key == "/x/1" && prev.value == b"a"));
        put(&*store, "/y/2", vec![], 0).await.unwrap();
        put(&*store, "/x/3", vec![], 0).await.unwrap();
        assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), 6);

        // From the middle, and from the future.
        let mut rx = store.watch("/x/", 3).await.unwrap();
        assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), 4);
        let mut future = store.watch("", 7).await.unwrap();
        put(&*store, "/z", vec![], 0).await.unwrap();
        put(&*store, "/z", vec![], 0).await.unwrap();
        assert_eq!(next_batch(&mut future).await.unwrap()[0].revision(), 8);
    }

    #[tokio::test]
    async fn watch_from_compacted_history_fails() {
        let limits = Limits {
            history_revisions: 5,
            ..Limits::default()
        };
        let (_dir, store) = temp_store_with(limits);
        for i in 0..10 {
            put(&*store, &format!("/k/{i}"), vec![], 0).await.unwrap();
        }
        // Revisions 6..=10 are kept: a watch after 5 is complete, after 4 is not.
        let mut rx = store.watch("/k/", 5).await.unwrap();
        assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), 6);
        assert_eq!(
            store.watch("/k/", 4).await.unwrap_err(),
            StoreError::Compacted { oldest: 6 }
        );
    }

    #[tokio::test]
    async fn slow_watcher_is_ended_without_blocking_writers() {
        let limits = Limits {
            watch_buffer: 4,
            ..Limits::default()
        };
        let (_dir, store) = temp_store_with(limits);
        let mut rx = store.watch("/", 0).await.unwrap();
        for i in 0..10 {
            put(&*store, &format!("/k/{i}"), vec![], 0).await.unwrap();
        }
        for rev in 1..=3 {
            assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), rev);
        }
        assert!(matches!(next_batch(&mut rx).await, Err(StoreError::Compacted { .. })));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn lease_expiry_deletes_keys_with_events() {
        let (_dir, store) = temp_store();
        let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
        assert_ne!(lease, 0);
        put(&*store, "/l/a", b"a".to_vec(), lease).await.unwrap();
        put(&*store, "/l/b", b"b".to_vec(), lease).await.unwrap();
        put(&*store, "/l/c", b"c".to_vec(), 0).await.unwrap();
        assert_eq!(store.get("/l/a").await.unwrap().unwrap().lease, lease);
        let mut rx = store.watch("/l/", 3).await.unwrap();

        let started = Instant::now();
        let batch = next_batch(&mut rx).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(300 + 250),
            "expired late: {:?}",
            started.elapsed()
        );
        assert!(batch.iter().all(|e| matches!(e, Event::Delete { revision: 4, .. })));
        assert_eq!(batch.iter().map(Event::key).collect::<Vec<_>>(), ["/l/a", "/l/b"]);
        assert_eq!(
            store.list("/l/").await.unwrap(),
            (vec![store.get("/l/c").await.unwrap().unwrap()], 4)
        );
        assert_eq!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease)));
        assert_eq!(
            put(&*store, "/l/d", vec![], lease).await,
            Err(StoreError::LeaseNotFound(lease))
        );
    }

    #[tokio::test]
    async fn keep_alive_extends_a_lease() {
        let (_dir, store) = temp_store();
        let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
        put(&*store, "/ka", vec![], lease).await.unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            store.keep_alive(lease).await.unwrap();
        }
        // 600 ms after the grant, well past the first deadline.
        assert!(store.get("/ka").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(550)).await;
        assert_eq!(store.get("/ka").await.unwrap(), None);
        assert_eq!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease)));
    }

    #[tokio::test]
    async fn revoke_deletes_keys_and_unknown_leases_are_refused() {
        let (_dir, store) = temp_store();
        assert_eq!(put(&*store, "/r", vec![], 42).await, Err(StoreError::LeaseNotFound(42)));
        assert_eq!(store.revision().await.unwrap(), 0);

        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let other = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(lease, other);
        put(&*store, "/r/a", vec![], lease).await.unwrap();
        put(&*store, "/r/b", vec![], lease).await.unwrap();
        // Moved to another lease: no longer deleted with the first one.
        put(&*store, "/r/c", vec![], lease).await.unwrap();
        put(&*store, "/r/c", vec![], other).await.unwrap();
        let mut rx = store.watch("/r/", 4).await.unwrap();

        store.revoke_lease(lease).await.unwrap();
        let batch = next_batch(&mut rx).await.unwrap();
        assert_eq!(
            batch.iter().map(|e| (e.key(), e.revision())).collect::<Vec<_>>(),
            [("/r/a", 5), ("/r/b", 5)]
        );
        assert_eq!(store.list("/r/").await.unwrap().0.len(), 1);
        assert_eq!(store.revoke_lease(lease).await, Err(StoreError::LeaseNotFound(lease)));
        assert_eq!(
            put(&*store, "/r/d", vec![], lease).await,
            Err(StoreError::LeaseNotFound(lease))
        );

        // Revoking a lease without keys changes no key, so no new revision.
        let empty = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.revoke_lease(empty).await.unwrap();
        assert_eq!(store.revision().await.unwrap(), 5);
    }

    #[tokio::test]
    async fn data_revision_and_leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        put(&*store, "/d/1", b"one".to_vec(), 0).await.unwrap();
        put(&*store, "/d/2", b"two".to_vec(), 0).await.unwrap();
        put(&*store, "/d/1", b"uno".to_vec(), 0).await.unwrap();
        let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
        put(&*store, "/d/leased", vec![], lease).await.unwrap();
        let before = store.list("").await.unwrap();
        drop(store);

        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.list("").await.unwrap(), before);
        assert_eq!(store.revision().await.unwrap(), 4);
        let kv = store.get("/d/1").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
            (&b"uno"[..], 1, 3)
        );

        // History starts at the reopen: watching from now works, from before does not.
        assert_eq!(
            store.watch("", 3).await.unwrap_err(),
            StoreError::Compacted { oldest: 5 }
        );
        let mut rx = store.watch("", 4).await.unwrap();
        // The lease came back (with a fresh deadline), still holds its key, then expires.
        store.keep_alive(lease).await.unwrap();
        let batch = next_batch(&mut rx).await.unwrap();
        assert!(matches!(&batch[..], [Event::Delete { key, revision: 5, .. }] if key == "/d/leased"));
        assert_eq!(put(&*store, "/d/3", vec![], 0).await.unwrap(), 6);
    }

    const CRASH_ENV: &str = "SMESH_STORE_CRASH_TEST_PATH";

    /// Child half of `acknowledged_writes_survive_kill_9`; does nothing unless that test runs it.
    #[tokio::test]
    async fn crash_after_acknowledged_writes() {
        let Some(path) = std::env::var_os(CRASH_ENV) else {
            return;
        };
        let store = EmbeddedStore::open(Path::new(&path)).unwrap();
        for i in 0..20u8 {
            put(&*store, &format!("/crash/{i:02}"), vec![i], 0).await.unwrap();
        }
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        put(&*store, "/crash/leased", lease.to_le_bytes().to_vec(), lease)
            .await
            .unwrap();
        // kill -9 ourselves right after the acknowledgements: no destructors, no clean close.
        let _ = std::process::Command::new("kill")
            .args(["-9", &std::process::id().to_string()])
            .status();
        std::process::abort();
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::embedded::tests::crash_after_acknowledged_writes",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child should have been killed");

        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.revision().await.unwrap(), 21);
        let (kvs, _) = store.list("/crash/").await.unwrap();
        assert_eq!(kvs.len(), 21);
        let leased = kvs.last().unwrap();
        assert_eq!(leased.key, "/crash/leased");
        assert_eq!(leased.value, leased.lease.to_le_bytes());
        store.keep_alive(leased.lease).await.unwrap();
    }
}
