//! Golden-metric windows: every finished request and opaque connection is folded into the
//! current window's series, keyed by (direction, peer identity, service, destination, route,
//! outcome), each with counts, bytes and a latency sketch. The control-plane client closes
//! the window every [`WINDOW`] and pushes it (`crate::config::control`).
//!
//! Cost on the request path: a thread-local shard index, an uncontended lock of that shard,
//! a hash of the key's few strings, and a sketch insert. The workers never share a shard
//! unless there are more threads than shards; a window's close takes each shard's maps in
//! one swap.

use crate::telemetry::event::{ConnectionEvent, RequestCtx, RequestEvent};
use crate::telemetry::metrics::RouteMetrics;
use rustc_hash::FxHasher;
use smesh_api::latency::{self, DDSketch};
use smesh_api::v1::{ConnectionSeries, RequestSeries, StatsWindow};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How much time one window covers.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Series one shard keeps per window; requests and connections of further ones are only
/// counted (`StatsWindow::overflow`), so a flood of distinct peers cannot grow memory.
pub const MAX_SERIES: usize = 512;

type Map<V> = HashMap<u64, V, BuildHasherDefault<FxHasher>>;

/// What one finished request contributes to its series.
pub struct Sample<'a> {
    pub ctx: &'a RequestCtx,
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub failed: bool,
    pub response_bytes: u64,
    /// To the response head (as `smesh_request_duration_seconds`).
    pub latency: Duration,
}

impl<'a> Sample<'a> {
    /// A request whose event a consumer completed (body watched to its end).
    pub fn of_event(event: &'a RequestEvent) -> Self {
        Sample {
            ctx: &event.ctx,
            status: event.status,
            grpc_status: event.grpc_status,
            failed: event.is_failure(),
            response_bytes: event.response_bytes,
            latency: event.to_head,
        }
    }

    /// A request nobody watches, taken at its response head: its bytes are what the body
    /// announces (`Content-Length`), 0 when it announces nothing. gRPC calls are always
    /// watched (their status is in the trailers), so this is plain HTTP.
    pub fn at_head(ctx: &'a RequestCtx, status: u16, announced_bytes: Option<u64>) -> Self {
        Sample {
            ctx,
            status,
            grpc_status: None,
            failed: status >= 500,
            response_bytes: announced_bytes.unwrap_or(0),
            latency: ctx.start.elapsed(),
        }
    }

    fn key(&self) -> u64 {
        let mut h = FxHasher::default();
        let ctx = self.ctx;
        ctx.direction.hash(&mut h);
        // A route's handles live as long as its snapshot: its address names it (series of
        // the same route from two snapshots are merged by name when the window closes).
        ctx.route.as_ref().map(Arc::as_ptr).hash(&mut h);
        ctx.destination.as_deref().hash(&mut h);
        ctx.peer.as_deref().hash(&mut h);
        (self.status / 100, ctx.grpc, self.grpc_status, ctx.error).hash(&mut h);
        h.finish()
    }
}

/// One series of the open window.
struct Series {
    direction: &'static str,
    route: Option<Arc<RouteMetrics>>,
    destination: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    status_class: u16,
    grpc: bool,
    grpc_status: Option<u16>,
    error: Option<&'static str>,
    requests: u64,
    failures: u64,
    retries: u64,
    response_bytes: u64,
    latency_ms: DDSketch,
}

impl Series {
    fn new(s: &Sample) -> Self {
        Series {
            direction: s.ctx.direction,
            route: s.ctx.route.clone(),
            destination: s.ctx.destination.clone(),
            peer: s.ctx.peer.clone(),
            status_class: s.status / 100,
            grpc: s.ctx.grpc,
            grpc_status: s.grpc_status,
            error: s.ctx.error,
            requests: 0,
            failures: 0,
            retries: 0,
            response_bytes: 0,
            latency_ms: latency::new_sketch(),
        }
    }

    /// Whether `s` belongs here (its key hash matched: this rules out a collision).
    fn is_for(&self, s: &Sample) -> bool {
        let ctx = s.ctx;
        self.direction == ctx.direction
            && self.route.as_ref().map(Arc::as_ptr) == ctx.route.as_ref().map(Arc::as_ptr)
            && self.destination == ctx.destination
            && self.peer == ctx.peer
            && (self.status_class, self.grpc, self.grpc_status, self.error)
                == (s.status / 100, ctx.grpc, s.grpc_status, ctx.error)
    }

    fn add(&mut self, s: &Sample) {
        self.requests += 1;
        self.failures += u64::from(s.failed);
        self.retries += u64::from(s.ctx.tries.saturating_sub(1));
        self.response_bytes += s.response_bytes;
        self.latency_ms.add(s.latency.as_secs_f64() * 1000.0);
    }
}

#[derive(Default)]
struct Shard {
    requests: Map<Series>,
    connections: Map<ConnectionSeries>,
    overflow: u64,
}

impl Shard {
    fn full(&self) -> bool {
        self.requests.len() + self.connections.len() >= MAX_SERIES
    }
}

/// The open window of one proxy, sharded by thread.
pub struct Stats {
    shards: Box<[Mutex<Shard>]>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard (modulo the shard count): threads take turns.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// `threads`: how many threads record (the workers); more only share shards.
    pub fn new(threads: usize) -> Self {
        Stats {
            shards: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, Shard> {
        let i = SHARD.with(|i| *i) % self.shards.len();
        // A panic while holding a shard leaves plain counters: still good to use.
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record(&self, s: &Sample) {
        let key = s.key();
        let mut shard = self.shard();
        if !shard.requests.contains_key(&key) && shard.full() {
            shard.overflow += 1;
            return;
        }
        let series = shard.requests.entry(key).or_insert_with(|| Series::new(s));
        if series.is_for(s) {
            series.add(s);
        } else {
            shard.overflow += 1;
        }
    }

    pub fn record_connection(&self, e: &ConnectionEvent) {
        let mut h = FxHasher::default();
        (
            e.direction,
            e.peer.as_deref(),
            e.destination.as_deref(),
            e.kind.as_str(),
        )
            .hash(&mut h);
        let key = h.finish();
        let mut shard = self.shard();
        if !shard.connections.contains_key(&key) && shard.full() {
            shard.overflow += 1;
            return;
        }
        let series = shard.connections.entry(key).or_insert_with(|| ConnectionSeries {
            direction: e.direction.to_string(),
            peer_identity: e.peer.as_deref().unwrap_or_default().to_string(),
            destination: e.destination.as_deref().unwrap_or_default().to_string(),
            kind: e.kind.as_str().to_string(),
            ..Default::default()
        });
        series.connections += 1;
        series.errors += u64::from(e.error.is_some());
        series.bytes_from_client += e.bytes_from_client;
        series.bytes_to_client += e.bytes_to_client;
    }

    /// Ends the open window (which began at `start_unix_ms`) and starts the next one.
    pub fn close(&self, start_unix_ms: u64) -> StatsWindow {
        let mut merged: HashMap<RequestKey, (RequestSeries, DDSketch)> = HashMap::new();
        let mut connections: HashMap<(String, String, String, String), ConnectionSeries> = HashMap::new();
        let mut overflow = 0;
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|p| p.into_inner()));
            overflow += taken.overflow;
            for series in taken.requests.into_values() {
                let out = series.output();
                let key = RequestKey::of(&out);
                let (total, sketch) = merged.entry(key).or_insert_with(|| (out, latency::new_sketch()));
                total.requests += series.requests;
                total.failures += series.failures;
                total.retries += series.retries;
                total.response_bytes += series.response_bytes;
                latency::merge(sketch, &series.latency_ms);
            }
            for c in taken.connections.into_values() {
                let key = (
                    c.direction.clone(),
                    c.peer_identity.clone(),
                    c.destination.clone(),
                    c.kind.clone(),
                );
                let total = connections.entry(key).or_insert_with(|| ConnectionSeries {
                    connections: 0,
                    errors: 0,
                    bytes_from_client: 0,
                    bytes_to_client: 0,
                    ..c.clone()
                });
                total.connections += c.connections;
                total.errors += c.errors;
                total.bytes_from_client += c.bytes_from_client;
                total.bytes_to_client += c.bytes_to_client;
            }
        }
        StatsWindow {
            start_unix_ms,
            duration_ms: WINDOW.as_millis() as u32,
            requests: merged
                .into_values()
                .map(|(mut s, sketch)| {
                    s.latency_ms_sketch = latency::encode(&sketch);
                    s
                })
                .collect(),
            connections: connections.into_values().collect(),
            overflow,
        }
    }
}

/// A series' identity by name, across shards and snapshots.
#[derive(PartialEq, Eq, Hash)]
struct RequestKey(String, String, String, String, String, u32, bool, i32, String);

impl RequestKey {
    fn of(s: &RequestSeries) -> Self {
        RequestKey(
            s.direction.clone(),
            s.peer_identity.clone(),
            s.service.clone(),
            s.destination.clone(),
            s.route.clone(),
            s.status_class,
            s.grpc,
            s.grpc_status,
            s.error.clone(),
        )
    }
}

impl Series {
    /// The series' key fields as sent; the counts start at zero (the close adds them).
    fn output(&self) -> RequestSeries {
        let (service, route) = match &self.route {
            Some(r) => (r.service_name().to_string(), r.route_name().to_string()),
            None => (String::new(), String::new()),
        };
        let destination = self
            .destination
            .as_deref()
            .map_or_else(|| service.clone(), str::to_string);
        RequestSeries {
            direction: self.direction.to_string(),
            peer_identity: self.peer.as_deref().unwrap_or_default().to_string(),
            service,
            destination,
            route,
            status_class: u32::from(self.status_class),
            grpc: self.grpc,
            grpc_status: self.grpc_status.map_or(-1, i32::from),
            error: self.error.unwrap_or_default().to_string(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests;
