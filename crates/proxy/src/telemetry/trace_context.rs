//! A request's place in a distributed trace (W3C Trace Context): the ids it continues or
//! starts, and one client span per try. Filled only when tracing is on (`crate::trace`);
//! the tries record their ends here because only the dispatch loop sees them.

use http::HeaderValue;
use std::net::SocketAddr;
use std::time::Instant;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// The trace this request belongs to, and the spans this hop adds to it.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// This hop's server span.
    pub span_id: SpanId,
    /// The caller's span, when the request continued a trace.
    pub parent: Option<SpanId>,
    /// The head sampling decision (the caller's `sampled` flag, or the ratio's).
    pub sampled: bool,
    /// The caller's `tracestate`, passed on unchanged.
    pub state: Option<HeaderValue>,
    /// One client span per try, in order.
    pub tries: Vec<TrySpan>,
    /// A route's FaultInjection aborted the request.
    pub fault_aborted: bool,
}

/// One try sent upstream.
#[derive(Debug, Clone)]
pub struct TrySpan {
    pub span_id: SpanId,
    pub start: Instant,
    pub end: Option<Instant>,
    pub endpoint: Option<SocketAddr>,
    pub outcome: TryOutcome,
}

/// How a try ended, as the dispatch loop saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// Still waiting (the request ended first: a deadline, a dropped client).
    Pending,
    /// A response head with this status.
    Answered(u16),
    /// No response: why, as an `error.type` (`connect_failed`, `upstream_failed`, ...).
    Failed(&'static str),
    /// The per-try timeout passed.
    TimedOut,
}

impl TraceContext {
    /// Continues the caller's trace (a valid `traceparent`), else starts a new one whose
    /// head decision is `sample(trace_id)`.
    pub fn continue_or_start(
        traceparent: Option<&HeaderValue>,
        tracestate: Option<&HeaderValue>,
        sample: impl FnOnce(&TraceId) -> bool,
    ) -> Self {
        match traceparent.and_then(|v| parse_traceparent(v.as_bytes())) {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id,
                span_id: new_span_id(),
                parent: Some(parent.span_id),
                sampled: parent.sampled,
                // Per the spec, only read alongside a valid traceparent.
                state: tracestate.cloned(),
                tries: Vec::new(),
                fault_aborted: false,
            },
            None => {
                let trace_id = new_trace_id();
                TraceContext {
                    sampled: sample(&trace_id),
                    trace_id,
                    span_id: new_span_id(),
                    parent: None,
                    state: None,
                    tries: Vec::new(),
                    fault_aborted: false,
                }
            }
        }
    }

    /// A try starts: its span, and the `traceparent` that names it the upstream's parent.
    pub fn start_try(&mut self, endpoint: Option<SocketAddr>) -> HeaderValue {
        let span_id = new_span_id();
        self.tries.push(TrySpan {
            span_id,
            start: Instant::now(),
            end: None,
            endpoint,
            outcome: TryOutcome::Pending,
        });
        let text = traceparent(&self.trace_id, &span_id, self.sampled);
        HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
    }

    /// The last try ended.
    pub fn end_try(&mut self, outcome: TryOutcome) {
        if let Some(last) = self.tries.last_mut().filter(|t| t.end.is_none()) {
            last.end = Some(Instant::now());
            last.outcome = outcome;
        }
    }
}

/// What a valid `traceparent` says.
#[derive(Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Parses `version-traceid-parentid-flags` (W3C Trace Context, level 1). `None` when invalid:
/// wrong length or separators, upper-case or non-hex digits, version `ff`, all-zero ids, or
/// version 00 with anything after the flags. Later versions may append fields after a `-`.
pub fn parse_traceparent(text: &[u8]) -> Option<TraceParent> {
    if text.len() < 55 || text[2] != b'-' || text[35] != b'-' || text[52] != b'-' {
        return None;
    }
    let version = hex_byte(&text[0..2])?;
    if version == 0xff || (version == 0 && text.len() != 55) || (text.len() > 55 && text[55] != b'-') {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    for (i, byte) in trace_id.iter_mut().enumerate() {
        *byte = hex_byte(&text[3 + 2 * i..5 + 2 * i])?;
    }
    for (i, byte) in span_id.iter_mut().enumerate() {
        *byte = hex_byte(&text[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&text[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// `00-<trace id>-<span id>-<01 or 00>`, on the stack (one per try).
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> [u8; 55] {
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&mut text[3..35], trace_id);
    write_hex(&mut text[36..52], span_id);
    if sampled {
        text[54] = b'1';
    }
    text
}

/// Lower-case hex, as the spec requires.
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

/// A random id, never all zeros (the spec's "invalid").
fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

pub fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_a_traceparent() {
        let parsed = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(parsed.trace_id[..2], [0x4b, 0xf9]);
        assert_eq!(parsed.span_id[7], 0xb7);
        assert!(parsed.sampled);
        assert_eq!(&traceparent(&parsed.trace_id, &parsed.span_id, true), VALID.as_bytes());
        let unsampled = traceparent(&parsed.trace_id, &parsed.span_id, false);
        assert_eq!(&unsampled[..], VALID.replace("-01", "-00").as_bytes());
        let unsampled = VALID.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Other flag bits do not matter for sampling.
        assert!(
            parse_traceparent(VALID.replace("-01", "-03").as_bytes())
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn rejects_invalid_traceparents() {
        let invalid = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ];
        for text in invalid {
            assert_eq!(parse_traceparent(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn a_later_version_may_append_fields() {
        let v1 = VALID.replacen("00", "01", 1);
        assert!(parse_traceparent(format!("{v1}-more").as_bytes()).is_some());
        assert!(parse_traceparent(format!("{v1}more").as_bytes()).is_none());
    }

    #[test]
    fn continues_a_valid_trace_and_starts_one_otherwise() {
        let parent = HeaderValue::from_static(VALID);
        let state = HeaderValue::from_static("vendor=x");
        let mut ctx = TraceContext::continue_or_start(Some(&parent), Some(&state), |_| false);
        let parsed = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(
            (ctx.trace_id, ctx.parent, ctx.sampled),
            (parsed.trace_id, Some(parsed.span_id), true)
        );
        assert_eq!(ctx.state, Some(state.clone()));
        // Each try names its own span as the upstream's parent.
        let first = ctx.start_try(None);
        ctx.end_try(TryOutcome::Answered(503));
        let second = ctx.start_try(None);
        let (a, b) = (first.to_str().unwrap(), second.to_str().unwrap());
        assert!(a.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && a.ends_with("-01"));
        assert_ne!(a, b);
        assert_ne!(parse_traceparent(a.as_bytes()).unwrap().span_id, ctx.span_id);
        assert_eq!(ctx.tries[0].outcome, TryOutcome::Answered(503));

        let broken = HeaderValue::from_static("00-xyz");
        let fresh = TraceContext::continue_or_start(Some(&broken), Some(&state), |_| true);
        assert_ne!(fresh.trace_id, parsed.trace_id);
        assert_eq!((fresh.parent, fresh.sampled, fresh.state), (None, true, None));
    }
}
