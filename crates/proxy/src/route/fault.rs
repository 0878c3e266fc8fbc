//! The `FaultInjection` filter: delay a share of requests, answer a share with an error
//! without contacting the upstream.

use crate::http::body::Body;
use http::{HeaderValue, Response, StatusCode};
use prometheus::IntCounter;
use std::time::Duration;

/// Set on responses made by an injected abort, so they are told apart from real failures.
pub const FAULT_HEADER: &str = "smesh-fault-injected";

pub struct Fault {
    delay: Option<(Duration, f64)>,
    abort: Option<Abort>,
    delays: IntCounter,
    aborts: IntCounter,
}

struct Abort {
    http: StatusCode,
    grpc: u32,
    fraction: f64,
}

/// A share in 0..=1 from a percentage (default 100).
pub fn fraction(percent: Option<f64>) -> f64 {
    percent.unwrap_or(100.0).clamp(0.0, 100.0) / 100.0
}

/// True for a `fraction` share of calls.
pub fn chance(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && rand::random::<f64>() < fraction)
}

impl Fault {
    pub fn compile(f: &smesh_model::FaultInjection, delays: IntCounter, aborts: IntCounter) -> Self {
        Fault {
            delay: f.delay.as_ref().map(|d| (d.fixed_delay, fraction(d.percent))),
            abort: f.abort.as_ref().map(|a| {
                let http = a
                    .http_status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                Abort {
                    http,
                    grpc: a
                        .grpc_status
                        .unwrap_or_else(|| smesh_model::GrpcCode::from_http_status(http.as_u16()).code()),
                    fraction: fraction(a.percent),
                }
            }),
            delays,
            aborts,
        }
    }

    /// Sleeps if this request is picked for a delay; returns the abort response if it is
    /// picked for one. Delay and abort are drawn independently.
    pub async fn apply(&self, grpc: bool) -> Option<Response<Body>> {
        if let Some((delay, fraction)) = self.delay {
            if chance(fraction) {
                self.delays.inc();
                tokio::time::sleep(delay).await;
            }
        }
        let abort = self.abort.as_ref().filter(|a| chance(a.fraction))?;
        self.aborts.inc();
        let mut resp = Response::new(Body::Empty);
        if grpc {
            let h = resp.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(abort.grpc));
            h.insert("grpc-message", HeaderValue::from_static("fault injected"));
        } else {
            *resp.status_mut() = abort.http;
            *resp.body_mut() = Body::full("fault injected\n");
            resp.headers_mut()
                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        resp.headers_mut()
            .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
        Some(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_is_about_right() {
        assert!(chance(1.0));
        assert!(!chance(0.0));
        let hits = (0..20_000).filter(|_| chance(0.2)).count();
        assert!((3_400..4_600).contains(&hits), "{hits}");
        assert_eq!(fraction(None), 1.0);
        assert_eq!(fraction(Some(20.0)), 0.2);
    }
}
