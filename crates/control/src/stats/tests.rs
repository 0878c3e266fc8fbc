use super::views::{report, View};
use super::*;

const WEB: &str = "spiffe://td/service/web";
const API: &str = "spiffe://td/service/api";

fn reporter(id: &str, service: &str, identity: &str) -> Reporter {
    Reporter {
        proxy_id: id.into(),
        service: service.into(),
        identity: identity.into(),
    }
}

/// `n` requests of which `failed` failed, each taking `ms`.
fn series(direction: &str, peer: &str, status_class: u32, n: u64, failed: u64, ms: f64) -> RequestSeries {
    let mut sketch = latency::new_sketch();
    for _ in 0..n {
        sketch.add(ms);
    }
    RequestSeries {
        direction: direction.into(),
        peer_identity: peer.into(),
        service: "api".into(),
        destination: "api".into(),
        route: "api-route".into(),
        status_class,
        grpc_status: -1,
        requests: n,
        failures: failed,
        latency_ms_sketch: latency::encode(&sketch),
        ..Default::default()
    }
}

fn window(start: u64, requests: Vec<RequestSeries>) -> StatsWindow {
    StatsWindow {
        start_unix_ms: start,
        duration_ms: 10_000,
        requests,
        ..Default::default()
    }
}

#[test]
fn windows_of_two_proxies_merge_and_the_services_view_prefers_the_clients_side() {
    let ring = Ring::new(DEFAULT_WINDOWS);
    let web = reporter("web-1", "web", WEB);
    let api = reporter("api-1", "api", API);
    for start in [100_000, 110_000] {
        // web's proxy: 95 ok at 2 ms, 5 failed fast; api's proxy saw the 95 that reached it
        let out = vec![
            series("outbound", "", 2, 95, 0, 2.0),
            series("outbound", "", 5, 5, 5, 0.5),
        ];
        assert!(ring.ingest(&web, window(start, out), start));
        assert!(ring.ingest(
            &api,
            window(start + 3, vec![series("inbound", WEB, 2, 95, 0, 1.5)]),
            start
        ));
    }
    assert_eq!(ring.len(), 2);
    // at 122 s the windows of 100 s and 110 s are closed
    let r = report(&ring, View::Services, 20_000, None, 122_500);
    assert_eq!((r.from_unix_ms, r.to_unix_ms, r.windows), (100_000, 120_000, 2));
    assert_eq!(r.rows.len(), 1);
    let api_row = &r.rows[0];
    assert_eq!((api_row.name.as_str(), api_row.side), ("api", "client"));
    assert_eq!((api_row.requests, api_row.failures, api_row.rps), (200, 10, 10.0));
    // asked for a minute, the two windows there are give the rate
    let minute = report(&ring, View::Services, 60_000, None, 122_500);
    assert_eq!(
        (minute.from_unix_ms, minute.window_seconds, minute.rows[0].rps),
        (60_000, 20.0, 10.0)
    );
    assert_eq!(api_row.success_rate, Some(95.0));
    assert_eq!(api_row.mtls_percent, Some(100.0));
    let p99 = api_row.p99_ms.unwrap();
    assert!((1.9..=2.1).contains(&p99), "{p99}");
    // the edge web -> api carries both identities
    let e = report(&ring, View::Edges, 20_000, Some("web"), 122_500);
    assert_eq!(e.rows.len(), 1);
    assert_eq!(e.rows[0].name, "web -> api");
    assert!(e.rows[0].source_identities.contains(WEB));
    assert!(e.rows[0].destination_identities.contains(API));
    // both proxies are listed with what they served
    let p = report(&ring, View::Proxies, 20_000, None, 122_500);
    let counts: Vec<_> = p.rows.iter().map(|r| (r.name.as_str(), r.requests)).collect();
    assert_eq!(counts, vec![("api-1", 190), ("web-1", 200)]);
}

#[test]
fn the_open_window_is_not_read_until_its_grace_passed() {
    let ring = Ring::new(10);
    let web = reporter("w", "web", "");
    ring.ingest(
        &web,
        window(120_000, vec![series("outbound", "", 2, 10, 0, 1.0)]),
        130_000,
    );
    assert_eq!(report(&ring, View::Services, 10_000, None, 131_000).windows, 0);
    assert_eq!(report(&ring, View::Services, 10_000, None, 132_000).windows, 1);
}

#[test]
fn the_ring_keeps_its_capacity_and_refuses_old_and_future_windows() {
    let ring = Ring::new(3);
    let web = reporter("w", "web", "");
    let now = 1_000_000;
    for i in 0..5 {
        ring.ingest(
            &web,
            window(i * 10_000, vec![series("outbound", "", 2, 1, 0, 1.0)]),
            now,
        );
    }
    assert_eq!(ring.len(), 3);
    // older than the oldest kept
    assert!(!ring.ingest(&web, window(0, vec![]), now));
    // a clock far ahead
    assert!(!ring.ingest(&web, window(now + 120_000, vec![]), now));
}

#[test]
fn a_series_with_a_bad_sketch_counts_as_overflow() {
    let ring = Ring::new(3);
    let mut bad = series("outbound", "", 2, 7, 0, 1.0);
    bad.latency_ms_sketch = vec![0xff; 16];
    ring.ingest(&reporter("w", "web", ""), window(10_000, vec![bad]), 20_000);
    let p = report(&ring, View::Proxies, 10_000, None, 22_000);
    assert_eq!((p.rows[0].requests, p.overflow), (0, 7));
    ring.read(0, u64::MAX, |w| {
        let w = w.next().unwrap();
        assert_eq!(w.proxies["w"].overflow, 7);
        assert!(w.requests.is_empty());
    });
}
