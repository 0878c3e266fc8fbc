//! `smesh up`: the demo mesh on this machine. A control plane on its embedded store, three
//! services (`web` calling `api`, which runs as v1 and v2 and calls the TCP service `db`),
//! each behind its own `smesh proxy`, and a gentle load. Ctrl-C stops all of it. With
//! `--library`, web has the mesh linked in instead of a proxy (the `smesh` library), on
//! web's proxy's port.

mod banner;
mod children;
mod guard;
mod layout;
mod setup;
mod state;

use children::Children;
use clap::Args;
use layout::{Layout, Proxy, LAST_OFFSET};
use setup::{apply, join_token, Remote};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct UpArgs {
    /// Base port: web's proxy listens on BASE (outbound), the control plane on BASE+40,
    /// and each service's proxy and app on BASE+100*i+{0,3,11,51}.
    #[arg(long, default_value_t = 4140)]
    port: u16,
    /// Where the control plane keeps its state (and admin token).
    #[arg(long, default_value = "smesh-data")]
    data: PathBuf,
    /// Do not send the background trickle of demo requests.
    #[arg(long)]
    no_load: bool,
    /// Start from a clean state: delete what earlier demos left in --data (resources,
    /// policies, CA, tokens, logs) first.
    #[arg(long)]
    reset: bool,
    /// Run web in library mode: the mesh linked into it (no proxy), serving on BASE.
    #[arg(long)]
    library: bool,
}

/// One plain HTTP/1.1 GET: the response (head and body) on 200, else why not.
fn http_get(addr: SocketAddr, path: &str, host: &str) -> Result<String, String> {
    let url = format!("http://{addr}{path}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|_| s.write_all(req.as_bytes()))
        .and_then(|_| s.read_to_string(&mut out))
        .map_err(|e| format!("{url}: {e}"))?;
    if out.starts_with("HTTP/1.1 200") {
        return Ok(out);
    }
    Err(format!("{url} (Host: {host}) answered {}", describe_refusal(&out)))
}

/// The status line, the proxy's error reason and the first line of the body of a refusal.
fn describe_refusal(response: &str) -> String {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").trim_start_matches("HTTP/1.1 ").to_string();
    let reason = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("smesh-proxy-error"))
        .map(|(_, v)| format!(" (smesh-proxy-error: {})", v.trim()))
        .unwrap_or_default();
    let body = body.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    if body.is_empty() {
        format!("{status}{reason}")
    } else {
        format!("{status}{reason}: {body}")
    }
}

/// Polls `ready` until it succeeds. Fails at once when a child exits, or after `timeout`
/// with the last reason `ready` gave (and the end of the log of `what`, if it is a child).
fn wait_for(
    children: &mut Children,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        children.check()?;
        let reason = match ready() {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            let log = children.log_of(what);
            return Err(
                format!("{what} was not ready within {}s: {reason}\n{log}", timeout.as_secs())
                    .trim_end()
                    .to_string(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(args: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let Some(layout) = Layout::new(args.port) else {
        return Err(format!(
            "--port {}: the demo listens on BASE to BASE+{LAST_OFFSET}, so BASE must be at most {}",
            args.port,
            u16::MAX - LAST_OFFSET
        ));
    };
    std::fs::create_dir_all(&args.data).map_err(|e| format!("cannot create {}: {e}", args.data.display()))?;
    // Absolute, so what the banner prints works from any directory.
    let data = std::path::absolute(&args.data).map_err(|e| format!("{}: {e}", args.data.display()))?;
    // Nothing in the data directory is touched before the lock is ours.
    let holder = guard::Holder {
        control: &format!("https://{}", layout.control),
        web: layout.web.outbound,
        data: &data,
    };
    let _lock = guard::lock(&data, &holder)?;
    guard::check_ports(&layout.ports(), args.port)?;
    if args.reset {
        state::reset(&data)?;
    }
    let kept_state = state::has_state(&data);
    let mut children = Children::new();
    let mode = Mode {
        load: !args.no_load,
        library: args.library,
    };
    let outcome = start_and_serve(&mut children, &exe, &data, &layout, kept_state, mode);
    // Said before the others are stopped (that takes a moment): the cause comes first.
    if let Err(e) = &outcome {
        eprintln!("error: {e}");
    }
    eprintln!("\nstopping the demo...");
    drop(children);
    match outcome {
        Ok(()) => {
            eprintln!("stopped.");
            Ok(())
        }
        Err(_) => Err("the demo was stopped".into()),
    }
}

/// What runs besides the demo's processes: the trickle of requests, web's linked-in mesh.
#[derive(Clone, Copy)]
struct Mode {
    load: bool,
    library: bool,
}

/// Starts the demo's processes into `children` and runs until a signal (Ok) or a failure.
fn start_and_serve(
    children: &mut Children,
    exe: &Path,
    data: &Path,
    layout: &Layout,
    kept_state: bool,
    Mode { load, library }: Mode,
) -> Result<(), String> {
    let Layout {
        control: control_addr,
        web,
        api_v1,
        api_v2,
        db,
        db_via_v1,
        db_via_v2,
    } = *layout;
    let control_url = format!("https://{control_addr}");
    // The control plane writes the mesh root here; every client checks it with it.
    let control_ca = data.join("ca.pem");
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;

    let s = |v: &str| v.to_string();
    let store = format!("embedded:{}", data.display());
    eprintln!("starting the control plane on https://{control_addr} ...");
    children.spawn(
        exe,
        "control",
        &[
            s("control"),
            s("--listen"),
            control_addr.to_string(),
            s("--store"),
            store,
            s("--tls"),
        ],
        &logs,
    )?;
    wait_for(children, "control", Duration::from_secs(10), || {
        if !control_ca.exists() {
            return Err(format!("{} not written yet", control_ca.display()));
        }
        TcpStream::connect_timeout(&control_addr, Duration::from_millis(200))
            .map(drop)
            .map_err(|e| format!("cannot connect to {control_addr}: {e}"))
    })?;
    let token_file = data.join("admin-token");
    let remote = Remote {
        url: &control_url,
        token_file: &token_file,
        ca: &control_ca,
    };
    apply(exe, &remote)?;
    let kept = if kept_state {
        state::kept_resources(&remote)
    } else {
        Vec::new()
    };
    if !kept.is_empty() {
        eprintln!(
            "kept from earlier demos in {}: {} (`smesh up --reset` starts clean)",
            data.display(),
            kept.join(", ")
        );
    }

    let app = |name: &str, version: &str, p: &Proxy, extra: &[String]| {
        let mut a = vec![
            s("demo-app"),
            s("--name"),
            s(name),
            s("--version"),
            s(version),
            s("--listen"),
            p.app.to_string(),
        ];
        a.extend_from_slice(extra);
        a
    };
    eprintln!("starting the apps: web, api v1, api v2, db ...");
    children.spawn(exe, "db", &app("db", "v1", &db, &[s("--tcp-echo")]), &logs)?;
    children.spawn(
        exe,
        "api-v1",
        &app("api", "v1", &api_v1, &[s("--call-tcp"), db_via_v1.to_string()]),
        &logs,
    )?;
    children.spawn(
        exe,
        "api-v2",
        &app("api", "v2", &api_v2, &[s("--call-tcp"), db_via_v2.to_string()]),
        &logs,
    )?;
    if library {
        // web serves on its proxy's port itself, and calls api through the linked-in mesh.
        let token = join_token(exe, &remote, "web", &logs.join("web.token"))?;
        let linked = Proxy {
            app: web.outbound,
            ..web
        };
        let web_extra = [
            s("--call"),
            s("api"),
            s("--mesh-control"),
            control_url.clone(),
            s("--mesh-control-ca"),
            control_ca.display().to_string(),
            s("--mesh-token-file"),
            token.display().to_string(),
        ];
        children.spawn(exe, "web", &app("web", "v1", &linked, &web_extra), &logs)?;
    } else {
        let web_extra = [s("--call"), s("api"), s("--via"), web.outbound.to_string()];
        children.spawn(exe, "web", &app("web", "v1", &web, &web_extra), &logs)?;
    }

    let proxy_args = |service: &str, version: &str, p: &Proxy, upstream: Option<SocketAddr>| {
        let mut a = vec![
            s("proxy"),
            s("--control"),
            control_url.clone(),
            s("--control-ca"),
            control_ca.display().to_string(),
            s("--service"),
            s(service),
            s("--labels"),
            format!("version={version}"),
            s("--app"),
            p.app.to_string(),
            s("--inbound"),
            p.inbound.to_string(),
            s("--outbound"),
            p.outbound.to_string(),
            s("--admin"),
            p.admin.to_string(),
            s("--drain-timeout"),
            s("2s"),
        ];
        if let Some(u) = upstream {
            a.extend([s("--upstream"), format!("db={u}")]);
        }
        a
    };
    // Each proxy gets its identity with a join token of its own: the demo runs on mTLS.
    let proxies = [
        ("proxy-web", "web", "v1", &web, None),
        ("proxy-api-v1", "api", "v1", &api_v1, Some(db_via_v1)),
        ("proxy-api-v2", "api", "v2", &api_v2, Some(db_via_v2)),
        ("proxy-db", "db", "v1", &db, None),
    ];
    // In library mode web has no proxy.
    let proxies: Vec<_> = proxies
        .into_iter()
        .filter(|(name, ..)| !(library && *name == "proxy-web"))
        .collect();
    eprintln!("starting a proxy for each app, each with its own identity ...");
    for (name, service, version, p, upstream) in &proxies {
        let token = join_token(exe, &remote, service, &logs.join(format!("{name}.token")))?;
        let mut args = proxy_args(service, version, p, *upstream);
        args.extend([s("--token-file"), token.display().to_string()]);
        children.spawn(exe, name, &args, &logs)?;
    }
    for (name, _, _, p, _) in &proxies {
        wait_for(children, name, Duration::from_secs(10), || {
            http_get(p.admin, "/ready", "admin").map(drop)
        })?;
    }
    wait_for(children, "the demo", Duration::from_secs(10), || {
        let r = http_get(web.outbound, "/", "web")?;
        if r.contains("api") && r.contains("echo:") {
            Ok(())
        } else {
            let body = r.split_once("\r\n\r\n").map_or(r.as_str(), |(_, body)| body);
            Err(format!(
                "web answered without api's and db's parts:\n{}",
                body.trim_end()
            ))
        }
    })
    .map_err(|e| {
        let admins: Vec<_> = [
            ("proxy-web", web.admin),
            ("proxy-api-v1", api_v1.admin),
            ("proxy-api-v2", api_v2.admin),
            ("proxy-db", db.admin),
        ]
        .into_iter()
        .filter(|(name, _)| !(library && *name == "proxy-web"))
        .collect();
        state::not_ready_hint(e, kept_state, &kept, &admins)
    })?;
    let found_at = crate::endpoint::write(
        &crate::endpoint::Endpoint {
            control: control_url.clone(),
            ca: control_ca.clone(),
            token_file: token_file.clone(),
            pid: std::process::id(),
        },
        data,
    )?;
    let web_banner = if library {
        banner::Web::Library(web.outbound)
    } else {
        banner::Web::Proxied(&web)
    };
    banner::print_banner(data, control_addr, web_banner, &remote, &logs, exe, &found_at);

    let stop = Arc::new(AtomicBool::new(false));
    let load = load.then(|| {
        let stop = stop.clone();
        let target = web.outbound;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = http_get(target, "/trickle", "web");
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    });
    let outcome = wait_for_signal(children);
    crate::endpoint::remove(&found_at);
    stop.store(true, Ordering::Relaxed);
    if let Some(load) = load {
        let _ = load.join();
    }
    outcome
}

/// Runs until Ctrl-C or SIGTERM (Ok), or until a child exits (Err naming it).
fn wait_for_signal(children: &mut Children) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            // Signals first: on Ctrl-C the children get SIGINT too and exit; that is no failure.
            tokio::select! {
                biased;
                _ = int.recv() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = tick.tick() => children.check()?,
            }
        }
    })
}
