//! Compiled HTTPRoute and GRPCRoute rules: request matching (Gateway API semantics) and
//! per-rule policy.

use crate::balance::Balancer;
use crate::telemetry::metrics::RouteMetrics;
use http::{HeaderName, Method, Request};
use regex::Regex;
use smesh_model::{
    GrpcMethodMatchType, GrpcRouteMatch, HttpRouteMatch, PathMatchType, Timeouts, ValueMatch, ValueMatchType,
};
use std::sync::Arc;
use std::time::Duration;

pub struct WeightedBackend {
    pub weight: u32,
    pub service: Arc<str>,
    pub balancer: Arc<Balancer>,
    /// What to speak to this backend's endpoints; `None` follows the client.
    pub protocol: Option<smesh_model::Protocol>,
    /// The target Service's BackendPolicy (circuit breaker, outlier detection, budget).
    pub policy: Option<Arc<crate::resilience::policy::ServicePolicy>>,
    /// `api{version=v2}` when the route picked a label subset: named when it has no endpoint.
    pub subset: Option<Arc<str>>,
}

pub struct RetryPolicy {
    pub attempts: u32,
    /// Which answers are retried.
    pub on: RetryOn,
    pub backoff: Duration,
    pub per_try_timeout: Option<Duration>,
}

pub enum RetryOn {
    /// HTTPRoute `codes`: these response statuses. A failed exchange with the upstream (a
    /// reset) counts as 502, a per-try timeout as 504.
    Statuses(Vec<u16>),
    /// GRPCRoute `codes`: bit n set retries gRPC status n, read from a trailers-only response
    /// (`grpc-status` among the response headers: a call that failed before any message).
    /// Other HTTP statuses count as gRPC clients read them (502/503/504/429 are UNAVAILABLE,
    /// ...), so UNAVAILABLE also covers failed exchanges with the upstream; a per-try timeout
    /// (504) is both UNAVAILABLE and DEADLINE_EXCEEDED.
    GrpcStatuses(u32),
}

impl RetryPolicy {
    /// Whether an answer with this HTTP status (and, when it is a response, these headers)
    /// is one the policy retries.
    pub fn retries(&self, status: u16, headers: Option<&http::HeaderMap>) -> bool {
        match &self.on {
            RetryOn::Statuses(codes) => codes.contains(&status),
            RetryOn::GrpcStatuses(mask) => {
                let has = |code: u32| code < 32 && mask & (1 << code) != 0;
                match status {
                    200 => headers
                        .and_then(|h| h.get("grpc-status"))
                        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u32>().ok())
                        .is_some_and(has),
                    504 => {
                        has(smesh_model::GrpcCode::Unavailable.code())
                            || has(smesh_model::GrpcCode::DeadlineExceeded.code())
                    }
                    other => has(smesh_model::GrpcCode::from_http_status(other).code()),
                }
            }
        }
    }
}

impl From<&smesh_model::Retry> for RetryPolicy {
    fn from(r: &smesh_model::Retry) -> Self {
        RetryPolicy {
            attempts: r.attempts.unwrap_or(smesh_model::Retry::DEFAULT_ATTEMPTS),
            on: RetryOn::Statuses(if r.codes.is_empty() {
                smesh_model::Retry::DEFAULT_CODES.to_vec()
            } else {
                r.codes.clone()
            }),
            backoff: r.backoff.unwrap_or(smesh_model::Retry::DEFAULT_BACKOFF),
            per_try_timeout: r.per_try_timeout,
        }
    }
}

impl From<&smesh_model::GrpcRetry> for RetryPolicy {
    fn from(r: &smesh_model::GrpcRetry) -> Self {
        let codes = if r.codes.is_empty() {
            smesh_model::GrpcRetry::DEFAULT_CODES
        } else {
            &r.codes
        };
        RetryPolicy {
            attempts: r.attempts.unwrap_or(smesh_model::Retry::DEFAULT_ATTEMPTS),
            on: RetryOn::GrpcStatuses(codes.iter().fold(0, |mask, c| mask | 1 << c.code())),
            backoff: r.backoff.unwrap_or(smesh_model::Retry::DEFAULT_BACKOFF),
            per_try_timeout: r.per_try_timeout,
        }
    }
}

/// What to do with a matched request.
pub struct Rule {
    pub route: Arc<str>,
    pub backends: Vec<WeightedBackend>,
    total_weight: u64,
    /// Whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// Each try: the smaller of `backendRequest` and the retry's `perTryTimeout`.
    pub try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub metrics: Arc<RouteMetrics>,
    /// HTTPRoute filters; `None` when the rule has none.
    pub filters: Option<Box<crate::route::filters::Filters>>,
    /// RateLimit filters; `None` when the rule has none.
    pub rate_limits: Option<Box<crate::resilience::ratelimit::RateLimits>>,
    /// The rule's `priority` (see `crate::resilience::shed::request_priority`).
    pub priority: Option<smesh_model::Priority>,
    /// `Upgrade` protocols tunnelled besides WebSocket (the rule's `upgrades`).
    pub upgrades: Box<[Box<str>]>,
}

impl Rule {
    pub fn new(
        route: &str,
        backends: Vec<WeightedBackend>,
        timeouts: Timeouts,
        retry: Option<RetryPolicy>,
        metrics: Arc<RouteMetrics>,
    ) -> Self {
        let per_try = retry.as_ref().and_then(|r| r.per_try_timeout);
        let try_timeout = match (timeouts.backend_request, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Rule {
            route: Arc::from(route),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            request_timeout: timeouts.request,
            try_timeout,
            retry,
            metrics,
            filters: None,
            rate_limits: None,
            priority: None,
            upgrades: Box::default(),
        }
    }

    /// Picks a backend in proportion to weights (a canary split).
    pub fn backend(&self) -> &WeightedBackend {
        if self.backends.len() == 1 || self.total_weight == 0 {
            return &self.backends[0];
        }
        let mut point = rand::random_range(0..self.total_weight);
        for b in &self.backends {
            let w = u64::from(b.weight);
            if point < w {
                return b;
            }
            point -= w;
        }
        &self.backends[0]
    }
}

enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(m: &ValueMatch) -> Self {
        match m.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(m.value.clone()),
            // Validation rejected bad patterns; a never-matching one is the safe fallback.
            ValueMatchType::RegularExpression => ValueMatcher::Regex(anchored(&m.value)),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Regex(r) => r.is_match(value),
        }
    }
}

pub(crate) fn anchored(pattern: &str) -> Regex {
    Regex::new(&format!("^(?:{pattern})$")).unwrap_or_else(|_| Regex::new("[^\\s\\S]").expect("static regex"))
}

/// One compiled `matches` entry: every condition in it must hold.
pub struct RouteMatch {
    path: Option<PathMatcher>,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    cookies: Vec<(String, ValueMatcher)>,
}

impl RouteMatch {
    pub fn everything() -> Self {
        RouteMatch {
            path: None,
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
            cookies: Vec::new(),
        }
    }

    pub fn compile(m: &HttpRouteMatch) -> Self {
        RouteMatch {
            path: m.path.as_ref().map(|p| match p.kind {
                PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
                PathMatchType::PathPrefix => PathMatcher::Prefix(p.value.trim_end_matches('/').to_string()),
                PathMatchType::RegularExpression => PathMatcher::Regex(anchored(&p.value)),
            }),
            method: m.method.as_ref().and_then(|s| Method::from_bytes(s.as_bytes()).ok()),
            headers: m
                .headers
                .iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        ValueMatcher::compile(h),
                    ))
                })
                .collect(),
            query: m
                .query_params
                .iter()
                .map(|q| (q.name.clone(), ValueMatcher::compile(q)))
                .collect(),
            cookies: m
                .cookies
                .iter()
                .map(|c| (c.name.clone(), ValueMatcher::compile(c)))
                .collect(),
        }
    }

    /// Sort key for Gateway API precedence: exact path, then longest prefix, then regular
    /// expressions (their place is left to implementations), then catch-alls (no path or
    /// prefix `/`); ties go to a method match, then most header matches, then most query
    /// matches (cookies count as headers).
    pub fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            Some(PathMatcher::Exact(p)) => (0, p.len()),
            Some(PathMatcher::Prefix(p)) if !p.is_empty() => (1, p.len()),
            Some(PathMatcher::Regex(_)) => (2, 0),
            Some(PathMatcher::Prefix(_)) | None => (3, 0),
        };
        (
            kind,
            usize::MAX - len,
            self.method.is_none(),
            usize::MAX - self.headers.len() - self.cookies.len(),
            usize::MAX - self.query.len(),
        )
    }

    /// Sort key for GRPCRoute matches (Gateway API: most characters of an exact service,
    /// then of an exact method, then most header matches): an exact service and method, then
    /// an exact service, then an exact method, then regular expressions, then matches without
    /// a method (`None`: a rule without matches). Further ties keep file order.
    pub fn grpc_precedence(m: Option<&GrpcRouteMatch>) -> (u8, usize, usize, usize) {
        let Some(m) = m else {
            return (4, usize::MAX, usize::MAX, usize::MAX);
        };
        let len = |s: &Option<String>| usize::MAX - s.as_ref().map_or(0, String::len);
        let (class, service, method) = match &m.method {
            Some(g) if g.kind == GrpcMethodMatchType::Exact => {
                let class = match (&g.service, &g.method) {
                    (Some(_), Some(_)) => 0,
                    (Some(_), None) => 1,
                    _ => 2,
                };
                (class, len(&g.service), len(&g.method))
            }
            Some(_) => (3, usize::MAX, usize::MAX),
            None => (4, usize::MAX, usize::MAX),
        };
        (class, service, method, usize::MAX - m.headers.len())
    }

    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatcher::Exact(p)) => path == p,
            Some(PathMatcher::Prefix(p)) => {
                p.is_empty()
                    || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            Some(PathMatcher::Regex(r)) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method()) {
            return false;
        }
        for (name, matcher) in &self.headers {
            let found = req
                .headers()
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| matcher.matches(v)));
            if !found {
                return false;
            }
        }
        for (name, matcher) in &self.cookies {
            let found = req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .any(|(k, v)| k == name && matcher.matches(v.trim_matches('"')));
            if !found {
                return false;
            }
        }
        if !self.query.is_empty() {
            let query = req.uri().query().unwrap_or("");
            for (name, matcher) in &self.query {
                let found = query
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .any(|(k, v)| k == name && matcher.matches(v));
                if !found {
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smesh_model::PathMatch;

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch::compile(&HttpRouteMatch {
            path: Some(PathMatch {
                kind: PathMatchType::PathPrefix,
                value: p.into(),
            }),
            ..Default::default()
        })
    }

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).header("x-canary", "yes").body(()).unwrap()
    }

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(prefix("/api").matches(&req("/api")));
        assert!(prefix("/api").matches(&req("/api/v1?x=1")));
        assert!(!prefix("/api").matches(&req("/apiary")));
        assert!(prefix("/").matches(&req("/anything")));
        assert!(prefix("/api/").matches(&req("/api/x")));
    }

    #[test]
    fn headers_query_and_precedence() {
        let m = RouteMatch::compile(&HttpRouteMatch {
            headers: vec![ValueMatch {
                kind: ValueMatchType::RegularExpression,
                name: "x-canary".into(),
                value: "y.s".into(),
            }],
            query_params: vec![ValueMatch {
                kind: ValueMatchType::Exact,
                name: "debug".into(),
                value: "1".into(),
            }],
            ..Default::default()
        });
        assert!(m.matches(&req("/a?debug=1")));
        assert!(!m.matches(&req("/a?debug=2")));
        assert!(prefix("/api/v1").precedence() < prefix("/api").precedence());
        assert!(m.precedence() < RouteMatch::everything().precedence());
        let regex = RouteMatch::compile(&HttpRouteMatch {
            path: Some(PathMatch {
                kind: PathMatchType::RegularExpression,
                value: "/items/[0-9]+".into(),
            }),
            ..Default::default()
        });
        assert!(prefix("/items").precedence() < regex.precedence());
        assert!(regex.precedence() < prefix("/").precedence());
        assert!(regex.precedence() < RouteMatch::everything().precedence());
    }

    #[test]
    fn cookies() {
        let m = RouteMatch::compile(&HttpRouteMatch {
            cookies: vec![ValueMatch {
                kind: ValueMatchType::Exact,
                name: "canary".into(),
                value: "1".into(),
            }],
            ..Default::default()
        });
        let with = |cookies: &[&str]| {
            let mut b = Request::builder().uri("/");
            for c in cookies {
                b = b.header("cookie", *c);
            }
            b.body(()).unwrap()
        };
        assert!(m.matches(&with(&["session=abc; canary=1"])));
        assert!(m.matches(&with(&["session=abc", "canary=\"1\""])));
        assert!(!m.matches(&with(&["session=abc; canary=10"])));
        assert!(!m.matches(&with(&["xcanary=1"])));
        assert!(!m.matches(&with(&[])));
        assert!(m.precedence() < RouteMatch::everything().precedence());
    }

    #[test]
    fn grpc_retry_codes() {
        use smesh_model::{GrpcCode, GrpcRetry};
        let retry = |codes: &[GrpcCode]| {
            RetryPolicy::from(&GrpcRetry {
                codes: codes.to_vec(),
                ..Default::default()
            })
        };
        let p = retry(&[GrpcCode::Unavailable, GrpcCode::ResourceExhausted]);
        let status = |code: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", code.parse().unwrap());
            h
        };
        assert!(p.retries(200, Some(&status("14"))));
        assert!(p.retries(200, Some(&status("8"))));
        assert!(!p.retries(200, Some(&status("9"))));
        assert!(!p.retries(200, Some(&status("x"))));
        // a normal response (grpc-status comes later, in trailers)
        assert!(!p.retries(200, Some(&http::HeaderMap::new())));
        // proxy failures (502), an upstream's 503/429 and per-try timeouts (504) read as UNAVAILABLE
        for s in [502, 503, 504, 429] {
            assert!(p.retries(s, None), "{s}");
        }
        assert!(!p.retries(500, None));
        let p = retry(&[GrpcCode::DeadlineExceeded]);
        assert!(p.retries(504, None) && p.retries(200, Some(&status("4"))));
        assert!(!p.retries(502, None));
        // default: UNAVAILABLE
        let p = retry(&[]);
        assert!(p.retries(200, Some(&status("14"))) && !p.retries(200, Some(&status("13"))));
        // HTTPRoute: statuses only
        let p = RetryPolicy::from(&smesh_model::Retry::default());
        assert!(p.retries(503, None) && !p.retries(200, Some(&status("14"))));
    }

    #[test]
    fn grpc_precedence_order() {
        let m = |kind, service: Option<&str>, method: Option<&str>| GrpcRouteMatch {
            method: Some(smesh_model::GrpcMethodMatch {
                kind,
                service: service.map(str::to_string),
                method: method.map(str::to_string),
            }),
            headers: Vec::new(),
        };
        use GrpcMethodMatchType::{Exact, RegularExpression};
        let both = m(Exact, Some("a.S"), Some("Get"));
        let longer_service = m(Exact, Some("a.LongerS"), None);
        let service = m(Exact, Some("a.S"), None);
        let method = m(Exact, None, Some("Get"));
        let regex = m(RegularExpression, Some("a\\..*"), None);
        let headers = GrpcRouteMatch {
            method: None,
            headers: vec![ValueMatch {
                kind: ValueMatchType::Exact,
                name: "x".into(),
                value: "1".into(),
            }],
        };
        let keys: Vec<_> = [&both, &longer_service, &service, &method, &regex, &headers]
            .into_iter()
            .map(|m| RouteMatch::grpc_precedence(Some(m)))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert!(*keys.last().unwrap() < RouteMatch::grpc_precedence(None));
    }
}
