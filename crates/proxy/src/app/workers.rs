//! The workers (docs/architecture.md, "Workers"), whatever the mode: N threads, each running its own
//! single-threaded runtime and accepting on its own `SO_REUSEPORT` socket for every listener,
//! so a connection and the upstream connections it uses stay on one thread. A mode gives the
//! listeners and the state they share; the workers bind, accept, and drain on stop.

use crate::http::pool;
use crate::listen::accept::{accept_loop, bind, bind_first};
use crate::listen::server::{ListenerSpec, Shared};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// Scheduler ticks between a busy worker's polls of epoll (tokio's default is 61). A worker
/// that always has ready tasks checks for new I/O only this often; larger batches mean fewer
/// epoll_wait calls per request. Measured on one worker (wrk -c64 HTTP/1.1, h2load -c8 -m16
/// h2c): 61 -> 200..1000 gave +2% and +5% req/s, with no gain beyond; at most ~256 task
/// polls (well under a millisecond) pass before a saturated worker sees new events.
const WORKER_EVENT_INTERVAL: u32 = 256;

/// An address to listen on and what its connections are for.
pub struct Listener {
    pub addr: SocketAddr,
    pub spec: Arc<ListenerSpec>,
}

/// Listeners bound for the first worker, not yet served.
pub struct Workers {
    listeners: Vec<Listener>,
    first: Vec<std::net::TcpListener>,
    count: usize,
}

/// Workers serving their listeners; [`Running::join`] waits until they have drained.
pub struct Running {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Binds every listener up front, so an address in use is a start-up error.
    pub fn bind(listeners: Vec<Listener>, count: usize) -> Result<Workers, String> {
        let first = listeners
            .iter()
            .map(|l| bind_first(l.addr).map_err(|e| format!("cannot listen on {}: {e}", l.addr)))
            .collect::<Result<_, _>>()?;
        Ok(Workers {
            listeners,
            first,
            count: count.max(1),
        })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Starts the worker threads. Until `stop` turns true each accepts on every listener;
    /// then it closes its sockets and lets open connections finish, up to `drain`.
    pub fn start(self, shared: Arc<Shared>, stop: watch::Receiver<bool>, drain: Duration) -> Result<Running, String> {
        let specs: Vec<Arc<ListenerSpec>> = self.listeners.iter().map(|l| l.spec.clone()).collect();
        let mut threads = Vec::new();
        let mut first = Some(self.first);
        for index in 0..self.count {
            // Worker 0 takes the sockets bound above; the others bind their own on the same
            // addresses, and the kernel spreads connections across them.
            let sockets = match first.take() {
                Some(s) => s,
                None => self
                    .listeners
                    .iter()
                    .map(|l| bind(l.addr).map_err(|e| format!("cannot listen on {}: {e}", l.addr)))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            let worker = Worker {
                sockets,
                specs: specs.clone(),
                shared: shared.clone(),
                stop: stop.clone(),
                drain,
            };
            let thread = std::thread::Builder::new()
                .name(format!("smesh-worker-{index}"))
                .spawn(move || worker.run())
                .map_err(|e| format!("cannot start worker thread: {e}"))?;
            threads.push(thread);
        }
        Ok(Running { threads })
    }
}

impl Running {
    /// Blocks until every worker has drained and stopped.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One worker thread's share: a socket per listener.
struct Worker {
    sockets: Vec<std::net::TcpListener>,
    specs: Vec<Arc<ListenerSpec>>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    drain: Duration,
}

impl Worker {
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .event_interval(WORKER_EVENT_INTERVAL)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start worker runtime");
                return;
            }
        };
        let Worker {
            sockets,
            specs,
            shared,
            stop,
            drain,
        } = self;
        runtime.block_on(async move {
            tokio::spawn(pool::close_idle_forever(stop.clone()));
            let loops: Vec<_> = sockets
                .into_iter()
                .zip(specs)
                .map(|(socket, spec)| tokio::spawn(accept_loop(socket, spec, shared.clone(), stop.clone(), drain)))
                .collect();
            for l in loops {
                let _ = l.await;
            }
        });
    }
}
