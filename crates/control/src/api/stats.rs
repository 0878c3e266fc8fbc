//! `GET /api/v1/stats/{services,routes,edges,proxies}?window=1m&name=X`: the golden metrics
//! of the mesh's last closed windows (`crate::stats::views`). A read: open on loopback.

use super::{require_read, ApiError, Shared};
use crate::stats::views::{report, View};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Deserialize)]
pub(super) struct StatsQuery {
    /// How far back: `10s` .. `1h` (default `1m`), rounded up to whole windows.
    window: Option<String>,
    /// Only the groups this names (a service, a route, either end of an edge, a proxy).
    name: Option<String>,
}

pub(super) async fn stats(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(view): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<crate::stats::views::Report>, ApiError> {
    require_read(&state, peer, &headers)?;
    let view = View::parse(&view).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no stats view {view:?}: services, routes, edges or proxies"),
        )
    })?;
    let window = match q.window.as_deref() {
        None | Some("") => std::time::Duration::from_secs(60),
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid window {w:?}: {e}")))?,
    };
    let name = q.name.as_deref().filter(|n| !n.is_empty());
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    Ok(Json(report(
        &state.stats,
        view,
        window_ms,
        name,
        crate::stats::now_ms(),
    )))
}
