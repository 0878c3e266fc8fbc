//! `BackendPolicy`: per-Service resilience settings applied by every proxy that sends to the
//! Service (circuit breaking, outlier detection, the retry budget, active health checks,
//! adaptive concurrency), and one applied by the Service's own proxies to what they let in
//! (`rateLimit`).

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheck>>,
    /// Enforced on the inbound side by the proxies registered for the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::ServiceRateLimit>,
    /// A concurrency limit learned from latency; sheds the lowest priority first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<Box<crate::AdaptiveConcurrency>>,
    /// How connections to the Service's endpoints are made and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<Box<ConnectionPool>>,
}

/// Upstream connection settings; unset fields keep the proxy's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// TCP connect (and mesh TLS handshake) timeout. Default: the proxy's `--connect-timeout`.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// An idle HTTP/1.1 connection is closed after this long. Default 60s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed when their
    /// request ends. 0: no reuse (a connection per request). Default 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_per_endpoint: Option<u32>,
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

/// Active health checks: each proxy probes every endpoint of the Service every `interval`;
/// `unhealthyThreshold` failures in a row take it out of balancing, `healthyThreshold`
/// passes in a row bring it back. Exactly one of `http`, `grpc`, `tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    /// Default 5s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Each check's limit. Default 1s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
    pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
}

/// `GET path`; passes when the status is one of `expectedStatuses` (default `[200]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHealthCheck {
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

/// `grpc.health.v1.Health/Check` for `service` (default "": the server as a whole); passes
/// on SERVING.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthCheck {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

/// Passes when a TCP connection can be made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

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
    if let Some(h) = &spec.health_check {
        let kinds = [h.http.is_some(), h.grpc.is_some(), h.tcp.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            fail("spec.healthCheck", "give exactly one of http, grpc, tcp".into());
        }
        if let Some(x) = &h.http {
            if !x.path.starts_with('/') || x.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                fail(
                    "spec.healthCheck.http.path",
                    format!("path {:?} must start with / and have no spaces", x.path),
                );
            }
            for s in x.expected_statuses.iter().filter(|s| !(100..=599).contains(*s)) {
                fail(
                    "spec.healthCheck.http.expectedStatuses",
                    format!("status {s} out of range 100-599"),
                );
            }
        }
        for (name, v) in [("interval", h.interval), ("timeout", h.timeout)] {
            if v.is_some_and(|d| d < Duration::from_millis(10)) {
                fail(&format!("spec.healthCheck.{name}"), "must be at least 10ms".into());
            }
        }
        for (name, v) in [
            ("unhealthyThreshold", h.unhealthy_threshold),
            ("healthyThreshold", h.healthy_threshold),
        ] {
            if v == Some(0) {
                fail(&format!("spec.healthCheck.{name}"), "must be at least 1".into());
            }
        }
    }
    if let Some(r) = &spec.rate_limit {
        crate::ratelimit::validate_service_rate_limit("spec.rateLimit", r, fail);
    }
    if let Some(a) = &spec.adaptive_concurrency {
        crate::qos::validate_adaptive_concurrency("spec.adaptiveConcurrency", a, fail);
    }
    if let Some(c) = &spec.connection_pool {
        for (name, v) in [("connectTimeout", c.connect_timeout), ("idleTimeout", c.idle_timeout)] {
            if v.is_some_and(|d| d < Duration::from_millis(1)) {
                fail(&format!("spec.connectionPool.{name}"), "must be at least 1ms".into());
            }
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
    use std::time::Duration;

    const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001}]\n";

    fn load_policy(spec: &str) -> Result<Vec<crate::Sourced>, String> {
        let text =
            format!("{SERVICE}---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n{spec}");
        load("mesh.yaml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_and_round_trips() {
        let items = load_policy(
            "  targetRef: {name: api}\n  circuitBreaker: {maxConnections: 5, maxPendingRequests: 2, maxRequests: 10, maxRetries: 3}\n  outlierDetection: {consecutive5xx: 3, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}\n  retryBudget: {ratio: 0.2, minRetriesPerSecond: 10, ttl: 10s}\n  healthCheck: {http: {path: /healthz, expectedStatuses: [200, 204]}, interval: 1s, timeout: 500ms, unhealthyThreshold: 2, healthyThreshold: 1}\n",
        )
        .expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!("not a BackendPolicy")
        };
        assert_eq!(p.spec.circuit_breaker.as_ref().unwrap().max_requests, Some(10));
        let h = p.spec.health_check.as_ref().unwrap();
        assert_eq!(h.http.as_ref().unwrap().expected_statuses, [200, 204]);
        assert_eq!(h.timeout, Some(Duration::from_millis(500)));
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
        let e = load_policy("  targetRef: {name: api}\n  healthCheck: {http: {path: x, expectedStatuses: [700]}, tcp: {}, interval: 1ms, healthyThreshold: 0}\n").unwrap_err();
        for want in [
            "spec.healthCheck: give exactly one of http, grpc, tcp",
            "spec.healthCheck.http.path",
            "spec.healthCheck.http.expectedStatuses: status 700",
            "spec.healthCheck.interval: must be at least 10ms",
            "spec.healthCheck.healthyThreshold",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        assert!(load_policy("  targetRef: {name: api}\n  healthCheck: {grpc: {}}\n").is_ok());
        assert!(load_policy("  targetRef: {name: api}\n  healthCheck: {tcp: {}}\n").is_ok());
        let e = load_policy("  targetRef: {name: api}\n  circuitBreaker: {maxRequest: 3}\n").unwrap_err();
        assert!(e.contains("unknown field `maxRequest`"), "{e}");
    }
}
