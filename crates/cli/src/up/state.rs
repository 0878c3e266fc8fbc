//! What earlier demos left in the data directory: `--reset` deletes it; otherwise the demo
//! says which stored resources it kept, and when it is not ready, which policy refused it.

use super::Remote;
use std::net::SocketAddr;
use std::path::Path;

/// The demo's own resources (see `RESOURCES`): not worth reporting as kept.
const OWN: &[(&str, &str)] = &[
    ("Service", "web"),
    ("Service", "api"),
    ("Service", "db"),
    ("HTTPRoute", "api-canary"),
];

/// Deletes everything in `data` but the lock this demo holds (so no demo runs there).
pub fn reset(data: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(data).map_err(|e| format!("cannot read {}: {e}", data.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name() == super::guard::LOCK_FILE {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| format!("--reset: cannot delete {}: {e}", path.display()))?;
    }
    eprintln!("--reset: deleted the state of earlier demos in {}", data.display());
    Ok(())
}

/// Whether an earlier demo left a store here.
pub fn has_state(data: &Path) -> bool {
    data.join("smesh.redb").exists()
}

/// "Kind/name" of each stored resource that is not one of the demo's own.
pub fn kept_resources(remote: &Remote) -> Vec<String> {
    let Ok(control) = crate::client::Control::new(remote.url, None, Some(remote.ca)) else {
        return Vec::new();
    };
    let list = async {
        let mut kept = Vec::new();
        for kind in smesh_model::Resource::KINDS {
            let reply = control.get(&format!("/api/v1/resources/{kind}")).await?.json()?;
            for item in reply["items"].as_array().into_iter().flatten() {
                let name = item["metadata"]["name"].as_str().unwrap_or("?");
                if !OWN.contains(&(kind, name)) {
                    kept.push(format!("{kind}/{name}"));
                }
            }
        }
        Ok(kept)
    };
    crate::commands::block_on(list).unwrap_or_default()
}

/// `error` (the demo is not ready), with the policies that denied its requests and, when
/// earlier state was kept, what was kept and `--reset`.
pub fn not_ready_hint(error: String, kept_state: bool, kept: &[String], admins: &[(&str, SocketAddr)]) -> String {
    let mut out = error;
    for (proxy, admin) in admins {
        for (service, policy, count) in denials(*admin) {
            // "default": no policy matched, and the service's Allow policies or the mesh's
            // `defaultPolicy: deny` decided.
            let by = if policy == "default" {
                "the default policy (no AuthorizationPolicy allowed them)".to_string()
            } else {
                format!("AuthorizationPolicy {policy:?}")
            };
            out.push_str(&format!(
                "\n{proxy} denied {count} request(s) to {service} by {by} \
                 (smesh_authz_decisions_total at http://{admin}/metrics)."
            ));
        }
    }
    if kept_state {
        let what = if kept.is_empty() {
            "its state".to_string()
        } else {
            kept.join(", ")
        };
        out.push_str(&format!(
            "\nThis demo kept what earlier demos stored ({what}); `smesh up --reset` starts from a clean state."
        ));
    }
    out
}

/// (service, policy, count) of each denying `smesh_authz_decisions_total` series of a proxy.
fn denials(admin: SocketAddr) -> Vec<(String, String, String)> {
    let Ok(metrics) = super::http_get(admin, "/metrics", "admin") else {
        return Vec::new();
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("smesh_authz_decisions_total{") && l.contains("decision=\"deny\""))
        .map(|l| {
            let label = |k: &str| {
                l.split(&format!("{k}=\"")[..])
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("?")
                    .to_string()
            };
            let count = l.rsplit(' ').next().unwrap_or("?").to_string();
            (label("service"), label("policy"), count)
        })
        .collect()
}
