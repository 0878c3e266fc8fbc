//! The last stage of a request: its [`RequestEvent`], completed when the response body ends
//! (or is dropped), and handed to the consumers: the route's gRPC-status counter, the access
//! log and the proxy's filters.
//!
//! A response is watched only when some consumer takes the event (the access log is on,
//! filters are installed, or the request is a gRPC call, whose status comes in the
//! trailers); otherwise nothing is built and the response goes out untouched (the
//! golden-metric window then takes the request at its head, `crate::listen::http`).

use crate::filter::{Filters, RequestFilters};
use crate::http::body::{Body, BodyError};
use crate::listen::server::Shared;
use crate::telemetry::event::{BodyEnd, RequestCtx, RequestEvent};
use crate::telemetry::window::Sample;
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

impl Shared {
    /// Whether any consumer wants this request's event (`configured`: the snapshot's
    /// filters).
    pub fn want(&self, ctx: &RequestCtx, configured: &Option<Filters>) -> bool {
        ctx.grpc || self.access_log.is_some() || self.filters.is_some() || configured.is_some()
    }

    /// Whether a consumer reports the request line.
    pub fn want_head(&self) -> bool {
        self.access_log.is_some() || self.filters.is_some()
    }

    /// Hands a finished request to every consumer.
    pub fn deliver(&self, event: &RequestEvent, configured: &Option<Filters>) {
        if let Some(route) = event.ctx.route.as_ref().filter(|_| event.ctx.grpc) {
            route.grpc_response(event.grpc_status);
        }
        if let Some(stats) = &self.stats {
            stats.record(&Sample::of_event(event));
        }
        if let Some(log) = &self.access_log {
            log.record_request(event);
        }
        for filter in RequestFilters::new(&self.filters, configured).iter() {
            filter.request_done(event);
        }
    }
}

/// Watches `resp`'s body to its end and then delivers the request's event (the caller
/// checked [`Shared::want`]).
pub fn watch(
    ctx: RequestCtx,
    resp: Response<Body>,
    shared: &Arc<Shared>,
    configured: Option<Filters>,
) -> Response<Body> {
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
        configured,
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
    /// The snapshot's filters when the request started.
    configured: Option<Filters>,
}

impl Watched {
    fn finish(&mut self, end: BodyEnd) {
        if let Some(mut event) = self.event.take() {
            event.to_end = event.ctx.start.elapsed();
            event.end = end;
            self.shared.deliver(&event, &self.configured);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::Snapshot;
    use crate::filter::Filter;
    use crate::telemetry::metrics::Metrics;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Mutex;

    /// What a test checks of an event: gRPC status, bytes, end, failure.
    type Seen = (Option<u16>, u64, BodyEnd, bool);

    /// Keeps every event it is given.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl Filter for Recorder {
        fn request_done(&self, e: &RequestEvent) {
            let mut seen = self.0.lock().unwrap();
            seen.push((e.grpc_status, e.response_bytes, e.end.clone(), e.is_failure()));
        }
    }

    fn shared(recorder: Option<Arc<Recorder>>) -> (Arc<Shared>, Arc<Metrics>) {
        let metrics = Metrics::new();
        let shared = Shared {
            config: Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::serving(None))),
            metrics: metrics.clone(),
            limits: Default::default(),
            access_log: None,
            filters: recorder.map(|r| Arc::from([r as Arc<dyn Filter>])),
            connections: Default::default(),
            tls: Default::default(),
            resets: Arc::new(crate::http::resets::ResetLimiter::new(0)),
            identities: Default::default(),
            stats: None,
        };
        (Arc::new(shared), metrics)
    }

    fn ctx(metrics: &Arc<Metrics>, grpc: bool) -> RequestCtx {
        let mut ctx = RequestCtx::new("outbound", "127.0.0.1:1".parse().unwrap(), None);
        ctx.grpc = grpc;
        ctx.route = Some(Arc::new(metrics.route("outbound", "api", "r")));
        ctx
    }

    type Frames = Vec<Result<Frame<Bytes>, BodyError>>;

    fn response(frames: Frames) -> Response<Body> {
        Response::new(Body::Boxed(Box::pin(StreamBody::new(tokio_stream::iter(frames)))))
    }

    fn trailers(status: &'static str) -> Result<Frame<Bytes>, BodyError> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static(status));
        Ok(Frame::trailers(t))
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, BodyError> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    fn grpc_count(metrics: &Metrics, status: &str) -> u64 {
        let families = metrics.registry.gather();
        let family = families.iter().find(|f| f.name() == "smesh_grpc_responses_total");
        family.map_or(0, |f| {
            f.get_metric()
                .iter()
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "grpc_status" && l.value() == status)
                })
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        })
    }

    #[tokio::test]
    async fn a_grpc_failure_in_the_trailers_is_counted_by_its_status() {
        let recorder = Arc::new(Recorder::default());
        let (shared, metrics) = shared(Some(recorder.clone()));
        let resp = watch(
            ctx(&metrics, true),
            response(vec![data("msg"), trailers("14")]),
            &shared,
            None,
        );
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await;
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(seen, vec![(Some(14), 3, BodyEnd::Complete, true)]);
        assert_eq!((grpc_count(&metrics, "14"), grpc_count(&metrics, "0")), (1, 0));
    }

    #[tokio::test]
    async fn a_body_cut_off_mid_stream_completes_with_the_error() {
        let recorder = Arc::new(Recorder::default());
        let (shared, metrics) = shared(Some(recorder.clone()));
        let cut: Result<Frame<Bytes>, BodyError> = Err("upstream went away".into());
        let resp = watch(ctx(&metrics, false), response(vec![data("part"), cut]), &shared, None);
        assert!(resp.into_body().collect().await.is_err());
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(seen, vec![(None, 4, BodyEnd::Error("upstream went away".into()), true)]);
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_completes_as_dropped() {
        let recorder = Arc::new(Recorder::default());
        let (shared, metrics) = shared(Some(recorder.clone()));
        let mut body = watch(ctx(&metrics, true), response(vec![data("a"), data("b")]), &shared, None).into_body();
        let first = body.frame().await;
        assert!(first.is_some_and(|f| f.is_ok()));
        drop(body);
        let seen = recorder.0.lock().unwrap().clone();
        // A gRPC call without a status is a failure too.
        assert_eq!(seen, vec![(None, 1, BodyEnd::Dropped, true)]);
        assert_eq!(grpc_count(&metrics, "none"), 1);
    }

    #[test]
    fn only_grpc_calls_are_watched_without_consumers() {
        let (shared, metrics) = shared(None);
        assert!(!shared.want(&ctx(&metrics, false), &None));
        assert!(shared.want(&ctx(&metrics, true), &None));
        let (shared, metrics) = super::tests::shared(Some(Default::default()));
        assert!(shared.want(&ctx(&metrics, false), &None));
    }
}
