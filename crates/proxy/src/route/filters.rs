//! HTTPRoute rule filters, compiled once per snapshot. A rule without filters has none of
//! this (`Rule::filters` is `None`), so the request path pays a branch and nothing else.
//!
//! Order on the request: fault injection (delay, abort), redirect, request header modifier,
//! URL rewrite, then mirrors (which see the rewritten request). On the response: the response
//! header modifier (upstream responses only).

use crate::balance::Balancer;
use crate::http::body::Body;
use crate::route::fault::Fault;
use crate::route::mirror::{Mirror, MirrorCounters};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Response, StatusCode};
use smesh_model::{HeaderModifier, HttpRouteRule, PathMatchType, PathModifier, PathModifierType, Protocol};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct Filters {
    fault: Option<Fault>,
    redirect: Option<Redirect>,
    request_headers: Option<HeaderOps>,
    rewrite: Option<Rewrite>,
    mirrors: Vec<Mirror>,
    response_headers: Option<HeaderOps>,
    /// The rule's PathPrefix values (trailing '/' trimmed), for ReplacePrefixMatch.
    prefixes: Vec<String>,
}

/// Builds the balancer over a service's endpoints that carry a subset's labels.
pub type BalancerFor<'a> = dyn Fn(&str, &BTreeMap<String, String>) -> Arc<Balancer> + 'a;

/// What the snapshot gives to build filters that need other services and metrics.
pub struct Context<'a> {
    pub service: &'a str,
    pub route: &'a str,
    pub metrics: &'a crate::telemetry::metrics::Metrics,
    /// The balancer over a service's endpoints carrying the subset's labels.
    pub balancer: &'a BalancerFor<'a>,
    pub protocol: &'a dyn Fn(&str) -> Option<Protocol>,
}

impl Context<'_> {
    fn mirror(&self, m: &smesh_model::RequestMirror) -> Mirror {
        let name = m.backend_ref.name.as_str();
        let counter = |result: &str| self.metrics.resilience.mirrors.with_label_values(&[name, result]);
        Mirror {
            service: Arc::from(name),
            balancer: (self.balancer)(name, &m.backend_ref.subset),
            protocol: (self.protocol)(name),
            fraction: crate::route::fault::fraction(m.percent),
            counters: MirrorCounters {
                sent: counter("sent"),
                failed: counter("failed"),
                dropped: counter("dropped"),
                skipped: counter("skipped"),
            },
        }
    }

    fn fault(&self, f: &smesh_model::FaultInjection) -> Fault {
        let counter = |kind: &str| {
            self.metrics
                .resilience
                .faults
                .with_label_values(&[self.service, self.route, kind])
        };
        Fault::compile(f, counter("delay"), counter("abort"))
    }
}

impl Filters {
    /// `None` when the rule has no filters.
    pub fn compile(rule: &HttpRouteRule, cx: &Context) -> Option<Box<Filters>> {
        if rule.filters.is_empty() {
            return None;
        }
        let mut f = Filters {
            prefixes: rule
                .matches
                .iter()
                .filter_map(|m| m.path.as_ref())
                .filter(|p| p.kind == PathMatchType::PathPrefix)
                .map(|p| p.value.trim_end_matches('/').to_string())
                .collect(),
            ..Default::default()
        };
        for filter in &rule.filters {
            if let Some(m) = &filter.request_header_modifier {
                f.request_headers = Some(HeaderOps::compile(m));
            }
            if let Some(m) = &filter.response_header_modifier {
                f.response_headers = Some(HeaderOps::compile(m));
            }
            if let Some(u) = &filter.url_rewrite {
                f.rewrite = Some(Rewrite {
                    hostname: u.hostname.as_ref().and_then(|h| HeaderValue::from_str(h).ok()),
                    path: u.path.clone(),
                });
            }
            if let Some(r) = &filter.request_redirect {
                f.redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.clone(),
                    port: r.port,
                    status: StatusCode::from_u16(r.status_code.unwrap_or(smesh_model::RequestRedirect::DEFAULT_STATUS))
                        .unwrap_or(StatusCode::FOUND),
                });
            }
            if let Some(m) = &filter.request_mirror {
                f.mirrors.push(cx.mirror(m));
            }
            if let Some(fi) = &filter.fault_injection {
                f.fault = Some(cx.fault(fi));
            }
        }
        Some(Box::new(f))
    }

    /// Applies the request filters to the head about to be forwarded. `Some(response)` ends
    /// the request here (a redirect or an injected abort).
    pub async fn on_request(&self, parts: &mut Parts) -> Option<Response<Body>> {
        if let Some(fault) = &self.fault {
            let grpc = parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if let Some(resp) = fault.apply(grpc).await {
                return Some(resp);
            }
        }
        if let Some(redirect) = &self.redirect {
            return Some(redirect.response(parts, &self.prefixes));
        }
        if let Some(ops) = &self.request_headers {
            ops.apply(&mut parts.headers);
        }
        if let Some(rewrite) = &self.rewrite {
            rewrite.apply(parts, &self.prefixes);
        }
        None
    }

    /// Starts the mirrors this request gets; for a streamed body, the senders its frames
    /// are to be copied to.
    pub fn mirror(
        &self,
        parts: &Parts,
        body: &crate::route::mirror::MirrorBody<'_>,
        connect_timeout: Duration,
        mesh_tls: Option<&Arc<crate::identity::MeshTls>>,
    ) -> Vec<crate::http::tee::TapSender> {
        self.mirrors
            .iter()
            .filter_map(|m| m.send(parts, body, connect_timeout, mesh_tls))
            .collect()
    }

    pub fn on_response(&self, resp: &mut Response<Body>) {
        if let Some(ops) = &self.response_headers {
            ops.apply(resp.headers_mut());
        }
    }
}

struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(m: &HeaderModifier) -> Self {
        let pairs = |list: &[smesh_model::HeaderPair]| {
            list.iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect()
        };
        HeaderOps {
            set: pairs(&m.set),
            add: pairs(&m.add),
            remove: m
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

struct Rewrite {
    hostname: Option<HeaderValue>,
    path: Option<PathModifier>,
}

impl Rewrite {
    fn apply(&self, parts: &mut Parts, prefixes: &[String]) {
        let new_path = self.path.as_ref().map(|p| modified_path(p, parts.uri.path(), prefixes));
        let authority = self
            .hostname
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok());
        if let Some(h) = &self.hostname {
            parts.headers.insert(header::HOST, h.clone());
        }
        if new_path.is_none() && (authority.is_none() || parts.uri.authority().is_none()) {
            return;
        }
        let mut uri = parts.uri.clone().into_parts();
        if let Some(path) = new_path {
            let pq = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                uri.path_and_query = Some(pq);
            }
        }
        if uri.authority.is_some() {
            if let Some(a) = authority {
                uri.authority = Some(a);
            }
        }
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
}

/// The path a `ReplaceFullPath` / `ReplacePrefixMatch` modifier makes of `path`.
fn modified_path(m: &PathModifier, path: &str, prefixes: &[String]) -> String {
    match m.kind {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        PathModifierType::ReplacePrefixMatch => {
            let replacement = m.replace_prefix_match.as_deref().unwrap_or("/");
            // The longest of the rule's prefixes that matches whole segments of the path.
            let matched = prefixes
                .iter()
                .filter(|p| {
                    p.is_empty()
                        || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
                })
                .max_by_key(|p| p.len());
            let Some(prefix) = matched else {
                return path.to_string();
            };
            let rest = &path[prefix.len()..];
            let base = replacement.trim_end_matches('/');
            let joined = if rest.is_empty() {
                if base.is_empty() {
                    "/".to_string()
                } else {
                    base.to_string()
                }
            } else {
                format!("{base}{rest}")
            };
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

struct Redirect {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifier>,
    port: Option<u16>,
    status: StatusCode,
}

impl Redirect {
    fn location(&self, parts: &Parts, prefixes: &[String]) -> String {
        let host_header = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let (req_host, req_port) = match host_header.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || host_header.starts_with('[') => match p.parse::<u16>() {
                Ok(port) => (h.to_string(), Some(port)),
                Err(_) => (host_header.clone(), None),
            },
            _ => (host_header.clone(), None),
        };
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self.hostname.clone().unwrap_or(req_host);
        // Gateway API: an explicit port wins; a changed scheme implies its well-known port.
        let port = self.port.or(if self.scheme.is_some() { None } else { req_port });
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = port.filter(|p| *p != default_port);
        let path = match &self.path {
            Some(m) => modified_path(m, parts.uri.path(), prefixes),
            None => parts.uri.path().to_string(),
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(&path);
        if let Some(q) = parts.uri.query() {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    fn response(&self, parts: &Parts, prefixes: &[String]) -> Response<Body> {
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&self.location(parts, prefixes)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix_mod(to: &str) -> PathModifier {
        PathModifier {
            kind: PathModifierType::ReplacePrefixMatch,
            replace_full_path: None,
            replace_prefix_match: Some(to.into()),
        }
    }

    #[test]
    fn replace_prefix_match_follows_gateway_api() {
        let p = vec!["/foo".to_string()];
        assert_eq!(modified_path(&prefix_mod("/xyz"), "/foo/bar", &p), "/xyz/bar");
        assert_eq!(modified_path(&prefix_mod("/xyz/"), "/foo/bar", &p), "/xyz/bar");
        assert_eq!(modified_path(&prefix_mod("/xyz"), "/foo", &p), "/xyz");
        assert_eq!(modified_path(&prefix_mod("/"), "/foo/bar", &p), "/bar");
        assert_eq!(modified_path(&prefix_mod("/"), "/foo", &p), "/");
        let p = vec!["/foo".to_string(), "/foo/bar".to_string()];
        assert_eq!(modified_path(&prefix_mod("/x"), "/foo/bar/baz", &p), "/x/baz");
        assert_eq!(modified_path(&prefix_mod("/x"), "/other", &p), "/other");
    }

    fn head(uri: &str, host: &str) -> Parts {
        let (parts, ()) = http::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    #[test]
    fn redirect_location() {
        let r = Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: None,
            port: None,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        assert_eq!(r.location(&head("/a?b=1", "api:8080"), &[]), "https://api/a?b=1");
        let r = Redirect {
            scheme: None,
            hostname: Some("new.example".into()),
            path: Some(PathModifier {
                kind: PathModifierType::ReplaceFullPath,
                replace_full_path: Some("/moved".into()),
                replace_prefix_match: None,
            }),
            port: Some(8443),
            status: StatusCode::FOUND,
        };
        assert_eq!(r.location(&head("/a", "api"), &[]), "http://new.example:8443/moved");
        let r = Redirect {
            scheme: None,
            hostname: None,
            path: None,
            port: None,
            status: StatusCode::FOUND,
        };
        assert_eq!(r.location(&head("/a", "api:8080"), &[]), "http://api:8080/a");
    }

    #[test]
    fn header_ops_and_rewrite() {
        let ops = HeaderOps::compile(&HeaderModifier {
            set: vec![smesh_model::HeaderPair {
                name: "x-set".into(),
                value: "new".into(),
            }],
            add: vec![smesh_model::HeaderPair {
                name: "x-add".into(),
                value: "2".into(),
            }],
            remove: vec!["x-gone".into()],
        });
        let mut h = HeaderMap::new();
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-add", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        ops.apply(&mut h);
        assert_eq!(h["x-set"], "new");
        assert_eq!(h.get_all("x-add").iter().count(), 2);
        assert!(!h.contains_key("x-gone"));

        let rw = Rewrite {
            hostname: Some(HeaderValue::from_static("backend.internal")),
            path: Some(prefix_mod("/v2")),
        };
        let mut parts = head("http://api/v1/items?id=3", "api");
        rw.apply(&mut parts, &["/v1".to_string()]);
        assert_eq!(parts.uri.to_string(), "http://backend.internal/v2/items?id=3");
        assert_eq!(parts.headers[header::HOST], "backend.internal");
    }
}
