//! Request bodies for unit tests: a fixed sequence of data frames, optionally trailers.

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::StreamBody;
use std::convert::Infallible;

pub type Frames = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A body of `chunks`, then (with `trailers`) `grpc-status: 0` as trailers.
pub fn frames(chunks: &[&'static str], trailers: bool) -> Frames {
    frames_of(chunks.iter().map(|c| Bytes::from_static(c.as_bytes())), trailers)
}

/// [`frames`] of any chunks.
pub fn frames_of(chunks: impl IntoIterator<Item = Bytes>, trailers: bool) -> Frames {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    if trailers {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(tokio_stream::iter(frames))
}
