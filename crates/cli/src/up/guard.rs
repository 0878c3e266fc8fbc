//! What `smesh up` checks before it starts anything, so that a second demo never disturbs a
//! running one: a lock on the data directory (held while the demo runs, released by the
//! kernel when it exits however it exits) and the ports it needs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

/// The lock file in the data directory; it also says which demo holds it.
pub const LOCK_FILE: &str = "up.lock";

/// Held for as long as the demo runs.
pub struct DataLock {
    _file: File,
}

/// Who runs the demo, written into the lock file for the next `smesh up` to report.
pub struct Holder<'a> {
    pub control: &'a str,
    pub web: SocketAddr,
    pub data: &'a Path,
}

/// Locks `data` (which must exist) for this demo, or explains which demo already runs there.
/// The lock file is only written once the lock is ours.
pub fn lock(data: &Path, holder: &Holder) -> Result<DataLock, String> {
    let path = data.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(already_running(data, &text));
        }
        Err(TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
    }
    let info = serde_json::json!({
        "pid": std::process::id(),
        "control": holder.control,
        "web": holder.web.to_string(),
        "data": holder.data.display().to_string(),
    });
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(format!("{info}\n").as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(DataLock { _file: file })
}

fn already_running(data: &Path, lock_text: &str) -> String {
    let info: serde_json::Value = serde_json::from_str(lock_text).unwrap_or_default();
    let field = |k: &str| info[k].as_str().unwrap_or("?").to_string();
    let pid = info["pid"].as_u64().map_or("?".to_string(), |p| p.to_string());
    format!(
        "a smesh demo is already running with the data directory {data}:\n  \
         pid {pid}, control plane {control}, web's proxy http://{web}, logs in {data}/logs/\n\
         Stop it with Ctrl-C in its terminal (or `kill {pid}`), or run another one beside it with \
         `smesh up --data OTHER_DIR --port OTHER_BASE`.\n\
         Nothing of the running demo was touched.",
        data = data.display(),
        control = field("control"),
        web = field("web"),
    )
}

/// Fails naming the first port that is taken, and what to do about it.
pub fn check_ports(ports: &[(SocketAddr, String)], base: u16) -> Result<(), String> {
    for (addr, what) in ports {
        if let Err(e) = TcpListener::bind(addr) {
            return Err(format!(
                "port {} ({what}) is not free: {e}. Something else listens there \
                 (another `smesh up`?); pick other ports with `smesh up --port BASE` \
                 (now {base}; the demo uses BASE to BASE+{}).",
                addr.port(),
                super::LAST_OFFSET
            ));
        }
    }
    Ok(())
}
