//! `orders`: a program with the mesh linked in. It serves its own calls behind the mesh
//! (`--serve`: mTLS, authorization, registered as an endpoint of `--service`), calls
//! another Service through the mesh (balancing, retries and mTLS as the resources say) in
//! rounds, prints what happened in each as one JSON line, then serves until SIGTERM or
//! Ctrl-C.
//!
//! ```text
//! orders --control http://127.0.0.1:4190 --service orders --token-file orders.token \
//!        [--target inventory --requests 20 --rounds 1 --pause-ms 0] \
//!        [--serve 127.0.0.1:8080] [--admin 127.0.0.1:9901] [--control-ca ca.pem]
//! orders --config mesh.yaml --target inventory
//! ```

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::collections::BTreeMap;
use std::net::SocketAddr;

struct Args {
    builder: smesh::Builder,
    serve: Option<std::net::TcpListener>,
    target: Option<String>,
    requests: usize,
    rounds: usize,
    pause: std::time::Duration,
}

fn args() -> Result<Args, String> {
    let mut builder = smesh::Mesh::builder();
    let (mut target, mut requests, mut rounds, mut pause_ms) = (None, 10, 1, 0);
    let mut serve = None;
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--control" => builder = builder.control(value()?),
            "--config" => builder = builder.config_file(value()?),
            "--service" => builder = builder.service(value()?),
            "--token-file" => builder = builder.token_file(value()?),
            "--control-ca" => builder = builder.control_ca(value()?),
            "--admin" => {
                let addr: SocketAddr = value()?.parse().map_err(|e| format!("--admin: {e}"))?;
                builder = builder.admin(addr);
            }
            "--target" => target = Some(value()?),
            "--serve" => {
                // Bound first: the address is registered when the mesh connects.
                let addr = value()?;
                let listener = std::net::TcpListener::bind(&addr).map_err(|e| format!("--serve {addr}: {e}"))?;
                let local = listener.local_addr().map_err(|e| format!("--serve {addr}: {e}"))?;
                builder = builder.advertise(local);
                serve = Some(listener);
            }
            "--requests" => requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--pause-ms" => pause_ms = value()?.parse().map_err(|e| format!("--pause-ms: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        builder,
        serve,
        target,
        requests,
        rounds,
        pause: std::time::Duration::from_millis(pause_ms),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let mesh = args.builder.connect().await?;
    if let Some(listener) = args.serve {
        mesh.serve(listener, tower::service_fn(app))?;
    }
    let client = mesh.http_client();
    let Some(target) = args.target else {
        return until_stopped().await;
    };
    for round in 0..args.rounds {
        if round > 0 {
            tokio::time::sleep(args.pause).await;
        }
        let line = call_round(&client, &target, args.requests).await?;
        let spiffe_id = mesh.spiffe_id().unwrap_or_default();
        println!("{{\"round\": {round}, {line}, \"spiffe_id\": {spiffe_id:?}}}");
    }
    until_stopped().await
}

/// This program's own answer to the calls it serves: who it is and what was asked.
async fn app(req: http::Request<smesh::Body>) -> Result<http::Response<String>, smesh::Error> {
    let text = format!("orders: {} {}\n", req.method(), req.uri().path());
    let resp = http::Response::builder()
        .header("x-backend", "orders-library")
        .body(text);
    Ok(resp.expect("a valid response"))
}

/// Stays registered, with its metrics served, until told to stop.
async fn until_stopped() -> Result<(), Box<dyn std::error::Error>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// `requests` calls to `target`, one after another; what came of them, as JSON fields.
async fn call_round(
    client: &smesh::HttpClient,
    target: &str,
    requests: usize,
) -> Result<String, Box<dyn std::error::Error>> {
    let (mut ok, mut errors) = (0usize, Vec::new());
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..requests {
        let req = http::Request::get(format!("http://{target}/orders/{i}")).body(Empty::<Bytes>::new())?;
        match client.request(req).await {
            Ok(resp) if resp.status().is_success() => {
                ok += 1;
                // The test backends name themselves in `x-backend`.
                let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok());
                *backends.entry(backend.unwrap_or("?").to_string()).or_default() += 1;
                // Read to the end: the connection goes back to the pool.
                resp.into_body().collect().await?;
            }
            Ok(resp) => errors.push(format!("status {}", resp.status())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let backends: Vec<String> = backends.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
    let errors: Vec<String> = errors.iter().map(|e| format!("{e:?}")).collect();
    Ok(format!(
        "\"ok\": {ok}, \"errors\": [{}], \"backends\": {{{}}}",
        errors.join(", "),
        backends.join(", ")
    ))
}
