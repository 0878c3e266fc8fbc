//! Builds what proxies receive: the stored resources, with registered endpoints added to
//! their Services (a registered service without a Service resource gets a plain one).

use crate::keys;
use crate::registry::Registration;
use crate::store::KeyValue;
use smesh_model::{Endpoint, Metadata, Object, Resource, ServiceSpec, API_VERSION};
use std::collections::BTreeMap;

/// Parses stored resources; a value that no longer parses is skipped and logged (it was
/// validated when written, so this means a newer writer or a damaged store).
pub fn stored_resources(kvs: &[KeyValue]) -> Vec<Resource> {
    kvs.iter()
        .filter(|kv| kv.key.starts_with(keys::RESOURCES))
        .filter_map(|kv| {
            let text = String::from_utf8_lossy(&kv.value);
            match smesh_model::parse(&kv.key, &text) {
                Ok(mut items) if items.len() == 1 => Some(items.remove(0).resource),
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "skipping unreadable stored resource");
                    None
                }
            }
        })
        .collect()
}

pub fn registrations(kvs: &[KeyValue]) -> Vec<Registration> {
    kvs.iter()
        .filter(|kv| kv.key.starts_with(keys::REGISTRY))
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect()
}

/// The effective resources: Services carry static and registered endpoints.
pub fn compose(kvs: &[KeyValue]) -> Vec<Resource> {
    let mut resources = stored_resources(kvs);
    let mut by_service: BTreeMap<String, Vec<Registration>> = BTreeMap::new();
    for r in registrations(kvs) {
        by_service.entry(r.service.clone()).or_default().push(r);
    }
    for resource in &mut resources {
        if let Resource::Service(s) = resource {
            if let Some(regs) = by_service.remove(&s.metadata.name) {
                add_endpoints(&mut s.spec, regs);
            }
        }
    }
    for (name, regs) in by_service {
        let mut spec = ServiceSpec::default();
        add_endpoints(&mut spec, regs);
        resources.push(Resource::Service(Object {
            api_version: API_VERSION.to_string(),
            kind: "Service".to_string(),
            metadata: Metadata {
                name,
                labels: BTreeMap::new(),
            },
            spec,
        }));
    }
    resources
}

fn add_endpoints(spec: &mut ServiceSpec, regs: Vec<Registration>) {
    for r in regs {
        // A static endpoint with the same address wins: validation forbids duplicates.
        if spec.endpoints.iter().any(|e| e.address == r.address) {
            continue;
        }
        spec.endpoints.push(Endpoint {
            address: r.address,
            weight: (r.weight > 0).then_some(r.weight),
            labels: r.labels,
            identity: (!r.identity.is_empty()).then_some(r.identity),
        });
    }
}
