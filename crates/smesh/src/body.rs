//! The response body type: the proxy's own, behind a type this crate can keep stable.

use crate::Error;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use smesh_proxy::embed;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

/// A response body, streamed from the application called (an [`http_body::Body`] of
/// [`Bytes`]). Its upstream connection goes back to the mesh's pool once it has been read
/// to the end; a body dropped early closes that connection instead.
pub struct Body(embed::Body);

impl Body {
    pub(crate) fn new(body: embed::Body) -> Self {
        Body(body)
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("smesh::Body")
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        Pin::new(&mut self.get_mut().0)
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(Error::body)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// A body that is `Send` but maybe not `Sync` (tonic's, `UnsyncBoxBody`), made `Sync` for the
/// mesh, whose boxed bodies are shared as `Send + Sync`: polling takes `&mut` and needs no
/// lock; only the `&self` size questions lock (uncontended: one task owns the body).
pub(crate) struct SyncBody<B>(Mutex<Pin<Box<B>>>);

impl<B> SyncBody<B> {
    pub(crate) fn new(body: B) -> Self {
        SyncBody(Mutex::new(Box::pin(body)))
    }
}

impl<B: http_body::Body> http_body::Body for SyncBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let body = match self.get_mut().0.get_mut() {
            Ok(body) => body,
            // Poisoned by a panic in a size question: the body itself was not changed.
            Err(poisoned) => poisoned.into_inner(),
        };
        body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match self.0.lock() {
            Ok(body) => body.is_end_stream(),
            Err(poisoned) => poisoned.into_inner().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.lock() {
            Ok(body) => body.size_hint(),
            Err(poisoned) => poisoned.into_inner().size_hint(),
        }
    }
}
