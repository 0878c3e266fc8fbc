//! Request bodies that can be sent again although their length was not known up front
//! (chunked HTTP/1.1, HTTP/2 and gRPC requests): the body streams to the upstream as it
//! arrives while a copy of what was sent is kept, up to a limit. A retry replays the copy,
//! then goes on reading the client's body where the previous try stopped. Once the body is
//! over the limit the copy is dropped and the request can no longer be retried.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

struct State<B> {
    /// The client's body, where the last try left it (`None` once it ended).
    source: Option<B>,
    /// Everything read from `source` so far, while under `limit`.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    trailers: Option<HeaderMap>,
    limit: usize,
    /// Over the limit: `kept` was dropped.
    overflowed: bool,
}

/// The shared copy of one request's body; one [`ReplayBody`] per try reads from it.
pub struct Replay<B = Incoming>(Arc<Mutex<State<B>>>);

impl<B> Clone for Replay<B> {
    fn clone(&self) -> Self {
        Replay(self.0.clone())
    }
}

impl<B> Replay<B> {
    pub fn new(source: B, limit: usize) -> Self {
        Replay(Arc::new(Mutex::new(State {
            source: Some(source),
            kept: Vec::new(),
            kept_bytes: 0,
            trailers: None,
            limit,
            overflowed: false,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State<B>> {
        // Only the tries of one request touch this, one at a time; a panic elsewhere
        // leaves data that is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another try can get the whole body.
    pub fn can_replay(&self) -> bool {
        !self.state().overflowed
    }

    /// A body for the next try: the kept copy first, then the rest of the client's body.
    pub fn body(&self) -> ReplayBody<B> {
        ReplayBody {
            replay: self.clone(),
            next: 0,
            trailers_sent: false,
        }
    }
}

pub struct ReplayBody<B = Incoming> {
    replay: Replay<B>,
    /// Index into `kept` of the next frame to send.
    next: usize,
    trailers_sent: bool,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let mut state = this.replay.state();
        if this.next < state.kept.len() {
            let data = state.kept[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(source) = state.source.as_mut() else {
            // The client's body ended: its trailers, if any, then the end.
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.source = None;
                this.trailers_sent = true;
                Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        keep(&mut state, &data);
                        this.next = state.kept.len();
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            state.trailers = Some(trailers.clone());
                            this.trailers_sent = true;
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.replay.state();
        self.next >= state.kept.len() && state.source.is_none() && (self.trailers_sent || state.trailers.is_none())
    }
}

fn keep<B>(state: &mut State<B>, data: &Bytes) {
    if state.overflowed {
        return;
    }
    if state.kept_bytes + data.len() > state.limit {
        state.overflowed = true;
        state.kept = Vec::new();
        return;
    }
    state.kept_bytes += data.len();
    // Cloning `Bytes` shares the buffer: nothing is copied.
    state.kept.push(data.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_bodies::{frames as source, Frames};
    use http_body_util::BodyExt;

    async fn read_all(body: ReplayBody<Frames>) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_retry_gets_the_whole_body_and_its_trailers() {
        let replay = Replay::new(source(&["ab", "cd", "ef"], true), 100);
        let (first, t1) = read_all(replay.body()).await;
        assert_eq!(first, b"abcdef");
        assert!(replay.can_replay());
        let (second, t2) = read_all(replay.body()).await;
        assert_eq!(second, b"abcdef");
        assert!(t1.is_some() && t2.is_some());
    }

    #[tokio::test]
    async fn a_retry_after_a_partial_try_goes_on_with_the_rest() {
        let replay = Replay::new(source(&["ab", "cd", "ef"], false), 100);
        let mut first = replay.body();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first); // the upstream answered before reading the rest
        let (second, _) = read_all(replay.body()).await;
        assert_eq!(second, b"abcdef");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_cannot_be_replayed() {
        let replay = Replay::new(source(&["abcd", "efgh"], false), 6);
        let (first, _) = read_all(replay.body()).await;
        assert_eq!(first, b"abcdefgh", "the first try still gets everything");
        assert!(!replay.can_replay());
    }
}
