//! `orders`: a program with the mesh linked in. It calls another Service through the mesh
//! (balancing, retries and mTLS as the resources say) in rounds, prints what happened in
//! each as one JSON line, then serves the mesh's admin endpoints until SIGTERM or Ctrl-C.
//!
//! ```text
//! orders --control http://127.0.0.1:4190 --service orders --token-file orders.token \
//!        --target inventory --requests 20 --admin 127.0.0.1:9901 [--control-ca ca.pem]
//!        [--rounds 1 --pause-ms 0]
//! orders --config mesh.yaml --target inventory
//! ```

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::collections::BTreeMap;
use std::net::SocketAddr;

struct Args {
    builder: smesh::Builder,
    target: String,
    requests: usize,
    rounds: usize,
    pause: std::time::Duration,
}

fn args() -> Result<Args, String> {
    let mut builder = smesh::Mesh::builder();
    let (mut target, mut requests, mut rounds, mut pause_ms) = (None, 10, 1, 0);
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
            "--requests" => requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--pause-ms" => pause_ms = value()?.parse().map_err(|e| format!("--pause-ms: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let target = target.ok_or("--target SERVICE is required")?;
    Ok(Args {
        builder,
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
    let client = mesh.http_client();
    for round in 0..args.rounds {
        if round > 0 {
            tokio::time::sleep(args.pause).await;
        }
        let line = call_round(&client, &args.target, args.requests).await?;
        let spiffe_id = mesh.spiffe_id().unwrap_or_default();
        println!("{{\"round\": {round}, {line}, \"spiffe_id\": {spiffe_id:?}}}");
    }
    // Stays registered, with its metrics served, until told to stop.
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
