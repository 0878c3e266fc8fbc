//! A Service's `BackendPolicy` as the request path uses it: the circuit breaker, outlier
//! detector, retry budget and adaptive concurrency limit, and the metrics of these layers. A
//! Service without a policy has none of this (`WeightedBackend::policy` is `None`).

use crate::balance::outlier::OutlierDetector;
use crate::balance::{Balancer, Endpoint};
use crate::http::pool::SendError;
use crate::resilience::budget::RetryBudget;
use crate::resilience::circuit::{CircuitBreaker, Overflow, Overflows, Permit, RetryPermit};
use crate::resilience::shed::{ConcurrencyLimiter, ShedMetrics};
use prometheus::IntCounter;
use smesh_model::Priority;
use std::sync::Arc;

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
        metrics: &crate::telemetry::metrics::Metrics,
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
    pub fn shed(&self, priority: Priority) -> Result<Option<crate::resilience::shed::Permit<'_>>, String> {
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
        Some(Err(SendError::Upstream(e))) if crate::http::body::is_client_body_error(&**e) => None,
        Some(Err(SendError::Upstream(_))) => Some(502),
        None => Some(504),
    }
}
