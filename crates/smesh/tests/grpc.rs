//! A tonic client whose transport is `mesh.grpc_channel`: a unary call to a gRPC Service
//! (HTTP/2 upstream, trailers) with a deadline the upstream receives, decremented; the
//! mesh's own failure as a gRPC status.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// e2e.Msg's first field (tests/e2e/echo.proto), written out instead of generated.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

/// One gRPC message, then `grpc-status: 0`.
struct Answer(Option<Bytes>, bool);

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !self.1 {
            self.1 = true;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}

/// Answers `text` with "echo:<text> timeout:<the grpc-timeout it got>".
async fn echo(req: Request<Incoming>) -> Result<Response<Answer>, hyper::Error> {
    let timeout = req
        .headers()
        .get("grpc-timeout")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let mut body = req.into_body().collect().await?.to_bytes();
    body.advance(5); // the gRPC frame's flag and length
    let msg: Msg = prost::Message::decode(body).expect("a Msg");
    let reply = Msg {
        text: format!("echo:{} timeout:{}", msg.text, timeout.unwrap_or_default()),
    };
    let encoded = prost::Message::encode_to_vec(&reply);
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    let resp = Response::builder()
        .header("content-type", "application/grpc")
        .body(Answer(Some(framed.freeze()), false));
    Ok(resp.expect("a valid response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_calls_through_the_mesh_with_its_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(echo);
                let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(io, service).await;
            });
        }
    });
    let dir = std::env::temp_dir().join(format!("smesh-lib-grpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    let resources = format!(
        "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: echo}}\n\
         spec: {{ports: [{{port: 80, protocol: grpc}}], endpoints: [{{address: \"{addr}\"}}]}}\n"
    );
    std::fs::write(&file, resources).unwrap();
    let mesh = smesh::Mesh::builder().config_file(&file).connect().await.unwrap();

    // As a generated client uses its channel: `Grpc::new`, the method's path alone.
    let mut grpc = tonic::client::Grpc::new(mesh.grpc_channel("echo").unwrap());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Msg { text: "hi".into() });
    req.set_timeout(Duration::from_secs(5));
    let path = http::uri::PathAndQuery::from_static("/e2e.Echo/Unary");
    let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
    let reply = grpc.unary(req, path, codec).await.expect("a reply").into_inner();

    // The deadline arrived, less the time the call spent on its way (5 s as tonic words it:
    // 5000000u; anything shorter is a decremented one).
    let (echoed, timeout) = reply.text.split_once(" timeout:").expect("echo:TEXT timeout:VALUE");
    assert_eq!(echoed, "echo:hi");
    let left = grpc_timeout(timeout).unwrap_or_else(|| panic!("no grpc-timeout upstream: {reply:?}"));
    assert!(
        left > Duration::ZERO && left < Duration::from_secs(5),
        "{timeout}: {left:?}"
    );

    // No such Service: the mesh's answer is a gRPC status, as a sidecar's would be.
    let mut nowhere = tonic::client::Grpc::new(mesh.grpc_channel("nowhere").unwrap());
    nowhere.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/e2e.Echo/Unary");
    let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
    let status = nowhere
        .unary(tonic::Request::new(Msg::default()), path, codec)
        .await
        .expect_err("no such service");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert!(status.message().contains("unknown authority"), "{status:?}");

    let metrics = mesh.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("smesh_grpc_responses_total{") && l.contains("service=\"echo\"")),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `grpc-timeout` value (`<digits><unit>`, gRPC over HTTP/2).
fn grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}
