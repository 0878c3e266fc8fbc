//! `smesh`: one binary for every role.

mod demo;
mod up;

use clap::{Args, Parser, Subcommand};
use smesh_proxy::{Limits, ProxyOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "smesh",
    version,
    about = "smesh: a service mesh (data plane proxy and tools)"
)]
struct Cli {
    /// Log filter (e.g. info, debug, smesh_proxy=debug); RUST_LOG also works.
    #[arg(long, global = true, env = "SMESH_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data-plane proxy with a static configuration file.
    Proxy(Box<ProxyArgs>),
    /// Check a configuration file: print every error, change nothing.
    Validate {
        /// The file to check.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Start a demo on this machine: sample services behind a proxy. Ctrl-C stops it all.
    Up(up::UpArgs),
    /// A small HTTP service used by the demo (and handy for trying routes).
    #[command(hide = true)]
    DemoApp(demo::DemoArgs),
}

#[derive(Args)]
struct ProxyArgs {
    /// Resources file (Service, HTTPRoute, ...); watched for changes, re-read on SIGHUP.
    #[arg(long)]
    config: PathBuf,
    /// Where local applications send their outbound requests.
    #[arg(long, default_value = "127.0.0.1:4140")]
    outbound: SocketAddr,
    /// Where the mesh sends requests for the local application (needs --app).
    #[arg(long, default_value = "0.0.0.0:4143")]
    inbound: SocketAddr,
    /// The local application's address.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// The name of the local application's service (labels inbound metrics).
    #[arg(long)]
    service: Option<String>,
    /// SERVICE=ADDR: a local port that always reaches SERVICE, any protocol. Repeatable.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<(String, SocketAddr)>,
    /// Admin port: /metrics /ready /live /config.
    #[arg(long, default_value = "127.0.0.1:4191")]
    admin: SocketAddr,
    /// Worker threads, each with its own event loop.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Access log: a file path, or - for standard output.
    #[arg(long)]
    access_log: Option<String>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Largest request head (HTTP/1) or header list (HTTP/2) accepted; larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Client connections open at once; more are closed at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Time a client connection may sit idle waiting for a request head.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Largest request body kept in memory so it can be retried; bigger bodies are not retried.
    #[arg(long, default_value_t = 64 * 1024)]
    max_retry_body_bytes: u64,
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    detect_timeout: Duration,
    /// Upstream connect timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// HTTP/2 streams a client may have open on one connection.
    #[arg(long, default_value_t = 1024)]
    max_concurrent_streams: u32,
}

fn parse_upstream(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or("expected SERVICE=ADDR, e.g. db=127.0.0.1:6379")?;
    let addr = addr.parse().map_err(|e| format!("invalid address {addr:?}: {e}"))?;
    if name.is_empty() {
        return Err("empty service name".into());
    }
    Ok((name.to_string(), addr))
}

fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Proxy(args) => smesh_proxy::run(ProxyOptions {
            config: args.config,
            outbound: Some(args.outbound),
            inbound: args.app.map(|_| args.inbound),
            app: args.app,
            service: args.service,
            upstreams: args.upstreams,
            admin: args.admin,
            workers: args.workers,
            access_log: args.access_log,
            drain_timeout: args.drain_timeout,
            limits: Limits {
                max_header_bytes: args.max_header_bytes,
                max_connections: args.max_connections,
                idle_timeout: args.idle_timeout,
                max_retry_body_bytes: args.max_retry_body_bytes,
                detect_timeout: args.detect_timeout,
                connect_timeout: args.connect_timeout,
                max_concurrent_streams: args.max_concurrent_streams,
            },
        }),
        Command::Validate { file } => validate(&file),
        Command::Up(args) => up::run(args),
        Command::DemoApp(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn validate(file: &std::path::Path) -> Result<(), String> {
    let items = smesh_proxy::reload::load(file)?;
    println!("ok: {} resources in {}", items.len(), file.display());
    Ok(())
}
