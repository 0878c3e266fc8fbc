//! Responses the proxy makes itself. Each names its reason in `smesh-proxy-error`; gRPC
//! clients get the matching `grpc-status` in a trailers-only response.

use crate::http::body::{Body, BodyError};
use http::{HeaderValue, Response, StatusCode};
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const PROXY_ERROR_HEADER: &str = "smesh-proxy-error";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    UnknownAuthority,
    NoRoute,
    NoEndpoints,
    ConnectFailed,
    UpstreamFailed,
    Timeout,
    BadRequest,
    BodyTooLarge,
    /// An AuthorizationPolicy (or the default policy) denied the request.
    Forbidden,
    /// A BackendPolicy circuit breaker limit was reached.
    CircuitOpen,
    /// A RateLimit filter's bucket was empty (429 with `retry-after`).
    RateLimited,
    /// The upstream's adaptive concurrency limit had no room for the request's priority.
    LoadShed,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UnknownAuthority | ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints | ProxyError::CircuitOpen | ProxyError::LoadShed => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectFailed | ProxyError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Short machine-readable reason, used in the header and as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::UnknownAuthority => "unknown authority",
            ProxyError::NoRoute => "no route",
            ProxyError::NoEndpoints => "no endpoints",
            ProxyError::ConnectFailed => "connect failed",
            ProxyError::UpstreamFailed => "upstream failed",
            ProxyError::Timeout => "timeout",
            ProxyError::BadRequest => "bad request",
            ProxyError::BodyTooLarge => "request body too large",
            ProxyError::Forbidden => "forbidden",
            ProxyError::CircuitOpen => "circuit open",
            ProxyError::RateLimited => "rate limited",
            ProxyError::LoadShed => "load shed",
        }
    }

    /// Where the cause says more than the HTTP status, it decides, as gRPC itself answers
    /// these: DEADLINE_EXCEEDED for a deadline, RESOURCE_EXHAUSTED for a quota or a size
    /// limit; and UNAVAILABLE for an authority or route this proxy does not know (a 404 reads
    /// as UNIMPLEMENTED, a method the server lacks, but the server was never asked; the e2e
    /// tests pin this). The rest read their HTTP status as gRPC clients do.
    fn grpc_status(self) -> &'static str {
        use smesh_model::GrpcCode;
        let code = match self {
            ProxyError::Timeout => GrpcCode::DeadlineExceeded,
            ProxyError::BodyTooLarge | ProxyError::RateLimited => GrpcCode::ResourceExhausted,
            ProxyError::UnknownAuthority | ProxyError::NoRoute => GrpcCode::Unavailable,
            _ => GrpcCode::from_http_status(self.status().as_u16()),
        };
        code.number()
    }

    pub fn response(self, detail: &str, grpc: bool) -> Response<Body> {
        let reason = HeaderValue::from_static(self.reason());
        let message = if detail.is_empty() {
            self.reason().to_string()
        } else {
            format!("{}: {detail}", self.reason())
        };
        let mut resp = if grpc {
            let mut r = Response::new(Body::Empty);
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&message) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Body::full(format!("{message}\n")));
            *r.status_mut() = self.status();
            r.headers_mut()
                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        };
        resp.headers_mut().insert(PROXY_ERROR_HEADER, reason);
        resp
    }
}

/// Why the proxy answers a request itself: the reason, and what caused it, typed. Stages
/// pass causes, not strings; the words are written once, when the answer is (`Display`).
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    pub cause: Cause,
}

#[derive(Debug)]
pub enum Cause {
    /// The reason says it all.
    None,
    /// A stage's own words (a head check, an authorization decision, a policy's limit).
    Said(Cow<'static, str>),
    /// The request's whole deadline passed.
    RequestTimeout(Duration),
    /// The Service (or the subset a route picked) has no endpoints at all.
    NoEndpoints(Arc<str>),
    /// The label subset a route picked (`api{version=v3}`) matches no endpoint of the Service.
    NoneInSubset(Arc<str>, Arc<str>),
    /// Every endpoint of the Service that was tried failed to connect.
    NoReachableEndpoint(Arc<str>),
    Connect(SocketAddr, BodyError),
    /// The exchange with this endpoint failed after the request may have reached it.
    Upstream(SocketAddr, BodyError),
    /// The per-try timeout passed on this endpoint.
    NoAnswerInTime(SocketAddr),
    /// A streamed body could not be sent a second time.
    BodyAlreadySent,
    /// The client's own request body failed (cut off, malformed framing).
    ClientBody(BodyError),
}

impl Failure {
    pub fn new(error: ProxyError, cause: Cause) -> Self {
        Failure { error, cause }
    }

    pub fn said(error: ProxyError, words: impl Into<Cow<'static, str>>) -> Self {
        Failure::new(error, Cause::Said(words.into()))
    }

    /// The answer to the client (see [`ProxyError::response`]).
    pub fn response(&self, grpc: bool) -> Response<Body> {
        match &self.cause {
            Cause::None => self.error.response("", grpc),
            cause => self.error.response(&cause.to_string(), grpc),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::None => f.write_str(self.error.reason()),
            cause => write!(f, "{}: {cause}", self.error.reason()),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::None => Ok(()),
            Cause::Said(words) => f.write_str(words),
            Cause::RequestTimeout(d) => write!(f, "request timeout {}", humantime::format_duration(*d)),
            Cause::NoEndpoints(service) => write!(f, "service {service:?} has no endpoints"),
            Cause::NoneInSubset(service, subset) => {
                write!(f, "none in {subset} (no endpoint of {service:?} has these labels)")
            }
            Cause::NoReachableEndpoint(service) => write!(f, "no reachable endpoint of {service:?}"),
            Cause::Connect(endpoint, e) | Cause::Upstream(endpoint, e) => write!(f, "{endpoint}: {e}"),
            Cause::NoAnswerInTime(endpoint) => write!(f, "no response from {endpoint} in time"),
            Cause::BodyAlreadySent => f.write_str("request body already sent"),
            Cause::ClientBody(e) => write!(f, "reading request body: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shed_is_a_503_or_unavailable() {
        let r = ProxyError::LoadShed.response("sheddable", false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[PROXY_ERROR_HEADER], "load shed");
        let g = ProxyError::LoadShed.response("sheddable", true);
        assert_eq!(g.status(), StatusCode::OK);
        assert_eq!(g.headers()["grpc-status"], "14");
        assert_eq!(g.headers()["grpc-message"], "load shed: sheddable");
    }

    #[test]
    fn a_failure_is_worded_when_answered() {
        let endpoint: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let f = Failure::new(ProxyError::ConnectFailed, Cause::Connect(endpoint, refused.into()));
        assert_eq!(f.to_string(), "connect failed: 127.0.0.1:9: connection refused");
        let bare = Failure::new(ProxyError::RateLimited, Cause::None);
        assert_eq!(bare.to_string(), "rate limited");
        let body = bare.response(false).into_body();
        assert!(matches!(body, Body::Full(Some(ref b)) if b.as_ref() == b"rate limited\n"));
    }
}
