//! `POST /api/v1/tokens`: join tokens for the Identity service ([`crate::identity`]).

use super::{require_token, ApiError, Shared};
use crate::identity::{token_key, unix, StoredToken};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use std::time::{Duration, SystemTime};

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
pub struct TokenRequest {
    service: String,
    /// e.g. "1h"; default one hour.
    ttl: Option<String>,
}

/// Checks a token request; the token's expiry (Unix seconds) when issued at `now`.
pub(crate) fn token_expiry(req: &TokenRequest, now: SystemTime) -> Result<u64, ApiError> {
    smesh_model::validate_name(&req.service).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("service: {e}")))?;
    let ttl = match req.ttl.as_deref() {
        Some(t) => humantime::parse_duration(t).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("ttl: {e}")))?,
        None => DEFAULT_TOKEN_TTL,
    };
    // humantime reads up to 2^64 s (`300000000000y`), past what SystemTime can hold.
    now.checked_add(ttl)
        .map(unix)
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, format!("ttl: {ttl:?} is too long")))
}

/// `POST /api/v1/tokens`: a new single-use join token for a service.
pub async fn create_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<TokenRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    require_token(&state, &headers)?;
    let expires_unix = token_expiry(&req, SystemTime::now())?;
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let stored = StoredToken {
        service: req.service.clone(),
        expires_unix,
        used: false,
    };
    let value = serde_json::to_vec(&stored).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    crate::store::put(state.store.as_ref(), &token_key(&token), value, 0).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"token": token, "service": req.service, "expires_unix": expires_unix})),
    ))
}
