//! `smesh up`: the demo mesh on this machine. A control plane on its embedded store, three
//! services (`web` calling `api`, which runs as v1 and v2 and calls the TCP service `db`),
//! each behind its own `smesh proxy`, and a gentle load. Ctrl-C stops all of it. With
//! `--library`, web has the mesh linked in instead of a proxy (the `smesh` library), on
//! web's proxy's port.

use clap::Args;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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
    /// Run web in library mode: the mesh linked into it (no proxy), serving on BASE.
    #[arg(long)]
    library: bool,
}

/// Every child, stopped by PID when this is dropped (and by the kernel if we die first).
struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, exe: &Path, name: &str, args: &[String], log_dir: &Path) -> Result<(), String> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))
            .map_err(|e| format!("cannot create log for {name}: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(args).stdout(std::process::Stdio::null()).stderr(log);
        // If `smesh up` itself is killed, the children go too.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Proxies first (they deregister and drain), then apps, then the control plane.
        for (_, child) in self.0.iter_mut().rev() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, child) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                eprintln!("{name} did not stop in time; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

const RESOURCES: &str = r#"apiVersion: smesh.io/v1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80, protocol: http}]
---
apiVersion: smesh.io/v1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80, protocol: http}]
---
apiVersion: smesh.io/v1
kind: Service
metadata: {name: db}
spec:
  ports: [{port: 5432, protocol: tcp}]
---
apiVersion: smesh.io/v1
kind: HTTPRoute
metadata: {name: api-canary}
spec:
  parentRefs: [{name: api}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: api, subset: {version: v2}}]
  - backendRefs:
    - {name: api, subset: {version: v1}, weight: 80}
    - {name: api, subset: {version: v2}, weight: 20}
    timeouts: {request: 5s}
    retry: {attempts: 2, codes: [502, 503]}
"#;

fn http_ok(addr: SocketAddr, path: &str, host: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not come up within {}s", timeout.as_secs()))
}

struct Proxy {
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    app: SocketAddr,
}

pub fn run(args: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let logs = args.data.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let at = |offset: u16| SocketAddr::from(([127, 0, 0, 1], args.port + offset));
    let control_addr = at(40);
    let control_url = format!("https://{control_addr}");
    // The control plane writes the mesh root here; every client checks it with it.
    let control_ca = args.data.join("ca.pem");
    let proxy = |i: u16| Proxy {
        outbound: at(100 * i),
        inbound: at(100 * i + 3),
        admin: at(100 * i + 51),
        app: at(100 * i + 11),
    };
    let (web, api_v1, api_v2, db) = (proxy(0), proxy(1), proxy(2), proxy(3));
    // api's proxies reach db through a local upstream port each.
    let (db_via_v1, db_via_v2) = (at(100 + 20), at(200 + 20));

    let mut children = Children(Vec::new());
    let s = |v: &str| v.to_string();
    let store = format!("embedded:{}", args.data.display());
    children.spawn(
        &exe,
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
    wait_for("the control plane", Duration::from_secs(10), || {
        control_ca.exists() && std::net::TcpStream::connect_timeout(&control_addr, Duration::from_millis(200)).is_ok()
    })?;
    let token_file = args.data.join("admin-token");
    let remote = Remote {
        url: &control_url,
        token_file: &token_file,
        ca: &control_ca,
    };
    apply(&exe, &remote)?;

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
    children.spawn(&exe, "db", &app("db", "v1", &db, &[s("--tcp-echo")]), &logs)?;
    children.spawn(
        &exe,
        "api-v1",
        &app("api", "v1", &api_v1, &[s("--call-tcp"), db_via_v1.to_string()]),
        &logs,
    )?;
    children.spawn(
        &exe,
        "api-v2",
        &app("api", "v2", &api_v2, &[s("--call-tcp"), db_via_v2.to_string()]),
        &logs,
    )?;
    if args.library {
        // web serves on its proxy's port itself, and calls api through the linked-in mesh.
        let token = join_token(&exe, &remote, "web", &logs.join("web.token"))?;
        let library = Proxy {
            app: web.outbound,
            ..proxy(0)
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
        children.spawn(&exe, "web", &app("web", "v1", &library, &web_extra), &logs)?;
    } else {
        let web_extra = [s("--call"), s("api"), s("--via"), web.outbound.to_string()];
        children.spawn(&exe, "web", &app("web", "v1", &web, &web_extra), &logs)?;
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
    let proxies = proxies
        .into_iter()
        .filter(|(name, ..)| !(args.library && *name == "proxy-web"));
    for (name, service, version, p, upstream) in proxies {
        let token = join_token(&exe, &remote, service, &logs.join(format!("{name}.token")))?;
        let mut args = proxy_args(service, version, p, upstream);
        args.extend([s("--token-file"), token.display().to_string()]);
        children.spawn(&exe, name, &args, &logs)?;
    }
    let ready: &[&Proxy] = if args.library {
        &[&api_v1, &api_v2, &db]
    } else {
        &[&web, &api_v1, &api_v2, &db]
    };
    for p in ready {
        wait_for("a proxy", Duration::from_secs(10), || {
            http_ok(p.admin, "/ready", "admin").is_some()
        })?;
    }
    wait_for("the demo", Duration::from_secs(10), || {
        http_ok(web.outbound, "/", "web").is_some_and(|r| r.contains("api") && r.contains("echo:"))
    })?;
    print_banner(&args, control_addr, &web, &remote, &logs);

    let stop = Arc::new(AtomicBool::new(false));
    let load = (!args.no_load).then(|| {
        let stop = stop.clone();
        let target = web.outbound;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = http_ok(target, "/trickle", "web");
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    });
    wait_for_signal()?;
    eprintln!("\nstopping the demo...");
    stop.store(true, Ordering::Relaxed);
    if let Some(load) = load {
        let _ = load.join();
    }
    drop(children);
    eprintln!("stopped.");
    Ok(())
}

/// How the demo's CLI calls reach the control plane.
struct Remote<'a> {
    url: &'a str,
    token_file: &'a Path,
    ca: &'a Path,
}

impl Remote<'_> {
    fn args(&self) -> [&std::ffi::OsStr; 6] {
        [
            "--control".as_ref(),
            self.url.as_ref(),
            "--token-file".as_ref(),
            self.token_file.as_os_str(),
            "--control-ca".as_ref(),
            self.ca.as_os_str(),
        ]
    }
}

fn apply(exe: &Path, remote: &Remote) -> Result<(), String> {
    let mut child = Command::new(exe)
        .args(["apply", "-f", "-"])
        .args(remote.args())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run smesh apply: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(RESOURCES.as_bytes())
            .map_err(|e| format!("smesh apply: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("smesh apply: {e}"))?;
    if !status.success() {
        return Err("applying the demo resources failed".into());
    }
    Ok(())
}

/// Creates a join token for `service` with the CLI and writes it to `path` (owner-only).
fn join_token(exe: &Path, remote: &Remote, service: &str, path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = Command::new(exe)
        .args(["token", "create", "--service", service])
        .args(remote.args())
        .output()
        .map_err(|e| format!("cannot run smesh token create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "smesh token create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(&out.stdout)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

fn print_banner(args: &UpArgs, control: SocketAddr, web: &Proxy, remote: &Remote, logs: &Path) {
    let web_out = web.outbound;
    if args.library {
        println!(
            r#"
smesh demo mesh is up, web in library mode (the mesh linked in, no proxy).
  control plane    https://{control}   (state, admin token and CA certificate in {data})
  web              http://{web_out}   (its own port: mTLS, authorization and metrics in process)
  logs             {logs}/

Try:
  curl http://{web_out}/hello          # web -> api (80% v1, 20% v2) -> db (TCP), all on mTLS
  export SMESH_CONTROL=https://{control} SMESH_TOKEN_FILE={token} SMESH_CONTROL_CA={ca}
  smesh get proxies; smesh get endpoints web

Ctrl-C stops everything."#,
            data = args.data.display(),
            token = remote.token_file.display(),
            ca = remote.ca.display(),
            logs = logs.display(),
        );
        return;
    }
    println!(
        r#"
smesh demo mesh is up.
  control plane    https://{control}   (state, admin token and CA certificate in {data})
  web's proxy      http://{web_out}   admin http://{web_admin}/metrics
  logs             {logs}/

Try:
  curl -H 'Host: web' http://{web_out}/hello                  # web -> api (80% v1, 20% v2) -> db (TCP), all on mTLS
  curl -H 'Host: api' -H 'x-canary: true' http://{web_out}/    # always api v2
  curl -x http://{web_out} http://api/                          # the proxy as an HTTP proxy
  export SMESH_CONTROL=https://{control} SMESH_TOKEN_FILE={token} SMESH_CONTROL_CA={ca}
  smesh get services; smesh get endpoints api; smesh get proxies; smesh get certificates
  smesh kv put demo/greeting hello; smesh kv get demo/greeting
  curl -s http://{web_admin}/metrics | grep smesh_requests_total

Ctrl-C stops everything."#,
        data = args.data.display(),
        web_admin = web.admin,
        token = remote.token_file.display(),
        ca = remote.ca.display(),
        logs = logs.display(),
    );
}

fn wait_for_signal() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
