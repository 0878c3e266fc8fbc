//! The `RateLimit` HTTPRoute filter (smesh's own, next to `FaultInjection`): a local token
//! bucket per proxy, keyed by route, by source or by a header value; and a BackendPolicy's
//! `rateLimit`, enforced by the target Service's own proxies and, with `scope: mesh`, split
//! across them.

use serde::{Deserialize, Serialize};

/// `{requestsPerSecond: 100, burst: 20, key: route | source | {header: NAME}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// Tokens added per second (may be fractional, e.g. 0.5).
    pub requests_per_second: f64,
    /// Bucket size: requests allowed at once after a quiet period. Default: a tenth of a
    /// second's worth, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Which requests share a bucket. Default `route`.
    #[serde(default, skip_serializing_if = "RateLimitKey::is_route")]
    pub key: RateLimitKey,
    /// Per-key limits keep at most this many buckets (default 10,000); when full, idle keys
    /// are dropped first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
}

impl RateLimit {
    pub const DEFAULT_MAX_KEYS: u32 = 10_000;

    pub fn burst_or_default(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| (self.requests_per_second / 10.0).ceil().clamp(1.0, u32::MAX as f64) as u32)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateLimitKey {
    /// `route` (one bucket for the rule) or `source` (one per client: its verified mesh
    /// identity, else its IP address).
    Named(NamedKey),
    /// `{header: x-tenant}`: one bucket per value; requests without it share one bucket.
    Header { header: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedKey {
    #[default]
    Route,
    Source,
}

impl Default for RateLimitKey {
    fn default() -> Self {
        RateLimitKey::Named(NamedKey::Route)
    }
}

impl RateLimitKey {
    fn is_route(&self) -> bool {
        *self == RateLimitKey::Named(NamedKey::Route)
    }
}

/// A BackendPolicy's `rateLimit`: the RateLimit filter's fields plus `scope`. It is enforced
/// on the inbound side by the proxies in front of the target Service's endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceRateLimit {
    /// The Service's limit: per proxy (`local`), or for the whole Service (`mesh`).
    pub requests_per_second: f64,
    /// Default: a tenth of a second's worth, at least 1 (split like the rate with `mesh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Which requests share a bucket: `route` (all of the Service's inbound requests),
    /// `source` (per calling identity or IP) or `{header: NAME}`. Default `route`.
    #[serde(default, skip_serializing_if = "RateLimitKey::is_route")]
    pub key: RateLimitKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
    /// Default `local`.
    #[serde(default, skip_serializing_if = "RateLimitScope::is_local")]
    pub scope: RateLimitScope,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// Every proxy of the Service allows the full rate.
    #[default]
    Local,
    /// The rate (and the burst) is for the Service as a whole: each of its proxies allows
    /// its share, the limit divided by the Service's live endpoints.
    Mesh,
}

impl RateLimitScope {
    fn is_local(&self) -> bool {
        *self == RateLimitScope::Local
    }
}

impl ServiceRateLimit {
    /// The limit one proxy enforces when the Service has `endpoints` endpoints (0 counts as
    /// 1: a proxy not yet in its Service's endpoint list still has the whole limit to itself).
    /// `local` scope ignores the count. The burst is split down, never below 1.
    pub fn share(&self, endpoints: usize) -> RateLimit {
        let n = match self.scope {
            RateLimitScope::Local => 1,
            RateLimitScope::Mesh => endpoints.max(1),
        };
        let whole = self.as_filter();
        let burst = whole.burst_or_default();
        RateLimit {
            requests_per_second: self.requests_per_second / n as f64,
            burst: Some((burst / u32::try_from(n).unwrap_or(u32::MAX)).max(1)),
            ..whole
        }
    }

    fn as_filter(&self) -> RateLimit {
        RateLimit {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
            key: self.key.clone(),
            max_keys: self.max_keys,
        }
    }
}

pub(crate) fn validate_service_rate_limit(at: &str, r: &ServiceRateLimit, fail: &mut dyn FnMut(&str, String)) {
    validate_rate_limit(at, &r.as_filter(), fail);
}

pub(crate) fn validate_rate_limit(at: &str, r: &RateLimit, fail: &mut dyn FnMut(&str, String)) {
    if !(r.requests_per_second > 0.0 && r.requests_per_second <= 1e9) {
        fail(
            &format!("{at}.requestsPerSecond"),
            format!("{} must be greater than 0 (at most 1e9)", r.requests_per_second),
        );
    }
    if r.burst == Some(0) {
        fail(&format!("{at}.burst"), "must be at least 1".into());
    }
    if r.max_keys == Some(0) {
        fail(&format!("{at}.maxKeys"), "must be at least 1".into());
    }
    if let RateLimitKey::Header { header } = &r.key {
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b))
        {
            fail(&format!("{at}.key.header"), format!("invalid header name {header:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{load, Resource};

    fn route(filter: &str) -> Result<Vec<crate::Sourced>, String> {
        let text = format!(
            "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec:\n  endpoints: [{{address: 127.0.0.1:9001}}]\n---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - filters:\n{filter}"
        );
        load("mesh.yaml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_keys_and_round_trips() {
        let items = route(
            "    - {type: RateLimit, rateLimit: {requestsPerSecond: 100, burst: 20}}\n    - {type: RateLimit, rateLimit: {requestsPerSecond: 5, key: source}}\n    - {type: RateLimit, rateLimit: {requestsPerSecond: 0.5, key: {header: x-tenant}, maxKeys: 10}}\n",
        )
        .expect("valid");
        let Resource::HttpRoute(r) = &items[1].resource else {
            panic!()
        };
        let f = &r.spec.rules[0].filters;
        let keys: Vec<_> = f.iter().map(|f| f.rate_limit.as_ref().unwrap().key.clone()).collect();
        assert_eq!(
            keys,
            [
                super::RateLimitKey::Named(super::NamedKey::Route),
                super::RateLimitKey::Named(super::NamedKey::Source),
                super::RateLimitKey::Header {
                    header: "x-tenant".into()
                }
            ]
        );
        assert_eq!(f[0].rate_limit.as_ref().unwrap().burst_or_default(), 20);
        assert_eq!(f[1].rate_limit.as_ref().unwrap().burst_or_default(), 1);
        let yaml = crate::to_yaml([&items[1].resource]);
        let again = crate::parse("again.yaml", &yaml).expect("round trip");
        assert_eq!(again[0].resource, items[1].resource);
    }

    #[test]
    fn rejects_bad_limits() {
        let e = route("    - {type: RateLimit, rateLimit: {requestsPerSecond: 0, burst: 0, key: {header: \"a b\"}}}\n")
            .unwrap_err();
        for want in ["requestsPerSecond", "burst: must be at least 1", "key.header"] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        assert!(route("    - {type: RateLimit, rateLimit: {requestsPerSecond: 1, key: client}}\n").is_err());
    }

    fn policy(limit: &str) -> Result<Vec<crate::Sourced>, String> {
        let text = format!(
            "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: api}}\n  rateLimit: {limit}\n"
        );
        load("policy.yaml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn backend_policy_limit_parses_and_round_trips() {
        let items = policy("{requestsPerSecond: 100, burst: 10, key: source, scope: mesh}").expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!()
        };
        let r = p.spec.rate_limit.as_ref().unwrap();
        assert_eq!(r.scope, super::RateLimitScope::Mesh);
        assert_eq!(r.key, super::RateLimitKey::Named(super::NamedKey::Source));
        let yaml = crate::to_yaml([&items[1].resource]);
        assert!(yaml.contains("scope: mesh"), "{yaml}");
        let again = crate::parse("again.yaml", &yaml).expect("round trip");
        assert_eq!(again[0].resource, items[1].resource);
        let items = policy("{requestsPerSecond: 5}").expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!()
        };
        assert_eq!(p.spec.rate_limit.as_ref().unwrap().scope, super::RateLimitScope::Local);
    }

    #[test]
    fn backend_policy_limit_rejects_bad_fields_naming_file_and_field() {
        let e = policy("{requestsPerSecond: -3, burst: 0, key: {header: \"a b\"}, maxKeys: 0}").unwrap_err();
        for want in [
            "policy.yaml: document 2 (BackendPolicy \"p\"): spec.rateLimit.requestsPerSecond: -3 must be greater than 0",
            "spec.rateLimit.burst: must be at least 1",
            "spec.rateLimit.key.header: invalid header name \"a b\"",
            "spec.rateLimit.maxKeys: must be at least 1",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        let e = policy("{requestsPerSecond: 1, scope: global}").unwrap_err();
        assert!(
            e.contains("policy.yaml") && e.contains("unknown variant `global`"),
            "{e}"
        );
        let e = policy("{requestsPerSecond: 1, scop: mesh}").unwrap_err();
        assert!(e.contains("unknown field `scop`"), "{e}");
    }

    #[test]
    fn mesh_scope_splits_rate_and_burst() {
        let limit = |scope, burst| super::ServiceRateLimit {
            requests_per_second: 100.0,
            burst,
            key: Default::default(),
            max_keys: None,
            scope,
        };
        let mesh = limit(super::RateLimitScope::Mesh, Some(12));
        for (n, rps, burst) in [
            (0, 100.0, 12),
            (1, 100.0, 12),
            (2, 50.0, 6),
            (3, 100.0 / 3.0, 4),
            (5, 20.0, 2),
            (40, 2.5, 1),
        ] {
            let share = mesh.share(n);
            assert!((share.requests_per_second - rps).abs() < 1e-9, "{n}: {share:?}");
            assert_eq!(share.burst, Some(burst), "{n}");
        }
        // the default burst (a tenth of the whole limit) is split too
        assert_eq!(limit(super::RateLimitScope::Mesh, None).share(2).burst, Some(5));
        // local scope: every proxy has the whole limit, whatever the count
        let local = limit(super::RateLimitScope::Local, None).share(3);
        assert_eq!((local.requests_per_second, local.burst), (100.0, Some(10)));
        // the shares add up to the whole
        let total: f64 = (0..3).map(|_| mesh.share(3).requests_per_second).sum();
        assert!((total - 100.0).abs() < 1e-9);
    }
}
