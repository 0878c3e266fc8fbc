//! `smesh`: one binary for every role.

mod client;
mod commands;
mod demo;
mod endpoint;
mod malloc;
mod prometheus;
mod stat;
mod table;
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
    /// Log filter, e.g. info, debug, smesh_proxy=debug (RUST_LOG also works).
    ///
    /// Release builds leave out trace-level events (a debug build has them).
    #[arg(long, global = true, env = "SMESH_LOG", default_value = "info")]
    log_level: String,
    /// --control and friends given before the subcommand (`smesh --control URL get ...`).
    #[command(flatten)]
    before: RemoteBefore,
    #[command(subcommand)]
    command: Command,
}

/// The CLI's connection flags, accepted before the subcommand too (kubectl users put them
/// there); the subcommand's own are what `--help` shows.
#[derive(Args)]
struct RemoteBefore {
    #[arg(long = "control", id = "before_control", hide = true)]
    control: Option<String>,
    #[arg(long = "token", id = "before_token", hide = true)]
    token: Option<String>,
    #[arg(long = "token-file", id = "before_token_file", hide = true)]
    token_file: Option<PathBuf>,
    #[arg(long = "control-ca", id = "before_control_ca", hide = true)]
    control_ca: Option<PathBuf>,
}

impl RemoteBefore {
    /// Fills what `remote` lacks, or has only from the environment (a flag beats a variable).
    fn apply_to(self, remote: &mut Remote) {
        fn pick<T: PartialEq + From<String>>(slot: &mut Option<T>, before: Option<T>, env: &str) {
            let from_env = std::env::var(env).ok().map(T::from);
            if before.is_some() && (slot.is_none() || *slot == from_env) {
                *slot = before;
            }
        }
        pick(&mut remote.control, self.control, "SMESH_CONTROL");
        pick(&mut remote.token, self.token, "SMESH_TOKEN");
        pick(&mut remote.token_file, self.token_file, "SMESH_TOKEN_FILE");
        pick(&mut remote.control_ca, self.control_ca, "SMESH_CONTROL_CA");
    }
}

impl Command {
    /// The connection flags of a command that talks to the control plane.
    fn remote_mut(&mut self) -> Option<&mut Remote> {
        match self {
            Command::Apply { remote, .. }
            | Command::Get { remote, .. }
            | Command::Delete { remote, .. }
            | Command::Check { remote }
            | Command::Token { remote, .. }
            | Command::Ca { remote, .. }
            | Command::Kv { remote, .. }
            | Command::Stat { remote, .. }
            | Command::Edges { remote, .. }
            | Command::PrometheusConfig { remote, .. } => Some(remote),
            _ => None,
        }
    }
}

/// How the CLI reaches the control plane.
#[derive(Args)]
struct Remote {
    /// The control plane's address [default: the running `smesh up` demo of ./smesh-data, else
    /// the user's latest one (~/.local/state/smesh/endpoint.json), else http://127.0.0.1:4180].
    #[arg(long, global = true, env = "SMESH_CONTROL")]
    control: Option<String>,
    /// Admin token for writes (else --token-file, else ./smesh-data/admin-token if present).
    #[arg(long, global = true, env = "SMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token.
    #[arg(long, global = true, env = "SMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to check an https:// control plane against (else
    /// ./smesh-data/ca.pem if present).
    #[arg(long, global = true, env = "SMESH_CONTROL_CA")]
    control_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data-plane proxy with a static configuration file.
    Proxy(Box<ProxyArgs>),
    /// Run the control plane: configuration and endpoint distribution, admin API, KV.
    Control(ControlArgs),
    /// Apply resources (a file, a directory of them, or - for standard input) all-or-nothing.
    Apply {
        #[arg(short = 'f', long = "filename", required_unless_present = "stray")]
        file: Option<PathBuf>,
        /// A file given without -f: refused with a tip (kubectl users type it so).
        #[arg(hide = true)]
        stray: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show resources: service, httproute, grpcroute, meshconfig, authorizationpolicy,
    /// backendpolicy; `endpoints SERVICE`, `proxies`, `certificates`.
    Get {
        /// What to show (see above; plurals and svc, route, authz work too).
        kind: String,
        name: Option<String>,
        /// table, wide, yaml or json [default: table for lists, yaml for one named resource].
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a resource.
    Delete {
        kind: String,
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Check the mesh's identity system: the CA, certificate renewals, proxies without identity.
    Check {
        #[command(flatten)]
        remote: Remote,
    },
    /// Golden metrics from the proxies' last windows: request rate, success rate, latency
    /// percentiles, TCP connections and bytes, mTLS share. No Prometheus needed.
    Stat {
        /// services, routes, edges or proxies.
        #[arg(default_value = "services")]
        view: String,
        /// Only this service (route, either end of an edge, proxy).
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
        /// How far back (10s .. 1h, whole 10 s windows).
        #[arg(long, default_value = "1m")]
        window: String,
        /// table, wide (adds requests, retries, shed, breaker overflows, rate-limited) or json.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Who calls whom: src -> dst with rate, success, p99 and the mTLS identities seen.
    Edges {
        /// Only edges from or to this service.
        service: Option<String>,
        #[arg(long, default_value = "1m")]
        window: String,
        /// table, wide or json.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Join tokens: a proxy uses one once to get its first certificate.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// The mesh CA's roots: show, rotate, retire the old ones.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// The key/value store.
    Kv {
        #[command(subcommand)]
        command: KvCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Check a configuration file: print every error, change nothing.
    Validate {
        /// The file to check.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print a Prometheus scrape configuration for every proxy connected to the control plane.
    PrometheusConfig {
        /// `file-sd`: a file_sd_configs target list (JSON); `static`: a whole prometheus.yml.
        #[arg(long, default_value = "file-sd")]
        format: String,
        /// The scrape job's name (`static`).
        #[arg(long, default_value = "smesh-proxies")]
        job: String,
        /// The scrape interval (`static`).
        #[arg(long, default_value = "15s")]
        interval: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start a demo on this machine: sample services behind a proxy. Ctrl-C stops it all.
    Up(up::UpArgs),
    /// A sample app: answers every request with its name and version (the demo's apps; handy
    /// for trying routes, e.g. the README's Quick start).
    DemoApp(demo::DemoArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// The signing root, the roots still trusted, and the public trust bundle.
    Show {
        /// Print only the trust bundle (PEM), e.g. for --control-ca.
        #[arg(long)]
        bundle: bool,
    },
    /// Make a new signing root; the old one stays trusted until `smesh ca retire`.
    Rotate,
    /// Stop trusting the roots a rotation replaced (refused while certificates they signed
    /// are still valid, unless --force).
    Retire {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token for SERVICE; prints the token.
    Create {
        #[arg(long)]
        service: String,
        /// How long the token may be used.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum KvCommand {
    /// Set KEY to VALUE; with --cas N only if KEY's modify index is N (0: KEY must not exist).
    Put {
        key: String,
        value: String,
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Print KEY's value.
    Get { key: String },
    /// Delete KEY.
    Delete { key: String },
    /// Print every change under PREFIX, in order, until interrupted.
    Watch {
        prefix: String,
        /// Start after this index (default: from now).
        #[arg(long)]
        index: Option<u64>,
    },
}

#[derive(Args)]
struct ControlArgs {
    /// gRPC (proxies) and HTTP (API, KV) on one address.
    #[arg(long, default_value = "127.0.0.1:4180")]
    listen: SocketAddr,
    /// embedded:DIR (a single-file store) or etcd:URL[,URL...].
    #[arg(long, default_value = "embedded:./smesh-data")]
    store: String,
    /// File holding the admin token; default: DIR/admin-token, generated on first start.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Default lease TTL of registered endpoints.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// SPIFFE trust domain of the identities the CA issues.
    #[arg(long, default_value = "smesh.local")]
    trust_domain: String,
    /// CA root certificate (PEM) to use instead of one made on first start (needs --ca-key).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// CA root private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Serve the API and the proxies over TLS with a certificate from the mesh CA, and
    /// require proxies to authenticate with their mesh certificates. Clients check it with
    /// the CA in DIR/ca.pem (`--control-ca`).
    #[arg(long)]
    tls: bool,
    /// Extra names (DNS or IP) for the certificate made by --tls; localhost, 127.0.0.1,
    /// ::1 and the --listen address are always in it.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Serve TLS with this certificate chain (PEM) instead (needs --tls-key; implies --tls).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct ProxyArgs {
    /// Resources file (Service, HTTPRoute, ...); watched for changes, re-read on SIGHUP.
    #[arg(long, required_unless_present = "control_urls")]
    config: Option<PathBuf>,
    /// Control plane URL(s), comma-separated; any replica will do.
    #[arg(
        long = "control",
        value_delimiter = ',',
        conflicts_with = "config",
        id = "control_urls"
    )]
    control_urls: Vec<String>,
    /// Labels of this proxy's endpoint when registered, e.g. version=v2,zone=a.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The address other proxies reach this proxy's inbound port at.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Lease TTL for the registered endpoint (default: the control plane's).
    #[arg(long, value_parser = humantime::parse_duration)]
    lease_ttl: Option<Duration>,
    /// Configuration snapshots larger than this are refused (nacked).
    #[arg(long, default_value_t = 16 << 20)]
    max_config_bytes: usize,
    /// File holding a join token (`smesh token create`) for this proxy's first certificate.
    #[arg(long, env = "SMESH_JOIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) an https:// control plane's certificate is checked against
    /// (the control plane's DIR/ca.pem).
    #[arg(long, env = "SMESH_CONTROL_CA")]
    control_ca: Option<PathBuf>,
    /// Where local applications send their outbound requests.
    #[arg(long, default_value = "127.0.0.1:4140")]
    outbound: SocketAddr,
    /// Where the mesh sends requests for the local application (needs --app).
    #[arg(long, default_value = "0.0.0.0:4143")]
    inbound: SocketAddr,
    /// The local application's address.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// What the local app speaks: http (HTTP/1.1), http2 or grpc; default: whatever the
    /// client spoke (HTTP between proxies is HTTP/2, the client's version is restored).
    #[arg(long, value_parser = parse_app_protocol, requires = "app")]
    app_protocol: Option<smesh_model::Protocol>,
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
    /// Time from the first byte of an HTTP/1 request head to its end; a slower client is
    /// disconnected (slowloris).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
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
    /// HTTP/2 requests a client address may abandon (reset) per second, bursts of twice
    /// that; over it, its connections are closed and refused for 10 s. 0: no limit.
    #[arg(long, default_value_t = 200)]
    max_client_resets: u32,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("expected KEY=VALUE, e.g. version=v2")?;
    Ok((k.to_string(), v.to_string()))
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

fn parse_app_protocol(s: &str) -> Result<smesh_model::Protocol, String> {
    use smesh_model::Protocol;
    match s {
        "http" | "http1" => Ok(Protocol::Http),
        "http2" | "h2c" => Ok(Protocol::Http2),
        "grpc" => Ok(Protocol::Grpc),
        _ => Err(format!("{s:?}: expected http, http2 or grpc")),
    }
}

fn main() -> ExitCode {
    malloc::keep_freed_memory();
    let mut cli = Cli::parse();
    init_logging(&cli.log_level);
    if let Some(remote) = cli.command.remote_mut() {
        cli.before.apply_to(remote);
    }
    let result = match cli.command {
        Command::Proxy(args) => smesh_proxy::run(ProxyOptions {
            config: args.config,
            control: args.control_urls,
            labels: args.labels.into_iter().collect(),
            advertise: args.advertise,
            lease_ttl: args.lease_ttl,
            max_config_bytes: args.max_config_bytes,
            join_token: match &args.token_file {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => Some(t.trim().to_string()),
                    Err(e) => {
                        eprintln!("error: cannot read --token-file {}: {e}", f.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => None,
            },
            control_ca: args.control_ca,
            outbound: Some(args.outbound),
            inbound: args.app.map(|_| args.inbound),
            app: args.app,
            app_protocol: args.app_protocol,
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
                header_read_timeout: args.header_read_timeout,
                max_retry_body_bytes: args.max_retry_body_bytes,
                detect_timeout: args.detect_timeout,
                connect_timeout: args.connect_timeout,
                max_concurrent_streams: args.max_concurrent_streams,
                max_client_resets: args.max_client_resets,
            },
        }),
        Command::Validate { file } => validate(&file),
        Command::Control(args) => smesh_control::run(smesh_control::ControlOptions {
            listen: args.listen,
            store: args.store,
            admin_token_file: args.admin_token_file,
            lease_ttl: args.lease_ttl,
            trust_domain: args.trust_domain,
            ca: args.ca_cert.zip(args.ca_key),
            tls: serving_certificate(args.tls, args.listen, args.tls_san, args.tls_cert.zip(args.tls_key)),
        }),
        Command::Apply { file, stray, remote } => match (file, stray) {
            (Some(file), None) => with_control(remote, |c| async move { commands::apply(&c, &file).await }),
            (_, Some(stray)) => Err(format!(
                "smesh apply takes its file after -f: smesh apply -f {}",
                stray.display()
            )),
            (None, None) => Err("smesh apply needs -f FILE (a file, a directory or - for stdin)".into()),
        },
        Command::Get {
            kind,
            name,
            output,
            remote,
        } => with_control(remote, |c| async move {
            let listing = name.is_none()
                || matches!(
                    kind.as_str(),
                    "endpoints" | "endpoint" | "ep" | "proxies" | "proxy" | "certificates" | "certs"
                );
            let output = output.unwrap_or_else(|| if listing { "table".into() } else { "yaml".into() });
            commands::get(&c, &kind, name.as_deref(), &output).await
        }),
        Command::Delete { kind, name, remote } => {
            with_control(remote, |c| async move { commands::delete(&c, &kind, &name).await })
        }
        Command::Check { remote } => with_control(remote, |c| async move { commands::check(&c).await }),
        Command::Stat {
            view,
            name,
            window,
            output,
            remote,
        } => with_control(remote, |c| async move {
            let args = stat::StatArgs {
                view: &view,
                name: name.as_deref(),
                window: &window,
                output: &output,
            };
            stat::stat(&c, args).await
        }),
        Command::Edges {
            service,
            window,
            output,
            remote,
        } => with_control(remote, |c| async move {
            stat::edges(&c, service.as_deref(), &window, &output).await
        }),
        Command::Token { command, remote } => with_control(remote, |c| async move {
            match command {
                TokenCommand::Create { service, ttl } => commands::token_create(&c, &service, &ttl).await,
            }
        }),
        Command::Ca { command, remote } => with_control(remote, |c| async move {
            match command {
                CaCommand::Show { bundle } => commands::ca_show(&c, bundle).await,
                CaCommand::Rotate => commands::ca_change(&c, "/api/v1/ca/rotate").await,
                CaCommand::Retire { force } => {
                    let path = if force {
                        "/api/v1/ca/retire?force=true"
                    } else {
                        "/api/v1/ca/retire"
                    };
                    commands::ca_change(&c, path).await
                }
            }
        }),
        Command::Kv { command, remote } => with_control(remote, |c| async move {
            match command {
                KvCommand::Put { key, value, cas } => commands::kv_put(&c, &key, &value, cas).await,
                KvCommand::Get { key } => commands::kv_get(&c, &key).await,
                KvCommand::Delete { key } => commands::kv_delete(&c, &key).await,
                KvCommand::Watch { prefix, index } => commands::kv_watch(&c, &prefix, index).await,
            }
        }),
        Command::PrometheusConfig {
            format,
            job,
            interval,
            remote,
        } => with_control(remote, |c| async move {
            prometheus::run(&c, &format, &job, &interval).await
        }),
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

/// Runs a command against the control plane: the one named by --control, else a running
/// `smesh up` demo's (see endpoint.rs), else the default. The token comes from the flag, the
/// token file, the demo's, or the local default data directory; a token file that cannot be
/// read is only a warning, as reads need no token.
fn with_control<F, Fut>(remote: Remote, f: F) -> Result<(), String>
where
    F: FnOnce(client::Control) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let demo = endpoint::find();
    // A demo's CA and token also serve when --control names it explicitly.
    let demo = demo.filter(|d| {
        remote
            .control
            .as_deref()
            .is_none_or(|c| c.trim_end_matches('/') == d.control)
    });
    let url = match (&remote.control, &demo) {
        (Some(url), _) => url.clone(),
        (None, Some(d)) => d.control.clone(),
        (None, None) => DEFAULT_CONTROL.to_string(),
    };
    let token_file = remote
        .token_file
        .or_else(|| demo.as_ref().map(|d| d.token_file.clone()))
        .or_else(|| Some(PathBuf::from("smesh-data/admin-token")).filter(|p| p.exists()));
    let token = match (remote.token, token_file) {
        (Some(t), _) => Some(t),
        (None, Some(file)) => match std::fs::read_to_string(&file) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!(
                    "warning: cannot read token file {}: {e} (writes will be refused)",
                    file.display()
                );
                None
            }
        },
        (None, None) => None,
    };
    let ca = remote
        .control_ca
        .or_else(|| demo.map(|d| d.ca))
        .or_else(|| Some(PathBuf::from("smesh-data/ca.pem")).filter(|p| p.exists()));
    let control = client::Control::new(url.trim_end_matches('/'), token, ca.as_deref())?;
    commands::block_on(f(control))
}

/// Where the CLI looks when nothing names the control plane and no demo runs.
const DEFAULT_CONTROL: &str = "http://127.0.0.1:4180";

/// The control plane's TLS certificate, if it serves TLS.
fn serving_certificate(
    tls: bool,
    listen: SocketAddr,
    extra: Vec<String>,
    files: Option<(PathBuf, PathBuf)>,
) -> Option<smesh_control::tls::ServingCertificate> {
    use smesh_control::tls::ServingCertificate;
    if let Some((cert, key)) = files {
        return Some(ServingCertificate::Files { cert, key });
    }
    if !tls {
        return None;
    }
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for name in extra {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Some(ServingCertificate::Own { names })
}

fn validate(file: &std::path::Path) -> Result<(), String> {
    let items = smesh_proxy::config::reload::load(file)?;
    println!("ok: {} resources in {}", items.len(), file.display());
    // Valid, but requests to such a backend would all fail: said, not refused.
    let resources: Vec<&smesh_model::Resource> = items.iter().map(|s| &s.resource).collect();
    let static_labels = |service: &str| {
        resources
            .iter()
            .filter_map(|r| match r {
                smesh_model::Resource::Service(s) if s.metadata.name == service => Some(s),
                _ => None,
            })
            .flat_map(|s| s.spec.endpoints.iter().map(|e| e.labels.clone()))
            .collect()
    };
    for warning in smesh_model::empty_subsets(resources.iter().copied(), static_labels) {
        eprintln!("warning: {warning}");
    }
    Ok(())
}
