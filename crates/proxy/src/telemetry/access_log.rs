//! Access log: workers hand lines to a bounded buffer; one thread writes them. A full
//! buffer drops the line and counts it: a request never waits for the log.

use crate::telemetry::event::{BodyEnd, ConnectionEvent, RequestEvent};
use prometheus::IntCounter;
use std::fmt::Write as _;
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

    /// One line per HTTP request, written when its response body ended:
    /// `TIME DIRECTION CLIENT "METHOD AUTHORITYPATH VERSION" STATUS TO_HEADms route=ROUTE
    /// dst=SERVICE upstream=ADDR tries=N peer=SPIFFE_ID grpc_status=CODE bytes=N
    /// end=complete|error|dropped total=TO_ENDms` (`-` where a field does not apply).
    pub fn record_request(&self, event: &RequestEvent) {
        let ctx = &event.ctx;
        let mut line = String::with_capacity(256);
        let _ = write!(
            line,
            "{} {} {} ",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            ctx.direction,
            ctx.client
        );
        match &ctx.head {
            Some(head) => {
                let _ = write!(
                    line,
                    "\"{} {}{} {:?}\"",
                    head.method,
                    head.authority.as_deref().unwrap_or(""),
                    head.uri.path(),
                    head.version
                );
            }
            None => line.push_str("\"-\""),
        }
        let _ = write!(
            line,
            " {} {:.3}ms route={} dst={} upstream={} tries={} peer={} grpc_status={} bytes={} end={} total={:.3}ms",
            event.status,
            event.to_head.as_secs_f64() * 1e3,
            ctx.route.as_ref().map_or("-", |r| r.route_name()),
            ctx.destination.as_deref().unwrap_or("-"),
            Dash(ctx.endpoint),
            ctx.tries,
            ctx.peer.as_deref().unwrap_or("-"),
            Dash(event.grpc_status),
            event.response_bytes,
            match event.end {
                BodyEnd::Complete => "complete",
                BodyEnd::Error(_) => "error",
                BodyEnd::Dropped => "dropped",
            },
            event.to_end.as_secs_f64() * 1e3,
        );
        if let BodyEnd::Error(e) = &event.end {
            let _ = write!(line, " error={e:?}");
        }
        self.record(line);
    }

    /// One line per opaque connection, when it closed:
    /// `TIME DIRECTION CLIENT KIND dst=SERVICE upstream=ADDR peer=SPIFFE_ID
    /// bytes_in=N bytes_out=N duration=Dms` (KIND: `tcp`, `connect` or `upgrade`).
    pub fn record_connection(&self, event: &ConnectionEvent) {
        let mut line = format!(
            "{} {} {} {} dst={} upstream={} peer={} bytes_in={} bytes_out={} duration={:.3}ms",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            event.direction,
            event.client,
            event.kind.as_str(),
            event.destination.as_deref().unwrap_or("-"),
            Dash(event.upstream),
            event.peer.as_deref().unwrap_or("-"),
            event.bytes_from_client,
            event.bytes_to_client,
            event.duration.as_secs_f64() * 1e3,
        );
        if let Some(e) = &event.error {
            let _ = write!(line, " error={e:?}");
        }
        self.record(line);
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

/// A field that may be absent, written as `-` then.
struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
