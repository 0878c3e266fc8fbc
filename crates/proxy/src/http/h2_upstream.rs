//! HTTP/2 connections to upstreams, driven with the `h2` crate itself rather than through
//! hyper's client.
//!
//! hyper's HTTP/2 client hands every request through a channel to the connection's task and
//! spawns one more task per request to wait for the response; each of those tasks is as big
//! as the connection's own state, so every request paid a large allocation and copy. Here
//! the task that proxies a request opens the stream and awaits the response itself; only a
//! request body still streaming gets a task of its own (it must flow while the response is
//! awaited). The response body is read, and its flow-control window released, by whoever
//! polls it.

use crate::http::body::BodyError;
use crate::http::headers::strip_hop_by_hop;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// Flow-control windows. A stream's response data stays unreleased in the connection's
/// window until its reader takes it; a client that never reads (one that grants a zero
/// window) leaves a whole stream window there. So the connection window is the sum of the
/// stream windows of the most streams a connection carries ([`MAX_STREAMS`]): stalled
/// streams hold their own windows (memory bounded per stream), never the connection's,
/// and the other clients' streams on the shared connection keep flowing.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024 * 1024;
/// Streams open at once on one connection; a full connection takes no new streams, a new
/// one does (see [`Connection::has_room`]).
pub const MAX_STREAMS: usize = (CONNECTION_WINDOW / STREAM_WINDOW) as usize;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams opened before the peer's SETTINGS say how many it takes (hyper's default).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// The largest response header list accepted from an upstream (hyper's client default).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams the peer may make us reset for its protocol errors before the connection is
/// dropped (hyper's default; a defence against floods of bad frames).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// An idle-looking connection is PINGed this often; no answer within the timeout closes it
/// (a peer that vanished without a FIN would otherwise hold streams forever).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A shared connection: a handle to open streams on, and whether its driver has ended.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Streams opened here whose response is not done (at most [`MAX_STREAMS`]).
    open: Arc<AtomicUsize>,
}

/// One of a connection's open streams; its count goes down when this is dropped (with the
/// response body, or with the request when no response came).
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request got no response.
pub enum SendFailure<B> {
    /// The connection takes no new streams (closed, or going away): nothing was sent.
    NotSent(Request<B>),
    /// The request may have reached the upstream.
    Sent(h2::Error),
    /// The upstream refused the stream unprocessed (GOAWAY with a lower last stream id, or
    /// RST_STREAM REFUSED_STREAM, RFC 9113 8.7): it may go to a new connection whatever the
    /// route's retry policy. The head and a body already streamed are gone; the caller
    /// resends from what it kept.
    Refused(h2::Error),
    /// The client's request body failed while it streamed (a [`crate::http::body::ClientBodyError`]).
    ClientBody(BodyError),
}

impl<B> SendFailure<B> {
    /// A failure from the stream's response: refused unprocessed, or sent.
    fn of_stream(e: h2::Error) -> Self {
        let refused = e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM));
        if refused {
            SendFailure::Refused(e)
        } else {
            SendFailure::Sent(e)
        }
    }
}

impl Connection {
    /// The HTTP/2 handshake on `io`; the connection is driven (and kept alive with PINGs)
    /// by a task of its own.
    pub async fn handshake<I>(io: I, addr: SocketAddr) -> Result<Self, h2::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let ping = conn.ping_pong();
        tokio::spawn(async move {
            let outcome = match ping {
                Some(ping) => tokio::select! {
                    r = &mut conn => r.map_err(|e| e.to_string()),
                    why = keepalive(ping) => Err(why),
                },
                None => conn.await.map_err(|e| e.to_string()),
            };
            ended.store(true, Ordering::Release);
            if let Err(e) = outcome {
                tracing::debug!(%addr, error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Connection {
            sender,
            closed,
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether another stream may open here without the open streams' windows adding up to
    /// more than the connection's.
    pub fn has_room(&self) -> bool {
        self.open.load(Ordering::Relaxed) < MAX_STREAMS
    }

    /// Opens a stream for `req` and waits for the response head.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, SendFailure<B>>
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BodyError>,
    {
        let mut sender = self.sender.clone();
        if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
            return Err(SendFailure::NotSent(req));
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        let slot = StreamSlot(self.open.clone());
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        // HTTP/2 forbids connection-specific headers (h2 refuses to send them). The request
        // path stripped the client's already, but a route's header filters run after that
        // and may add one; as hyper's client did, they are dropped here rather than fail.
        strip_hop_by_hop(head.headers_mut());
        let end_of_stream = body.is_end_stream();
        let (response, stream) = sender
            .send_request(head, end_of_stream)
            .map_err(SendFailure::of_stream)?;
        // The pipe is told when the response head is in; dropped before that (the request
        // timed out or was abandoned), the sender cancels the stream's upload. It says why
        // the upload failed when the client's body did.
        let mut answered = None;
        let mut body_failed = None;
        if !end_of_stream {
            let (tx, rx) = oneshot::channel();
            let (failed_tx, failed_rx) = oneshot::channel();
            answered = Some(tx);
            body_failed = Some(failed_rx);
            tokio::spawn(pipe(body, stream, rx, failed_tx));
        }
        let response = match response.await {
            Ok(response) => response,
            Err(e) => {
                return Err(match body_failed.and_then(|mut rx| rx.try_recv().ok()) {
                    Some(client) => SendFailure::ClientBody(client),
                    None => SendFailure::of_stream(e),
                })
            }
        };
        let (parts, recv) = response.into_parts();
        if let Some(tx) = answered {
            let _ = tx.send(());
        }
        let body = ResponseBody::new(recv, &parts.headers, slot);
        Ok(Response::from_parts(parts, body))
    }
}

/// PINGs the peer every [`KEEPALIVE_INTERVAL`]; returns why the connection is dead.
async fn keepalive(mut ping: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive PING: {e}"),
            Err(_) => return format!("no PING answer in {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// Streams a request body to its stream, within the peer's flow-control window. A body that
/// fails, a stream the peer reset, or a request given up before its response (`answered`
/// dropped unsent) ends it, and the peer is told with RST_STREAM(CANCEL).
async fn pipe<B>(
    mut body: B,
    mut stream: SendStream<Bytes>,
    answered: oneshot::Receiver<()>,
    failed: oneshot::Sender<BodyError>,
) where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    let mut answered = Some(answered);
    if let Err(e) = pipe_frames(&mut body, &mut stream, &mut answered).await {
        tracing::debug!(error = %e, "request body to an upstream h2 stream ended early");
        // Told before the reset, so the response's failure finds it.
        if crate::http::body::is_client_body_error(&*e) {
            let _ = failed.send(e);
        }
        stream.send_reset(h2::Reason::CANCEL);
    }
}

async fn pipe_frames<B>(
    body: &mut B,
    stream: &mut SendStream<Bytes>,
    answered: &mut Option<oneshot::Receiver<()>>,
) -> Result<(), BodyError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    loop {
        // The next frame first, then room for it in the peer's window. Reserving window
        // before the body has anything to send would pin connection window to an idle
        // stream, and a peer that grants more only once its window is used up would then
        // stall every other stream of the connection (the reason hyper's pipe changed to
        // this order, hyper#4003).
        let frame = poll_fn(|cx| {
            if let Some(e) = abandoned(answered, cx) {
                return Poll::Ready(Some(Err(e)));
            }
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                let why: BodyError = match reset {
                    Ok(reason) => format!("upstream reset the stream: {reason}").into(),
                    Err(e) => e.into(),
                };
                return Poll::Ready(Some(Err(why)));
            }
            Pin::new(&mut *body).poll_frame(cx).map_err(Into::into)
        })
        .await;
        let frame = match frame {
            None => {
                stream.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(frame) => frame?,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                    return Ok(());
                }
                continue;
            }
        };
        let end = body.is_end_stream();
        if !data.is_empty() {
            // Backpressure: a claim of one byte, waited for; h2 raises the claim to what
            // is buffered and sends as the window opens.
            stream.reserve_capacity(1);
            while stream.capacity() == 0 {
                let room = poll_fn(|cx| {
                    if let Some(e) = abandoned(answered, cx) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    stream.poll_capacity(cx).map(|c| c.map(|r| r.map_err(BodyError::from)))
                });
                match room.await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Err("upstream stream closed".into()),
                }
            }
        }
        if !data.is_empty() || end {
            stream.send_data(data, end)?;
        }
        if end {
            return Ok(());
        }
    }
}

/// Whether the request was given up before its response head came (its sender dropped
/// unsent); once it came, the upload goes on to its end.
fn abandoned(answered: &mut Option<oneshot::Receiver<()>>, cx: &mut Context<'_>) -> Option<BodyError> {
    let rx = answered.as_mut()?;
    match Pin::new(rx).poll(cx) {
        Poll::Pending => None,
        Poll::Ready(Ok(())) => {
            *answered = None;
            None
        }
        Poll::Ready(Err(_)) => Some("the request was given up before its response".into()),
    }
}

/// A response body from an upstream HTTP/2 stream; data read is given back to the peer's
/// window at once (the downstream write is what paces the reader).
// 40 bytes: with one more, `Body` (moved a few dozen times per response) grows from 48 to 56
// bytes; the length is a plain u64 with a sentinel instead of an `Option` for that reason.
pub struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    /// The response's `content-length`, or [`NO_LENGTH`].
    content_length: u64,
    _slot: StreamSlot,
}

const NO_LENGTH: u64 = u64::MAX;

impl ResponseBody {
    /// `headers`: the response's, whose `content-length` makes the size hint exact (an
    /// HTTP/1.1 client then gets a sized response rather than a chunked one).
    fn new(recv: RecvStream, headers: &HeaderMap, slot: StreamSlot) -> Self {
        let content_length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(NO_LENGTH);
        ResponseBody {
            recv,
            data_done: false,
            content_length,
            _slot: slot,
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.content_length {
            NO_LENGTH => SizeHint::default(),
            n => SizeHint::with_exact(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use tokio::net::{TcpListener, TcpStream};

    const REQUEST_BYTES: usize = 5 << 20;
    const RESPONSE_BYTES: usize = 8 << 20;

    /// An h2 server (default 64 KiB windows) that reads each request body whole, then
    /// answers with RESPONSE_BYTES and trailers saying what it received.
    async fn serve_one_connection(listener: TcpListener) {
        let (socket, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(socket).await.expect("server handshake");
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut body = req.into_body();
                let mut received = 0;
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.expect("request data");
                    received += chunk.len();
                    body.flow_control().release_capacity(chunk.len()).expect("release");
                }
                let trailer = body.trailers().await.expect("request trailers");
                let status = trailer.and_then(|t| t.get("grpc-status").cloned());
                let mut send = respond.send_response(Response::new(()), false).expect("respond");
                let mut left = RESPONSE_BYTES;
                while left > 0 {
                    send.reserve_capacity(left.min(16 << 10));
                    let room = poll_fn(|cx| send.poll_capacity(cx))
                        .await
                        .expect("open")
                        .expect("capacity");
                    let n = room.min(left);
                    send.send_data(Bytes::from(vec![7u8; n]), false).expect("send data");
                    left -= n;
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("received", received.to_string().parse().expect("number"));
                if let Some(status) = status {
                    trailers.insert("client-grpc-status", status);
                }
                send.send_trailers(trailers).expect("send trailers");
            });
        }
    }

    /// REQUEST_BYTES in 64 KiB chunks, then `grpc-status: 0` as trailers.
    fn request_body() -> crate::http::test_bodies::Frames {
        let chunk = Bytes::from(vec![1u8; 64 << 10]);
        crate::http::test_bodies::frames_of(std::iter::repeat_n(chunk, REQUEST_BYTES / (64 << 10)), true)
    }

    #[test]
    fn response_bodies_keep_body_small() {
        assert_eq!(std::mem::size_of::<ResponseBody>(), 40);
        assert_eq!(std::mem::size_of::<crate::http::body::Body>(), 48);
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_and_trailers_cross_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_one_connection(listener));
        let io = TcpStream::connect(addr).await.expect("connect");
        let conn = Connection::handshake(io, addr).await.expect("handshake");
        let req = Request::post(format!("http://{addr}/upload"))
            .body(request_body())
            .expect("request");
        // A window never given back would stall the exchange: bounded, it fails instead.
        let exchange = async {
            let Ok(resp) = conn.send(req).await else {
                panic!("no response");
            };
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.expect("response body")
        };
        let collected = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("the exchange finishes");
        let trailers = collected.trailers().cloned().expect("response trailers");
        assert_eq!(collected.to_bytes().len(), RESPONSE_BYTES);
        assert_eq!(trailers.get("received").expect("received"), &REQUEST_BYTES.to_string());
        assert_eq!(
            trailers.get("client-grpc-status").expect("request trailers arrived"),
            "0"
        );
    }

    #[tokio::test]
    async fn a_request_given_up_before_its_response_cancels_its_upload() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(socket).await.expect("server handshake");
            let Some(Ok((req, _never_answered))) = conn.accept().await else {
                panic!("no request");
            };
            let watch = tokio::spawn(async move {
                let mut body = req.into_body();
                loop {
                    match body.data().await {
                        Some(Ok(chunk)) => {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        Some(Err(e)) => break e.reason(),
                        None => break None,
                    }
                }
            });
            // The connection is driven until the stream's fate is known.
            let reason = tokio::select! {
                r = watch => r.expect("watcher"),
                _ = conn.accept() => None,
            };
            let _ = seen_tx.send(reason);
        });
        let io = TcpStream::connect(addr).await.expect("connect");
        let conn = Connection::handshake(io, addr).await.expect("handshake");
        // An upload that never ends: one chunk, then nothing.
        let (chunks, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        chunks
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("queue");
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::post(format!("http://{addr}/slow"))
            .body(body)
            .expect("request");
        let gave_up = tokio::time::timeout(Duration::from_millis(200), conn.send(req)).await;
        assert!(gave_up.is_err(), "the server never answers");
        let reason = tokio::time::timeout(Duration::from_secs(5), seen_rx)
            .await
            .expect("the server sees the stream end")
            .expect("reported");
        assert_eq!(reason, Some(h2::Reason::CANCEL));
        drop(chunks);
    }

    #[tokio::test]
    async fn a_closed_connection_hands_the_request_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            // Handshake, then close the connection at once.
            drop(h2::server::handshake(socket).await.expect("server handshake"));
        });
        let io = TcpStream::connect(addr).await.expect("connect");
        let conn = Connection::handshake(io, addr).await.expect("handshake");
        server.await.expect("server");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !conn.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the driver notices the close");
        let req = Request::get(format!("http://{addr}/")).body(http_body_util::Empty::<Bytes>::new());
        match conn.send(req.expect("request")).await {
            Err(SendFailure::NotSent(back)) => assert_eq!(back.uri().path(), "/"),
            Err(SendFailure::Sent(e) | SendFailure::Refused(e)) => panic!("sent on a closed connection: {e}"),
            Err(SendFailure::ClientBody(e)) => panic!("no body to fail: {e}"),
            Ok(_) => panic!("a response from a closed connection"),
        }
    }
}
