//! `RequestMirror` for request bodies that stream instead of being kept in memory (length
//! unknown up front, e.g. chunked uploads and gRPC streams, or too big to keep): every frame
//! read from the client goes on to the upstream and, through a bounded channel, to each
//! mirror's request ([`Tap`]). The client never waits for a mirror: a mirror that falls
//! [`TAP_FRAMES`] frames behind is cut off, and its request fails (a failed mirror) rather
//! than reaching the shadow incomplete. So does a mirror whose client body ends in an error,
//! or is never read to its end.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// How many frames a mirror may lag behind the client's body before it is cut off.
pub const TAP_FRAMES: usize = 64;

/// The client's body, copied to mirrors as it is read.
pub struct Tee<B = Incoming> {
    source: B,
    taps: Vec<TapSender>,
}

/// The primary's end of one mirror's body.
pub struct TapSender {
    frames: mpsc::Sender<Frame<Bytes>>,
    /// Set once the client's body was read to its end: the mirror's body is complete.
    complete: Arc<AtomicBool>,
}

/// One mirror's request body: the client's frames as the primary reads them.
pub struct Tap {
    frames: mpsc::Receiver<Frame<Bytes>>,
    complete: Arc<AtomicBool>,
    size: SizeHint,
}

/// The error a mirror's request fails with when its body cannot be complete.
#[derive(Debug)]
pub struct TapCut;

impl std::fmt::Display for TapCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mirror cut off: it fell behind the client's body, or that body did not end")
    }
}

impl std::error::Error for TapCut {}

/// A channel for one mirror's body; `size` is the client body's size hint.
pub fn tap(size: SizeHint) -> (TapSender, Tap) {
    let (tx, rx) = mpsc::channel(TAP_FRAMES);
    let complete = Arc::new(AtomicBool::new(false));
    let sender = TapSender {
        frames: tx,
        complete: complete.clone(),
    };
    (
        sender,
        Tap {
            frames: rx,
            complete,
            size,
        },
    )
}

impl<B: HttpBody> Tee<B> {
    pub fn new(source: B, taps: Vec<TapSender>) -> Self {
        let mut tee = Tee { source, taps };
        // A body that is over before it starts may never be polled.
        if tee.source.is_end_stream() {
            tee.finish();
        }
        tee
    }

    pub fn is_tapped(&self) -> bool {
        !self.taps.is_empty()
    }

    fn finish(&mut self) {
        for tap in self.taps.drain(..) {
            tap.complete.store(true, Ordering::Release);
        }
    }
}

fn copy(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        return Some(Frame::data(data.clone()));
    }
    frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.source).poll_frame(cx);
        if this.taps.is_empty() {
            return polled;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // A full channel is a mirror too slow to keep up: dropping its sender cuts it.
                this.taps
                    .retain(|tap| copy(frame).is_none_or(|c| tap.frames.try_send(c).is_ok()));
                if this.source.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.taps.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.source.size_hint()
    }
}

impl HttpBody for Tap {
    type Data = Bytes;
    type Error = TapCut;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, TapCut>>> {
        let this = self.get_mut();
        match this.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if this.complete.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(TapCut))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_bodies::frames as source;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn every_mirror_gets_the_whole_body_and_its_trailers() {
        let (a, tap_a) = tap(SizeHint::default());
        let (b, tap_b) = tap(SizeHint::default());
        let primary = Tee::new(source(&["ab", "cd", "ef"], true), vec![a, b]);
        let got = primary.collect().await.unwrap();
        assert!(got.trailers().is_some());
        assert_eq!(got.to_bytes(), "abcdef");
        for tap in [tap_a, tap_b] {
            let mirrored = tap.collect().await.unwrap();
            assert!(mirrored.trailers().is_some());
            assert_eq!(mirrored.to_bytes(), "abcdef");
        }
    }

    #[tokio::test]
    async fn a_mirror_that_falls_behind_is_cut_off_and_the_primary_goes_on() {
        let chunks: Vec<&'static str> = vec!["x"; TAP_FRAMES + 10];
        let (slow, tap_slow) = tap(SizeHint::default());
        let primary = Tee::new(source(&chunks, false), vec![slow]);
        let got = primary.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), TAP_FRAMES + 10, "the primary is not held up");
        let mut tap_slow = tap_slow;
        let mut read = 0;
        let failed = loop {
            match tap_slow.frame().await {
                Some(Ok(_)) => read += 1,
                Some(Err(TapCut)) => break true,
                None => break false,
            }
        };
        assert!(failed, "a cut mirror must fail, not end as if complete");
        assert_eq!(read, TAP_FRAMES);
    }

    #[tokio::test]
    async fn a_body_not_read_to_its_end_fails_the_mirror() {
        let (t, tap_t) = tap(SizeHint::default());
        let mut primary = Tee::new(source(&["ab", "cd"], false), vec![t]);
        let _ = primary.frame().await;
        drop(primary);
        let err = tap_t.collect().await;
        assert!(err.is_err());
    }

    #[tokio::test]
    async fn an_empty_body_completes_the_mirror_at_once() {
        let (t, tap_t) = tap(SizeHint::with_exact(0));
        let primary = Tee::new(http_body_util::Empty::<Bytes>::new(), vec![t]);
        assert!(!primary.is_tapped());
        assert_eq!(tap_t.collect().await.unwrap().to_bytes(), "");
    }
}
