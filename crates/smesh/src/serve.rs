//! Inbound: an application of this program, as a `tower::Service`, behind the inbound port's
//! stages (see [`crate::Mesh::serve`]).

use crate::body::SyncBody;
use crate::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use smesh_proxy::embed::{self, BodyError, ClientBody, LocalApp, LocalFuture};
use std::sync::Mutex;
use tower::{Service, ServiceExt};

/// The application, cloned for each call as tower services are (the lock is held only for
/// the clone, so a service that is `Send` but not `Sync` can be shared between threads).
pub(crate) struct App<S>(pub(crate) Mutex<S>);

impl<S, B> LocalApp for App<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BodyError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BodyError>,
{
    fn call(&self, req: Request<ClientBody>) -> LocalFuture {
        let service = match self.0.lock() {
            Ok(service) => service.clone(),
            // A clone that panicked left nothing half-changed behind: the service is as it was.
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Box::pin(async move {
            let req = req.map(|body| Body::new(body.into_streaming()));
            let resp = service.oneshot(req).await.map_err(Into::into)?;
            Ok(resp.map(|body| embed::Body::Boxed(Box::pin(SyncBody::new(body.map_err(Into::into))))))
        })
    }
}
