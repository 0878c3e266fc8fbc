//! The request body as the tries see it: kept in memory (sent as often as needed), streamed
//! with a copy kept for a retry, or streamed once. Mirrors get the kept body, or a copy of
//! the streamed one frame by frame.

use crate::dispatch::Failure;
use crate::http::body::{Body, ClientBody};
use crate::http::errors::{Cause, ProxyError};
use crate::http::replay::Replay;
use crate::http::tee::{TapSender, Tee};
use crate::route::mirror::MirrorBody;
use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};

pub enum RequestBody {
    /// Empty, or read whole because a retry may need it (its length known and small).
    Kept(Bytes),
    /// Streamed while a copy is kept, up to the limit (its length unknown, e.g. gRPC).
    Replayable(Replay<Tee<ClientBody>>),
    /// Streamed once: `None` after the first try took it.
    Streamed(Option<Body>),
}

/// Why a retry cannot send the body again.
pub enum NoReplay {
    /// It grew past `--max-retry-body-bytes` while it streamed.
    TooLarge,
    /// It was streamed without a copy (counted when it started).
    Streamed,
}

impl RequestBody {
    /// The common case without waiting: a body that has already ended (most requests) is
    /// kept as it is; `Err` hands the body back for [`RequestBody::prepare`].
    pub fn ended(body: ClientBody) -> Result<Self, ClientBody> {
        if body.is_end_stream() {
            // Nothing to keep: a try refused unprocessed, or a retry, sends it again.
            Ok(RequestBody::Kept(Bytes::new()))
        } else {
            Err(body)
        }
    }

    /// A body that has not ended (see [`RequestBody::ended`]). `retry`: the route may retry.
    /// `mirror` starts the route's mirrors with the body they are to get and returns the
    /// senders of the streamed copies. `too_large` is called when a retry policy cannot
    /// apply because the body is too large to keep.
    pub async fn prepare(
        body: ClientBody,
        retry: bool,
        limit: u64,
        mirror: impl FnOnce(MirrorBody<'_>) -> Vec<TapSender>,
        too_large: impl FnOnce(),
    ) -> Result<Self, Failure> {
        if retry && body.size_hint().upper().is_some_and(|n| n <= limit) {
            return match Box::pin(Limited::new(body, limit as usize).collect()).await {
                Ok(collected) => {
                    let kept = collected.to_bytes();
                    mirror(MirrorBody::Kept(&kept));
                    Ok(RequestBody::Kept(kept))
                }
                Err(e) => Err(Failure::new(ProxyError::BadRequest, Cause::ClientBody(e))),
            };
        }
        let taps = mirror(MirrorBody::Streamed(body.size_hint()));
        if retry && body.size_hint().upper().is_none() {
            return Ok(RequestBody::Replayable(Replay::new(
                Tee::new(body, taps),
                limit as usize,
            )));
        }
        if retry {
            too_large();
        }
        Ok(RequestBody::Streamed(Some(if taps.is_empty() {
            body.into_streaming()
        } else {
            Body::Tee(Box::new(Tee::new(body, taps)))
        })))
    }

    /// The body for the next try; `None` when a streamed body was already sent.
    pub fn for_try(&mut self) -> Option<Body> {
        match self {
            RequestBody::Kept(bytes) => Some(Body::full(bytes.clone())),
            RequestBody::Replayable(kept) => Some(Body::Replay(kept.body())),
            RequestBody::Streamed(body) => body.take(),
        }
    }

    /// A body handed back unsent (a failed connect) goes to the next try.
    pub fn give_back(&mut self, body: Body) {
        if let RequestBody::Streamed(slot) = self {
            *slot = Some(body);
        }
    }

    /// Whether a later try can send the body again in full.
    pub fn replay(&self) -> Result<(), NoReplay> {
        match self {
            RequestBody::Kept(_) => Ok(()),
            RequestBody::Replayable(kept) if kept.can_replay() => Ok(()),
            RequestBody::Replayable(_) => Err(NoReplay::TooLarge),
            RequestBody::Streamed(_) => Err(NoReplay::Streamed),
        }
    }

    /// Whether the body was streamed to a try without a copy (it cannot go again).
    pub fn streamed_once(&self) -> bool {
        matches!(self, RequestBody::Streamed(None))
    }
}
