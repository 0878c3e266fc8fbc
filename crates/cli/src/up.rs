//! `smesh up`: a demo on this machine. Starts sample services and a proxy in front of them as
//! child processes, sends a gentle trickle of requests, and stops everything on Ctrl-C.

use clap::Args;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct UpArgs {
    /// The proxy's outbound port; the admin port is this + 51, the demo apps use this + 1..3.
    #[arg(long, default_value_t = 4140)]
    port: u16,
    /// Do not send the background trickle of demo requests.
    #[arg(long)]
    no_load: bool,
}

struct Children(Vec<(&'static str, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            // SIGTERM first so the proxy drains; SIGKILL whatever is left after a moment.
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

fn config(api_v1: SocketAddr, api_v2: SocketAddr, web: SocketAddr) -> String {
    format!(
        r#"apiVersion: smesh.io/v1
kind: Service
metadata: {{name: web}}
spec:
  ports: [{{port: 80, protocol: http}}]
  endpoints: [{{address: "{web}", labels: {{version: v1}}}}]
---
apiVersion: smesh.io/v1
kind: Service
metadata: {{name: api}}
spec:
  ports: [{{port: 80, protocol: http}}]
  endpoints:
  - {{address: "{api_v1}", labels: {{version: v1}}}}
  - {{address: "{api_v2}", labels: {{version: v2}}}}
---
apiVersion: smesh.io/v1
kind: HTTPRoute
metadata: {{name: api-canary}}
spec:
  parentRefs: [{{name: api}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "true"}}]}}]
    backendRefs: [{{name: api, subset: {{version: v2}}}}]
  - backendRefs:
    - {{name: api, subset: {{version: v1}}, weight: 80}}
    - {{name: api, subset: {{version: v2}}, weight: 20}}
    timeouts: {{request: 5s}}
    retry: {{attempts: 2, codes: [502, 503]}}
"#
    )
}

fn wait_ready(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.starts_with("HTTP/1.1 200")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn run(args: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let dir = std::env::temp_dir().join(format!("smesh-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let local = |offset: u16| SocketAddr::from(([127, 0, 0, 1], args.port + offset));
    let (outbound, admin) = (local(0), local(51));
    let (api_v1, api_v2, web) = (local(1), local(2), local(3));
    let config_path = dir.join("mesh.yaml");
    std::fs::write(&config_path, config(api_v1, api_v2, web)).map_err(|e| format!("cannot write config: {e}"))?;

    let mut children = Children(Vec::new());
    let spawn = |children: &mut Children, name: &'static str, args: &[String]| -> Result<(), String> {
        let child = Command::new(&exe)
            .args(args)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        children.0.push((name, child));
        Ok(())
    };
    for (name, version, addr) in [("api", "v1", api_v1), ("api", "v2", api_v2), ("web", "v1", web)] {
        let args = [
            "demo-app",
            "--name",
            name,
            "--version",
            version,
            "--listen",
            &addr.to_string(),
        ]
        .map(String::from);
        spawn(&mut children, "demo app", &args)?;
    }
    let proxy_args = [
        "proxy".to_string(),
        "--config".into(),
        config_path.display().to_string(),
        "--outbound".into(),
        outbound.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--drain-timeout".into(),
        "2s".into(),
    ];
    spawn(&mut children, "proxy", &proxy_args)?;
    if !wait_ready(admin, "/ready", Duration::from_secs(10)) {
        return Err("the proxy did not become ready within 10s".into());
    }
    print_banner(outbound, admin, &config_path);

    let stop = Arc::new(AtomicBool::new(false));
    let load = (!args.no_load).then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || trickle(outbound, &stop))
    });
    wait_for_ctrl_c()?;
    eprintln!("\nstopping the demo...");
    stop.store(true, Ordering::Relaxed);
    if let Some(load) = load {
        let _ = load.join();
    }
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("stopped.");
    Ok(())
}

fn print_banner(outbound: SocketAddr, admin: SocketAddr, config: &Path) {
    println!(
        r#"
smesh demo is up.
  proxy outbound   http://{outbound}   (send requests with Host: api or Host: web)
  proxy admin      http://{admin}/metrics  /config  /ready
  configuration    {config}  (edit it: the proxy reloads it live)

Try:
  curl -H 'Host: api' http://{outbound}/hello            # 80% api v1, 20% api v2
  curl -H 'Host: api' -H 'x-canary: true' http://{outbound}/hello   # always v2
  curl -x http://{outbound} http://web/                   # as an HTTP proxy
  curl -s http://{admin}/metrics | grep smesh_requests_total

Ctrl-C stops everything."#,
        config = config.display()
    );
}

/// A gentle background load so the metrics move: two requests a second.
fn trickle(outbound: SocketAddr, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = TcpStream::connect_timeout(&outbound, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /trickle HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_end(&mut Vec::new());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_for_ctrl_c() -> Result<(), String> {
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
