//! `--header-read-timeout`: an HTTP/1 client has this long from the first byte of a request
//! head to its end (HAProxy's `timeout http-request`). A client trickling its head a byte at a
//! time (slowloris) would otherwise hold the connection for the whole `--idle-timeout`.
//!
//! hyper's own header timer cannot be used for it: it starts when hyper begins waiting for a
//! head, so on a keep-alive connection it also bounds the idle time between requests, which
//! is `--idle-timeout`'s job (and hyper keeps that one). Here the connection's reads are
//! watched instead: bytes read while no request is in the proxy start a head, and the clock
//! runs from the first read that then has to wait for more of it (hyper reads again at once
//! while a head is incomplete, so that is the head's first bytes give or take a poll); it
//! stops when the head is complete (the service is called). The cost per request is a few
//! relaxed atomic operations on the connection's own counters.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the service tells the watch: heads completed, and requests still in the proxy.
#[derive(Default)]
pub struct Heads {
    completed: AtomicU64,
    in_proxy: AtomicUsize,
    /// The connection became a tunnel (an upgrade or CONNECT): no more heads on it.
    tunnel: AtomicBool,
}

/// A request in the proxy, from its complete head until its response is handed back.
pub struct InProxy(Arc<Heads>);

impl Heads {
    /// Called when hyper hands the service a complete head.
    pub fn head_complete(self: &Arc<Self>) -> InProxy {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.in_proxy.fetch_add(1, Ordering::Relaxed);
        InProxy(self.clone())
    }

    /// Called when a response turns the connection into a tunnel.
    pub fn tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A request's future with its [`InProxy`] mark, dropped when the response is handed
    /// back. (A thin wrapper, not an async block: the request future is built in place rather
    /// than built and then copied into the block's state, a few KB per request.)
    pub struct Handling<F> {
        #[pin]
        request: F,
        in_proxy: Option<InProxy>,
        connect: bool,
    }
}

impl<F> Handling<F> {
    /// `connect`: a CONNECT request, whose success makes the connection a tunnel.
    pub fn new(in_proxy: InProxy, connect: bool, request: F) -> Self {
        Handling {
            request,
            in_proxy: Some(in_proxy),
            connect,
        }
    }
}

impl<F, B, E> Future for Handling<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.request.poll(cx));
        if let (Ok(resp), Some(in_proxy)) = (&out, this.in_proxy.take()) {
            let status = resp.status();
            if status == http::StatusCode::SWITCHING_PROTOCOLS || (*this.connect && status.is_success()) {
                in_proxy.0.tunnel();
            }
        }
        Poll::Ready(out)
    }
}

impl Drop for InProxy {
    fn drop(&mut self) {
        self.0.in_proxy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/1 connection's I/O that fails its reads once a head takes too long.
///
/// Most heads arrive whole in one read and are parsed before the next, so the clock costs
/// nothing for them: a head is only marked as started, and the timer (one per connection,
/// reused) is set only when a read has to wait with a head still incomplete.
pub struct HeadTimeout<I> {
    io: I,
    heads: Arc<Heads>,
    limit: Duration,
    /// A head has started: the count of completed heads then, and its deadline once a read
    /// had to wait for the rest.
    started: Option<(u64, Option<Instant>)>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<I> HeadTimeout<I> {
    pub fn new(io: I, heads: Arc<Heads>, limit: Duration) -> Self {
        HeadTimeout {
            io,
            heads,
            limit,
            started: None,
            timer: None,
        }
    }
}

fn head_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "request head not complete within --header-read-timeout",
    )
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadTimeout<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.heads.tunnel.load(Ordering::Relaxed) {
            this.started = None;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let completed = this.heads.completed.load(Ordering::Relaxed);
        if this.started.is_some_and(|(at, _)| at != completed) {
            // The head being timed is complete.
            this.started = None;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before && this.started.is_none() && this.heads.in_proxy.load(Ordering::Relaxed) == 0 {
            // The first bytes of a new head.
            this.started = Some((completed, None));
        }
        if polled.is_pending() {
            if let Some((_, deadline)) = &mut this.started {
                // Waiting for the rest of a head: the clock runs (from this first wait, a
                // moment after the head's first bytes), and its expiry wakes this task.
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + this.limit);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(head_timed_out()));
                }
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadTimeout<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_times_out_and_a_complete_one_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let heads = Arc::new(Heads::default());
        let mut io = HeadTimeout::new(server, heads.clone(), Duration::from_secs(10));
        let (client_read, mut client_write) = tokio::io::split(client);
        let mut buf = [0u8; 16];

        // A head that completes in time: no error, and the clock stops.
        client_write.write_all(b"GET").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        let in_proxy = heads.head_complete();
        tokio::time::advance(Duration::from_secs(30)).await;
        // Body bytes while the request is in the proxy do not start the clock.
        client_write.write_all(b"body").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 4);
        drop(in_proxy);
        tokio::time::advance(Duration::from_secs(30)).await;

        // The next head trickles (a byte, another 5 s later, then nothing), read as hyper reads (again at once
        // while the head is incomplete): the read fails 10 s after its first byte.
        client_write.write_all(b"G").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        let first_byte = Instant::now();
        let trickle = tokio::spawn(async move {
            for byte in [b"E"] {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if client_write.write_all(byte).await.is_err() {
                    break;
                }
            }
            client_write
        });
        let failed = loop {
            match io.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 1),
                Err(e) => break e,
            }
        };
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        assert_eq!(first_byte.elapsed(), Duration::from_secs(10));
        let mut client_write = trickle.await.unwrap();

        // A tunnel's bytes are not a head.
        heads.tunnel();
        client_write.write_all(b"frame").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 5);
        tokio::time::advance(Duration::from_secs(60)).await;
        client_write.write_all(b"frame").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 5);
        drop(client_read);
    }
}
