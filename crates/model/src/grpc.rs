//! `GRPCRoute` (Gateway API shape): gRPC requests matched by service and method (and
//! headers), with the same backends, filters, timeouts and priority as HTTPRoute rules, and
//! retries by gRPC status. A GRPCRoute rule is lowered to an HTTPRoute rule (a method match
//! is a path match on `/pkg.Service/Method`), so the proxy compiles both the same way.

use crate::duration;
use crate::{
    BackendRef, FilterType, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, Object, ParentRef, PathMatch,
    PathMatchType, Priority, Timeouts, ValueMatch,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

pub type GrpcRoute = Object<GrpcRouteSpec>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<GrpcRetry>,
    /// HTTPRoute's filters except `URLRewrite` and `RequestRedirect` (a gRPC path is a
    /// method name: there is nothing to rewrite or redirect to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// As on HTTPRoute rules (see `crate::HttpRouteRule::priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// One `matches` entry: every condition in it must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    /// Request metadata (HTTP/2 headers), as HTTPRoute `headers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
}

/// `service` is the fully qualified protobuf service (`pkg.Service`), `method` the method
/// name; either may be left out (not both). `RegularExpression` makes both patterns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default)]
    pub kind: GrpcMethodMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrpcMethodMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// GRPCRoute `retry`: as HTTPRoute's, with gRPC status names as `codes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRetry {
    /// Maximum number of retries after the first try. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// gRPC statuses that are retried. Default `[UNAVAILABLE]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<GrpcCode>,
    /// Wait before the first retry; doubles with each further retry.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
}

impl GrpcRetry {
    pub const DEFAULT_CODES: &'static [GrpcCode] = &[GrpcCode::Unavailable];
}

/// A gRPC status other than OK, by its canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u32)]
pub enum GrpcCode {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    pub const ALL: [GrpcCode; 16] = [
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The number sent in `grpc-status`.
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    pub fn from_name(name: &str) -> Option<GrpcCode> {
        GrpcCode::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The number as text: a `grpc-status` header value made without formatting.
    pub fn number(self) -> &'static str {
        const NUMBERS: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        ];
        NUMBERS[self as usize]
    }

    /// The gRPC status an HTTP status stands for, as gRPC clients read a response that has no
    /// `grpc-status` (gRPC's doc/http-grpc-status-mapping.md). The one HTTP-to-gRPC mapping:
    /// injected aborts given only an HTTP status, GRPCRoute retries of non-gRPC answers and
    /// the proxy's own errors (where their cause says no more) all use it, so a client sees
    /// the same status whether the proxy or an intermediary answered.
    pub fn from_http_status(status: u16) -> GrpcCode {
        match status {
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }
}

/// `#[serde(deserialize_with)]` for a `grpcStatus` given as a number (1-16, range checked
/// by validation) or a name such as `UNAVAILABLE`; it is kept (and written back) as the number.
pub(crate) mod status_number {
    use super::GrpcCode;
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        struct Status;
        impl Visitor<'_> for Status {
            type Value = Option<u32>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a gRPC status: a number 1-16 or a name such as UNAVAILABLE")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(Some)
                    .map_err(|_| E::custom(format!("gRPC status {v} out of range 1-16")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("gRPC status {v} out of range 1-16")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                GrpcCode::from_name(v).map(|c| Some(c.code())).ok_or_else(|| {
                    E::custom(format!(
                        "unknown gRPC status {v:?}, expected a number 1-16 or one of {:?}",
                        GrpcCode::ALL.map(GrpcCode::name)
                    ))
                })
            }
        }
        d.deserialize_any(Status)
    }
}

impl GrpcMethodMatch {
    /// The path match this method match means: `/service/method` exactly, `/service/` as a
    /// prefix, or a regular expression over the path (method only, or `RegularExpression`).
    pub fn path(&self) -> PathMatch {
        const ANY: &str = "[^/]+";
        let (kind, value) = match (self.kind, self.service.as_deref(), self.method.as_deref()) {
            (GrpcMethodMatchType::Exact, Some(s), Some(m)) => (PathMatchType::Exact, format!("/{s}/{m}")),
            (GrpcMethodMatchType::Exact, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}/")),
            (GrpcMethodMatchType::Exact, None, m) => (
                PathMatchType::RegularExpression,
                format!("/{ANY}/{}", m.map_or(ANY.to_string(), regex::escape)),
            ),
            (GrpcMethodMatchType::RegularExpression, s, m) => (
                PathMatchType::RegularExpression,
                format!("/(?:{})/(?:{})", s.unwrap_or(ANY), m.unwrap_or(ANY)),
            ),
        };
        PathMatch { kind, value }
    }
}

impl GrpcRouteMatch {
    pub fn to_http(&self) -> HttpRouteMatch {
        HttpRouteMatch {
            path: self.method.as_ref().map(GrpcMethodMatch::path),
            headers: self.headers.clone(),
            ..Default::default()
        }
    }
}

impl GrpcRouteRule {
    /// The same rule as an HTTPRoute rule, without its `retry` (whose codes are gRPC
    /// statuses): what the proxy compiles.
    pub fn to_http(&self) -> HttpRouteRule {
        HttpRouteRule {
            name: self.name.clone(),
            matches: self.matches.iter().map(GrpcRouteMatch::to_http).collect(),
            backend_refs: self.backend_refs.clone(),
            timeouts: self.timeouts.clone(),
            retry: None,
            filters: self.filters.clone(),
            priority: self.priority,
            upgrades: Vec::new(),
        }
    }
}

/// HTTPRoute filters that GRPCRoute rules do not take: a gRPC path is a method name, there
/// is nothing to rewrite or redirect to.
const UNSUPPORTED_FILTERS: [FilterType; 2] = [FilterType::UrlRewrite, FilterType::RequestRedirect];

/// A protobuf identifier: a letter or '_', then letters, digits and '_'.
fn identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks what is particular to GRPCRoute rules (method matches, retry codes, which
/// filters) and their filters; `fail(field, reason)` records an error. The rest is checked
/// as for HTTPRoute rules (`crate::validate`).
pub(crate) fn validate_grpc_rules(route: &GrpcRoute, services: &HashSet<&str>, fail: &mut dyn FnMut(&str, String)) {
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        for (m, matcher) in rule.matches.iter().enumerate() {
            let Some(method) = &matcher.method else { continue };
            let at = format!("{at}.matches[{m}].method");
            if method.service.is_none() && method.method.is_none() {
                fail(&at, "give service and/or method".into());
            }
            match method.kind {
                GrpcMethodMatchType::Exact => {
                    if let Some(s) = method.service.as_deref().filter(|s| !s.split('.').all(identifier)) {
                        fail(
                            &format!("{at}.service"),
                            format!("invalid service {s:?}: expected a fully qualified protobuf service such as pkg.v1.Service"),
                        );
                    }
                    if let Some(m) = method.method.as_deref().filter(|m| !identifier(m)) {
                        fail(
                            &format!("{at}.method"),
                            format!("invalid method {m:?}: expected a protobuf method name such as GetUser"),
                        );
                    }
                }
                GrpcMethodMatchType::RegularExpression => {
                    for (name, pattern) in [("service", &method.service), ("method", &method.method)] {
                        if let Some(why) = pattern.as_deref().and_then(crate::validate::regex_error) {
                            fail(&format!("{at}.{name}"), why);
                        }
                    }
                }
            }
        }
        if let Some(retry) = &rule.retry {
            let mut seen = HashSet::new();
            for (c, code) in retry.codes.iter().enumerate() {
                if !seen.insert(*code) {
                    fail(
                        &format!("{at}.retry.codes[{c}]"),
                        format!("{} given twice", code.name()),
                    );
                }
            }
        }
        crate::filters::validate_rule_filters(r, &rule.to_http(), services, ("GRPCRoute", &UNSUPPORTED_FILTERS), fail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load, Resource};

    const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001, labels: {version: v1}}]\n";

    fn route(rules: &str) -> String {
        format!("{SERVICE}---\napiVersion: smesh.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n{rules}")
    }

    fn errors(rules: &str) -> String {
        match load("mesh.yaml", &route(rules)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_field_and_round_trips() {
        let text = route(
            "  - matches:\n    - method: {service: e2e.Echo, method: Unary}\n      headers: [{name: x-canary, value: 'yes'}]\n    - method: {type: RegularExpression, method: 'Get.*'}\n    backendRefs:\n    - {name: api, subset: {version: v1}, weight: 90}\n    - {name: api, weight: 10}\n    timeouts: {request: 2s}\n    retry: {attempts: 2, codes: [UNAVAILABLE, RESOURCE_EXHAUSTED], backoff: 10ms, perTryTimeout: 500ms}\n    priority: critical\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [x-b]}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: api}, percent: 5}}\n    - {type: FaultInjection, faultInjection: {abort: {grpcStatus: UNAVAILABLE, percent: 1}, delay: {fixedDelay: 10ms}}}\n    - {type: RateLimit, rateLimit: {requestsPerSecond: 10}}\n  - {}\n",
        );
        let items = load("mesh.yaml", &text).expect("valid");
        let Resource::GrpcRoute(g) = &items[1].resource else {
            panic!("not a GRPCRoute: {:?}", items[1].resource)
        };
        let rule = &g.spec.rules[0];
        let retry = rule.retry.as_ref().expect("retry");
        assert_eq!(retry.codes, [GrpcCode::Unavailable, GrpcCode::ResourceExhausted]);
        let abort = rule.filters[3].fault_injection.as_ref().and_then(|f| f.abort.as_ref());
        assert_eq!(abort.and_then(|a| a.grpc_status), Some(14));
        assert_eq!(rule.priority, Some(Priority::Critical));
        // what the control plane stores (JSON) reads back the same
        let json = serde_json::to_string(&items[1].resource).expect("json");
        assert!(
            json.contains("\"kind\":\"GRPCRoute\"") && json.contains("\"UNAVAILABLE\""),
            "{json}"
        );
        let again = crate::parse("stored", &json).expect("parses");
        assert_eq!(again[0].resource, items[1].resource);
    }

    #[test]
    fn http_statuses_map_as_grpc_clients_read_them() {
        use GrpcCode::*;
        for (http, grpc) in [
            (400, Internal),
            (401, Unauthenticated),
            (403, PermissionDenied),
            (404, Unimplemented),
            (429, Unavailable),
            (502, Unavailable),
            (503, Unavailable),
            (504, Unavailable),
            (500, Unknown),
            (413, Unknown),
            (200, Unknown),
        ] {
            assert_eq!(GrpcCode::from_http_status(http), grpc, "{http}");
        }
        for code in GrpcCode::ALL {
            assert_eq!(code.number(), code.code().to_string());
        }
    }

    #[test]
    fn method_matches_become_path_matches() {
        let m = |kind, s: Option<&str>, m: Option<&str>| {
            GrpcMethodMatch {
                kind,
                service: s.map(str::to_string),
                method: m.map(str::to_string),
            }
            .path()
        };
        use GrpcMethodMatchType::*;
        let p = m(Exact, Some("pkg.Svc"), Some("Get"));
        assert_eq!((p.kind, p.value.as_str()), (PathMatchType::Exact, "/pkg.Svc/Get"));
        let p = m(Exact, Some("pkg.Svc"), None);
        assert_eq!((p.kind, p.value.as_str()), (PathMatchType::PathPrefix, "/pkg.Svc/"));
        let p = m(Exact, None, Some("Get"));
        assert_eq!(
            (p.kind, p.value.as_str()),
            (PathMatchType::RegularExpression, "/[^/]+/Get")
        );
        let p = m(RegularExpression, Some("pkg\\..*"), None);
        assert_eq!(p.value, "/(?:pkg\\..*)/(?:[^/]+)");
    }

    #[test]
    fn names_the_field_and_reason() {
        let e = errors("  - matches: [{method: {service: 'pkg/Svc', method: 'Get-x'}}]\n");
        assert!(
            e.contains("(GRPCRoute \"g\"): spec.rules[0].matches[0].method.service: invalid service \"pkg/Svc\""),
            "{e}"
        );
        assert!(
            e.contains("spec.rules[0].matches[0].method.method: invalid method \"Get-x\""),
            "{e}"
        );
        let e = errors("  - matches: [{method: {type: Exact}}]\n");
        assert!(
            e.contains("spec.rules[0].matches[0].method: give service and/or method"),
            "{e}"
        );
        let e = errors("  - matches: [{method: {type: RegularExpression, method: '('}}]\n");
        assert!(
            e.contains("spec.rules[0].matches[0].method.method: invalid regular expression"),
            "{e}"
        );
        let e = errors("  - matches: [{method: {type: Prefix, service: a.B}}]\n");
        assert!(
            e.contains("spec.rules[0].matches[0].method.type: unknown variant `Prefix`"),
            "{e}"
        );
        let e = errors("  - retry: {codes: [UNAVAILABLE, UNAVAILABLE]}\n");
        assert!(
            e.contains("spec.rules[0].retry.codes[1]: UNAVAILABLE given twice"),
            "{e}"
        );
        let e = errors("  - retry: {codes: [UNAVAIL]}\n");
        assert!(
            e.contains("spec.rules[0].retry.codes[0]: unknown variant `UNAVAIL`"),
            "{e}"
        );
        let e = errors("  - retry: {attempts: 11}\n");
        assert!(e.contains("spec.rules[0].retry.attempts: at most 10 retries"), "{e}");
        let e = errors("  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n");
        assert!(
            e.contains("spec.rules[0].filters[0].type: filter type URLRewrite is not supported on a GRPCRoute"),
            "{e}"
        );
        let e = errors("  - filters: [{type: FaultInjection, faultInjection: {abort: {grpcStatus: NOPE}}}]\n");
        assert!(
            e.contains("spec.rules[0].filters[0].faultInjection.abort.grpcStatus: unknown gRPC status \"NOPE\""),
            "{e}"
        );
        let e = errors("  - filters: [{type: FaultInjection, faultInjection: {abort: {grpcStatus: 0}}}]\n");
        assert!(e.contains("abort.grpcStatus: gRPC status 0 out of range 1-16"), "{e}");
        let e = errors("  - backendRefs: [{name: nope}]\n    matches: [{headers: [{name: 'bad name', value: x}]}]\n");
        assert!(
            e.contains("spec.rules[0].backendRefs[0].name: no Service named \"nope\""),
            "{e}"
        );
        assert!(
            e.contains("spec.rules[0].matches[0].headers[0].name: invalid name"),
            "{e}"
        );
        assert_eq!(errors("  - {}\n"), "");
        let e = match load(
            "mesh.yaml",
            "apiVersion: smesh.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{name: nope}]\n",
        ) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("spec.parentRefs[0].name: no Service named \"nope\""), "{e}");
    }
}
