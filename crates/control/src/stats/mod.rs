//! Golden metrics without Prometheus: the windows proxies push on their Discovery stream,
//! merged across proxies into one [`MeshWindow`] per 10 s of wall-clock time, kept in a
//! bounded ring in memory ([`Ring`], an hour by default) and read by [`views`] for the
//! `/api/v1/stats/...` API. Nothing is written to the store: stats survive no restart.
//!
//! Series are re-keyed by what the control plane knows of the reporting proxy (its Hello):
//! an outbound series' source is the reporter, an inbound one's destination is.

pub mod views;

use smesh_api::latency::{self, DDSketch};
use smesh_api::v1::{ConnectionSeries, RequestSeries, StatsWindow};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The windows' length (the proxies' `WINDOW`).
pub const WINDOW_MS: u64 = 10_000;
/// An hour at 10 s.
pub const DEFAULT_WINDOWS: usize = 360;
/// Series taken from one proxy's window; the rest count as overflow.
const MAX_SERIES_PER_PUSH: usize = 4096;
/// Windows dated this far ahead of this replica's clock are refused (a wrong clock).
const MAX_AHEAD_MS: u64 = 60_000;

/// The proxy a window came from, as its Hello named it.
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    pub proxy_id: String,
    /// The Service it fronts ("" for a client-only proxy).
    pub service: String,
    /// Its SPIFFE ID ("" without mesh TLS).
    pub identity: String,
}

/// A request series across the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    /// `inbound`: reported by the server's proxy; `outbound`: by the client's.
    pub direction: String,
    pub source_service: String,
    pub source_identity: String,
    /// The route's Service.
    pub service: String,
    /// The Service the requests went to.
    pub destination: String,
    pub destination_identity: String,
    pub route: String,
    pub status_class: u32,
    pub grpc: bool,
    pub grpc_status: i32,
    pub error: String,
}

#[derive(Clone)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    pub retries: u64,
    pub response_bytes: u64,
    pub latency_ms: DDSketch,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            failures: 0,
            retries: 0,
            response_bytes: 0,
            latency_ms: latency::new_sketch(),
        }
    }
}

impl Counts {
    /// Saturating: the numbers come from other processes.
    pub fn add(&mut self, o: &Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.failures = self.failures.saturating_add(o.failures);
        self.retries = self.retries.saturating_add(o.retries);
        self.response_bytes = self.response_bytes.saturating_add(o.response_bytes);
        latency::merge(&mut self.latency_ms, &o.latency_ms);
    }
}

/// Opaque connections across the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub direction: String,
    pub source_service: String,
    pub destination: String,
    pub kind: String,
}

#[derive(Debug, Clone, Default)]
pub struct ConnectionCounts {
    pub connections: u64,
    pub errors: u64,
    pub bytes: u64,
}

impl ConnectionCounts {
    pub fn add(&mut self, o: &ConnectionCounts) {
        self.connections = self.connections.saturating_add(o.connections);
        self.errors = self.errors.saturating_add(o.errors);
        self.bytes = self.bytes.saturating_add(o.bytes);
    }
}

/// What one proxy reported in one window.
#[derive(Clone, Default)]
pub struct ProxyCounts {
    pub service: String,
    pub identity: String,
    pub inbound: Counts,
    pub outbound: Counts,
    pub connections: ConnectionCounts,
    pub overflow: u64,
}

/// 10 s of the whole mesh.
#[derive(Default)]
pub struct MeshWindow {
    pub requests: HashMap<SeriesKey, Counts>,
    pub connections: HashMap<ConnectionKey, ConnectionCounts>,
    pub proxies: HashMap<String, ProxyCounts>,
}

/// The last windows of the mesh, oldest first, at most `capacity`.
pub struct Ring {
    capacity: usize,
    windows: Mutex<BTreeMap<u64, MeshWindow>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The source service of an inbound request: the peer's SPIFFE ID's ("" in plaintext).
fn service_of(identity: &str) -> String {
    smesh_model::SpiffeId::parse(identity).map_or_else(String::new, |id| id.service().to_string())
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        Ring {
            capacity: capacity.max(1),
            windows: Mutex::new(BTreeMap::new()),
        }
    }

    /// Merges one proxy's window into the mesh's window of the same time. A window older
    /// than the ring, or dated in the future, is dropped (false).
    pub fn ingest(&self, from: &Reporter, window: StatsWindow, now_ms: u64) -> bool {
        let start = window.start_unix_ms - window.start_unix_ms % WINDOW_MS;
        if start > now_ms + MAX_AHEAD_MS {
            return false;
        }
        // Decoded before the lock: readers and other proxies' pushes do not wait for it.
        let mut overflow = window.overflow;
        let kept = window.requests.len().min(MAX_SERIES_PER_PUSH);
        overflow = overflow.saturating_add((window.requests.len() - kept) as u64);
        let mut requests = Vec::with_capacity(kept);
        for series in window.requests.into_iter().take(kept) {
            match counts_of(&series) {
                Some(counts) => requests.push((key_of(from, series), counts)),
                None => overflow = overflow.saturating_add(series.requests),
            }
        }
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let full = windows.len() >= self.capacity;
        if full && windows.first_key_value().is_some_and(|(oldest, _)| start < *oldest) {
            return false;
        }
        let mesh = windows.entry(start).or_default();
        let proxy = mesh.proxies.entry(from.proxy_id.clone()).or_default();
        proxy.service.clone_from(&from.service);
        proxy.identity.clone_from(&from.identity);
        proxy.overflow = proxy.overflow.saturating_add(overflow);
        for (key, counts) in requests {
            let side = if key.direction == "inbound" {
                &mut proxy.inbound
            } else {
                &mut proxy.outbound
            };
            side.add(&counts);
            mesh.requests.entry(key).or_default().add(&counts);
        }
        for c in window.connections.into_iter().take(MAX_SERIES_PER_PUSH) {
            let counts = ConnectionCounts {
                connections: c.connections,
                errors: c.errors,
                bytes: c.bytes_from_client.saturating_add(c.bytes_to_client),
            };
            proxy.connections.add(&counts);
            mesh.connections
                .entry(connection_key_of(from, c))
                .or_default()
                .add(&counts);
        }
        while windows.len() > self.capacity {
            windows.pop_first();
        }
        true
    }

    /// Runs `f` over the windows that start in `from_ms..to_ms`.
    pub fn read<T>(&self, from_ms: u64, to_ms: u64, f: impl FnOnce(&mut dyn Iterator<Item = &MeshWindow>) -> T) -> T {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut windows.range(from_ms..to_ms).map(|(_, w)| w))
    }

    pub fn len(&self) -> usize {
        self.windows.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn counts_of(s: &RequestSeries) -> Option<Counts> {
    let latency_ms = if s.latency_ms_sketch.is_empty() {
        latency::new_sketch()
    } else {
        latency::decode(&s.latency_ms_sketch)?
    };
    Some(Counts {
        requests: s.requests,
        failures: s.failures.min(s.requests),
        retries: s.retries,
        response_bytes: s.response_bytes,
        latency_ms,
    })
}

fn key_of(from: &Reporter, s: RequestSeries) -> SeriesKey {
    let inbound = s.direction == "inbound";
    let (source_service, source_identity, destination_identity) = if inbound {
        (service_of(&s.peer_identity), s.peer_identity, from.identity.clone())
    } else {
        (from.service.clone(), from.identity.clone(), String::new())
    };
    SeriesKey {
        direction: if inbound { "inbound" } else { "outbound" }.to_string(),
        source_service,
        source_identity,
        service: s.service,
        destination: s.destination,
        destination_identity,
        route: s.route,
        status_class: s.status_class,
        grpc: s.grpc,
        grpc_status: s.grpc_status,
        error: s.error,
    }
}

fn connection_key_of(from: &Reporter, c: ConnectionSeries) -> ConnectionKey {
    let inbound = c.direction == "inbound";
    ConnectionKey {
        direction: if inbound { "inbound" } else { "outbound" }.to_string(),
        source_service: if inbound {
            service_of(&c.peer_identity)
        } else {
            from.service.clone()
        },
        destination: if inbound && c.destination.is_empty() {
            from.service.clone()
        } else {
            c.destination
        },
        kind: c.kind,
    }
}

#[cfg(test)]
mod tests;
