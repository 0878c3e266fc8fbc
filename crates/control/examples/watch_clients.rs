//! watch_clients: many lightweight control-plane clients in one process, for bench/control-plane.
//!
//! Each client is one `Discovery.Stream`: it says Hello with a unique `proxy_id` (and, with
//! `--register`, an endpoint to register), then acks every ConfigSnapshot it receives, like
//! `smesh proxy --control` does, but without parsing the YAML. It records when (wall clock, ns
//! since the Unix epoch) each version arrived, so the harness can measure propagation from a
//! timestamp it took just before an apply.
//!
//! Connections: by default every client has its own HTTP/2 connection (as real proxies do);
//! `--conns C` multiplexes the streams over C connections instead.
//!
//! Driven by commands on stdin, one per line; every answer is one JSON line on stdout:
//!   status                         -> {"ev":"status", connected, with_snapshot, min_version, max_version, ...}
//!   sync TIMEOUT_MS                -> waits until every client is connected and on the same, newest version
//!   wait VERSION T0_NS TIMEOUT_MS  -> waits until every client has a version >= VERSION; latencies from T0_NS
//!   churn RATE SECONDS LIFE_MS     -> starts endpoint churn in the background: RATE/2 new streams per second,
//!                                     each registering an endpoint and leaving with Goodbye after LIFE_MS
//!                                     (so RATE endpoint changes per second); prints {"ev":"churn_done",...}
//!   quit                           -> says Goodbye on every stream and exits
//! Every wait is bounded by its timeout; the process also exits when stdin closes.

use clap::Parser;
use smesh_api::v1::discovery_client::DiscoveryClient;
use smesh_api::v1::{proxy_message, Ack, Endpoint, Goodbye, Hello, ProxyMessage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

#[derive(Parser, Debug, Clone)]
#[command(about = "Many lightweight smesh control-plane watch clients in one process")]
struct Args {
    /// Control plane URL.
    #[arg(long, default_value = "http://127.0.0.1:4180")]
    control: String,
    /// Number of long-lived clients (streams).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// HTTP/2 connections shared by the clients; 0: one connection per client.
    #[arg(long, default_value_t = 0)]
    conns: usize,
    /// Prefix of the proxy ids (`PREFIX-<i>`).
    #[arg(long, default_value = "wc")]
    id_prefix: String,
    /// Register one endpoint per client in service `PREFIX-<i % services>`.
    #[arg(long)]
    register: Option<String>,
    /// Number of services the registered endpoints are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// New clients started per second (a bounded ramp, not a thundering herd).
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Lease TTL in milliseconds sent in Hello (0: the control plane's default).
    #[arg(long, default_value_t = 0)]
    lease_ttl_ms: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What one client has seen: (version, arrival ns) for each snapshot, oldest first.
#[derive(Default)]
struct ClientState {
    connected: AtomicBool,
    received: Mutex<Vec<(u64, u64)>>,
    errors: AtomicU64,
}

const KEEP_RECEIVED: usize = 512;

struct Shared {
    clients: Vec<Arc<ClientState>>,
    snapshot_bytes: AtomicU64,
    snapshots: AtomicU64,
    bytes_total: AtomicU64,
    connect_failures: AtomicU64,
    last_error: Mutex<String>,
}

fn out(v: serde_json::Value) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{v}");
    let _ = stdout.flush();
}

fn endpoint_for(url: &str) -> Result<TonicEndpoint, String> {
    TonicEndpoint::from_shared(url.to_string())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_adaptive_window(false)
        })
        .map_err(|e| format!("invalid control URL: {e}"))
}

async fn connect(url: &str) -> Result<Channel, String> {
    endpoint_for(url)?.connect().await.map_err(|e| format!("connect: {e}"))
}

fn registration(service: &str, address: String) -> Endpoint {
    Endpoint {
        service: service.to_string(),
        address,
        labels: HashMap::from([("bench".to_string(), "watch-clients".to_string())]),
        weight: 1,
        identity: String::new(),
    }
}

/// One stream: Hello, then ack every snapshot until `stop` (then Goodbye) or the stream ends.
/// Returns Ok(true) after a clean Goodbye.
async fn run_stream(
    channel: Channel,
    hello: Hello,
    state: Option<Arc<ClientState>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<bool, String> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(ProxyMessage {
        kind: Some(proxy_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(256 << 20);
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("stream: {e}"))?
        .into_inner();
    if let Some(s) = &state {
        s.connected.store(true, Ordering::Release);
    }
    let result = loop {
        if *stop.borrow() {
            let _ = tx
                .send(ProxyMessage {
                    kind: Some(proxy_message::Kind::Goodbye(Goodbye {})),
                })
                .await;
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            break Ok(true);
        }
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(snapshot)) => {
                    let t = now_ns();
                    let len = (snapshot.resources_yaml.len() + snapshot.resources_yaml_gzip.len()) as u64;
                    shared.snapshot_bytes.store(len, Ordering::Relaxed);
                    shared.snapshots.fetch_add(1, Ordering::Relaxed);
                    shared.bytes_total.fetch_add(len, Ordering::Relaxed);
                    if let Some(s) = &state {
                        let mut r = s.received.lock().unwrap();
                        r.push((snapshot.version, t));
                        if r.len() > KEEP_RECEIVED {
                            let extra = r.len() - KEEP_RECEIVED;
                            r.drain(..extra);
                        }
                    }
                    let ack = Ack { version: snapshot.version, accepted: true, ..Default::default() };
                    if tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Ack(ack)) }).await.is_err() {
                        break Err("stream closed".to_string());
                    }
                }
                Ok(None) => break Err("stream ended".to_string()),
                Err(e) => break Err(format!("stream: {e}")),
            },
            _ = stop.changed() => {}
        }
    };
    if let Some(s) = &state {
        s.connected.store(false, Ordering::Release);
    }
    result
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn versions(shared: &Shared) -> (usize, usize, u64, u64) {
    let mut connected = 0;
    let mut with = 0;
    let (mut min, mut max) = (u64::MAX, 0);
    for c in &shared.clients {
        if c.connected.load(Ordering::Acquire) {
            connected += 1;
        }
        if let Some(&(v, _)) = c.received.lock().unwrap().last() {
            with += 1;
            min = min.min(v);
            max = max.max(v);
        }
    }
    (connected, with, if with == 0 { 0 } else { min }, max)
}

fn status(shared: &Shared, ev: &str) -> serde_json::Value {
    let (connected, with, min, max) = versions(shared);
    serde_json::json!({
        "ev": ev,
        "clients": shared.clients.len(),
        "connected": connected,
        "with_snapshot": with,
        "min_version": min,
        "max_version": max,
        "snapshot_bytes": shared.snapshot_bytes.load(Ordering::Relaxed),
        "snapshots": shared.snapshots.load(Ordering::Relaxed),
        "bytes_total": shared.bytes_total.load(Ordering::Relaxed),
        "stream_errors": shared.clients.iter().map(|c| c.errors.load(Ordering::Relaxed)).sum::<u64>(),
        "connect_failures": shared.connect_failures.load(Ordering::Relaxed),
        "last_error": shared.last_error.lock().unwrap().clone(),
    })
}

/// Latencies (ms from t0) of the first arrival of a version >= `version` at each client.
fn latencies(shared: &Shared, version: u64, t0: u64) -> (Vec<f64>, usize) {
    let mut lat = Vec::with_capacity(shared.clients.len());
    let mut missing = 0;
    for c in &shared.clients {
        let r = c.received.lock().unwrap();
        match r.iter().find(|(v, _)| *v >= version) {
            Some(&(_, t)) => lat.push(t.saturating_sub(t0) as f64 / 1e6),
            None => missing += 1,
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat, missing)
}

async fn churn(
    args: Args,
    shared: Arc<Shared>,
    rate: f64,
    seconds: f64,
    life: Duration,
    counter: Arc<AtomicU64>,
) -> serde_json::Value {
    // Each churn stream makes two changes (its registration and its Goodbye).
    let period = Duration::from_secs_f64(2.0 / rate.max(0.1));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let registered = Arc::new(AtomicU64::new(0));
    let goodbyes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < end {
        tick.tick().await;
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let hello = Hello {
            proxy_id: format!("{}-churn-{n}", args.id_prefix),
            version: "watch_clients".into(),
            endpoint: Some(registration(
                &format!("churn-{}", n % 10),
                format!("10.2.{}.{}:8080", (n >> 8) & 255, n & 255),
            )),
            lease_ttl_ms: args.lease_ttl_ms,
            applied_version: 0,
            admin_address: String::new(),
        };
        let (url, shared, registered, goodbyes, failures) = (
            args.control.clone(),
            shared.clone(),
            registered.clone(),
            goodbyes.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            let channel = match connect(&url).await {
                Ok(c) => c,
                Err(_) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let run = tokio::spawn(run_stream(channel, hello, None, shared, stop_rx));
            tokio::time::sleep(life).await;
            let _ = stop_tx.send(true);
            match tokio::time::timeout(Duration::from_secs(5), run).await {
                Ok(Ok(Ok(true))) => {
                    registered.fetch_add(1, Ordering::Relaxed);
                    goodbyes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let issued = Instant::now() - started;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    serde_json::json!({
        "ev": "churn_done",
        "streams": registered.load(Ordering::Relaxed) + failures.load(Ordering::Relaxed),
        "registrations": registered.load(Ordering::Relaxed),
        "goodbyes": goodbyes.load(Ordering::Relaxed),
        "failures": failures.load(Ordering::Relaxed),
        "issue_seconds": issued.as_secs_f64(),
        "changes_per_second": (registered.load(Ordering::Relaxed) + goodbyes.load(Ordering::Relaxed)) as f64 / issued.as_secs_f64().max(1e-9),
    })
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let shared = Arc::new(Shared {
        clients: (0..args.clients).map(|_| Arc::new(ClientState::default())).collect(),
        snapshot_bytes: AtomicU64::new(0),
        snapshots: AtomicU64::new(0),
        bytes_total: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        last_error: Mutex::new(String::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Shared connections, if asked for.
    let mut channels = Vec::new();
    if args.conns > 0 {
        for _ in 0..args.conns {
            match connect(&args.control).await {
                Ok(c) => channels.push(c),
                Err(e) => {
                    out(serde_json::json!({"ev": "fatal", "error": e}));
                    return;
                }
            }
        }
    }

    // Long-lived clients, started at --connect-rate; each reconnects (bounded backoff) if its stream breaks.
    let mut handles = Vec::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
    {
        let args = args.clone();
        let shared = shared.clone();
        let stop_rx = stop_rx.clone();
        let channels = channels.clone();
        let (htx, mut hrx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gap);
            for i in 0..args.clients {
                tick.tick().await;
                if *stop_rx.borrow() {
                    break;
                }
                let hello = Hello {
                    proxy_id: format!("{}-{i}", args.id_prefix),
                    version: "watch_clients".into(),
                    endpoint: args.register.as_ref().map(|p| {
                        registration(
                            &format!("{p}-{}", i % args.services.max(1)),
                            format!("10.1.{}.{}:8080", (i >> 8) & 255, i & 255),
                        )
                    }),
                    lease_ttl_ms: args.lease_ttl_ms,
                    applied_version: 0,
                    admin_address: String::new(),
                };
                let state = shared.clients[i].clone();
                let shared = shared.clone();
                let stop = stop_rx.clone();
                let shared_channel = (!channels.is_empty()).then(|| channels[i % channels.len()].clone());
                let url = args.control.clone();
                let h = tokio::spawn(async move {
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        let channel = match &shared_channel {
                            Some(c) => Ok(c.clone()),
                            None => connect(&url).await,
                        };
                        let result = match channel {
                            Ok(c) => {
                                run_stream(c, hello.clone(), Some(state.clone()), shared.clone(), stop.clone()).await
                            }
                            Err(e) => {
                                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                                Err(e)
                            }
                        };
                        match result {
                            Ok(_) => return,
                            Err(e) => {
                                state.errors.fetch_add(1, Ordering::Relaxed);
                                *shared.last_error.lock().unwrap() = e;
                            }
                        }
                        if *stop.borrow() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                });
                let _ = htx.send(h);
            }
        });
        // Collect the handles as they are created, for the final Goodbye.
        let collector = tokio::spawn(async move {
            let mut hs = Vec::new();
            while let Some(h) = hrx.recv().await {
                hs.push(h);
            }
            hs
        });
        handles.push(collector);
    }

    // Commands from stdin (a plain thread: reading stdin blocks).
    let (ctx, mut crx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if ctx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = ctx.send("quit".into());
    });

    let churn_counter = Arc::new(AtomicU64::new(0));
    while let Some(line) = crx.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => out(status(&shared, "status")),
            ["sync", timeout_ms] => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms.parse().unwrap_or(30_000));
                let mut stable_since: Option<(Instant, u64)> = None;
                let ok = loop {
                    let (connected, with, min, max) = versions(&shared);
                    if connected == shared.clients.len() && with == shared.clients.len() && min == max {
                        match stable_since {
                            Some((t, v)) if v == max && t.elapsed() >= Duration::from_millis(500) => break true,
                            Some((_, v)) if v == max => {}
                            _ => stable_since = Some((Instant::now(), max)),
                        }
                    } else {
                        stable_since = None;
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let mut s = status(&shared, "sync");
                s["ok"] = ok.into();
                out(s);
            }
            ["wait", version, t0, timeout_ms] => {
                let version: u64 = version.parse().unwrap_or(u64::MAX);
                let t0: u64 = t0.parse().unwrap_or(0);
                let deadline = Instant::now() + Duration::from_millis(timeout_ms.parse().unwrap_or(30_000));
                loop {
                    let (_, missing) = latencies(&shared, version, t0);
                    if missing == 0 || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let (lat, missing) = latencies(&shared, version, t0);
                out(serde_json::json!({
                    "ev": "wait",
                    "version": version,
                    "got": lat.len(),
                    "missing": missing,
                    "p50_ms": percentile(&lat, 50.0),
                    "p90_ms": percentile(&lat, 90.0),
                    "p99_ms": percentile(&lat, 99.0),
                    "max_ms": lat.last().copied().unwrap_or(f64::NAN),
                    "min_ms": lat.first().copied().unwrap_or(f64::NAN),
                    "snapshot_bytes": shared.snapshot_bytes.load(Ordering::Relaxed),
                }));
            }
            ["churn", rate, seconds, life_ms] => {
                let rate: f64 = rate.parse().unwrap_or(100.0);
                let seconds: f64 = seconds.parse().unwrap_or(20.0);
                let life = Duration::from_millis(life_ms.parse().unwrap_or(1000));
                let (args, shared, counter) = (args.clone(), shared.clone(), churn_counter.clone());
                tokio::spawn(async move {
                    out(churn(args, shared, rate, seconds, life, counter).await);
                });
                out(serde_json::json!({"ev": "churn_started", "rate": rate, "seconds": seconds}));
            }
            ["quit"] => break,
            [] => {}
            _ => out(serde_json::json!({"ev": "error", "error": format!("unknown command {line:?}")})),
        }
    }

    // Goodbye on every stream, bounded.
    let _ = stop_tx.send(true);
    for collector in handles {
        if let Ok(Ok(hs)) = tokio::time::timeout(Duration::from_secs(2), collector).await {
            let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(hs)).await;
        }
    }
    out(status(&shared, "bye"));
}
