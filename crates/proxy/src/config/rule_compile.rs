//! One route rule of a Service compiled into the [`Rule`] the request path reads: its
//! backends (subsets, protocols, BackendPolicies), filters and RateLimit buckets (carried
//! over from the previous snapshot when unchanged).

use crate::balance::Balancer;
use crate::config::snapshot::Snapshot;
use crate::resilience::policy::ServicePolicy;
use crate::route::rule::{RetryPolicy, Rule, WeightedBackend};
use crate::telemetry::metrics::Metrics;
use rustc_hash::FxHashMap;
use smesh_model::{HttpRouteRule, Protocol};
use std::sync::Arc;

/// What compiling one route rule of a Service needs.
pub(super) struct RuleContext<'a> {
    pub(super) service: &'a Arc<str>,
    /// Over all the Service's endpoints.
    pub(super) balancer: &'a Arc<Balancer>,
    pub(super) own_protocol: Option<Protocol>,
    pub(super) policies: &'a FxHashMap<String, Arc<ServicePolicy>>,
    pub(super) balancer_for: &'a crate::route::filters::BalancerFor<'a>,
    pub(super) protocol_of: &'a dyn Fn(&str) -> Option<Protocol>,
    pub(super) metrics: &'a Arc<Metrics>,
    pub(super) previous: &'a Snapshot,
}

impl RuleContext<'_> {
    /// Compiles an HTTPRoute rule (or a GRPCRoute rule lowered to one, with its own `retry`).
    /// `key` names the rule among all routes' rules, for its RateLimit buckets (carried over
    /// from the previous snapshot when unchanged).
    pub(super) fn rule(
        &self,
        rule: &HttpRouteRule,
        retry: Option<RetryPolicy>,
        route: &str,
        key: &str,
        route_metrics: &Arc<crate::telemetry::metrics::RouteMetrics>,
        limiters: &mut FxHashMap<String, Arc<crate::resilience::ratelimit::RateLimiter>>,
    ) -> Arc<Rule> {
        let name = self.service;
        let backends = if rule.backend_refs.is_empty() {
            vec![WeightedBackend {
                weight: 1,
                service: name.clone(),
                balancer: self.balancer.clone(),
                protocol: self.own_protocol,
                policy: self.policies.get(&**name).cloned(),
                subset: None,
            }]
        } else {
            rule.backend_refs
                .iter()
                .map(|b| WeightedBackend {
                    weight: b.weight.unwrap_or(1),
                    service: Arc::from(b.name.as_str()),
                    balancer: (self.balancer_for)(&b.name, &b.subset),
                    protocol: (self.protocol_of)(&b.name),
                    policy: self.policies.get(b.name.as_str()).cloned(),
                    subset: (!b.subset.is_empty()).then(|| Arc::from(smesh_model::subset_text(&b.name, &b.subset))),
                })
                .collect()
        };
        let mut compiled = Rule::new(
            route,
            backends,
            rule.timeouts.clone().unwrap_or_default(),
            retry,
            route_metrics.clone(),
        );
        compiled.priority = rule.priority;
        compiled.upgrades = rule.upgrades.iter().map(|u| Box::from(u.as_str())).collect();
        compiled.filters = crate::route::filters::Filters::compile(
            rule,
            &crate::route::filters::Context {
                service: name,
                route,
                metrics: self.metrics,
                balancer: self.balancer_for,
                protocol: self.protocol_of,
            },
        );
        let mut rate_limits = Vec::new();
        for (i, f) in rule.filters.iter().enumerate() {
            let Some(spec) = &f.rate_limit else { continue };
            let key = format!("{key}/{i}");
            let limiter = match self.previous.limiters.get(&key).filter(|l| l.spec == *spec) {
                Some(l) => l.clone(),
                None => Arc::new(crate::resilience::ratelimit::RateLimiter::new(spec)),
            };
            limiters.insert(key, limiter.clone());
            rate_limits.push(limiter);
        }
        if !rate_limits.is_empty() {
            compiled.rate_limits = Some(Box::new(crate::resilience::ratelimit::RateLimits {
                limiters: rate_limits,
                limited: self
                    .metrics
                    .resilience
                    .rate_limited
                    .with_label_values(&[&**name, route]),
            }));
        }
        Arc::new(compiled)
    }
}
