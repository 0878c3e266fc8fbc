//! Route backends that name a label subset (`{name: api, subset: {version: v3}}`) matching
//! no endpoint of their service: valid, but every request to them fails. `apply` and
//! `validate` warn about them, and the proxy names the subset when it has nothing to send to.

use crate::Resource;
use std::collections::BTreeMap;

/// `api{version=v3}`: a service's subset as people read it.
pub fn subset_text(service: &str, subset: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{service}{{{}}}", labels.join(","))
}

/// A warning for each route backend whose subset matches none of its service's endpoints
/// now; `endpoint_labels(service)` lists the labels of each endpoint the service has.
/// A service with no endpoints at all gets no warning (its endpoints may register later).
pub fn empty_subsets<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
    endpoint_labels: impl Fn(&str) -> Vec<BTreeMap<String, String>>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for resource in resources {
        let backends: Vec<(&str, &BTreeMap<String, String>)> = match resource {
            Resource::HttpRoute(r) => r
                .spec
                .rules
                .iter()
                .flat_map(|rule| &rule.backend_refs)
                .map(|b| (b.name.as_str(), &b.subset))
                .collect(),
            Resource::GrpcRoute(r) => r
                .spec
                .rules
                .iter()
                .flat_map(|rule| &rule.backend_refs)
                .map(|b| (b.name.as_str(), &b.subset))
                .collect(),
            _ => continue,
        };
        for (service, subset) in backends.into_iter().filter(|(_, s)| !s.is_empty()) {
            let endpoints = endpoint_labels(service);
            let matches = |labels: &BTreeMap<String, String>| subset.iter().all(|(k, v)| labels.get(k) == Some(v));
            if endpoints.is_empty() || endpoints.iter().any(matches) {
                continue;
            }
            let seen: Vec<String> = endpoints.iter().map(|l| subset_text("", l)).collect();
            let warning = format!(
                "{}/{}: {} matches no endpoint of {service:?} now (its {} endpoint(s) have labels {})",
                resource.kind(),
                resource.name(),
                subset_text(service, subset),
                endpoints.len(),
                seen.join(" ")
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subset_matching_no_endpoint_is_named() {
        let text = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints:\n  - {address: 127.0.0.1:9001, labels: {version: v1}}\n---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - backendRefs: [{name: api, subset: {version: v3}}, {name: api, subset: {version: v1}}]\n";
        let resources: Vec<Resource> = crate::load("t.yaml", text)
            .unwrap()
            .into_iter()
            .map(|s| s.resource)
            .collect();
        let labels = |s: &str| -> Vec<BTreeMap<String, String>> {
            resources
                .iter()
                .filter_map(|r| match r {
                    Resource::Service(svc) if svc.metadata.name == s => Some(svc),
                    _ => None,
                })
                .flat_map(|svc| svc.spec.endpoints.iter().map(|e| e.labels.clone()))
                .collect()
        };
        let warnings = empty_subsets(&resources, labels);
        assert_eq!(
            warnings,
            ["HTTPRoute/r: api{version=v3} matches no endpoint of \"api\" now (its 1 endpoint(s) have labels {version=v1})"]
        );
        assert!(empty_subsets(&resources, |_| Vec::new()).is_empty());
    }
}
