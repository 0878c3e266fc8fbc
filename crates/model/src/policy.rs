//! `BackendPolicy`: per-Service resilience settings applied by every proxy that sends to the
//! Service (circuit breaking, outlier detection, the retry budget).

use crate::duration;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

pub type BackendPolicy = crate::Object<BackendPolicySpec>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendPolicySpec {
    /// The Service whose endpoints this policy protects.
    pub target_ref: crate::TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy-style thresholds, counted per proxy across its workers. Unset: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Upstream connections busy with a request at once (each in-flight HTTP/1.1 request
    /// holds one; HTTP/2 multiplexes on one per endpoint and worker and is not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests that may wait for a free `maxRequests`/`maxConnections` slot. Default 0:
    /// overflow fails at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the Service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight to the Service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses or local failures (connect, reset, timeout) that eject an
    /// endpoint. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<u32>,
    /// Consecutive 502/503/504 or local failures that eject. Unset: not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Each healthy interval after an ejection lowers the next ejection's multiplier by one.
    /// Default 10s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// The n-th ejection in a row lasts n x this (at most 300 s or this, whichever is
    /// larger). Default 30s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// At most this share of the Service's endpoints is ejected at once (one endpoint may
    /// always be). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

impl OutlierDetection {
    pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
    pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
}

/// Retries to the Service are allowed while, over the last `ttl`, retries stay below
/// `ratio` x requests + `minRetriesPerSecond` x `ttl` (as in Finagle and Linkerd).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// Default 10s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

impl RetryBudget {
    pub const DEFAULT_RATIO: f64 = 0.2;
    pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
}

/// Checks one BackendPolicy; `fail(field, reason)` records an error.
pub fn validate_backend_policy(p: &BackendPolicy, services: &HashSet<&str>, fail: &mut dyn FnMut(&str, String)) {
    let spec = &p.spec;
    if let Some(kind) = spec.target_ref.kind.as_deref().filter(|k| *k != "Service") {
        fail(
            "spec.targetRef.kind",
            format!("unsupported target kind {kind:?}, expected \"Service\""),
        );
    }
    if !services.contains(spec.target_ref.name.as_str()) {
        fail(
            "spec.targetRef.name",
            format!("no Service named {:?}", spec.target_ref.name),
        );
    }
    if let Some(cb) = &spec.circuit_breaker {
        for (name, v) in [("maxConnections", cb.max_connections), ("maxRequests", cb.max_requests)] {
            if v == Some(0) {
                fail(
                    &format!("spec.circuitBreaker.{name}"),
                    "must be at least 1 (0 would refuse every request)".into(),
                );
            }
        }
    }
    if let Some(o) = &spec.outlier_detection {
        for (name, v) in [
            ("consecutive5xx", o.consecutive5xx),
            ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
        ] {
            if v == Some(0) {
                fail(&format!("spec.outlierDetection.{name}"), "must be at least 1".into());
            }
        }
        for (name, v) in [("interval", o.interval), ("baseEjectionTime", o.base_ejection_time)] {
            if v.is_some_and(|d| d.is_zero()) {
                fail(
                    &format!("spec.outlierDetection.{name}"),
                    "must be greater than 0".into(),
                );
            }
        }
        if let Some(pct) = o.max_ejection_percent.filter(|p| *p > 100) {
            fail(
                "spec.outlierDetection.maxEjectionPercent",
                format!("percent {pct} out of range 0-100"),
            );
        }
    }
    if let Some(b) = &spec.retry_budget {
        if let Some(r) = b.ratio.filter(|r| !(0.0..=1000.0).contains(r)) {
            fail("spec.retryBudget.ratio", format!("ratio {r} out of range 0-1000"));
        }
        if b.ttl
            .is_some_and(|t| t < Duration::from_secs(1) || t > Duration::from_secs(60))
        {
            fail("spec.retryBudget.ttl", "ttl must be between 1s and 60s".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{load, Resource};

    const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001}]\n";

    fn load_policy(spec: &str) -> Result<Vec<crate::Sourced>, String> {
        let text =
            format!("{SERVICE}---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n{spec}");
        load("mesh.yaml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_and_round_trips() {
        let items = load_policy(
            "  targetRef: {name: api}\n  circuitBreaker: {maxConnections: 5, maxPendingRequests: 2, maxRequests: 10, maxRetries: 3}\n  outlierDetection: {consecutive5xx: 3, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}\n  retryBudget: {ratio: 0.2, minRetriesPerSecond: 10, ttl: 10s}\n",
        )
        .expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!("not a BackendPolicy")
        };
        assert_eq!(p.spec.circuit_breaker.as_ref().unwrap().max_requests, Some(10));
        let yaml = crate::to_yaml([&items[1].resource]);
        let again = crate::parse("again.yaml", &yaml).expect("round trip");
        assert_eq!(again[0].resource, items[1].resource);
    }

    #[test]
    fn rejects_bad_policies() {
        let e = load_policy("  targetRef: {name: nope}\n  circuitBreaker: {maxRequests: 0}\n  outlierDetection: {maxEjectionPercent: 150, interval: 0s}\n  retryBudget: {ratio: -1, ttl: 100ms}\n").unwrap_err();
        for want in [
            "spec.targetRef.name: no Service named \"nope\"",
            "spec.circuitBreaker.maxRequests: must be at least 1",
            "spec.outlierDetection.maxEjectionPercent",
            "spec.outlierDetection.interval",
            "spec.retryBudget.ratio",
            "spec.retryBudget.ttl",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        let e = load_policy("  targetRef: {name: api}\n  circuitBreaker: {maxRequest: 3}\n").unwrap_err();
        assert!(e.contains("unknown field `maxRequest`"), "{e}");
    }
}
