//! HTTPRoute rule filters (Gateway API shape: `type` plus the field of that name), and their
//! validation. `FaultInjection` is ours; the others are Gateway API core/extended filters.

use crate::{HttpRoute, HttpRouteRule, PathMatchType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestRedirect,
    RequestMirror,
    FaultInjection,
    /// smesh's own: a local token bucket (see `crate::RateLimit`).
    RateLimit,
}

impl FilterType {
    pub const ALL: [FilterType; 7] = [
        FilterType::RequestHeaderModifier,
        FilterType::ResponseHeaderModifier,
        FilterType::UrlRewrite,
        FilterType::RequestRedirect,
        FilterType::RequestMirror,
        FilterType::FaultInjection,
        FilterType::RateLimit,
    ];

    /// The name written in `type`.
    pub fn name(self) -> &'static str {
        match self {
            FilterType::RequestHeaderModifier => "RequestHeaderModifier",
            FilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterType::UrlRewrite => "URLRewrite",
            FilterType::RequestRedirect => "RequestRedirect",
            FilterType::RequestMirror => "RequestMirror",
            FilterType::FaultInjection => "FaultInjection",
            FilterType::RateLimit => "RateLimit",
        }
    }

    /// The field that carries this filter's settings.
    pub fn field(self) -> &'static str {
        match self {
            FilterType::RequestHeaderModifier => "requestHeaderModifier",
            FilterType::ResponseHeaderModifier => "responseHeaderModifier",
            FilterType::UrlRewrite => "urlRewrite",
            FilterType::RequestRedirect => "requestRedirect",
            FilterType::RequestMirror => "requestMirror",
            FilterType::FaultInjection => "faultInjection",
            FilterType::RateLimit => "rateLimit",
        }
    }
}

/// `set` replaces, `add` appends, `remove` deletes (header names, case-insensitive).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderPair {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`; default: the request's (`http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 or 302 (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

impl RequestRedirect {
    pub const DEFAULT_STATUS: u16 = 302;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: MirrorBackend,
    /// Share of requests mirrored, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorBackend {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "required_duration")]
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// The status answered to HTTP clients (and mapped to a gRPC status for gRPC clients when
    /// `grpcStatus` is not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The `grpc-status` answered to gRPC clients (HTTP clients then get 500 unless
    /// `httpStatus` is given too): a number or a name such as `UNAVAILABLE`.
    #[serde(
        default,
        deserialize_with = "crate::grpc::status_number::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// `#[serde(with = "required_duration")]` for plain `Duration` fields written as `100ms`.
pub(crate) mod required_duration {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::duration::format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        crate::duration::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// Checks every rule's filters of one route; `fail(field, reason)` records an error.
pub fn validate_route_filters(route: &HttpRoute, services: &HashSet<&str>, fail: &mut dyn FnMut(&str, String)) {
    for (r, rule) in route.spec.rules.iter().enumerate() {
        validate_rule_filters(r, rule, services, ("HTTPRoute", &[]), fail);
    }
}

/// Checks the filters of rule `r` of a route of kind `kind`, on which filters of the
/// `unsupported` types are an error.
pub(crate) fn validate_rule_filters(
    r: usize,
    rule: &HttpRouteRule,
    services: &HashSet<&str>,
    (kind, unsupported): (&str, &[FilterType]),
    fail: &mut dyn FnMut(&str, String),
) {
    let mut seen = HashSet::new();
    for (f, filter) in rule.filters.iter().enumerate() {
        let at = format!("spec.rules[{r}].filters[{f}]");
        if unsupported.contains(&filter.kind) {
            let supported: Vec<&str> = FilterType::ALL
                .into_iter()
                .filter(|t| !unsupported.contains(t))
                .map(FilterType::name)
                .collect();
            fail(
                &format!("{at}.type"),
                format!(
                    "filter type {} is not supported on a {kind} (supported: {})",
                    filter.kind.name(),
                    supported.join(", ")
                ),
            );
            continue;
        }
        let present: Vec<&str> = [
            ("requestHeaderModifier", filter.request_header_modifier.is_some()),
            ("responseHeaderModifier", filter.response_header_modifier.is_some()),
            ("urlRewrite", filter.url_rewrite.is_some()),
            ("requestRedirect", filter.request_redirect.is_some()),
            ("requestMirror", filter.request_mirror.is_some()),
            ("faultInjection", filter.fault_injection.is_some()),
            ("rateLimit", filter.rate_limit.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        let wanted = filter.kind.field();
        if present != [wanted] {
            fail(
                &at,
                format!(
                    "a filter of type {:?} needs exactly the field `{wanted}` (found {present:?})",
                    filter.kind
                ),
            );
            continue;
        }
        // Gateway API: each filter type at most once per rule, except RequestMirror (and
        // our RateLimit: a rule may limit per route and per source at once).
        if !matches!(
            filter.kind,
            crate::FilterType::RequestMirror | crate::FilterType::RateLimit
        ) && !seen.insert(filter.kind)
        {
            fail(
                &format!("{at}.type"),
                format!("filter {:?} given twice in one rule", filter.kind),
            );
        }
        let prefix_only = !rule.matches.is_empty()
            && rule
                .matches
                .iter()
                .all(|m| m.path.as_ref().is_some_and(|p| p.kind == PathMatchType::PathPrefix));
        let at = format!("{at}.{wanted}");
        if let Some(m) = filter
            .request_header_modifier
            .as_ref()
            .or(filter.response_header_modifier.as_ref())
        {
            header_modifier(&at, m, fail);
        }
        if let Some(u) = &filter.url_rewrite {
            if let Some(h) = &u.hostname {
                hostname(&format!("{at}.hostname"), h, fail);
            }
            if let Some(p) = &u.path {
                path_modifier(&format!("{at}.path"), p, prefix_only, fail);
            }
            if u.hostname.is_none() && u.path.is_none() {
                fail(&at, "give hostname and/or path".into());
            }
        }
        if let Some(rd) = &filter.request_redirect {
            if let Some(s) = rd.scheme.as_deref().filter(|s| !matches!(*s, "http" | "https")) {
                fail(&format!("{at}.scheme"), format!("scheme {s:?} must be http or https"));
            }
            if let Some(h) = &rd.hostname {
                hostname(&format!("{at}.hostname"), h, fail);
            }
            if let Some(p) = &rd.path {
                path_modifier(&format!("{at}.path"), p, prefix_only, fail);
            }
            if rd.port == Some(0) {
                fail(&format!("{at}.port"), "port must be 1-65535".into());
            }
            if let Some(code) = rd.status_code.filter(|c| !matches!(c, 301 | 302)) {
                fail(&format!("{at}.statusCode"), format!("status {code} must be 301 or 302"));
            }
            if !rule.backend_refs.is_empty() {
                fail(&at, "a rule that redirects cannot also have backendRefs".into());
            }
        }
        if filter.kind == crate::FilterType::UrlRewrite
            && rule
                .filters
                .iter()
                .any(|f| f.kind == crate::FilterType::RequestRedirect)
        {
            fail(
                &at,
                "URLRewrite and RequestRedirect cannot be used in the same rule".into(),
            );
        }
        if let Some(m) = &filter.request_mirror {
            if !services.contains(m.backend_ref.name.as_str()) {
                fail(
                    &format!("{at}.backendRef.name"),
                    format!("no Service named {:?}", m.backend_ref.name),
                );
            }
            percent(&format!("{at}.percent"), m.percent, fail);
        }
        if let Some(r) = &filter.rate_limit {
            crate::ratelimit::validate_rate_limit(&at, r, fail);
        }
        if let Some(fi) = &filter.fault_injection {
            if fi.delay.is_none() && fi.abort.is_none() {
                fail(&at, "give delay and/or abort".into());
            }
            if let Some(d) = &fi.delay {
                percent(&format!("{at}.delay.percent"), d.percent, fail);
                if d.fixed_delay.is_zero() {
                    fail(&format!("{at}.delay.fixedDelay"), "delay must be greater than 0".into());
                }
            }
            if let Some(a) = &fi.abort {
                percent(&format!("{at}.abort.percent"), a.percent, fail);
                match (a.http_status, a.grpc_status) {
                    (None, None) => fail(&format!("{at}.abort"), "give httpStatus and/or grpcStatus".into()),
                    (Some(s), _) if !(200..=599).contains(&s) => fail(
                        &format!("{at}.abort.httpStatus"),
                        format!("status {s} out of range 200-599"),
                    ),
                    (_, Some(s)) if !(1..=16).contains(&s) => fail(
                        &format!("{at}.abort.grpcStatus"),
                        format!("gRPC status {s} out of range 1-16"),
                    ),
                    _ => {}
                }
            }
        }
    }
}

fn percent(field: &str, p: Option<f64>, fail: &mut dyn FnMut(&str, String)) {
    if let Some(p) = p.filter(|p| !(0.0..=100.0).contains(p)) {
        fail(field, format!("percent {p} out of range 0-100"));
    }
}

fn header_modifier(at: &str, m: &HeaderModifier, fail: &mut dyn FnMut(&str, String)) {
    for (kind, list) in [("set", &m.set), ("add", &m.add)] {
        for (i, h) in list.iter().enumerate() {
            if !valid_header_name(&h.name) {
                fail(
                    &format!("{at}.{kind}[{i}].name"),
                    format!("invalid header name {:?}", h.name),
                );
            }
            if h.value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                fail(
                    &format!("{at}.{kind}[{i}].value"),
                    "header value has control characters".into(),
                );
            }
        }
    }
    for (i, name) in m.remove.iter().enumerate() {
        if !valid_header_name(name) {
            fail(&format!("{at}.remove[{i}]"), format!("invalid header name {name:?}"));
        }
    }
    if m.set.is_empty() && m.add.is_empty() && m.remove.is_empty() {
        fail(at, "give set, add and/or remove".into());
    }
}

fn path_modifier(at: &str, p: &PathModifier, prefix_only: bool, fail: &mut dyn FnMut(&str, String)) {
    let (value, other, name) = match p.kind {
        PathModifierType::ReplaceFullPath => (&p.replace_full_path, &p.replace_prefix_match, "replaceFullPath"),
        PathModifierType::ReplacePrefixMatch => (&p.replace_prefix_match, &p.replace_full_path, "replacePrefixMatch"),
    };
    match value {
        None => fail(at, format!("type {:?} needs `{name}`", p.kind)),
        Some(v) if !v.starts_with('/') => fail(&format!("{at}.{name}"), format!("path {v:?} must start with '/'")),
        Some(_) => {}
    }
    if other.is_some() {
        fail(at, format!("type {:?} takes only `{name}`", p.kind));
    }
    if p.kind == PathModifierType::ReplacePrefixMatch && !prefix_only {
        fail(
            at,
            "ReplacePrefixMatch needs every match of the rule to have a PathPrefix path".into(),
        );
    }
}

fn hostname(field: &str, host: &str, fail: &mut dyn FnMut(&str, String)) {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        fail(field, format!("invalid hostname {host:?}"));
    }
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::load;

    const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001}]\n";

    fn errors(rule: &str) -> String {
        let text = format!(
            "{SERVICE}---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - {rule}\n"
        );
        match load("mesh.yaml", &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_every_filter() {
        let ok = errors(
            "matches: [{path: {type: PathPrefix, value: /v1}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [server]}}\n    - {type: URLRewrite, urlRewrite: {hostname: backend, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: api}, percent: 50}}\n    - {type: FaultInjection, faultInjection: {delay: {fixedDelay: 100ms, percent: 20}, abort: {httpStatus: 503, percent: 50}}}",
        );
        assert_eq!(ok, "");
        let ok = errors("filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.com, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}}]");
        assert_eq!(ok, "");
    }

    #[test]
    fn rejects_bad_filters() {
        let e = errors("filters: [{type: RequestHeaderModifier, responseHeaderModifier: {remove: [x]}}]");
        assert!(e.contains("spec.rules[0].filters[0]: a filter of type RequestHeaderModifier needs exactly the field `requestHeaderModifier`"), "{e}");
        let e = errors(
            "filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]",
        );
        assert!(e.contains("ReplacePrefixMatch needs every match"), "{e}");
        let e = errors("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nope}, percent: 150}}]");
        assert!(e.contains("backendRef.name: no Service named \"nope\""), "{e}");
        assert!(e.contains("requestMirror.percent: percent 150 out of range"), "{e}");
        let e = errors("filters: [{type: FaultInjection, faultInjection: {abort: {percent: 5}}}]");
        assert!(
            e.contains("faultInjection.abort: give httpStatus and/or grpcStatus"),
            "{e}"
        );
        let e = errors("filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307, scheme: ftp}}]");
        assert!(
            e.contains("statusCode: status 307") && e.contains("scheme: scheme \"ftp\""),
            "{e}"
        );
        let e = errors("filters: [{type: Nope}]");
        assert!(e.contains("unknown variant `Nope`"), "{e}");
        let e = errors(
            "filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'bad name', value: x}]}}]",
        );
        assert!(e.contains("set[0].name: invalid header name"), "{e}");
    }
}
