//! The resource API: apply / get / delete resources, endpoints, proxies, certificates.

use super::{require_read, require_token, ApiError, Shared};
use crate::compose::{registrations, stored_resources};
use crate::keys;
use crate::registry::ProxyStatus;
use crate::store::{Compare, Op, Store};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use smesh_model::{ConfigError, Resource, Sourced};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Deserialize)]
struct ApplyFiles {
    files: Vec<ApplyFile>,
}

#[derive(Deserialize)]
struct ApplyFile {
    name: String,
    text: String,
}

#[derive(Deserialize)]
pub(super) struct ApplyQuery {
    /// The file name to use in error messages.
    file: Option<String>,
}

async fn current(store: &dyn Store) -> Result<(Vec<crate::store::KeyValue>, u64), ApiError> {
    Ok(store.list(keys::RESOURCES).await?)
}

fn as_sourced(resources: Vec<Resource>, file: &str) -> Vec<Sourced> {
    resources
        .into_iter()
        .enumerate()
        .map(|(i, resource)| Sourced {
            source: smesh_model::Source {
                file: Arc::from(file),
                document: i + 1,
            },
            resource,
        })
        .collect()
}

fn errors_text(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

/// The resources in an apply request's body (parsed, not yet validated): a YAML file, or with
/// `is_json` several (`{"files": [{"name", "text"}]}`) that stand or fall together. Errors
/// are 400s naming the file, document and field.
pub(crate) fn parse_apply_body(is_json: bool, file: Option<String>, body: &[u8]) -> Result<Vec<Sourced>, ApiError> {
    let files: Vec<ApplyFile> = if is_json {
        serde_json::from_slice::<ApplyFiles>(body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid apply request: {e}")))?
            .files
    } else {
        let name = file.unwrap_or_else(|| "request".into());
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("{name}: not UTF-8 text")))?;
        vec![ApplyFile { name, text }]
    };
    let mut new = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        match smesh_model::parse(&f.name, &f.text) {
            Ok(items) => new.extend(items),
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, errors_text(&errors)));
    }
    if new.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "no resources to apply".into()));
    }
    Ok(new)
}

/// All or nothing: the new resources are validated together with everything stored (so
/// references resolve), then written in one transaction guarded by the revisions read.
pub(super) async fn apply(
    State(state): State<Shared>,
    Query(q): Query<ApplyQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    require_token(&state, &headers)?;
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let new = parse_apply_body(is_json, q.file, &body)?;
    let (kvs, _) = current(state.store.as_ref()).await?;
    let mut merged: Vec<Sourced> = as_sourced(stored_resources(&kvs), "(stored)")
        .into_iter()
        .filter(|s| {
            !new.iter()
                .any(|n| n.resource.kind() == s.resource.kind() && n.resource.name() == s.resource.name())
        })
        .collect();
    merged.extend(new.iter().cloned());
    if let Err(e) = smesh_model::validate(&merged) {
        return Err(ApiError(StatusCode::BAD_REQUEST, errors_text(&e.0)));
    }
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    let mut applied = Vec::new();
    for item in &new {
        let key = keys::resource(item.resource.kind(), item.resource.name());
        let existing = kvs.iter().find(|kv| kv.key == key);
        compares.push(Compare::ModRevision {
            key: key.clone(),
            equals: existing.map_or(0, |kv| kv.mod_revision),
        });
        let value = serde_json::to_vec(&item.resource)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let verb = match existing {
            Some(kv) if kv.value == value => "unchanged",
            Some(_) => "configured",
            None => "created",
        };
        applied.push(serde_json::json!({"kind": item.resource.kind(), "name": item.resource.name(), "result": verb}));
        ops.push(Op::Put { key, value, lease: 0 });
    }
    let outcome = state.store.txn(compares, ops).await?;
    if !outcome.succeeded {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "resources changed during apply; apply again".into(),
        ));
    }
    // Against the endpoints the services have now (static and registered); a warning only.
    let registered = registrations(&kvs);
    let endpoint_labels = |service: &str| {
        let stored = merged.iter().filter_map(|s| match &s.resource {
            Resource::Service(svc) if svc.metadata.name == service => Some(svc),
            _ => None,
        });
        let mut labels: Vec<_> = stored
            .flat_map(|svc| svc.spec.endpoints.iter().map(|e| e.labels.clone()))
            .collect();
        labels.extend(
            registered
                .iter()
                .filter(|r| r.service == service)
                .map(|r| r.labels.clone().into_iter().collect()),
        );
        labels
    };
    let warnings = smesh_model::empty_subsets(new.iter().map(|s| &s.resource), endpoint_labels);
    Ok(Json(
        serde_json::json!({"revision": outcome.revision, "applied": applied, "warnings": warnings}),
    ))
}

fn resources_of_kind(kvs: &[crate::store::KeyValue], kind: &str) -> Vec<Resource> {
    stored_resources(kvs).into_iter().filter(|r| r.kind() == kind).collect()
}

fn kind_or_404(kind: &str) -> Result<&'static str, ApiError> {
    keys::canonical_kind(kind).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown kind {kind:?}; known kinds: {:?}", Resource::KINDS),
        )
    })
}

pub(super) async fn list_kind(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(kind): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    require_read(&state, peer, &headers)?;
    let kind = kind_or_404(&kind)?;
    let (kvs, revision) = current(state.store.as_ref()).await?;
    Ok(Json(
        serde_json::json!({"revision": revision, "items": resources_of_kind(&kvs, kind)}),
    ))
}

pub(super) async fn get_one(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((kind, name)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    require_read(&state, peer, &headers)?;
    let kind = kind_or_404(&kind)?;
    let (kvs, _) = current(state.store.as_ref()).await?;
    resources_of_kind(&kvs, kind)
        .into_iter()
        .find(|r| r.name() == name)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{kind} {name:?} not found")))
}

/// Deleting a resource that others refer to would leave proxies a configuration they must
/// reject, so it is refused with the references named.
pub(super) async fn delete_one(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((kind, name)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    require_token(&state, &headers)?;
    let kind = kind_or_404(&kind)?;
    let (kvs, _) = current(state.store.as_ref()).await?;
    let key = keys::resource(kind, &name);
    let Some(existing) = kvs.iter().find(|kv| kv.key == key) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("{kind} {name:?} not found")));
    };
    let rest: Vec<Sourced> = as_sourced(stored_resources(&kvs), "(stored)")
        .into_iter()
        .filter(|s| !(s.resource.kind() == kind && s.resource.name() == name))
        .collect();
    if let Err(e) = smesh_model::validate(&rest) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("cannot delete {kind} {name:?}: still referenced\n{}", errors_text(&e.0)),
        ));
    }
    let compares = vec![Compare::ModRevision {
        key: key.clone(),
        equals: existing.mod_revision,
    }];
    let outcome = state.store.txn(compares, vec![Op::Delete { key }]).await?;
    if !outcome.succeeded {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("{kind} {name:?} changed during delete; try again"),
        ));
    }
    Ok(Json(
        serde_json::json!({"revision": outcome.revision, "deleted": {"kind": kind, "name": name}}),
    ))
}

pub(super) async fn endpoints(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    require_read(&state, peer, &headers)?;
    let (kvs, revision) = state.store.list(keys::MESH).await?;
    let mut items = Vec::new();
    let mut known = false;
    for r in stored_resources(&kvs) {
        if let Resource::Service(s) = r {
            if s.metadata.name == service {
                known = true;
                for e in s.spec.endpoints {
                    items.push(serde_json::json!({"address": e.address, "labels": e.labels, "weight": e.weight.unwrap_or(1), "source": "static"}));
                }
            }
        }
    }
    for r in registrations(&kvs).into_iter().filter(|r| r.service == service) {
        known = true;
        items.push(serde_json::json!({"address": r.address, "labels": r.labels, "weight": r.weight.max(1), "source": "registered", "proxy": r.proxy_id, "identity": r.identity}));
    }
    if !known {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no service {service:?}: neither a Service resource nor a registered endpoint"),
        ));
    }
    Ok(Json(
        serde_json::json!({"revision": revision, "service": service, "endpoints": items}),
    ))
}

pub(super) async fn certificates(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    require_read(&state, peer, &headers)?;
    let (kvs, revision) = state.store.list(keys::CERTIFICATES).await?;
    let items: Vec<serde_json::Value> = kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    Ok(Json(serde_json::json!({"revision": revision, "items": items})))
}

pub(super) async fn proxies(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    require_read(&state, peer, &headers)?;
    let (kvs, revision) = state.store.list(keys::PROXIES).await?;
    let items: Vec<ProxyStatus> = kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    Ok(Json(serde_json::json!({"revision": revision, "items": items})))
}
