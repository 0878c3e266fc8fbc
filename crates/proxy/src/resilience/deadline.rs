//! Deadline propagation: the request's deadline (the smaller of the route's
//! `timeouts.request` and the client's `grpc-timeout`, counted from when the proxy received
//! the request) is sent to a gRPC upstream as `grpc-timeout`, less the time already spent in
//! the proxy, on every try.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, Instant};

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The gRPC wire form: at most 8 digits and a unit, as precise as fits (rounded up, so the
/// upstream never gets a deadline that has already passed).
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ns = d.as_nanos().max(1);
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (per, unit) in units {
        let n = ns.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Sets `grpc-timeout` to what is left until `deadline`.
pub fn propagate(headers: &mut HeaderMap, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    headers.insert(GRPC_TIMEOUT.clone(), encode_grpc_timeout(left));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::headers::grpc_timeout;

    #[test]
    fn encodes_and_round_trips() {
        let v = |d| encode_grpc_timeout(d).to_str().unwrap().to_string();
        assert_eq!(v(Duration::from_millis(250)), "250000u");
        assert_eq!(v(Duration::from_nanos(1500)), "1500n");
        assert_eq!(v(Duration::from_secs(3600)), "3600000m");
        assert_eq!(v(Duration::ZERO), "1n");
        assert_eq!(v(Duration::from_secs(1_000_000_000)), "16666667M");
        for d in [
            Duration::from_millis(1234),
            Duration::from_micros(17),
            Duration::from_secs(86_400),
        ] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", encode_grpc_timeout(d));
            let back = grpc_timeout(&h).unwrap();
            assert!(back >= d && back - d < Duration::from_millis(1), "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn propagates_what_is_left() {
        let mut h = HeaderMap::new();
        propagate(&mut h, Instant::now() + Duration::from_millis(800));
        let sent = grpc_timeout(&h).unwrap();
        assert!(
            sent <= Duration::from_millis(800) && sent > Duration::from_millis(700),
            "{sent:?}"
        );
    }
}
