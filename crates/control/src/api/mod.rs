//! The HTTP admin API: resources, the KV API, join tokens, the CA, `check` and the stats. Writes need the
//! admin token; reads are open to loopback clients.

pub mod ca;
pub mod check;
pub mod kv;
pub mod resources;
pub mod stats;
pub mod tokens;

use crate::store::{Store, StoreError};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub token: String,
    /// The CA in use (its roots, for `smesh check` and rotation).
    pub ca: crate::ca::CaHandle,
    /// The golden-metric windows the proxies pushed.
    pub stats: Arc<crate::stats::Ring>,
}

pub type Shared = Arc<ApiState>;

pub fn routes(state: Shared) -> Router {
    Router::new()
        .route("/api/v1/apply", axum::routing::post(resources::apply))
        .route("/api/v1/resources/{kind}", get(resources::list_kind))
        .route(
            "/api/v1/resources/{kind}/{name}",
            get(resources::get_one).delete(resources::delete_one),
        )
        .route("/api/v1/endpoints/{service}", get(resources::endpoints))
        .route("/api/v1/proxies", get(resources::proxies))
        .route("/api/v1/tokens", axum::routing::post(tokens::create_token))
        .route("/api/v1/certificates", get(resources::certificates))
        .route("/api/v1/check", get(check::check))
        .route("/api/v1/stats/{view}", get(stats::stats))
        .route("/api/v1/ca", get(ca::show))
        .route("/api/v1/ca/rotate", axum::routing::post(ca::rotate))
        .route("/api/v1/ca/retire", axum::routing::post(ca::retire))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(kv::routes())
        .with_state(state)
}

/// Whatever no route matched. A gRPC call (to a method this server lacks) gets gRPC's
/// UNIMPLEMENTED as before; anything else is a REST path that does not exist: 404 with a JSON
/// error, not an HTTP/2 200 a REST client cannot read.
pub async fn not_found(req: axum::extract::Request) -> Response {
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let (parts, ()) = tonic::Status::unimplemented("").into_http::<()>().into_parts();
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    let body = serde_json::json!({
        "error": "not found",
        "path": req.uri().path(),
        "message": "no such path: the API is under /api/v1/ (apply, resources/KIND, endpoints/SERVICE, \
                    proxies, certificates, tokens, check, ca), /v1/kv/KEY, /v1/watch/kv/PREFIX and /healthz",
    });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// An error as the API returns it: a status and a plain-text body a person can act on.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1.trim_end())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}"))
    }
}

/// Writes need `Authorization: Bearer <token>`.
pub fn require_token(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::UNAUTHORIZED, "invalid admin token".into())),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "writes need the admin token: Authorization: Bearer <token> (smesh --token-file / SMESH_TOKEN)".into(),
        )),
    }
}

/// Reads are open on loopback; from elsewhere they need the token too.
pub fn require_read(state: &ApiState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    if peer.ip().is_loopback() {
        Ok(())
    } else {
        require_token(state, headers)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
