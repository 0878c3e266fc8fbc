//! A Service's `BackendPolicy` as the request path uses it: the circuit breaker, outlier
//! detector, retry budget and adaptive concurrency limit, and the metrics of these layers. A
//! Service without a policy has none of this (`WeightedBackend::policy` is `None`).

use crate::balance::{Balancer, Endpoint};
use crate::budget::RetryBudget;
use crate::circuit::{CircuitBreaker, Overflow, Overflows, Permit, RetryPermit};
use crate::outlier::OutlierDetector;
use crate::pool::SendError;
use crate::shed::{ConcurrencyLimiter, ShedMetrics};
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use smesh_model::Priority;
use std::sync::Arc;

/// Families for the resilience layers, registered with the proxy's other metrics.
pub struct ResilienceMetrics {
    pub circuit_overflows: IntCounterVec,
    pub outlier_ejections: IntCounterVec,
    pub mirrors: IntCounterVec,
    pub faults: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_limit_share: GaugeVec,
    pub load_shed: IntCounterVec,
    pub concurrency_limit: GaugeVec,
    pub concurrency_baseline: GaugeVec,
    pub health_checks: IntCounterVec,
    pub unhealthy_endpoints: IntGaugeVec,
}

impl ResilienceMetrics {
    pub fn register(r: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            r.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let unhealthy_endpoints = IntGaugeVec::new(
            Opts::new(
                "smesh_health_unhealthy_endpoints",
                "Endpoints currently failing their active health checks.",
            ),
            &["service"],
        )
        .expect("valid metric definition");
        r.register(Box::new(unhealthy_endpoints.clone()))
            .expect("metric registered once");
        let rate_limit_share = GaugeVec::new(
            Opts::new(
                "smesh_rate_limit_share_requests_per_second",
                "Requests per second this proxy lets into its Service under the Service's BackendPolicy rateLimit (scope mesh: the limit divided by the Service's live endpoints).",
            ),
            &["service"],
        )
        .expect("valid metric definition");
        r.register(Box::new(rate_limit_share.clone()))
            .expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["service"]).expect("valid metric definition");
            r.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        ResilienceMetrics {
            unhealthy_endpoints,
            rate_limit_share,
            load_shed: counter(
                "smesh_load_shed_total",
                "Requests refused at once because the upstream's adaptive concurrency limit had no room for their priority.",
                &["service", "priority"],
            ),
            concurrency_limit: gauge(
                "smesh_adaptive_concurrency_limit",
                "The adaptive concurrency limit this proxy holds for the service (tries in flight).",
            ),
            concurrency_baseline: gauge(
                "smesh_adaptive_concurrency_baseline_seconds",
                "The service's no-load latency as the adaptive concurrency limit measures it.",
            ),
            rate_limited: counter(
                "smesh_rate_limited_total",
                "Requests refused by a RateLimit filter (route: the filter's route) or by the Service's BackendPolicy rateLimit (route=\"inbound\").",
                &["service", "route"],
            ),
            health_checks: counter(
                "smesh_health_checks_total",
                "Active health checks by result (success, failure).",
                &["service", "result"],
            ),
            circuit_overflows: counter(
                "smesh_circuit_breaker_overflows_total",
                "Requests or retries refused by a circuit breaker, by the limit that was reached.",
                &["service", "kind"],
            ),
            outlier_ejections: counter(
                "smesh_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["service"],
            ),
            mirrors: counter(
                "smesh_mirror_requests_total",
                "Mirrored requests by result (sent, failed, dropped, skipped).",
                &["service", "result"],
            ),
            faults: counter(
                "smesh_faults_injected_total",
                "Requests delayed or aborted by a FaultInjection filter.",
                &["service", "route", "kind"],
            ),
        }
    }
}

pub struct ServicePolicy {
    pub service: Arc<str>,
    /// What it was built from: a reload with the same spec keeps the live state.
    pub spec: smesh_model::BackendPolicySpec,
    pub circuit: Option<Arc<CircuitBreaker>>,
    pub outlier: Option<OutlierDetector>,
    pub budget: Option<Arc<RetryBudget>>,
    /// The adaptive concurrency limit (load shedding by priority).
    pub shed: Option<Arc<ConcurrencyLimiter>>,
    skipped_budget: IntCounter,
    skipped_circuit: IntCounter,
}

impl ServicePolicy {
    /// `previous`: this Service's policy in the snapshot being replaced, if any.
    pub fn build(
        spec: &smesh_model::BackendPolicySpec,
        service: &str,
        endpoints: Arc<Balancer>,
        metrics: &crate::metrics::Metrics,
        previous: Option<&ServicePolicy>,
    ) -> ServicePolicy {
        let same = previous.filter(|p| p.spec == *spec);
        let m = &metrics.resilience;
        let overflow = |kind: &str| m.circuit_overflows.with_label_values(&[service, kind]);
        ServicePolicy {
            service: Arc::from(service),
            spec: spec.clone(),
            circuit: match same {
                Some(p) => p.circuit.clone(),
                None => spec.circuit_breaker.as_ref().map(|c| {
                    Arc::new(CircuitBreaker::new(
                        c,
                        Overflows {
                            requests: overflow("requests"),
                            connections: overflow("connections"),
                            pending: overflow("pending"),
                            retries: overflow("retries"),
                        },
                    ))
                }),
            },
            outlier: spec
                .outlier_detection
                .as_ref()
                .map(|o| OutlierDetector::new(o, endpoints, m.outlier_ejections.with_label_values(&[service]))),
            budget: match same {
                Some(p) => p.budget.clone(),
                None => spec.retry_budget.as_ref().map(|b| Arc::new(RetryBudget::new(b))),
            },
            // The learned limit survives any reload that leaves its settings alone.
            shed: match previous.and_then(|p| p.shed.as_ref()) {
                Some(l) if spec.adaptive_concurrency.as_deref() == Some(&l.spec) => Some(l.clone()),
                _ => spec.adaptive_concurrency.as_ref().map(|a| {
                    let shed = |p: Priority| m.load_shed.with_label_values(&[service, p.as_str()]);
                    Arc::new(ConcurrencyLimiter::new(
                        a,
                        ShedMetrics {
                            shed: [
                                shed(Priority::Critical),
                                shed(Priority::Normal),
                                shed(Priority::Sheddable),
                            ],
                            limit: m.concurrency_limit.with_label_values(&[service]),
                            baseline: m.concurrency_baseline.with_label_values(&[service]),
                        },
                    ))
                }),
            },
            skipped_budget: metrics.retries_skipped.with_label_values(&["budget"]),
            skipped_circuit: metrics.retries_skipped.with_label_values(&["circuit_breaker"]),
        }
    }

    /// Before a try: a circuit-breaker slot (`h1`: the try holds an HTTP/1.1 connection),
    /// and on a request's first try a deposit into the retry budget.
    pub async fn admit(&self, h1: bool, first_try: bool) -> Result<Option<Permit<'_>>, String> {
        if first_try {
            if let Some(b) = &self.budget {
                b.deposit();
            }
        }
        match &self.circuit {
            Some(c) => match c.admit(h1).await {
                Ok(p) => Ok(Some(p)),
                Err(o) => Err(self.overflow_detail(o)),
            },
            None => Ok(None),
        }
    }

    /// Before a try, ahead of the circuit breaker: a slot under the adaptive concurrency
    /// limit for a request of this priority, or the reason it is shed.
    pub fn shed(&self, priority: Priority) -> Result<Option<crate::shed::Permit<'_>>, String> {
        let Some(limiter) = &self.shed else {
            return Ok(None);
        };
        match limiter.admit(priority) {
            Some(permit) => Ok(Some(permit)),
            None => Err(format!(
                "service {:?}: {} request over its share of the concurrency limit {:.1} ({} in flight)",
                self.service,
                priority.as_str(),
                limiter.limit(),
                limiter.in_flight()
            )),
        }
    }

    fn overflow_detail(&self, o: Overflow) -> String {
        format!("service {:?}: {}", self.service, o.describe())
    }

    /// Whether a retry the route's policy asks for may be made: `maxRetries` and the retry
    /// budget. The permit is held while the retry is in flight.
    pub fn retry(&self) -> Option<RetryGrant<'_>> {
        let permit = match &self.circuit {
            Some(c) => match c.retry() {
                Some(p) => Some(p),
                None => {
                    self.skipped_circuit.inc();
                    return None;
                }
            },
            None => None,
        };
        if let Some(b) = &self.budget {
            if !b.withdraw() {
                self.skipped_budget.inc();
                return None;
            }
        }
        Some(RetryGrant { _permit: permit })
    }

    /// Feeds one try's outcome to outlier detection.
    pub fn observe(&self, endpoint: &Endpoint, status: u16) {
        if let Some(o) = &self.outlier {
            o.observe(endpoint, status);
        }
    }
}

/// A retry allowed by the policy; holds its `maxRetries` slot until dropped.
pub struct RetryGrant<'a> {
    _permit: Option<RetryPermit<'a>>,
}

/// The status outlier detection sees for a try: the response's, or 503 for a failed
/// connect, 502 for a failed exchange and 504 for a per-try timeout; none when the endpoint
/// is not to blame (the client's body failed, or a stream was refused unprocessed by a
/// connection going away).
pub fn outcome_status<T>(outcome: &Option<Result<http::Response<T>, SendError>>) -> Option<u16> {
    match outcome {
        Some(Ok(resp)) => Some(resp.status().as_u16()),
        Some(Err(SendError::Connect(..))) => Some(503),
        Some(Err(SendError::Refused(_))) => None,
        Some(Err(SendError::Upstream(e))) if crate::body::is_client_body_error(&**e) => None,
        Some(Err(SendError::Upstream(_))) => Some(502),
        None => Some(504),
    }
}
