//! The key/value API, shaped like Consul's: `/v1/kv/<key>` with modify indexes for
//! check-and-set and blocking reads, plus a streaming watch at `/v1/watch/kv/<prefix>`.
//! Values are opaque bytes, at most [`MAX_VALUE_BYTES`].

use super::{require_read, require_token, ApiError, Shared};
use crate::keys;
use crate::store::{Compare, Event, KeyValue, Op, StoreError};
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

pub const MAX_VALUE_BYTES: usize = 512 * 1024;
const MAX_KEY_BYTES: usize = 512;
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
pub const INDEX_HEADER: &str = "x-smesh-index";

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/kv/{*key}", get(read).put(write).delete(remove))
        .route("/v1/watch/kv/{*prefix}", get(watch))
}

#[derive(Deserialize, Default)]
pub(crate) struct KvQuery {
    pub(crate) raw: Option<String>,
    pub(crate) recurse: Option<String>,
    pub(crate) index: Option<u64>,
    pub(crate) wait: Option<String>,
    pub(crate) cas: Option<u64>,
}

pub(crate) fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.starts_with('/') || key.contains("//") {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid key {key:?}: 1-{MAX_KEY_BYTES} bytes, no leading '/' and no empty segment"),
        ));
    }
    Ok(())
}

fn entry(kv: &KeyValue) -> serde_json::Value {
    serde_json::json!({
        "Key": &kv.key[keys::KV.len()..],
        "Value": base64::engine::general_purpose::STANDARD.encode(&kv.value),
        "CreateIndex": kv.create_revision,
        "ModifyIndex": kv.mod_revision,
        "Flags": 0,
        "LockIndex": 0,
    })
}

/// The entries a read returns: the key itself, or every key under it with `recurse`.
fn select(kvs: Vec<KeyValue>, key: &str, recurse: bool) -> Vec<KeyValue> {
    let full = keys::kv(key);
    kvs.into_iter().filter(|kv| recurse || kv.key == full).collect()
}

async fn read(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<KvQuery>,
) -> Result<Response, ApiError> {
    require_read(&state, peer, &headers)?;
    check_key(&key)?;
    let recurse = q.recurse.is_some();
    let prefix = keys::kv(&key);
    let (mut kvs, mut revision) = state.store.list(&prefix).await?;
    let mut found = select(kvs.clone(), &key, recurse);
    // A blocking read waits until something it returns changes past `index`.
    if let Some(index) = q.index {
        let current = found.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
        if current <= index {
            let wait = match q.wait.as_deref() {
                Some(w) => humantime::parse_duration(w)
                    .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid wait {w:?}: {e}")))?,
                None => DEFAULT_WAIT,
            }
            .min(MAX_WAIT);
            let mut events = state.store.watch(&prefix, revision).await?;
            let changed = async {
                while let Some(batch) = events.recv().await {
                    let batch = batch?;
                    if batch.iter().any(|e| recurse || e.key() == prefix) {
                        return Ok::<_, StoreError>(true);
                    }
                }
                Ok(false)
            };
            if let Ok(result) = tokio::time::timeout(wait, changed).await {
                result?;
                (kvs, revision) = state.store.list(&prefix).await?;
                found = select(kvs, &key, recurse);
            }
        }
    }
    let index = found.iter().map(|kv| kv.mod_revision).max().unwrap_or(revision);
    let mut resp = if found.is_empty() {
        (StatusCode::NOT_FOUND, "").into_response()
    } else if q.raw.is_some() && !recurse {
        Body::from(found[0].value.clone()).into_response()
    } else {
        Json(found.iter().map(entry).collect::<Vec<_>>()).into_response()
    };
    resp.headers_mut().insert(INDEX_HEADER, HeaderValue::from(index));
    Ok(resp)
}

/// `PUT`: `true` when written; with `?cas=N` only if the key's modify index is N (0: absent),
/// else `false`.
async fn write(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<KvQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_token(&state, &headers)?;
    check_key(&key)?;
    if body.len() > MAX_VALUE_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("value of {} bytes is over the {MAX_VALUE_BYTES}-byte limit", body.len()),
        ));
    }
    let full = keys::kv(&key);
    let compares = cas(&q, &full);
    let outcome = state
        .store
        .txn(
            compares,
            vec![Op::Put {
                key: full,
                value: body.to_vec(),
                lease: 0,
            }],
        )
        .await?;
    Ok(txn_reply(outcome))
}

async fn remove(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<KvQuery>,
) -> Result<Response, ApiError> {
    require_token(&state, &headers)?;
    check_key(&key)?;
    let full = keys::kv(&key);
    let (compares, op) = if q.recurse.is_some() {
        (Vec::new(), Op::DeletePrefix { prefix: full })
    } else {
        (cas(&q, &full), Op::Delete { key: full })
    };
    let outcome = state.store.txn(compares, vec![op]).await?;
    Ok(txn_reply(outcome))
}

/// The check-and-set condition of `?cas=N`, if given.
fn cas(q: &KvQuery, full_key: &str) -> Vec<Compare> {
    q.cas
        .map(|equals| {
            vec![Compare::ModRevision {
                key: full_key.to_string(),
                equals,
            }]
        })
        .unwrap_or_default()
}

/// Consul's answer to a write: `true` or `false`, with the store index in a header.
fn txn_reply(outcome: crate::store::TxnOutcome) -> Response {
    let mut resp = Json(outcome.succeeded).into_response();
    resp.headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(outcome.revision));
    resp
}

/// Streams every change under a prefix, one JSON object per line, in order. Starts after
/// `?index=N`, or after the current state when no index is given.
async fn watch(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
    Query(q): Query<KvQuery>,
) -> Result<Response, ApiError> {
    require_read(&state, peer, &headers)?;
    let full = keys::kv(&prefix);
    let after = match q.index {
        Some(i) => i,
        None => state.store.revision().await?,
    };
    let mut events = state.store.watch(&full, after).await.map_err(|e| match e {
        StoreError::Compacted { oldest } => ApiError(
            StatusCode::GONE,
            format!("index {after} is no longer kept (oldest {oldest}); read again and watch from there"),
        ),
        other => other.into(),
    })?;
    let stream = async_stream(move |tx| async move {
        while let Some(batch) = events.recv().await {
            let lines = match batch {
                Ok(batch) => batch.iter().map(event_line).collect::<String>(),
                Err(e) => format!("{}\n", serde_json::json!({"Error": e.to_string()})),
            };
            if tx.send(Ok::<_, std::io::Error>(Bytes::from(lines))).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/x-ndjson"));
    resp.headers_mut().insert(INDEX_HEADER, HeaderValue::from(after));
    Ok(resp)
}

fn event_line(e: &Event) -> String {
    let v = match e {
        Event::Put(kv) => {
            let mut v = entry(kv);
            v["Event"] = "put".into();
            v
        }
        Event::Delete { key, revision, .. } => serde_json::json!({
            "Event": "delete",
            "Key": &key[keys::KV.len()..],
            "ModifyIndex": revision,
        }),
    };
    format!("{v}\n")
}

/// A stream fed by a task through a small channel (back-pressure from the client).
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
