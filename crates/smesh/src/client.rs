//! The HTTP client: a request goes through the outbound port's stages in this process.

use crate::body::SyncBody;
use crate::{Body, Error};
use bytes::Bytes;
use http::{Request, Response};
use smesh_proxy::embed::{self, ClientBody, Embedded, PROXY_ERROR_HEADER};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A client that routes by authority exactly like a sidecar's outbound port (see the
/// [crate docs](crate#how-a-request-goes)). Cheap to clone: clones share the mesh.
#[derive(Clone)]
pub struct HttpClient {
    pub(crate) mesh: Arc<Embedded>,
}

impl HttpClient {
    /// Sends `req` to the Service its authority names (`http://orders/...`, or the `Host`
    /// header): its route's backends, balanced, retried and timed out as the mesh's
    /// resources say, over mTLS to endpoints fronted by smesh proxies.
    ///
    /// Any answer of the application is `Ok`, whatever its status; an answer the mesh made
    /// itself (unknown service, no route, no endpoint reachable, circuit open, timeout,
    /// denied by the destination's authorization) is an [`Error`] with the status and
    /// reason a sidecar would have answered with.
    pub async fn request<B>(&self, req: Request<B>) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, ClientBody::new(SyncBody::new(body)));
        answer(self.mesh.send(req).await).await
    }
}

/// The mesh's words on a failure are short; a longer body is not read past this.
const MAX_DETAIL_BYTES: usize = 4096;

/// The application's answer, or the mesh's own as an error (this process's, or the
/// destination's proxy's: a denial, an unreachable app).
async fn answer(resp: Response<embed::Body>) -> Result<Response<Body>, Error> {
    // A gRPC call gets the mesh's answer as gRPC does (a `grpc-status`), a response.
    let grpc = resp.headers().contains_key("grpc-status");
    let Some(reason) = resp.headers().get(PROXY_ERROR_HEADER).filter(|_| !grpc) else {
        return Ok(resp.map(Body::new));
    };
    let reason = String::from_utf8_lossy(reason.as_bytes()).into_owned();
    let status = resp.status();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_DETAIL_BYTES);
    let text = match http_body_util::BodyExt::collect(limited).await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    // Worded "<reason>: <detail>"; the reason is kept apart.
    let detail = match text.strip_prefix(reason.as_str()) {
        Some(rest) => rest.trim_start_matches(':').trim().to_string(),
        None => text,
    };
    Err(Error::mesh(status, reason, detail))
}

/// The client as a [`tower::Service`], for middleware stacks and clients built on them.
impl<B> tower::Service<Request<B>> for HttpClient
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

    /// Always ready: the mesh sheds, queues or refuses per request (circuit breaking, load
    /// shedding), not per client.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.request(req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[tokio::test]
    async fn the_mesh_s_own_answer_is_an_error_with_its_status_and_reason() {
        let mut resp = Response::new(embed::Body::full("no endpoints: api has none\n"));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut()
            .insert(PROXY_ERROR_HEADER, "no endpoints".parse().unwrap());
        let e = answer(resp).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(e.reason(), Some("no endpoints"));
        assert_eq!(
            e.to_string(),
            "smesh: no endpoints (503 Service Unavailable): api has none"
        );
    }

    #[tokio::test]
    async fn the_application_s_answer_is_ok_whatever_its_status() {
        let mut resp = Response::new(embed::Body::full("busy"));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let resp = answer(resp).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
