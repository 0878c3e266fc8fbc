//! Distributed tracing, on when the MeshConfig has `tracing`: a [`crate::filter::Filter`]
//! that continues or starts each request's W3C trace, names each try's span as the
//! upstream's parent in `traceparent`, and once the response has ended decides whether to
//! export the request's spans ([`sample`]: the head ratio, plus every error, timeout, shed
//! and slow request) over OTLP/gRPC ([`export`]). The configuration snapshot installs it
//! (`crate::config::snapshot`); without `tracing` no request meets it.

pub mod export;
pub mod sample;
pub mod spans;

use crate::filter::{Filter, ReceivedHead};
use crate::http::body::Body;
use crate::route::fault::FAULT_HEADER;
use crate::telemetry::event::{RequestCtx, RequestEvent, RequestHead};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace_context::TraceContext;
use export::Exporter;
use http::header::{HeaderName, HOST};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use prometheus::IntCounter;
use sample::Sampling;
use smesh_model::TracingSpec;
use spans::Finished;
use std::sync::Arc;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// One proxy's tracing: its settings and its export queue.
pub struct Tracer {
    /// What it was started with, so a reload that changes nothing keeps it.
    spec: TracingSpec,
    service: String,
    sampling: Sampling,
    exporter: Exporter,
    /// `smesh_trace_requests_total` by [outbound, inbound] x [continued, started].
    requests: [[IntCounter; 2]; 2],
}

impl Tracer {
    /// Starts the export to `spec.collector`; `service` names this proxy's spans.
    pub fn start(spec: &TracingSpec, service: &str, metrics: Arc<Metrics>) -> Result<Tracer, String> {
        Ok(Tracer {
            spec: spec.clone(),
            service: service.to_string(),
            sampling: Sampling {
                ratio: spec.sampling(),
                slow: spec.slow_threshold(),
            },
            requests: ["outbound", "inbound"].map(|direction| {
                ["continued", "started"].map(|trace| metrics.trace_requests.with_label_values(&[direction, trace]))
            }),
            exporter: Exporter::start(&spec.collector, service, metrics)?,
        })
    }

    /// Whether this tracer is what `spec` and `service` ask for.
    pub fn is(&self, spec: &TracingSpec, service: &str) -> bool {
        self.spec == *spec && self.service == service
    }

    /// Continues or starts the request's trace (before routing: a request the proxy refuses
    /// still continues its caller's trace).
    fn start_request(&self, ctx: &mut RequestCtx, method: &Method, uri: &Uri, version: Version, headers: &HeaderMap) {
        let (parent, state) = (headers.get(TRACEPARENT), headers.get(TRACESTATE));
        let trace = TraceContext::continue_or_start(parent, state, |id| self.sampling.head(id));
        ctx.trace = Some(Box::new(trace));
        // The spans name the request line (kept already when the access log is on).
        if ctx.head.is_none() {
            let authority = uri.authority().map(|a| a.as_str());
            let authority = authority.or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()));
            ctx.head = Some(Box::new(RequestHead {
                method: method.clone(),
                uri: uri.clone(),
                version,
                authority: authority.map(Box::from),
            }));
        }
    }

    /// What to export of a finished request, if it is kept.
    fn keep(&self, event: &RequestEvent) -> Option<Finished> {
        // The handler starts every request's trace once it has read the snapshot; one
        // finished without (a library caller that skipped `request_received`) gets a new one.
        let fresh;
        let trace = match event.ctx.trace.as_deref() {
            Some(trace) => trace,
            None => {
                fresh = TraceContext::continue_or_start(None, None, |id| self.sampling.head(id));
                &fresh
            }
        };
        let kept = self.sampling.keep(trace.sampled, event)?;
        Some(Finished::new(event, trace.clone(), kept))
    }
}

impl Filter for Tracer {
    fn request_received(&self, ctx: &mut RequestCtx, head: &ReceivedHead<'_>) {
        self.start_request(ctx, head.method, head.uri, head.version, head.headers);
    }

    fn upstream_request(&self, ctx: &mut RequestCtx, req: &mut Request<Body>) {
        let endpoint = ctx.endpoint;
        let Some(trace) = &mut ctx.trace else { return };
        let traceparent = trace.start_try(endpoint);
        let headers = req.headers_mut();
        headers.insert(TRACEPARENT, traceparent);
        match &trace.state {
            Some(state) => headers.insert(TRACESTATE, state.clone()),
            // A tracestate without a valid traceparent means nothing (W3C): not passed on.
            None => headers.remove(TRACESTATE),
        };
    }

    fn response_head(&self, ctx: &mut RequestCtx, resp: &mut Response<Body>) {
        if let Some(trace) = &mut ctx.trace {
            trace.fault_aborted = resp.headers().contains_key(FAULT_HEADER);
        }
    }

    fn request_done(&self, event: &RequestEvent) {
        if let Some(trace) = &event.ctx.trace {
            let direction = usize::from(event.ctx.direction == "inbound");
            self.requests[direction][usize::from(trace.parent.is_none())].inc();
        }
        if let Some(finished) = self.keep(event) {
            self.exporter.send(finished);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::event::BodyEnd;
    use crate::telemetry::trace_context::{parse_traceparent, TryOutcome};
    use crate::trace::sample::Kept;
    use http::HeaderValue;
    use std::time::Duration;

    fn tracer(sampling: f64) -> Tracer {
        let spec = TracingSpec {
            // Nothing listens there: the export is lazy and these tests never reach it.
            collector: "127.0.0.1:9".into(),
            sampling: Some(sampling),
            slow_threshold: Some(Duration::from_millis(500)),
        };
        Tracer::start(&spec, "web", Metrics::new()).unwrap()
    }

    fn event(ctx: RequestCtx, status: u16, grpc_status: Option<u16>) -> RequestEvent {
        RequestEvent {
            ctx,
            status,
            grpc_status,
            response_bytes: 0,
            to_head: Duration::from_millis(3),
            to_end: Duration::from_millis(4),
            end: BodyEnd::Complete,
        }
    }

    /// A request through the filter's phases: its head (with `traceparent`), one try.
    fn traced(tracer: &Tracer, traceparent: Option<&'static str>) -> (RequestCtx, Request<Body>) {
        let mut ctx = RequestCtx::new("outbound", "127.0.0.1:1".parse().unwrap(), None);
        let mut head = Request::get("http://api/x").body(()).unwrap().into_parts().0;
        if let Some(value) = traceparent {
            head.headers.insert(TRACEPARENT, HeaderValue::from_static(value));
        }
        head.headers.insert(TRACESTATE, HeaderValue::from_static("k=v"));
        tracer.start_request(&mut ctx, &head.method, &head.uri, head.version, &head.headers);
        let mut upstream = Request::new(Body::Empty);
        tracer.upstream_request(&mut ctx, &mut upstream);
        ctx.try_ended(|| TryOutcome::Answered(200));
        (ctx, upstream)
    }

    #[test]
    fn each_try_carries_the_trace_on_with_its_own_span_as_parent() {
        let t = tracer(0.0);
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (ctx, upstream) = traced(&t, Some(caller));
        let sent = parse_traceparent(upstream.headers()[TRACEPARENT].as_bytes()).unwrap();
        let trace = ctx.trace.as_deref().unwrap();
        assert_eq!(sent.trace_id, parse_traceparent(caller.as_bytes()).unwrap().trace_id);
        assert_eq!(sent.span_id, trace.tries[0].span_id);
        assert!(sent.sampled);
        assert_eq!(upstream.headers()[TRACESTATE], "k=v");
        assert_eq!(ctx.head.as_ref().map(|h| h.uri.path()), Some("/x"));

        // Without a valid caller: a new, unsampled trace (ratio 0), and no tracestate.
        let (ctx, upstream) = traced(&t, Some("00-garbage"));
        let sent = parse_traceparent(upstream.headers()[TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent.trace_id, ctx.trace.as_deref().unwrap().trace_id);
        assert!(!sent.sampled);
        assert!(upstream.headers().get(TRACESTATE).is_none());
    }

    #[test]
    fn keeps_sampled_traces_and_every_failure() {
        let t = tracer(0.0);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let kept = |status, grpc: Option<u16>, traceparent| {
            let (mut ctx, _) = traced(&t, traceparent);
            ctx.grpc = grpc.is_some();
            t.keep(&event(ctx, status, grpc)).map(|f| (f.kept, f.span_count()))
        };
        assert_eq!(kept(200, None, Some(unsampled)), None);
        assert_eq!(kept(200, None, None), None);
        assert_eq!(kept(503, None, Some(unsampled)), Some((Kept::Error, 2)));
        assert_eq!(kept(200, Some(14), Some(unsampled)), Some((Kept::Error, 2)));
        assert_eq!(kept(200, Some(0), Some(unsampled)), None);
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(kept(200, None, Some(sampled)), Some((Kept::Head, 2)));
        // Answered by the proxy before the filters saw it: a new trace, kept as an error.
        let mut ctx = RequestCtx::new("outbound", "127.0.0.1:1".parse().unwrap(), None);
        ctx.error = Some("bad request");
        assert_eq!(
            t.keep(&event(ctx, 404, None)).map(|f| (f.kept, f.span_count())),
            Some((Kept::Error, 1))
        );
    }
}
