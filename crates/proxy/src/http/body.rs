//! The one body type the proxy sends in both directions, so no request needs boxing.

use crate::http::pool::PoolReturn;
use crate::http::tee::Tee;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

pub enum Body {
    Empty,
    /// Fully buffered (proxy-generated responses, bodies kept for retries).
    Full(Option<Bytes>),
    /// Streamed from the client as it arrives.
    Streaming(Incoming),
    /// Streamed from a client of another body type (a library caller's).
    StreamingBoxed(BoxBody),
    /// An upstream response body; its connection goes back to the pool once the body is done.
    Upstream(Incoming, PoolReturn),
    /// A request body streamed while a copy is kept for retries.
    Replay(crate::http::replay::ReplayBody<Tee<ClientBody>>),
    /// A request body streamed to the upstream and copied to mirrors as it goes (rare, and
    /// the largest variant: boxed).
    Tee(Box<Tee<ClientBody>>),
    /// A mirror's request body: a copy of the client's, frame by frame.
    Tap(crate::http::tee::Tap),
    /// An upstream response body over HTTP/2.
    H2(crate::http::h2_upstream::ResponseBody),
    /// Any other body: a response body watched to its end (see `listen::complete`).
    Boxed(BoxBody),
}

/// A boxed body of any type (the rare cases: the common ones above are not boxed).
pub type BoxBody = Pin<Box<dyn HttpBody<Data = Bytes, Error = BodyError> + Send + Sync>>;

/// A request body as the client's side gives it: a server connection's (not boxed), or any
/// other body type, e.g. a library caller's (see `dispatch`).
pub enum ClientBody {
    Incoming(Incoming),
    Boxed(BoxBody),
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> Self {
        ClientBody::Incoming(body)
    }
}

impl ClientBody {
    /// The body to stream to one try (not kept, not mirrored).
    pub fn into_streaming(self) -> Body {
        match self {
            ClientBody::Incoming(body) => Body::Streaming(body),
            ClientBody::Boxed(body) => Body::StreamingBoxed(body),
        }
    }

    /// Any body, e.g. `http_body_util::Full<Bytes>` or a stream.
    pub fn new<B>(body: B) -> Self
    where
        B: HttpBody<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BodyError>,
    {
        use http_body_util::BodyExt;
        ClientBody::Boxed(Box::pin(body.map_err(Into::into)))
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Incoming(body) => boxed(Pin::new(body).poll_frame(cx)),
            ClientBody::Boxed(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Incoming(body) => body.is_end_stream(),
            ClientBody::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Incoming(body) => body.size_hint(),
            ClientBody::Boxed(body) => body.size_hint(),
        }
    }
}

/// Errors of any body variant (hyper's, or a mirror's copy cut off).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that failed on the client's side (malformed chunked framing, a client
/// gone mid-body). An upstream client that fails while sending it carries this as its
/// cause, so the request path answers 400 `bad request` rather than blaming the upstream.
#[derive(Debug)]
pub struct ClientBodyError(BodyError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Whether `error`, or any error in its chain of causes, is a [`ClientBodyError`].
pub fn is_client_body_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<ClientBodyError>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Streaming(body) => from_client(Pin::new(body).poll_frame(cx)),
            Body::StreamingBoxed(body) => from_client(body.as_mut().poll_frame(cx)),
            Body::Boxed(body) => body.as_mut().poll_frame(cx),
            Body::Upstream(body, done) => {
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    done.release();
                }
                boxed(frame)
            }
            Body::Replay(body) => from_client(Pin::new(body).poll_frame(cx)),
            Body::Tee(body) => from_client(Pin::new(&mut **body).poll_frame(cx)),
            Body::Tap(body) => boxed(Pin::new(body).poll_frame(cx)),
            Body::H2(body) => boxed(Pin::new(body).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Streaming(body) | Body::Upstream(body, _) => body.is_end_stream(),
            Body::StreamingBoxed(body) | Body::Boxed(body) => body.is_end_stream(),
            Body::Replay(body) => body.is_end_stream(),
            Body::Tee(body) => body.is_end_stream(),
            Body::Tap(body) => body.is_end_stream(),
            Body::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Streaming(body) | Body::Upstream(body, _) => body.size_hint(),
            Body::StreamingBoxed(body) | Body::Boxed(body) => body.size_hint(),
            Body::Replay(body) => body.size_hint(),
            Body::Tee(body) => body.size_hint(),
            Body::Tap(body) => body.size_hint(),
            Body::H2(body) => body.size_hint(),
        }
    }
}

type Polled<E> = Poll<Option<Result<Frame<Bytes>, E>>>;

fn boxed<E: Into<BodyError>>(polled: Polled<E>) -> Polled<BodyError> {
    polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
}

/// A frame of a body read from the client: its errors are the client's.
fn from_client<E: Into<BodyError>>(polled: Polled<E>) -> Polled<BodyError> {
    polled.map(|frame| frame.map(|r| r.map_err(|e| Box::new(ClientBodyError(e.into())) as BodyError)))
}
