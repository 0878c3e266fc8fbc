//! The demo's calls to its control plane, through the CLI (the same path a user's take):
//! its resources, and a join token for each proxy.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// How the demo's CLI calls reach the control plane.
pub struct Remote<'a> {
    pub url: &'a str,
    pub token_file: &'a Path,
    pub ca: &'a Path,
}

impl Remote<'_> {
    pub fn args(&self) -> [&std::ffi::OsStr; 6] {
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

pub fn apply(exe: &Path, remote: &Remote) -> Result<(), String> {
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
pub fn join_token(exe: &Path, remote: &Remote, service: &str, path: &Path) -> Result<PathBuf, String> {
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
