//! The last stage of a request: its [`RequestEvent`], completed when the response body ends
//! (or is dropped), and handed to the consumers: the route's gRPC-status counter, the access
//! log and the proxy's filters.
//!
//! A response is watched only when some consumer takes the event (the access log is on,
//! filters are installed, or the request is a gRPC call, whose status comes in the
//! trailers); otherwise nothing is built and the response goes out untouched.

use crate::http::body::{Body, BodyError};
use crate::listen::server::Shared;
use crate::telemetry::event::{BodyEnd, RequestCtx, RequestEvent};
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

impl Shared {
    /// Whether any consumer wants this request's event.
    pub fn want(&self, ctx: &RequestCtx) -> bool {
        ctx.grpc || self.access_log.is_some() || self.filters.is_some()
    }

    /// Whether a consumer reports the request line.
    pub fn want_head(&self) -> bool {
        self.access_log.is_some() || self.filters.is_some()
    }

    /// Hands a finished request to every consumer.
    pub fn deliver(&self, event: &RequestEvent) {
        if let Some(route) = event.ctx.route.as_ref().filter(|_| event.ctx.grpc) {
            route.grpc_response(event.grpc_status);
        }
        if let Some(log) = &self.access_log {
            log.record_request(event);
        }
        for filter in self.filters.iter().flat_map(|f| f.iter()) {
            filter.request_done(event);
        }
    }
}

/// Watches `resp`'s body to its end and then delivers the request's event; or does
/// nothing when no consumer wants it.
pub fn watch(ctx: RequestCtx, resp: Response<Body>, shared: &Arc<Shared>) -> Response<Body> {
    if !shared.want(&ctx) {
        return resp;
    }
    let to_head = ctx.start.elapsed();
    let (parts, inner) = resp.into_parts();
    // A trailers-only gRPC response (a call that failed before any message) has its status
    // in the head.
    let grpc_status = if ctx.grpc { grpc_status(&parts.headers) } else { None };
    let event = RequestEvent {
        status: parts.status.as_u16(),
        grpc_status,
        response_bytes: 0,
        to_head,
        to_end: Duration::ZERO,
        end: BodyEnd::Complete,
        ctx,
    };
    let watched = Watched {
        inner,
        event: Some(event),
        shared: shared.clone(),
    };
    Response::from_parts(parts, Body::Boxed(Box::pin(watched)))
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// A response body that completes its request's event when it ends.
struct Watched {
    inner: Body,
    /// `None` once delivered.
    event: Option<RequestEvent>,
    shared: Arc<Shared>,
}

impl Watched {
    fn finish(&mut self, end: BodyEnd) {
        if let Some(mut event) = self.event.take() {
            event.to_end = event.ctx.start.elapsed();
            event.end = end;
            self.shared.deliver(&event);
        }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(event) = &mut this.event {
                    if let Some(data) = frame.data_ref() {
                        event.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref().filter(|_| event.ctx.grpc) {
                        event.grpc_status = grpc_status(trailers).or(event.grpc_status);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(BodyEnd::Complete);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let error = e.to_string();
                this.finish(BodyEnd::Error(error));
            }
            Poll::Ready(None) => this.finish(BodyEnd::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is empty: that one ended too.
        let end = if self.inner.is_end_stream() {
            BodyEnd::Complete
        } else {
            BodyEnd::Dropped
        };
        self.finish(end);
    }
}
