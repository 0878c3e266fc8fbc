//! [`GrpcChannel`]: the HTTP client with a Service's name filled in, as a tonic transport.

use crate::{Body, Error, HttpClient};
use bytes::Bytes;
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A channel to one Service for tonic-generated clients (`EchoClient::new(channel)`): each
/// call goes to the Service it names, through the mesh (see
/// [how a request goes](crate#how-a-request-goes)), with the call's deadline
/// (`grpc-timeout`) passed on less the time spent in the mesh. The mesh's own failures
/// reach the client as gRPC statuses (e.g. UNAVAILABLE for no endpoints), as from a
/// sidecar. Cheap to clone.
#[derive(Clone)]
pub struct GrpcChannel {
    client: HttpClient,
    authority: Authority,
}

impl GrpcChannel {
    pub(crate) fn new(client: HttpClient, service: &str) -> Result<Self, Error> {
        let authority = service
            .parse()
            .map_err(|e| Error::start(format!("{service:?} is not a service name: {e}")))?;
        Ok(GrpcChannel { client, authority })
    }
}

impl<B> tower::Service<Request<B>> for GrpcChannel
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // tonic sends the method's path alone; the Service is this channel's.
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                let e = Error::start(format!("no URI for the call: {e}"));
                return Box::pin(async move { Err(e) });
            }
        }
        let client = self.client.clone();
        Box::pin(async move { client.request(req).await })
    }
}
