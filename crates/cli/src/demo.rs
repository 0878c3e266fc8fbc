//! The demo application: answers every request with who it is, so routing and balancing can
//! be seen from the outside.

use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;

#[derive(Args)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Service name to report.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Version label to report.
    #[arg(long, default_value = "v1")]
    version: String,
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let identity: &'static str = Box::leak(format!("{} {}", args.name, args.version).into_boxed_str());
        tracing::info!(listen = %args.listen, identity, "demo app ready");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                            let body = format!("hello from {identity}: {} {}\n", req.method(), req.uri().path());
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("x-demo-app", identity)
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("static response"),
                            )
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                    });
                }
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}
