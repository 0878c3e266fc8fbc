//! Authorization on the inbound side, with the peer identity that mesh mTLS verified.
//!
//! For a target service: a matching `Deny` policy denies; else, if the service has `Allow`
//! policies, one of them must match; else the MeshConfig's `defaultPolicy` decides.

use crate::telemetry::metrics::Metrics;
use http::Method;
use rustc_hash::FxHashMap;
use smesh_model::{AuthorizationPolicy, DefaultPolicy, Operation, PolicyAction, Resource, Sourced};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, by this policy (None: by default).
    Allow(Option<Arc<str>>),
    /// Denied, by this policy (None: by default).
    Deny(Option<Arc<str>>),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    fn policy(&self) -> &str {
        match self {
            Decision::Allow(p) | Decision::Deny(p) => p.as_deref().unwrap_or("default"),
        }
    }
}

/// What is being asked: who, and (for HTTP) what.
pub struct Request<'a> {
    /// The peer's verified SPIFFE ID; None for plaintext.
    pub peer: Option<&'a str>,
    /// None for opaque TCP (then only rules without `to` can match).
    pub method: Option<&'a Method>,
    pub path: Option<&'a str>,
    pub port: u16,
}

struct Policy {
    name: Arc<str>,
    action: PolicyAction,
    rules: Vec<smesh_model::AuthorizationRule>,
}

#[derive(Default)]
pub struct AuthzTable {
    by_service: FxHashMap<String, Vec<Policy>>,
    default: DefaultPolicy,
}

impl AuthzTable {
    pub fn build(items: &[Sourced]) -> Self {
        let mut table = AuthzTable::default();
        for item in items {
            match &item.resource {
                Resource::AuthorizationPolicy(p) => table.add(p),
                Resource::MeshConfig(m) => table.default = m.spec.default_policy,
                _ => {}
            }
        }
        table
    }

    fn add(&mut self, p: &AuthorizationPolicy) {
        self.by_service
            .entry(p.spec.target_ref.name.clone())
            .or_default()
            .push(Policy {
                name: Arc::from(p.metadata.name.as_str()),
                action: p.spec.action,
                rules: p.spec.rules.clone(),
            });
    }

    /// True when nothing can deny (no policies, default allow): the common case costs a lookup.
    pub fn is_open(&self, service: &str) -> bool {
        self.default == DefaultPolicy::Allow && !self.by_service.contains_key(service)
    }

    pub fn decide(&self, service: &str, req: &Request<'_>) -> Decision {
        let policies = self.by_service.get(service).map(Vec::as_slice).unwrap_or(&[]);
        let matching = |action| policies.iter().filter(move |p| p.action == action);
        if let Some(p) = matching(PolicyAction::Deny).find(|p| p.matches(req)) {
            return Decision::Deny(Some(p.name.clone()));
        }
        let mut allows = matching(PolicyAction::Allow).peekable();
        if allows.peek().is_some() {
            return match allows.find(|p| p.matches(req)) {
                Some(p) => Decision::Allow(Some(p.name.clone())),
                None => Decision::Deny(None),
            };
        }
        match self.default {
            DefaultPolicy::Allow => Decision::Allow(None),
            DefaultPolicy::Deny => Decision::Deny(None),
        }
    }
}

impl Policy {
    fn matches(&self, req: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| {
            let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req.peer));
            let to_ok = rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, req));
            from_ok && to_ok
        })
    }
}

fn source_matches(source: &smesh_model::PeerSource, peer: Option<&str>) -> bool {
    let Some(peer) = peer else { return false };
    match (&source.service, &source.identity) {
        (_, Some(id)) => id == peer,
        (Some(service), None) => smesh_model::SpiffeId::parse(peer).is_some_and(|id| id.service() == service),
        (None, None) => false,
    }
}

fn operation_matches(op: &Operation, req: &Request<'_>) -> bool {
    let http_parts = !op.methods.is_empty() || !op.paths.is_empty();
    if http_parts && req.method.is_none() {
        // A rule about methods or paths never matches opaque TCP.
        return false;
    }
    let method_ok = op.methods.is_empty() || req.method.is_some_and(|m| op.methods.iter().any(|x| x == m.as_str()));
    let path_ok = op.paths.is_empty()
        || req
            .path
            .is_some_and(|p| op.paths.iter().any(|x| Operation::path_matches(x, p)));
    let port_ok = op.ports.is_empty() || op.ports.contains(&req.port);
    method_ok && path_ok && port_ok
}

/// Decides an inbound request or connection to the app behind `rule` (the inbound rule, whose
/// one backend is the app), counting the decision. `None`: nothing governs the service.
pub fn decide_inbound(
    snapshot: &crate::config::snapshot::Snapshot,
    metrics: &Metrics,
    rule: &crate::route::rule::Rule,
    peer: Option<&str>,
    method: Option<&Method>,
    path: Option<&str>,
) -> Option<Decision> {
    let service = &rule.backends[0].service;
    if snapshot.authz.is_open(service) {
        return None;
    }
    let port = rule.backends[0]
        .balancer
        .endpoints()
        .first()
        .map_or(0, |e| e.addr.port());
    let decision = snapshot.authz.decide(
        service,
        &Request {
            peer,
            method,
            path,
            port,
        },
    );
    count(metrics, service, &decision);
    Some(decision)
}

/// Counts a decision in `smesh_authz_decisions_total{service, policy, decision}`.
pub fn count(metrics: &Metrics, service: &str, decision: &Decision) {
    let verdict = if decision.allowed() { "allow" } else { "deny" };
    metrics
        .authz_decisions
        .with_label_values(&[service, decision.policy(), verdict])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> AuthzTable {
        let svc = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\n";
        AuthzTable::build(&smesh_model::load("t.yaml", &format!("{svc}{yaml}")).unwrap())
    }

    const WEB: &str = "spiffe://example.org/service/web";

    fn get(path: &str, peer: Option<&'static str>) -> Request<'static> {
        Request {
            peer,
            method: Some(&Method::GET),
            path: Some(Box::leak(path.to_string().into_boxed_str())),
            port: 80,
        }
    }

    #[test]
    fn allow_web_get_api_prefix_deny_the_rest() {
        let t = table("apiVersion: smesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-get}\nspec:\n  targetRef: {name: api}\n  rules:\n  - from: [{service: web}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n");
        assert_eq!(
            t.decide("api", &get("/api/x", Some(WEB))),
            Decision::Allow(Some("web-get".into()))
        );
        assert!(!t.decide("api", &get("/admin", Some(WEB))).allowed());
        assert!(!t
            .decide("api", &get("/api/x", Some("spiffe://example.org/service/db")))
            .allowed());
        assert!(!t.decide("api", &get("/api/x", None)).allowed());
        let post = Request {
            peer: Some(WEB),
            method: Some(&Method::POST),
            path: Some("/api/x"),
            port: 80,
        };
        assert!(!t.decide("api", &post).allowed());
        let tcp = Request {
            peer: Some(WEB),
            method: None,
            path: None,
            port: 80,
        };
        assert!(!t.decide("api", &tcp).allowed());
        // other services are not governed by it
        assert!(t.decide("other", &get("/admin", None)).allowed());
    }

    #[test]
    fn deny_wins_and_default_deny() {
        let t = table("apiVersion: smesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin}\nspec:\n  targetRef: {name: api}\n  action: Deny\n  rules: [{to: [{paths: ['/admin']}]}]\n---\napiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {defaultPolicy: deny}\n");
        assert_eq!(
            t.decide("api", &get("/admin", Some(WEB))),
            Decision::Deny(Some("no-admin".into()))
        );
        assert_eq!(t.decide("api", &get("/other", Some(WEB))), Decision::Deny(None));
        assert!(!t.is_open("api") && !t.is_open("other"));
    }
}
