use super::*;
use crate::telemetry::event::{BodyEnd, ConnectionKind};
use crate::telemetry::metrics::Metrics;

fn ctx(metrics: &Arc<Metrics>, direction: &'static str, peer: Option<&str>) -> RequestCtx {
    let mut ctx = RequestCtx::new(direction, "127.0.0.1:1".parse().unwrap(), peer.map(Arc::from));
    ctx.route = Some(Arc::new(metrics.route(direction, "api", "r")));
    ctx
}

fn event(ctx: RequestCtx, status: u16, grpc_status: Option<u16>, ms: u64) -> RequestEvent {
    RequestEvent {
        ctx,
        status,
        grpc_status,
        response_bytes: 10,
        to_head: Duration::from_millis(ms),
        to_end: Duration::from_millis(ms),
        end: BodyEnd::Complete,
    }
}

fn find(w: &StatsWindow, f: impl Fn(&RequestSeries) -> bool) -> &RequestSeries {
    w.requests.iter().find(|s| f(s)).expect("series present")
}

#[test]
fn requests_fold_into_series_by_outcome_with_their_latency() {
    let metrics = Metrics::new();
    let stats = Stats::new(2);
    for i in 0..100u64 {
        let status = if i % 20 == 0 { 503 } else { 200 };
        let mut c = ctx(&metrics, "outbound", None);
        c.tries = if i % 10 == 0 { 2 } else { 1 };
        stats.record(&Sample::of_event(&event(c, status, None, 1 + i)));
    }
    let w = stats.close(10_000);
    assert_eq!((w.start_unix_ms, w.duration_ms, w.overflow), (10_000, 10_000, 0));
    assert_eq!(w.requests.len(), 2);
    let ok = find(&w, |s| s.status_class == 2);
    let failed = find(&w, |s| s.status_class == 5);
    assert_eq!(
        (ok.requests, ok.failures, failed.requests, failed.failures),
        (95, 0, 5, 5)
    );
    assert_eq!(ok.retries + failed.retries, 10);
    assert_eq!(ok.response_bytes, 950);
    assert_eq!(
        (ok.service.as_str(), ok.destination.as_str(), ok.route.as_str()),
        ("api", "api", "r")
    );
    let sketch = latency::decode(&ok.latency_ms_sketch).expect("a sketch");
    assert_eq!(sketch.count(), 95);
    let p99 = latency::quantile(&sketch, 0.99).unwrap();
    assert!((95.0..=103.0).contains(&p99), "{p99}");
    // the next window starts empty
    assert!(stats.close(20_000).requests.is_empty());
}

#[test]
fn grpc_status_and_peer_identity_are_part_of_the_key() {
    let metrics = Metrics::new();
    let stats = Stats::new(1);
    let web = "spiffe://example.org/service/web";
    for status in [Some(0), Some(14), Some(14), None] {
        let mut c = ctx(&metrics, "inbound", Some(web));
        c.grpc = true;
        stats.record(&Sample::of_event(&event(c, 200, status, 5)));
    }
    let w = stats.close(0);
    let unavailable = find(&w, |s| s.grpc_status == 14);
    assert_eq!((unavailable.requests, unavailable.failures), (2, 2));
    assert_eq!(unavailable.peer_identity, web);
    assert_eq!(find(&w, |s| s.grpc_status == 0).failures, 0);
    // a call that ended without a status failed
    assert_eq!(find(&w, |s| s.grpc_status == -1).failures, 1);
}

#[test]
fn series_are_capped_and_the_rest_counted() {
    let metrics = Metrics::new();
    let stats = Stats::new(1);
    for i in 0..MAX_SERIES + 10 {
        let c = ctx(&metrics, "inbound", Some(&format!("spiffe://td/service/s{i}")));
        stats.record(&Sample::at_head(&c, 200, Some(1)));
    }
    let w = stats.close(0);
    assert_eq!((w.requests.len(), w.overflow), (MAX_SERIES, 10));
}

#[test]
fn series_of_one_route_from_two_snapshots_merge_by_name() {
    let metrics = Metrics::new();
    let stats = Stats::new(1);
    for _ in 0..2 {
        // a new snapshot resolves new handles for the same route
        let c = ctx(&metrics, "outbound", None);
        stats.record(&Sample::at_head(&c, 204, None));
    }
    let w = stats.close(0);
    assert_eq!(w.requests.len(), 1);
    assert_eq!(w.requests[0].requests, 2);
}

#[test]
fn connections_fold_by_direction_peer_destination_and_kind() {
    let stats = Stats::new(1);
    for error in [None, Some("reset".to_string())] {
        let mut e = ConnectionEvent::start(ConnectionKind::Tcp, "outbound", "127.0.0.1:1".parse().unwrap(), None);
        e.destination = Some(Arc::from("db"));
        e.bytes_from_client = 3;
        e.bytes_to_client = 5;
        e.error = error;
        stats.record_connection(&e);
    }
    let w = stats.close(0);
    assert_eq!(w.connections.len(), 1);
    let c = &w.connections[0];
    assert_eq!((c.destination.as_str(), c.kind.as_str()), ("db", "tcp"));
    assert_eq!(
        (c.connections, c.errors, c.bytes_from_client, c.bytes_to_client),
        (2, 1, 6, 10)
    );
}
