//! The one body type the proxy sends in both directions, so no request needs boxing.

use crate::pool::PoolReturn;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

pub enum Body {
    Empty,
    /// Fully buffered (proxy-generated responses, bodies kept for retries).
    Full(Option<Bytes>),
    /// Streamed from the peer as it arrives.
    Streaming(Incoming),
    /// An upstream response body; its connection goes back to the pool once the body is done.
    Upstream(Incoming, PoolReturn),
    /// A request body streamed while a copy is kept for retries.
    Replay(crate::replay::ReplayBody),
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
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Streaming(body) => Pin::new(body).poll_frame(cx),
            Body::Upstream(body, done) => {
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    done.release();
                }
                frame
            }
            Body::Replay(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Streaming(body) | Body::Upstream(body, _) => body.is_end_stream(),
            Body::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Streaming(body) | Body::Upstream(body, _) => body.size_hint(),
            Body::Replay(body) => body.size_hint(),
        }
    }
}
