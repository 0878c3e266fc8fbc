//! Where a running `smesh up` demo is reached: the demo writes its control plane's URL, CA
//! and admin-token paths to DATA/endpoint.json and to the user's state directory, and the CLI
//! reads them when it is given no --control (nor SMESH_CONTROL), so the banner's commands work
//! as printed from any directory. The files name the demo's PID; a file whose demo is gone
//! is ignored.

use std::path::{Path, PathBuf};

pub const FILE: &str = "endpoint.json";

pub struct Endpoint {
    /// `https://host:port`
    pub control: String,
    pub ca: PathBuf,
    pub token_file: PathBuf,
    /// The `smesh up` that wrote it.
    pub pid: u32,
}

/// `$XDG_STATE_HOME/smesh/endpoint.json`, else `~/.local/state/smesh/endpoint.json`.
pub fn user_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")))?;
    Some(state.join("smesh").join(FILE))
}

/// Writes `endpoint` to DATA/endpoint.json and the user's file; returns the files written
/// (the user's file is a convenience: failing to write it is no error).
pub fn write(endpoint: &Endpoint, data: &Path) -> Result<Vec<PathBuf>, String> {
    let text = serde_json::json!({
        "control": endpoint.control,
        "ca": endpoint.ca.display().to_string(),
        "token_file": endpoint.token_file.display().to_string(),
        "pid": endpoint.pid,
    })
    .to_string();
    let local = data.join(FILE);
    std::fs::write(&local, format!("{text}\n")).map_err(|e| format!("cannot write {}: {e}", local.display()))?;
    let mut written = vec![local];
    if let Some(user) = user_file() {
        let saved = user
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&user, format!("{text}\n")));
        match saved {
            Ok(()) => written.push(user),
            Err(e) => eprintln!("note: cannot write {}: {e}", user.display()),
        }
    }
    Ok(written)
}

/// Removes the files `write` wrote that still name this process (a later demo may own one).
pub fn remove(written: &[PathBuf]) {
    for path in written {
        if read(path).is_some_and(|e| e.pid == std::process::id()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The running demo of this directory (./smesh-data), else the user's latest one.
pub fn find() -> Option<Endpoint> {
    let local = Path::new("smesh-data").join(FILE);
    [Some(local), user_file()]
        .into_iter()
        .flatten()
        .filter_map(|path| read(&path))
        .find(|e| alive(e.pid))
}

fn read(path: &Path) -> Option<Endpoint> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(Endpoint {
        control: v["control"].as_str()?.to_string(),
        ca: PathBuf::from(v["ca"].as_str()?),
        token_file: PathBuf::from(v["token_file"].as_str()?),
        pid: u32::try_from(v["pid"].as_u64()?).ok()?,
    })
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only checks; EPERM means it exists but belongs to someone else.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}
