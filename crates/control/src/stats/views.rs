//! What `smesh stat` and `smesh edges` show: the ring's last closed windows, grouped by
//! service, route, edge (source service -> destination service) or proxy.
//!
//! A group's numbers are its clients' view when meshed clients reported it (outbound:
//! after retries, with the failures the proxies made themselves, such as injected faults or
//! an open breaker), else its servers' view (inbound); `side` says which. The share of
//! mTLS and the identities always come from the servers' side, which verified them.

use super::{ConnectionCounts, Counts, MeshWindow, Ring, SeriesKey, WINDOW_MS};
use serde::Serialize;
use smesh_api::latency;
use std::collections::{BTreeMap, BTreeSet};

/// A window is read once this long after it closed, so every proxy has pushed it.
pub const GRACE_MS: u64 = 2_000;
/// At most an hour (the ring).
pub const MAX_WINDOW_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Services,
    Routes,
    Edges,
    Proxies,
}

impl View {
    pub fn parse(s: &str) -> Option<View> {
        match s {
            "services" | "service" | "svc" => Some(View::Services),
            "routes" | "route" => Some(View::Routes),
            "edges" | "edge" => Some(View::Edges),
            "proxies" | "proxy" => Some(View::Proxies),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            View::Services => "services",
            View::Routes => "routes",
            View::Edges => "edges",
            View::Proxies => "proxies",
        }
    }

    fn note(self) -> &'static str {
        match self {
            View::Services | View::Edges => {
                "side client: as meshed clients saw it (after retries); side server: as the servers' proxies saw it"
            }
            View::Routes => {
                "client-side routes are after retries (one request however many tries); server-side routes are each try"
            }
            View::Proxies => "every request the proxy served, inbound and outbound",
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub view: &'static str,
    /// The time rates are over: the reported windows' (at most the window asked for).
    pub window_seconds: f64,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
    /// Windows in that span that any proxy reported.
    pub windows: usize,
    /// Requests and connections the proxies counted but could not keep in a series (a
    /// window's series cap, or a malformed sketch): the rows leave them out.
    pub overflow: u64,
    pub note: &'static str,
    pub rows: Vec<Row>,
}

#[derive(Default, Serialize)]
pub struct Row {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub route: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service: String,
    pub side: &'static str,
    pub requests: u64,
    pub failures: u64,
    pub rps: f64,
    /// Percent; none without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub retries: u64,
    pub response_bytes: u64,
    /// Requests the proxies answered themselves, by `smesh-proxy-error` reason.
    pub proxy_errors: BTreeMap<String, u64>,
    /// Percent of the server side's requests that came over mesh mTLS.
    pub mtls_percent: Option<f64>,
    pub tcp_connections: u64,
    pub tcp_bytes: u64,
    pub source_identities: BTreeSet<String>,
    pub destination_identities: BTreeSet<String>,
}

/// One side's sums for a group.
#[derive(Default)]
struct Side {
    counts: Counts,
    errors: BTreeMap<String, u64>,
    mtls: u64,
}

impl Side {
    fn add(&mut self, k: &SeriesKey, c: &Counts) {
        self.counts.add(c);
        if !k.error.is_empty() {
            *self.errors.entry(k.error.clone()).or_default() += c.requests;
        }
        if !k.source_identity.is_empty() {
            self.mtls += c.requests;
        }
    }
}

/// A group's sums: both sides, its connections, the identities seen.
#[derive(Default)]
struct Group {
    client: Side,
    server: Side,
    connections: ConnectionCounts,
    source_ids: BTreeSet<String>,
    destination_ids: BTreeSet<String>,
}

impl Group {
    fn add(&mut self, k: &SeriesKey, c: &Counts) {
        if k.direction == "inbound" {
            self.server.add(k, c);
            self.source_ids
                .extend(Some(&k.source_identity).filter(|i| !i.is_empty()).cloned());
            self.destination_ids
                .extend(Some(&k.destination_identity).filter(|i| !i.is_empty()).cloned());
        } else {
            self.client.add(k, c);
        }
    }

    fn add_connections(&mut self, c: &ConnectionCounts) {
        self.connections.add(c);
    }

    fn row(self, name: String, seconds: f64) -> Row {
        let mtls_percent = percent(self.server.mtls, self.server.counts.requests);
        let (side, s) = if self.client.counts.requests > 0 || self.server.counts.requests == 0 {
            ("client", self.client)
        } else {
            ("server", self.server)
        };
        let q = |q: f64| latency::quantile(&s.counts.latency_ms, q).map(round2);
        Row {
            name,
            side,
            requests: s.counts.requests,
            failures: s.counts.failures,
            rps: round2(s.counts.requests as f64 / seconds),
            success_rate: percent(s.counts.requests.saturating_sub(s.counts.failures), s.counts.requests),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            retries: s.counts.retries,
            response_bytes: s.counts.response_bytes,
            proxy_errors: s.errors,
            mtls_percent,
            tcp_connections: self.connections.connections,
            tcp_bytes: self.connections.bytes,
            source_identities: self.source_ids,
            destination_identities: self.destination_ids,
            ..Default::default()
        }
    }
}

fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| round2(100.0 * part as f64 / whole as f64))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// "-" for what the mesh does not know: a plaintext or client-only caller, the service of a
/// request refused before routing (unknown authority).
fn or_unknown(s: &str) -> String {
    if s.is_empty() { "-" } else { s }.to_string()
}

/// The report of `view` over the last `window_ms` (rounded up to whole windows) of closed
/// windows at `now_ms`, only the groups that `name` names (if given).
pub fn report(ring: &Ring, view: View, window_ms: u64, name: Option<&str>, now_ms: u64) -> Report {
    let window_ms = window_ms.clamp(WINDOW_MS, MAX_WINDOW_MS).div_ceil(WINDOW_MS) * WINDOW_MS;
    let closed = now_ms.saturating_sub(GRACE_MS);
    let to = closed - closed % WINDOW_MS;
    let from = to.saturating_sub(window_ms);
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let (windows, overflow) = ring.read(from, to, |windows| {
        let (mut n, mut overflow) = (0, 0u64);
        for w in windows {
            n += 1;
            overflow = w
                .proxies
                .values()
                .fold(overflow, |sum, p| sum.saturating_add(p.overflow));
            fold(view, w, &mut groups);
        }
        (n, overflow)
    });
    // Rates are over the time proxies reported (every connected proxy pushes every window,
    // empty or not): right after a start or a restart of this replica that is less than
    // the window asked for.
    let seconds = (windows.max(1) as u64 * WINDOW_MS) as f64 / 1000.0;
    let rows = groups
        .into_iter()
        .filter(|((a, b), _)| name.is_none_or(|n| a == n || b == n))
        .map(|((a, b), g)| {
            let mut row = g.row(String::new(), seconds);
            match view {
                View::Services => row.name = a,
                View::Routes => (row.name, row.service, row.route) = (format!("{a}/{b}"), a, b),
                View::Edges => (row.name, row.source, row.destination) = (format!("{a} -> {b}"), a, b),
                View::Proxies => (row.name, row.service, row.side) = (a, b, "all"),
            }
            row
        })
        .collect();
    Report {
        view: view.as_str(),
        window_seconds: seconds,
        from_unix_ms: from,
        to_unix_ms: to,
        windows,
        overflow,
        note: view.note(),
        rows,
    }
}

/// Adds one window to the groups of `view`, keyed by a pair of names.
fn fold(view: View, w: &MeshWindow, groups: &mut BTreeMap<(String, String), Group>) {
    if view == View::Proxies {
        for (id, p) in &w.proxies {
            let g = groups.entry((id.clone(), p.service.clone())).or_default();
            g.client.counts.add(&p.inbound);
            g.client.counts.add(&p.outbound);
            g.add_connections(&p.connections);
        }
        return;
    }
    for (k, c) in &w.requests {
        let key = match view {
            View::Services => (or_unknown(&k.destination), String::new()),
            View::Routes => (or_unknown(&k.service), or_unknown(&k.route)),
            _ => (or_unknown(&k.source_service), or_unknown(&k.destination)),
        };
        groups.entry(key).or_default().add(k, c);
    }
    for (k, c) in &w.connections {
        // Each connection once: from its client's side when meshed, else its server's.
        if k.direction == "inbound" && !k.source_service.is_empty() {
            continue;
        }
        let key = match view {
            View::Services => (or_unknown(&k.destination), String::new()),
            View::Edges => (or_unknown(&k.source_service), or_unknown(&k.destination)),
            _ => continue,
        };
        groups.entry(key).or_default().add_connections(c);
    }
}
