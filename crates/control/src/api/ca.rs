//! CA root rotation through the admin API.
//!
//! `POST /api/v1/ca/rotate` makes a new signing root and keeps the old one trusted; every
//! proxy gets the two-root bundle pushed with its configuration and renews onto the new
//! root within two thirds of a certificate lifetime. `POST /api/v1/ca/retire` then drops
//! the old roots, refusing while certificates they signed are still valid (unless forced).
//! `GET /api/v1/ca` shows the roots.

use super::{require_read, require_token, ApiError, Shared};
use crate::ca::Ca;
use crate::identity::IssuedCertificate;
use crate::keys;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe_root(pem: &str) -> Value {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Some(der) = crate::ca::pem_to_der(pem) else {
        return json!({"error": "not PEM"});
    };
    let not_after = X509Certificate::from_der(&der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp());
    json!({"sha256": crate::ca::fingerprint(&der), "not_after_unix": not_after})
}

fn describe(ca: &Ca) -> Value {
    json!({
        "trust_domain": ca.trust_domain,
        "root": describe_root(&ca.root_pem),
        "previous": ca.previous.roots.iter().map(|p| describe_root(p)).collect::<Vec<_>>(),
        "rotated_unix": (ca.previous.rotated_unix > 0).then_some(ca.previous.rotated_unix),
        "from_files": ca.from_files,
        "bundle_pem": ca.bundle_pem(),
    })
}

/// `GET /api/v1/ca`: the signing root, the roots still trusted, the public bundle.
pub async fn show(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_read(&state, peer, &headers)?;
    Ok(Json(describe(&state.ca.load())))
}

fn refuse_files(ca: &Ca) -> Result<(), ApiError> {
    if ca.from_files {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the CA root comes from --ca-cert/--ca-key files: rotate it by restarting with new files".into(),
        ));
    }
    Ok(())
}

/// `POST /api/v1/ca/rotate`.
pub async fn rotate(State(state): State<Shared>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    require_token(&state, &headers)?;
    let current = state.ca.load_full();
    refuse_files(&current)?;
    let next = crate::ca::rotate(state.store.as_ref(), &current.trust_domain)
        .await
        .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    tracing::info!(trusted_roots = 1 + next.previous.roots.len(), "CA root rotated");
    let body = describe(&next);
    // This replica signs with the new root at once; the others follow the store.
    state.ca.store(Arc::new(next));
    Ok(Json(body))
}

#[derive(Deserialize)]
pub struct RetireQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /api/v1/ca/retire[?force=true]`.
pub async fn retire(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<RetireQuery>,
) -> Result<Json<Value>, ApiError> {
    require_token(&state, &headers)?;
    let current = state.ca.load_full();
    refuse_files(&current)?;
    if current.previous.roots.is_empty() {
        return Err(ApiError(StatusCode::CONFLICT, "no previous root to retire".into()));
    }
    if !query.force {
        // Issued-certificate records live as long as the certificates do.
        let (records, _) = state.store.list(keys::CERTIFICATES).await?;
        let now = now();
        let signing = current.root_fingerprint();
        // Older records do not say which root signed them: by time, then.
        let by_old_root = |c: &IssuedCertificate| match &c.root_sha256 {
            Some(root) => *root != signing,
            None => c.issued_unix <= current.previous.rotated_unix,
        };
        let old: Vec<IssuedCertificate> = records
            .iter()
            .filter_map(|kv| serde_json::from_slice::<IssuedCertificate>(&kv.value).ok())
            .filter(|c| c.not_after_unix > now && by_old_root(c))
            .collect();
        if let Some(last) = old.iter().map(|c| c.not_after_unix).max() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{} certificates signed before the rotation are still valid (the last for {} s more): \
                     their proxies would be cut off; wait for them to renew, or retire with ?force=true",
                    old.len(),
                    last - now
                ),
            ));
        }
    }
    let next = crate::ca::retire(state.store.as_ref(), &current.trust_domain)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    tracing::info!("previous CA roots retired");
    let body = describe(&next);
    state.ca.store(Arc::new(next));
    Ok(Json(body))
}
