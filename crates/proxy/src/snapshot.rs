//! A configuration snapshot: resources compiled into the tables the request path reads.
//! Built off the request path, then swapped in atomically; never mutated afterwards.

use crate::balance::{Balancer, Endpoint, EndpointStats};
use crate::metrics::Metrics;
use crate::policy::ServicePolicy;
use crate::route::{RetryPolicy, RouteMatch, Rule, WeightedBackend};
use rustc_hash::FxHashMap;
use smesh_model::{HttpRoute, MtlsMode, Protocol, Resource, Service, Sourced};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Snapshot {
    pub generation: u64,
    /// From the MeshConfig, if any.
    pub mtls: MtlsMode,
    pub authz: crate::authz::AuthzTable,
    /// The resources this snapshot was built from, for `/config`.
    pub resources: Vec<Resource>,
    services: Vec<ServiceTable>,
    by_name: FxHashMap<String, usize>,
    /// Host names are configuration, not request data: FxHash is safe and cheap here.
    by_host: FxHashMap<String, usize>,
    /// BackendPolicies by target Service (state carried over by the next build).
    policies: FxHashMap<String, Arc<ServicePolicy>>,
    /// RateLimit filters' buckets by "service/route/rule/filter" (kept by the next build
    /// when the filter is unchanged).
    limiters: FxHashMap<String, Arc<crate::ratelimit::RateLimiter>>,
}

/// Everything needed to route a request addressed to one Service.
pub struct ServiceTable {
    pub name: Arc<str>,
    ports: Vec<(u16, Option<Protocol>)>,
    /// All endpoints, for TCP and CONNECT.
    pub balancer: Arc<Balancer>,
    /// Route matches in Gateway API precedence order, each pointing at its rule.
    matches: Vec<(RouteMatch, Arc<Rule>)>,
}

impl ServiceTable {
    /// The protocol to speak to this service's endpoints: that of the addressed port if it
    /// says, else of the first port that says, else `None` (follow the client).
    pub fn protocol(&self, port: Option<u16>) -> Option<Protocol> {
        port.and_then(|p| self.ports.iter().find(|(q, _)| *q == p).and_then(|(_, proto)| *proto))
            .or_else(|| self.ports.iter().find_map(|(_, proto)| *proto))
    }

    pub fn route<B>(&self, req: &http::Request<B>) -> Option<&Arc<Rule>> {
        self.matches.iter().find(|(m, _)| m.matches(req)).map(|(_, rule)| rule)
    }
}

impl Snapshot {
    pub fn empty() -> Self {
        Snapshot {
            generation: 0,
            mtls: MtlsMode::default(),
            authz: Default::default(),
            resources: Vec::new(),
            services: Vec::new(),
            by_name: FxHashMap::default(),
            by_host: FxHashMap::default(),
            policies: FxHashMap::default(),
            limiters: FxHashMap::default(),
        }
    }

    /// Every endpoint of every Service whose BackendPolicy has a `healthCheck`.
    pub fn health_targets(&self) -> Vec<crate::health::Target> {
        let mut out = Vec::new();
        for (name, policy) in &self.policies {
            let (Some(spec), Some(table)) = (&policy.spec.health_check, self.service(name)) else {
                continue;
            };
            for e in table.balancer.endpoints() {
                out.push(crate::health::Target {
                    service: table.name.clone(),
                    endpoint: e.clone(),
                    spec: (**spec).clone(),
                    protocol: table.protocol(None),
                });
            }
        }
        out
    }

    pub fn service(&self, name: &str) -> Option<&ServiceTable> {
        self.by_name.get(name).map(|&i| &self.services[i])
    }

    /// Finds the service a `Host` / `:authority` value addresses.
    pub fn service_for_host(&self, authority: &str) -> Option<&ServiceTable> {
        let host = authority.trim_end_matches('.');
        let found = self.by_host.get(host).or_else(|| {
            let (bare, _port) = host.rsplit_once(':')?;
            self.by_host.get(bare)
        });
        if let Some(&i) = found {
            return Some(&self.services[i]);
        }
        // Hosts are case-insensitive; only pay for lowercasing when the fast path missed.
        let lower = host.to_ascii_lowercase();
        if lower != host {
            return self.service_for_host(&lower);
        }
        None
    }

    /// Compiles validated resources. Endpoint statistics are carried over from `previous`
    /// for addresses present in both.
    pub fn build(items: &[Sourced], previous: &Snapshot, metrics: &Arc<Metrics>, direction: &str) -> Snapshot {
        let mut stats: HashMap<SocketAddr, Arc<EndpointStats>> = HashMap::new();
        for table in &previous.services {
            for e in table.balancer.endpoints() {
                stats.insert(e.addr, e.stats.clone());
            }
        }
        let services: Vec<&Service> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        let routes: Vec<&HttpRoute> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::HttpRoute(r) => Some(r),
                _ => None,
            })
            .collect();

        let endpoints: HashMap<&str, Vec<Arc<Endpoint>>> = services
            .iter()
            .map(|s| {
                let eps = s
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        let addr: SocketAddr = e.address.parse().ok()?;
                        Some(Arc::new(Endpoint {
                            addr,
                            weight: e.weight.unwrap_or(1),
                            labels: e.labels.clone(),
                            stats: stats.entry(addr).or_default().clone(),
                            server_name: e.identity.as_deref().and_then(crate::identity::server_name),
                        }))
                    })
                    .collect();
                (s.metadata.name.as_str(), eps)
            })
            .collect();
        let lb_of: HashMap<&str, &Service> = services.iter().map(|s| (s.metadata.name.as_str(), *s)).collect();
        let balancer_for = |service: &str, subset: &BTreeMap<String, String>| -> Arc<Balancer> {
            let eps = endpoints.get(service).cloned().unwrap_or_default();
            let eps = eps
                .into_iter()
                .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                .collect();
            let algorithm = lb_of.get(service).map(|s| s.spec.load_balancer).unwrap_or_default();
            Arc::new(Balancer::new(eps, algorithm))
        };

        let protocol_of = |service: &str| -> Option<Protocol> {
            lb_of
                .get(service)
                .and_then(|s| s.spec.ports.iter().find_map(|p| p.protocol))
        };
        // BackendPolicies: if several target one Service, the first applies.
        let mut policies: FxHashMap<String, Arc<ServicePolicy>> = FxHashMap::default();
        for item in items {
            if let Resource::BackendPolicy(p) = &item.resource {
                let target = p.spec.target_ref.name.as_str();
                if !policies.contains_key(target) && lb_of.contains_key(target) {
                    let all = balancer_for(target, &BTreeMap::new());
                    let previous = previous.policies.get(target).map(|p| &**p);
                    let built = ServicePolicy::build(&p.spec, target, all, metrics, previous);
                    policies.insert(target.to_string(), Arc::new(built));
                }
            }
        }
        let mut limiters: FxHashMap<String, Arc<crate::ratelimit::RateLimiter>> = FxHashMap::default();
        let mut tables = Vec::new();
        let mut by_name = FxHashMap::default();
        let mut by_host = FxHashMap::default();
        for (index, s) in services.iter().enumerate() {
            let name: Arc<str> = Arc::from(s.metadata.name.as_str());
            let balancer = balancer_for(&name, &BTreeMap::new());
            let own_protocol = protocol_of(&name);
            let mut matches = Vec::new();
            for route in routes
                .iter()
                .filter(|r| r.spec.parent_refs.iter().any(|p| p.name == *name))
            {
                let route_metrics = Arc::new(metrics.route(direction, &name, &route.metadata.name));
                for (rule_index, rule) in route.spec.rules.iter().enumerate() {
                    let backends = if rule.backend_refs.is_empty() {
                        vec![WeightedBackend {
                            weight: 1,
                            service: name.clone(),
                            balancer: balancer.clone(),
                            protocol: own_protocol,
                            policy: policies.get(&*name).cloned(),
                        }]
                    } else {
                        rule.backend_refs
                            .iter()
                            .map(|b| WeightedBackend {
                                weight: b.weight.unwrap_or(1),
                                service: Arc::from(b.name.as_str()),
                                balancer: balancer_for(&b.name, &b.subset),
                                protocol: protocol_of(&b.name),
                                policy: policies.get(b.name.as_str()).cloned(),
                            })
                            .collect()
                    };
                    let mut compiled = Rule::new(
                        route.metadata.name.as_str(),
                        backends,
                        rule.timeouts.clone().unwrap_or_default(),
                        rule.retry.as_ref().map(RetryPolicy::from),
                        route_metrics.clone(),
                    );
                    compiled.filters = crate::filters::Filters::compile(
                        rule,
                        &crate::filters::Context {
                            service: &name,
                            route: &route.metadata.name,
                            metrics,
                            balancer: &balancer_for,
                            protocol: &protocol_of,
                        },
                    );
                    let mut rate_limits = Vec::new();
                    for (i, f) in rule.filters.iter().enumerate() {
                        let Some(spec) = &f.rate_limit else { continue };
                        let key = format!("{name}/{}/{rule_index}/{i}", route.metadata.name);
                        let limiter = match previous.limiters.get(&key).filter(|l| l.spec == *spec) {
                            Some(l) => l.clone(),
                            None => Arc::new(crate::ratelimit::RateLimiter::new(spec)),
                        };
                        limiters.insert(key, limiter.clone());
                        rate_limits.push(limiter);
                    }
                    if !rate_limits.is_empty() {
                        compiled.rate_limits = Some(Box::new(crate::ratelimit::RateLimits {
                            limiters: rate_limits,
                            limited: metrics
                                .resilience
                                .rate_limited
                                .with_label_values(&[&*name, route.metadata.name.as_str()]),
                        }));
                    }
                    let compiled = Arc::new(compiled);
                    if rule.matches.is_empty() {
                        matches.push((RouteMatch::everything(), compiled));
                    } else {
                        for m in &rule.matches {
                            matches.push((RouteMatch::compile(m), compiled.clone()));
                        }
                    }
                }
                for host in &route.spec.hostnames {
                    by_host.entry(host.to_ascii_lowercase()).or_insert(index);
                }
            }
            if matches.is_empty() {
                let rule = Rule::new(
                    "default",
                    vec![WeightedBackend {
                        weight: 1,
                        service: name.clone(),
                        balancer: balancer.clone(),
                        protocol: own_protocol,
                        policy: policies.get(&*name).cloned(),
                    }],
                    Default::default(),
                    None,
                    Arc::new(metrics.route(direction, &name, "default")),
                );
                matches.push((RouteMatch::everything(), Arc::new(rule)));
            }
            // Stable sort: equal precedence keeps file order.
            matches.sort_by_key(|(m, _)| m.precedence());

            by_host.insert(name.to_string(), index);
            for host in &s.spec.hostnames {
                by_host.insert(host.to_ascii_lowercase(), index);
            }
            for p in &s.spec.ports {
                by_host.insert(format!("{name}:{}", p.port), index);
                for host in &s.spec.hostnames {
                    by_host.insert(format!("{}:{}", host.to_ascii_lowercase(), p.port), index);
                }
            }
            by_name.insert(name.to_string(), index);
            tables.push(ServiceTable {
                name,
                ports: s.spec.ports.iter().map(|p| (p.port, p.protocol)).collect(),
                balancer,
                matches,
            });
        }
        let mtls = items
            .iter()
            .find_map(|i| match &i.resource {
                Resource::MeshConfig(m) => Some(m.spec.mtls),
                _ => None,
            })
            .unwrap_or_default();
        Snapshot {
            generation: previous.generation + 1,
            mtls,
            authz: crate::authz::AuthzTable::build(items),
            resources: items.iter().map(|i| i.resource.clone()).collect(),
            services: tables,
            by_name,
            by_host,
            policies,
            limiters,
        }
    }
}
