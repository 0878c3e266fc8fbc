//! `GET /api/v1/check` (and `smesh check`): is the mesh healthy? The CA root's remaining
//! life, certificates that should have been renewed by now, proxies that front a service
//! without an identity, and proxies that rejected the configuration they were sent (they keep
//! serving their previous one, so the change is not in effect there).

use super::{require_read, ApiError, Shared};
use crate::identity::IssuedCertificate;
use crate::keys;
use crate::registry::ProxyStatus;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A root with less than this much life left is reported.
const ROOT_WARNING_SECS: u64 = 30 * 24 * 3600;

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn check(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_read(&state, peer, &headers)?;
    let mut checks = Vec::new();
    let now = now();

    let root_left = state.ca.load().root_not_after().map(|t| t.saturating_sub(now));
    checks.push(match root_left {
        Some(left) if left > ROOT_WARNING_SECS => Check {
            name: "ca",
            ok: true,
            detail: format!("root valid for {} more days", left / 86400),
        },
        Some(left) => Check {
            name: "ca",
            ok: false,
            detail: format!("root expires in {} hours: rotate it", left / 3600),
        },
        None => Check {
            name: "ca",
            ok: false,
            detail: "no CA loaded".into(),
        },
    });

    // The newest certificate of each service should be in the first two thirds of its life:
    // past that, its proxies' renewals are failing.
    let (certs, _) = state.store.list(keys::CERTIFICATES).await?;
    let mut newest: BTreeMap<String, IssuedCertificate> = BTreeMap::new();
    for kv in &certs {
        if let Ok(c) = serde_json::from_slice::<IssuedCertificate>(&kv.value) {
            if newest
                .get(&c.service)
                .is_none_or(|n| n.not_after_unix < c.not_after_unix)
            {
                newest.insert(c.service.clone(), c);
            }
        }
    }
    let stale: Vec<String> = newest
        .values()
        .filter(|c| {
            let lifetime = c.not_after_unix.saturating_sub(c.issued_unix).max(1);
            c.not_after_unix.saturating_sub(now) < lifetime / 3
        })
        .map(|c| format!("{} (expires in {}s)", c.spiffe_id, c.not_after_unix.saturating_sub(now)))
        .collect();
    checks.push(Check {
        name: "certificates",
        ok: stale.is_empty(),
        detail: if stale.is_empty() {
            format!("{} services with current certificates", newest.len())
        } else {
            format!("not renewed in time: {}", stale.join(", "))
        },
    });

    let (proxies, _) = state.store.list(keys::PROXIES).await?;
    let proxies: Vec<ProxyStatus> = proxies
        .iter()
        .filter_map(|kv| serde_json::from_slice::<ProxyStatus>(&kv.value).ok())
        .collect();
    let missing: Vec<String> = proxies
        .iter()
        .filter(|p| !p.service.is_empty() && p.identity.is_empty())
        .map(|p| format!("{} ({})", p.proxy_id, p.service))
        .collect();
    checks.push(Check {
        name: "proxies",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            format!(
                "{} proxies connected, every registered one has an identity",
                proxies.len()
            )
        } else {
            format!("without an identity: {}", missing.join(", "))
        },
    });
    checks.push(rejected_configuration(&proxies));
    let ok = checks.iter().all(|c| c.ok);
    Ok(Json(serde_json::json!({"ok": ok, "checks": checks})))
}

/// Proxies whose newest answer was a nack: the version they rejected, and why.
fn rejected_configuration(proxies: &[ProxyStatus]) -> Check {
    let nacked: Vec<String> = proxies
        .iter()
        .filter(|p| p.nacked_version > p.acked_version)
        .map(|p| {
            let who = if p.service.is_empty() {
                p.proxy_id.clone()
            } else {
                format!("{} ({})", p.proxy_id, p.service)
            };
            format!("{who} rejected version {}: {}", p.nacked_version, p.last_error)
        })
        .collect();
    Check {
        name: "config",
        ok: nacked.is_empty(),
        detail: if nacked.is_empty() {
            "every proxy accepted its newest configuration".into()
        } else {
            format!("{}; they keep serving their previous configuration", nacked.join("; "))
        },
    }
}
