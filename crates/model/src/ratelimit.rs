//! The `RateLimit` HTTPRoute filter (smesh's own, next to `FaultInjection`): a local token
//! bucket per proxy, keyed by route, by source or by a header value.

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
}
