//! Which requests' spans are exported: the head decision (a share of traces, or the caller's
//! `sampled` flag) plus error-biased tail sampling, decided when the response has ended.

use crate::telemetry::event::RequestEvent;
use crate::telemetry::trace_context::TraceId;
use std::time::Duration;

/// The MeshConfig's `sampling` and `slowThreshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Share of new traces kept whatever their outcome, 0 to 1.
    pub ratio: f64,
    /// Requests slower than this are always kept.
    pub slow: Duration,
}

/// Why a request's spans are exported (a span attribute, so a user can tell them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The head decision (sampled trace).
    Head,
    /// A 5xx, a gRPC status other than OK, a proxy error, a body that failed.
    Error,
    /// Slower than the threshold.
    Slow,
}

impl Kept {
    pub fn as_str(self) -> &'static str {
        match self {
            Kept::Head => "head",
            Kept::Error => "error",
            Kept::Slow => "slow",
        }
    }
}

impl Sampling {
    /// The head decision for a trace this proxy starts: by the trace id (its last 8 bytes
    /// read as a share of 2^64, like OpenTelemetry's TraceIdRatioBased), so every proxy that
    /// sees the id alone decides alike.
    pub fn head(&self, trace_id: &TraceId) -> bool {
        if self.ratio >= 1.0 {
            return true;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(low) as f64) < self.ratio * (u64::MAX as f64)
    }

    /// Whether to export a finished request: failures and slow ones always, the rest by the
    /// head decision (`sampled`).
    pub fn keep(&self, sampled: bool, event: &RequestEvent) -> Option<Kept> {
        self.keep_outcome(sampled, event.is_failure() || event.ctx.error.is_some(), event.to_end)
    }

    fn keep_outcome(&self, sampled: bool, failed: bool, took: Duration) -> Option<Kept> {
        if failed {
            Some(Kept::Error)
        } else if took > self.slow {
            Some(Kept::Slow)
        } else if sampled {
            Some(Kept::Head)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(ratio: f64) -> Sampling {
        Sampling {
            ratio,
            slow: Duration::from_millis(500),
        }
    }

    fn id(low: u64) -> TraceId {
        let mut id = [7u8; 16];
        id[8..].copy_from_slice(&low.to_be_bytes());
        id
    }

    #[test]
    fn the_head_ratio_keeps_its_share_of_trace_ids() {
        assert!(!sampling(0.0).head(&id(0)));
        assert!(sampling(1.0).head(&id(u64::MAX)));
        let half = sampling(0.5);
        assert!(half.head(&id(u64::MAX / 4)) && !half.head(&id(u64::MAX / 4 * 3)));
        let kept = (0..10_000u64)
            .filter(|i| sampling(0.01).head(&id(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))))
            .count();
        assert!((50..=150).contains(&kept), "{kept} of 10000 at 1%");
    }

    #[test]
    fn errors_and_slow_requests_are_kept_whatever_the_head_said() {
        let s = sampling(0.0);
        let fast = Duration::from_millis(10);
        assert_eq!(s.keep_outcome(false, false, fast), None);
        assert_eq!(s.keep_outcome(true, false, fast), Some(Kept::Head));
        assert_eq!(s.keep_outcome(false, true, fast), Some(Kept::Error));
        assert_eq!(s.keep_outcome(true, true, fast), Some(Kept::Error));
        assert_eq!(
            s.keep_outcome(false, false, Duration::from_millis(501)),
            Some(Kept::Slow)
        );
        assert_eq!(s.keep_outcome(false, false, Duration::from_millis(500)), None);
    }
}
