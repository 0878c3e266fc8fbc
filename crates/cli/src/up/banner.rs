//! What `smesh up` prints once the demo answers: where everything is and what to try.

use super::layout::Proxy;
use super::setup::Remote;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// How web is reached: through its proxy, or (`--library`) on its own port with the mesh
/// linked in.
pub enum Web<'a> {
    Proxied(&'a Proxy),
    Library(SocketAddr),
}

pub fn print_banner(
    data: &Path,
    control: SocketAddr,
    web: Web,
    remote: &Remote,
    logs: &Path,
    exe: &Path,
    found_at: &[PathBuf],
) {
    // The commands below must work as printed: the binary by its full path unless PATH has it.
    let smesh = if on_path(exe) {
        "smesh".to_string()
    } else {
        exe.display().to_string()
    };
    let found = found_at
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    let web = match web {
        Web::Proxied(web) => web,
        Web::Library(web_out) => {
            println!(
                r#"
smesh demo mesh is up, web in library mode (the mesh linked in, no proxy).
  control plane    https://{control}   (state, admin token and CA certificate in {data})
  web              http://{web_out}   (its own port: mTLS, authorization and metrics in process)
  logs             {logs}/
  smesh binary     {exe}

Try:
  curl http://{web_out}/hello          # web -> api (80% v1, 20% v2) -> db (TCP), all on mTLS
  {smesh} get proxies; {smesh} get endpoints web

The CLI finds this demo by itself while it runs (from {found}).
For another shell or machine: export SMESH_CONTROL=https://{control} SMESH_TOKEN_FILE={token} SMESH_CONTROL_CA={ca}

Ctrl-C stops everything."#,
                data = data.display(),
                token = remote.token_file.display(),
                ca = remote.ca.display(),
                logs = logs.display(),
                exe = exe.display(),
            );
            return;
        }
    };
    let web_out = web.outbound;
    println!(
        r#"
smesh demo mesh is up.
  control plane    https://{control}   (state, admin token and CA certificate in {data})
  web's proxy      http://{web_out}   admin http://{web_admin}/metrics
  logs             {logs}/
  smesh binary     {exe}

Try:
  curl -H 'Host: web' http://{web_out}/hello                  # web -> api (80% v1, 20% v2) -> db (TCP), all on mTLS
  curl -H 'Host: api' -H 'x-canary: true' http://{web_out}/    # always api v2
  curl -x http://{web_out} http://api/                          # the proxy as an HTTP proxy
  {smesh} get services; {smesh} get endpoints api; {smesh} get proxies
  {smesh} kv put demo/greeting hello; {smesh} kv get demo/greeting
  curl -s http://{web_admin}/metrics | grep smesh_requests_total

The CLI finds this demo by itself while it runs (from {found}).
For another shell or machine: export SMESH_CONTROL=https://{control} SMESH_TOKEN_FILE={token} SMESH_CONTROL_CA={ca}

Ctrl-C stops everything."#,
        data = data.display(),
        web_admin = web.admin,
        token = remote.token_file.display(),
        ca = remote.ca.display(),
        logs = logs.display(),
        exe = exe.display(),
    );
}

/// Whether `smesh` on PATH is this very binary.
fn on_path(exe: &Path) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    let me = std::fs::canonicalize(exe).ok();
    std::env::split_paths(&path).any(|dir| std::fs::canonicalize(dir.join("smesh")).ok() == me && me.is_some())
}
