//! The demo application used by `smesh up`: answers every request with who it is, and can
//! call another service through its proxy (HTTP by Host, or TCP through an upstream port),
//! so routing, balancing and topology can be seen from the outside. `--tcp-echo` makes it a
//! line echo server instead. With `--mesh-control` it has the mesh linked in (the `smesh`
//! library): it serves behind the library's inbound stages and calls through its client, no
//! proxy either way.

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Service name to report.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Version label to report.
    #[arg(long, default_value = "v1")]
    version: String,
    /// On each request, also call this service (Host header) through --via, or through the
    /// linked-in mesh with --mesh-control.
    #[arg(long)]
    call: Option<String>,
    /// The local proxy's outbound address used for --call.
    #[arg(long)]
    via: Option<SocketAddr>,
    /// On each request, also send a line to this TCP address (e.g. a proxy's upstream port).
    #[arg(long)]
    call_tcp: Option<SocketAddr>,
    /// Be a TCP line echo server instead of an HTTP service.
    #[arg(long)]
    tcp_echo: bool,
    /// Link the mesh in: this control plane's configuration, an identity for --name from
    /// --mesh-token-file, --listen served behind mTLS and authorization and registered.
    #[arg(long, requires_all = ["mesh_control_ca", "mesh_token_file"], conflicts_with_all = ["via", "tcp_echo"])]
    mesh_control: Option<String>,
    /// The control plane's CA certificate (PEM).
    #[arg(long)]
    mesh_control_ca: Option<std::path::PathBuf>,
    /// A join token for --name.
    #[arg(long)]
    mesh_token_file: Option<std::path::PathBuf>,
}

/// How this app reaches the service it calls.
#[derive(Clone)]
enum Caller {
    /// Through its proxy's outbound port.
    Proxy(SocketAddr),
    /// Through the mesh linked into this process.
    Mesh(smesh::HttpClient),
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    if args.mesh_control.is_some() {
        return runtime.block_on(run_with_mesh(args));
    }
    if args.call.is_some() && args.via.is_none() {
        return Err("--call needs --via (a proxy's outbound port) or --mesh-control".into());
    }
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        tracing::info!(listen = %args.listen, name = %args.name, version = %args.version, "demo app ready");
        let args = Arc::new(args);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let args = args.clone();
                    tokio::spawn(async move {
                        if args.tcp_echo {
                            echo(stream).await;
                        } else {
                            let caller = args.via.map(Caller::Proxy);
                            let service = service_fn(move |req| answer(args.clone(), caller.clone(), req));
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                        }
                    });
                }
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

async fn echo(stream: TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if write.write_all(format!("echo: {line}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The demo app with the mesh linked in: registered as --name at --listen, served and
/// calling through the mesh, until Ctrl-C or SIGTERM.
async fn run_with_mesh(args: DemoArgs) -> Result<(), String> {
    let listener =
        std::net::TcpListener::bind(args.listen).map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let mut builder = smesh::Mesh::builder().service(&args.name).advertise(args.listen);
    if let (Some(url), Some(ca), Some(token)) = (&args.mesh_control, &args.mesh_control_ca, &args.mesh_token_file) {
        builder = builder.control(url).control_ca(ca).token_file(token);
    }
    let mesh = builder.connect().await.map_err(|e| e.to_string())?;
    let args = Arc::new(args);
    let caller = Some(Caller::Mesh(mesh.http_client()));
    let app = tower::service_fn(move |req| answer(args.clone(), caller.clone(), req));
    mesh.serve(listener, app).map_err(|e| e.to_string())?;
    tracing::info!(identity = ?mesh.spiffe_id(), "demo app ready, with the mesh linked in");
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn answer<B>(
    args: Arc<DemoArgs>,
    caller: Option<Caller>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut body = format!(
        "{} {} answered {} {}\n",
        args.name,
        args.version,
        req.method(),
        req.uri().path()
    );
    if let (Some(host), Some(caller)) = (&args.call, caller) {
        let reply = match call_http(caller, host, req.uri().path()).await {
            Ok(text) => text,
            Err(e) => format!("call to {host} failed: {e}\n"),
        };
        body.push_str(&format!("  -> {reply}"));
    }
    if let Some(addr) = args.call_tcp {
        let reply = match call_tcp(addr, &args.name).await {
            Ok(text) => text,
            Err(e) => format!("tcp call to {addr} failed: {e}"),
        };
        body.push_str(&format!("  -> tcp {reply}\n"));
    }
    let identity = format!("{} {}", args.name, args.version);
    Ok(Response::builder()
        .header("x-demo-app", identity)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

async fn call_http(caller: Caller, host: &str, path: &str) -> Result<String, String> {
    let via = match caller {
        Caller::Proxy(via) => via,
        Caller::Mesh(client) => return call_mesh(client, host, path).await,
    };
    let work = async {
        let stream = TcpStream::connect(via).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

async fn call_mesh(client: smesh::HttpClient, host: &str, path: &str) -> Result<String, String> {
    let work = async {
        let req = Request::builder()
            .uri(format!("http://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

async fn call_tcp(addr: SocketAddr, name: &str) -> Result<String, String> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(format!("hello from {name}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        Ok(line.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}
