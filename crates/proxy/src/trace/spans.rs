//! A kept request, copied off the request path ([`Finished`]), and its OTLP spans: the
//! server span (the request as this hop received it) and a client span per try, with
//! OpenTelemetry's HTTP and gRPC semantic conventions and the mesh's decisions as events.

use crate::telemetry::event::{BodyEnd, RequestEvent};
use crate::telemetry::trace_context::{TraceContext, TryOutcome, TrySpan};
use crate::trace::sample::Kept;
use http::{Method, Uri};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span, Status};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the spans of one kept request need: copied (cheap clones) from its event.
pub struct Finished {
    pub trace: TraceContext,
    /// The request's start, by the wall clock and by the monotonic one.
    pub wall_start: SystemTime,
    pub start: Instant,
    pub direction: &'static str,
    pub method: Option<Method>,
    pub uri: Option<Uri>,
    pub authority: Option<Box<str>>,
    pub client: SocketAddr,
    pub peer_identity: Option<Arc<str>>,
    pub route: Option<Box<str>>,
    pub destination: Option<Arc<str>>,
    pub status: u16,
    pub grpc: bool,
    pub grpc_status: Option<u16>,
    pub error: Option<&'static str>,
    pub body_error: bool,
    pub to_head: Duration,
    pub to_end: Duration,
    pub kept: Kept,
}

impl Finished {
    pub fn new(event: &RequestEvent, trace: TraceContext, kept: Kept) -> Self {
        let ctx = &event.ctx;
        let head = ctx.head.as_deref();
        Finished {
            trace,
            wall_start: SystemTime::now() - ctx.start.elapsed(),
            start: ctx.start,
            direction: ctx.direction,
            method: head.map(|h| h.method.clone()),
            uri: head.map(|h| h.uri.clone()),
            authority: head.and_then(|h| h.authority.clone()),
            client: ctx.client,
            peer_identity: ctx.peer.clone(),
            route: ctx.route.as_ref().map(|r| Box::from(r.route_name())),
            destination: ctx.destination.clone(),
            status: event.status,
            grpc: ctx.grpc,
            grpc_status: event.grpc_status,
            error: ctx.error,
            body_error: matches!(event.end, BodyEnd::Error(_)),
            to_head: event.to_head,
            to_end: event.to_end,
            kept,
        }
    }

    /// How many spans [`Finished::spans`] makes.
    pub fn span_count(&self) -> usize {
        1 + self.trace.tries.len()
    }

    /// The server span, then one client span per try.
    pub fn spans(&self) -> Vec<Span> {
        let mut spans = Vec::with_capacity(self.span_count());
        spans.push(self.server_span());
        let last = self.trace.tries.len().saturating_sub(1);
        for (i, try_span) in self.trace.tries.iter().enumerate() {
            spans.push(self.client_span(i, try_span, i == last));
        }
        spans
    }

    fn nanos(&self, at: Instant) -> u64 {
        let wall = self.wall_start + at.saturating_duration_since(self.start);
        wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }

    fn name(&self) -> String {
        self.method.as_ref().map_or("HTTP", |m| m.as_str()).to_string()
    }

    /// Attributes both kinds of span carry: the request line.
    fn request_attributes(&self) -> Vec<KeyValue> {
        let mut attrs = Vec::with_capacity(12);
        if let Some(method) = &self.method {
            attrs.push(text("http.request.method", method.as_str()));
        }
        if let Some(uri) = &self.uri {
            attrs.push(text("url.path", uri.path()));
        }
        let authority = self.authority.as_deref().or(self.uri.as_ref().and_then(|u| u.host()));
        if let Some(authority) = authority {
            let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
            attrs.push(text("server.address", host));
        }
        if self.grpc {
            attrs.push(text("rpc.system", "grpc"));
        }
        attrs
    }

    fn server_span(&self) -> Span {
        let mut attrs = self.request_attributes();
        attrs.push(int("http.response.status_code", self.status.into()));
        if let Some(code) = self.grpc_status {
            attrs.push(int("rpc.grpc.status_code", code.into()));
        }
        attrs.push(text("network.peer.address", &self.client.ip().to_string()));
        attrs.push(int("network.peer.port", self.client.port().into()));
        attrs.push(text("smesh.direction", self.direction));
        attrs.push(text("smesh.sampled_by", self.kept.as_str()));
        if let Some(route) = &self.route {
            attrs.push(text("smesh.route", route));
        }
        if let Some(destination) = &self.destination {
            attrs.push(text("smesh.destination", destination));
        }
        if let Some(identity) = &self.peer_identity {
            attrs.push(text("smesh.peer.identity", identity));
        }
        let error = self.error_type();
        if let Some(error) = &error {
            attrs.push(text("error.type", error));
        }
        let end = self.nanos(self.start + self.to_end);
        Span {
            trace_id: self.trace.trace_id.to_vec(),
            span_id: self.trace.span_id.to_vec(),
            parent_span_id: self.trace.parent.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: self.trace_state(),
            flags: self.flags(self.trace.parent.is_some()),
            name: self.name(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: self.nanos(self.start),
            end_time_unix_nano: end,
            attributes: attrs,
            events: self.decisions(),
            status: Some(status(error.as_deref())),
            ..Default::default()
        }
    }

    /// The mesh's decisions: each retry, and the proxy's own answer (timeout, shed, ...).
    fn decisions(&self) -> Vec<Event> {
        let mut events = Vec::new();
        for (i, pair) in self.trace.tries.windows(2).enumerate() {
            events.push(Event {
                time_unix_nano: self.nanos(pair[1].start),
                name: "retry".into(),
                attributes: vec![
                    int("http.request.resend_count", i as i64 + 1),
                    text("smesh.previous_outcome", &outcome_text(pair[0].outcome)),
                ],
                ..Default::default()
            });
        }
        if self.trace.fault_aborted {
            events.push(Event {
                time_unix_nano: self.nanos(self.start + self.to_head),
                name: "fault".into(),
                attributes: vec![text("smesh.fault", "abort")],
                ..Default::default()
            });
        }
        if let Some(reason) = self.error {
            events.push(Event {
                time_unix_nano: self.nanos(self.start + self.to_head),
                name: decision_name(reason).into(),
                attributes: vec![text("smesh.proxy_error", reason)],
                ..Default::default()
            });
        }
        events
    }

    fn client_span(&self, index: usize, try_span: &TrySpan, last: bool) -> Span {
        let mut attrs = self.request_attributes();
        if let Some(endpoint) = try_span.endpoint {
            attrs.push(text("network.peer.address", &endpoint.ip().to_string()));
            attrs.push(int("network.peer.port", endpoint.port().into()));
        }
        if index > 0 {
            attrs.push(int("http.request.resend_count", index as i64));
        }
        let mut events = Vec::new();
        let error = match try_span.outcome {
            TryOutcome::Answered(status) => {
                attrs.push(int("http.response.status_code", status.into()));
                let grpc_status = self.grpc_status.filter(|_| last);
                if let Some(code) = grpc_status {
                    attrs.push(int("rpc.grpc.status_code", code.into()));
                }
                match grpc_status {
                    Some(code) if code != 0 => Some(code.to_string()),
                    _ if status >= 500 => Some(status.to_string()),
                    _ => None,
                }
            }
            TryOutcome::Failed(why) => Some(why.to_string()),
            TryOutcome::TimedOut => {
                events.push(Event {
                    time_unix_nano: try_span.end.map_or(0, |at| self.nanos(at)),
                    name: "timeout".into(),
                    attributes: vec![text("smesh.timeout", "per_try")],
                    ..Default::default()
                });
                Some("timeout".to_string())
            }
            // The request ended first (its deadline, or the client left).
            TryOutcome::Pending => Some(self.error.unwrap_or("cancelled").to_string()),
        };
        if let Some(error) = &error {
            attrs.push(text("error.type", error));
        }
        // The last answered try lasts as long as its response body does.
        let end = match (last, try_span.outcome, try_span.end) {
            (true, TryOutcome::Answered(_), _) | (_, _, None) => self.start + self.to_end,
            (_, _, Some(end)) => end,
        };
        Span {
            trace_id: self.trace.trace_id.to_vec(),
            span_id: try_span.span_id.to_vec(),
            parent_span_id: self.trace.span_id.to_vec(),
            trace_state: self.trace_state(),
            flags: self.flags(false),
            name: self.name(),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: self.nanos(try_span.start),
            end_time_unix_nano: self.nanos(end),
            attributes: attrs,
            events,
            status: Some(status(error.as_deref())),
            ..Default::default()
        }
    }

    /// The server span's `error.type`: the proxy's reason, else a failing status.
    fn error_type(&self) -> Option<String> {
        if let Some(reason) = self.error {
            return Some(reason.replace(' ', "_"));
        }
        match self.grpc_status {
            Some(code) if code != 0 => return Some(code.to_string()),
            None if self.grpc => return Some("no_grpc_status".into()),
            _ => {}
        }
        if self.status >= 500 {
            Some(self.status.to_string())
        } else if self.body_error {
            Some("response_body_failed".into())
        } else {
            None
        }
    }

    fn trace_state(&self) -> String {
        let state = self.trace.state.as_ref().and_then(|s| s.to_str().ok());
        state.unwrap_or_default().to_string()
    }

    /// The W3C trace flags (the sampled bit), and whether the parent is remote: OTLP's
    /// HAS_IS_REMOTE (0x100) and IS_REMOTE (0x200) bits.
    fn flags(&self, remote_parent: bool) -> u32 {
        let sampled = u32::from(self.trace.sampled);
        if remote_parent {
            sampled | 0x300
        } else {
            sampled | 0x100
        }
    }
}

/// The span event a proxy error reason reads as.
fn decision_name(reason: &str) -> &'static str {
    match reason {
        "timeout" => "timeout",
        "load shed" => "shed",
        "circuit open" => "breaker_open",
        "rate limited" => "rate_limited",
        "forbidden" => "denied",
        _ => "proxy_error",
    }
}

fn outcome_text(outcome: TryOutcome) -> String {
    match outcome {
        TryOutcome::Answered(status) => status.to_string(),
        TryOutcome::Failed(why) => why.to_string(),
        TryOutcome::TimedOut => "timeout".into(),
        TryOutcome::Pending => "pending".into(),
    }
}

fn status(error: Option<&str>) -> Status {
    match error {
        Some(error) => Status {
            message: error.to_string(),
            code: StatusCode::Error as i32,
        },
        None => Status::default(),
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
    }
}
