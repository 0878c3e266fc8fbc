//! A `Mesh` from a resource file, called from a multi-threaded runtime, against loopback
//! HTTP/1.1 upstreams: routing by authority, retries, balancing, the mesh's own answers as
//! errors, the proxy's metric names.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// An upstream that answers 503 to every other request (the first, the third, ...) and
/// names itself in `x-backend`; counts what it saw.
async fn flaky(name: &'static str) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let status = if n.is_multiple_of(2) { 503 } else { 200 };
                    let resp = Response::builder()
                        .status(status)
                        .header("x-backend", name)
                        .body(Full::new(Bytes::from_static(b"ok")));
                    async move { Ok::<_, std::convert::Infallible>(resp.unwrap()) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn resources(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: inventory}}\n\
         spec: {{endpoints: [{{address: \"{a}\"}}, {{address: \"{b}\"}}]}}\n---\n\
         apiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: inventory}}\n\
         spec:\n  parentRefs: [{{name: inventory}}]\n  rules:\n  \
         - {{retry: {{attempts: 3, codes: [503], backoff: 1ms}}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_routed_retried_and_counted_from_any_runtime_thread() {
    let (a, seen_a) = flaky("a").await;
    let (b, seen_b) = flaky("b").await;
    let dir = std::env::temp_dir().join(format!("smesh-lib-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, resources(a, b)).unwrap();
    let mesh = smesh::Mesh::builder().config_file(&file).connect().await.unwrap();
    let client = mesh.http_client();

    // Each on a task of its own, so the requests run on whichever runtime thread picks them
    // up; one after another, so the backends' every-other-request 503s meet at most twice
    // in a row (a retry goes to the other endpoint).
    for i in 0..20 {
        let client = client.clone();
        let call = tokio::spawn(async move {
            let req = Request::get(format!("http://inventory/item/{i}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = client.request(req).await.expect("an answer");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("a body").to_bytes();
            (status, body)
        });
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "a 503 is retried");
        assert_eq!(&body[..], b"ok");
    }
    assert!(seen_a.load(Ordering::SeqCst) > 0 && seen_b.load(Ordering::SeqCst) > 0);

    // The mesh's own answer is an error, in the proxy's words.
    let req = Request::get("http://nowhere/").body(String::new()).unwrap();
    let e = client.request(req).await.expect_err("no such service");
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(e.reason(), Some("unknown authority"));

    let metrics = mesh.metrics_text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("smesh_requests_total{") && l.contains("service=\"inventory\""))
        .expect("smesh_requests_total for inventory");
    assert!(
        line.contains("direction=\"outbound\"") && line.ends_with(" 20"),
        "{line}"
    );
    assert!(metrics.contains("smesh_retries_total"), "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_options_are_start_errors() {
    let e = smesh::Mesh::builder()
        .connect()
        .await
        .err()
        .expect("neither file nor control plane");
    assert!(e.to_string().contains("--config FILE"), "{e}");
    assert_eq!(e.status(), None);
    let e = smesh::Mesh::builder()
        .control("http://127.0.0.1:1")
        .token_file("/nonexistent/token")
        .connect()
        .await
        .err()
        .expect("no token file");
    assert!(e.to_string().contains("cannot read token file"), "{e}");
}

/// Service `orders` at `addr`, and with `guarded` an AuthorizationPolicy that lets only
/// `web` call it.
fn orders(addr: SocketAddr, guarded: bool) -> String {
    let mut text = format!(
        "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: orders}}\n\
         spec: {{endpoints: [{{address: \"{addr}\"}}]}}\n"
    );
    if guarded {
        text.push_str(
            "---\napiVersion: smesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-only}\n\
             spec: {targetRef: {name: orders}, rules: [{from: [{service: web}]}]}\n",
        );
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_app_in_process_under_the_service_s_authorization() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("smesh-lib-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, orders(addr, false)).unwrap();
    let mesh = smesh::Mesh::builder()
        .config_file(&file)
        .service("orders")
        .connect()
        .await
        .unwrap();
    let app = tower::service_fn(|req: Request<smesh::Body>| async move {
        let body = req.into_body().collect().await?.to_bytes();
        // Bodies need not be `Sync` (tonic's are not), on either side.
        let answer = Full::new(Bytes::from(format!("got {} bytes", body.len()))).boxed_unsync();
        Ok::<_, smesh::Error>(Response::new(answer))
    });
    mesh.serve(listener, app).unwrap();
    let client = mesh.http_client();
    let call = || async {
        let req = Request::post("http://orders/new")
            .body(Full::new(Bytes::from_static(b"12345")).boxed_unsync())
            .unwrap();
        client.request(req).await
    };

    // Through this program's own inbound listener: no policy, served.
    let resp = call().await.expect("served");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"got 5 bytes"
    );

    // Only `web` may call now (the file is watched): this caller has no identity, so it is
    // denied before the app sees the request.
    std::fs::write(&file, orders(addr, true)).unwrap();
    let mut denied = None;
    for _ in 0..500 {
        match call().await {
            Err(e) if e.status() == Some(StatusCode::FORBIDDEN) => {
                denied = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    let denied = denied.expect("denied within 5 s of the policy");
    assert_eq!(denied.reason(), Some("forbidden"));
    // The inbound side's words, read from its answer.
    assert!(
        denied.to_string().contains("an unauthenticated peer denied"),
        "{denied}"
    );

    let metrics = mesh.metrics_text();
    let served = metrics
        .lines()
        .find(|l| l.starts_with("smesh_requests_total{") && l.contains("direction=\"inbound\""))
        .expect("inbound requests counted");
    assert!(served.contains("service=\"orders\""), "{served}");
    let _ = std::fs::remove_dir_all(&dir);
}
