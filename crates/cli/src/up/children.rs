//! The demo's child processes: started with their stderr in a log file each, watched so that
//! one that exits stops the demo at once with its name and the end of its log, and stopped by
//! PID when dropped (and by the kernel if `smesh up` dies first).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Lines of a failed child's log shown with its exit.
const TAIL_LINES: usize = 12;

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

pub struct Children(Vec<Running>);

impl Children {
    pub fn new() -> Self {
        Children(Vec::new())
    }

    pub fn spawn(&mut self, exe: &Path, name: &str, args: &[String], log_dir: &Path) -> Result<(), String> {
        let path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
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
        self.0.push(Running {
            name: name.to_string(),
            child,
            log: path,
        });
        Ok(())
    }

    /// An error naming the first child that has exited, with the end of its log.
    pub fn check(&mut self) -> Result<(), String> {
        for r in &mut self.0 {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(format!("{} exited ({status}).\n{}", r.name, log_tail(&r.log)));
            }
        }
        Ok(())
    }

    /// The end of `name`'s log, to explain why it is not ready.
    pub fn log_of(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|r| r.name == name)
            .map(|r| log_tail(&r.log))
            .unwrap_or_default()
    }
}

/// "last lines of PATH:" and those lines, indented.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
    if tail.is_empty() {
        return format!("Its log {} is empty.", path.display());
    }
    let mut out = format!("Last lines of its log {}:", path.display());
    for line in tail {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

impl Drop for Children {
    fn drop(&mut self) {
        // Proxies first (they deregister and drain), then apps, then the control plane.
        for r in self.0.iter_mut().rev() {
            if let Ok(None) = r.child.try_wait() {
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for r in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = r.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = r.child.try_wait() {
                eprintln!("{} did not stop in time; killing it", r.name);
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }
}
