//! Access log: workers hand lines to a bounded buffer; one thread writes them. A full
//! buffer drops the line and counts it: a request never waits for the log.

use prometheus::IntCounter;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

const BUFFER_LINES: usize = 16 * 1024;

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: IntCounter,
}

impl AccessLog {
    /// `dest` is a file path (appended to) or `-` for standard output.
    pub fn start(dest: &str, dropped: IntCounter) -> io::Result<(AccessLog, JoinHandle<()>)> {
        let out: Box<dyn Write + Send> = if dest == "-" {
            Box::new(io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(dest)?)
        };
        let (tx, rx) = mpsc::sync_channel(BUFFER_LINES);
        let flusher = std::thread::Builder::new()
            .name("smesh-access-log".into())
            .spawn(move || flush(rx, out))?;
        Ok((AccessLog { tx, dropped }, flusher))
    }

    pub fn record(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Writes lines as they come and flushes whenever the buffer runs empty; ends when every
/// sender is gone.
fn flush(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let mut write = |line: String| {
            let _ = out.write_all(line.as_bytes()).and_then(|_| out.write_all(b"\n"));
        };
        write(line);
        while let Ok(line) = rx.try_recv() {
            write(line);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}
