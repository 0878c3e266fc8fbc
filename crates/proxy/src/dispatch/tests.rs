//! `Dispatch` driven as a library caller would, without the server: a rule from a YAML
//! snapshot, loopback HTTP/1.1 upstreams, request bodies of any type.

use super::*;
use crate::config::snapshot::Snapshot;
use crate::telemetry::metrics::Metrics;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use tokio::net::TcpListener;

/// A loopback upstream: answers its n-th request (from 0) with `answer(n)` after its delay.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<AtomicU32>,
}

async fn upstream(answer: impl Fn(u32) -> (u16, Duration) + Send + Sync + 'static) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let (answer, counter) = (Arc::new(answer), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (answer, counter) = (answer.clone(), counter.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (answer, counter) = (answer.clone(), counter.clone());
                    async move {
                        // Read the whole body, as a real server would before answering.
                        let _ = req.into_body().collect().await;
                        let (status, delay) = answer(counter.fetch_add(1, Ordering::SeqCst));
                        tokio::time::sleep(delay).await;
                        let resp = Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"ok")));
                        Ok::<_, std::convert::Infallible>(resp.unwrap())
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

/// 503 to the first request, 200 after.
fn flaky_once() -> impl Fn(u32) -> (u16, Duration) + Send + Sync + 'static {
    |n| (if n == 0 { 503 } else { 200 }, Duration::ZERO)
}

const RETRY_503: &str = "retry: {attempts: 2, codes: [503], backoff: 1ms}";

fn always(status: u16) -> impl Fn(u32) -> (u16, Duration) + Send + Sync + 'static {
    move |_| (status, Duration::ZERO)
}

/// An address nothing listens on.
fn dead_address() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Service `api` with these endpoints; `rule` is the YAML of its one HTTPRoute rule's
/// extra fields, `policy` the YAML of a BackendPolicy spec's fields.
fn snapshot(metrics: &Arc<Metrics>, endpoints: &[SocketAddr], rule: &str, policy: &str) -> Snapshot {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("{{address: \"{a}\"}}")).collect();
    let mut text = format!(
        "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\n\
         spec: {{loadBalancer: round_robin, endpoints: [{}]}}\n---\n\
         apiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: api-route}}\n\
         spec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - {{{rule}}}\n",
        eps.join(", ")
    );
    if !policy.is_empty() {
        text.push_str(&format!(
            "---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\n\
             spec: {{targetRef: {{name: api}}, {policy}}}\n"
        ));
    }
    let items = smesh_model::load("mesh.yaml", &text).expect("valid test configuration");
    Snapshot::build(&items, &Snapshot::serving(None), metrics, "outbound")
}

/// A POST (hyper sends a body of unknown length chunked only for methods that have one).
fn head() -> (Parts, Request<()>) {
    let req = || Request::builder().method("POST").uri("http://api/x").body(()).unwrap();
    (req().into_parts().0, req())
}

fn ctx() -> RequestCtx {
    RequestCtx::new("outbound", "127.0.0.1:1".parse().unwrap(), None)
}

/// Sends one request with `body` through the snapshot's `api` rule.
async fn send<B: Into<ClientBody>>(
    snapshot: &Snapshot,
    metrics: &Metrics,
    body: B,
    retry_limit: u64,
) -> (RequestCtx, Result<Response<Body>, Failure>) {
    let (parts, req) = head();
    let rule = snapshot
        .service("api")
        .and_then(|s| s.route(&req))
        .expect("routed")
        .clone();
    let dispatch = Dispatch {
        rule: &rule,
        connect_timeout: Duration::from_millis(500),
        max_retry_body_bytes: retry_limit,
        mesh_tls: None,
        metrics,
        filters: Default::default(),
    };
    let mut ctx = ctx();
    let result = dispatch.send(&mut ctx, parts, body, false).await;
    (ctx, result)
}

fn empty() -> ClientBody {
    ClientBody::new(http_body_util::Empty::<Bytes>::new())
}

fn status(result: &Result<Response<Body>, Failure>) -> u16 {
    match result {
        Ok(resp) => resp.status().as_u16(),
        Err(failure) => failure.error.status().as_u16(),
    }
}

fn skipped(metrics: &Metrics, reason: &str) -> u64 {
    metrics.retries_skipped.with_label_values(&[reason]).get()
}

#[tokio::test]
async fn a_503_is_retried_with_the_kept_body() {
    let up = upstream(flaky_once()).await;
    let metrics = Metrics::new();
    let s = snapshot(&metrics, &[up.addr], RETRY_503, "");
    let body = ClientBody::new(Full::new(Bytes::from_static(b"kept for the retry")));
    let (ctx, result) = send(&s, &metrics, body, 1024).await;
    assert_eq!(status(&result), 200);
    assert_eq!((ctx.tries, up.seen.load(Ordering::SeqCst)), (2, 2));
    assert_eq!(ctx.endpoint, Some(up.addr));
    assert_eq!(ctx.destination.as_deref(), Some("api"));
}

#[tokio::test]
async fn an_exhausted_retry_budget_stops_retries() {
    let up = upstream(always(503)).await;
    let metrics = Metrics::new();
    let s = snapshot(
        &metrics,
        &[up.addr],
        "retry: {attempts: 3, codes: [503], backoff: 1ms}",
        "retryBudget: {ratio: 0.5, minRetriesPerSecond: 0}",
    );
    let mut tries = 0;
    for _ in 0..4 {
        let (ctx, result) = send(&s, &metrics, empty(), 1024).await;
        assert_eq!(status(&result), 503);
        tries += ctx.tries;
    }
    // Without the budget: 4 x (1 + 3) tries. With it: half a retry per request.
    assert!(tries <= 4 + 2, "{tries} tries");
    assert!(skipped(&metrics, "budget") >= 2);
}

#[tokio::test]
async fn a_full_circuit_breaker_refuses_at_once() {
    let up = upstream(|_| (200, Duration::from_millis(300))).await;
    let metrics = Metrics::new();
    let s = snapshot(&metrics, &[up.addr], "name: r", "circuitBreaker: {maxRequests: 1}");
    let started = Instant::now();
    let (first, second) = tokio::join!(send(&s, &metrics, empty(), 0), async {
        // The first request holds the only slot while its upstream sleeps.
        while up.seen.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send(&s, &metrics, empty(), 0).await
    });
    assert_eq!(status(&first.1), 200);
    assert!(matches!(
        second.1,
        Err(Failure {
            error: ProxyError::CircuitOpen,
            ..
        })
    ));
    assert_eq!(second.0.tries, 0, "refused before any try");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let bad = upstream(always(500)).await;
    let good = upstream(always(200)).await;
    let metrics = Metrics::new();
    let s = snapshot(
        &metrics,
        &[bad.addr, good.addr],
        "name: r",
        "outlierDetection: {consecutive5xx: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}",
    );
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(status(&send(&s, &metrics, empty(), 0).await.1));
    }
    assert_eq!(
        bad.seen.load(Ordering::SeqCst),
        2,
        "ejected after 2 consecutive 5xx: {statuses:?}"
    );
    assert!(statuses.iter().rev().take(8).all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test]
async fn a_failed_connect_moves_to_another_endpoint() {
    let good = upstream(always(200)).await;
    let metrics = Metrics::new();
    // No retry policy: a connect failure is not a retry.
    let s = snapshot(&metrics, &[dead_address(), good.addr], "name: r", "");
    let mut moved = 0;
    for _ in 0..4 {
        let (ctx, result) = send(&s, &metrics, empty(), 0).await;
        assert_eq!(status(&result), 200);
        assert_eq!(ctx.endpoint, Some(good.addr));
        moved += u32::from(ctx.tries == 2);
    }
    // Round robin reaches the dead endpoint once; then it is avoided for a while.
    assert_eq!(moved, 1);
}

#[tokio::test]
async fn a_per_try_timeout_ends_each_try() {
    let up = upstream(|_| (200, Duration::from_secs(5))).await;
    let metrics = Metrics::new();
    let rule = "retry: {attempts: 1, codes: [504], backoff: 1ms, perTryTimeout: 100ms}";
    let s = snapshot(&metrics, &[up.addr], rule, "");
    let started = Instant::now();
    let (ctx, result) = send(&s, &metrics, empty(), 0).await;
    assert!(matches!(
        result,
        Err(Failure {
            error: ProxyError::Timeout,
            ..
        })
    ));
    assert_eq!(ctx.tries, 2);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_body_too_large_to_keep_is_not_retried() {
    let up = upstream(flaky_once()).await;
    let metrics = Metrics::new();
    let s = snapshot(&metrics, &[up.addr], RETRY_503, "");
    // A streamed body of unknown length that outgrows the 16 bytes kept for a retry.
    let chunks = (0..4).map(|_| Ok::<_, BodyError>(http_body::Frame::data(Bytes::from_static(&[b'x'; 16]))));
    let body = ClientBody::new(StreamBody::new(tokio_stream::iter(chunks)));
    let (ctx, result) = send(&s, &metrics, body, 16).await;
    assert_eq!(status(&result), 503, "the upstream answer, not retried");
    assert_eq!(ctx.tries, 1);
    assert_eq!(skipped(&metrics, "body_too_large"), 1);
}

use crate::http::body::BodyError;
