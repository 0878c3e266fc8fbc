//! A small HTTP client for the control plane's API (one request per connection).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use smesh_api::transport::{ControlTrust, ControlUrl};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct Control {
    /// `http(s)://host:port` without a trailing slash.
    pub base: String,
    pub token: Option<String>,
    url: ControlUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim_end().to_string()
    }

    /// The body as JSON when the call succeeded; the server's message otherwise.
    pub fn json(self) -> Result<serde_json::Value, String> {
        if !self.status.is_success() {
            return Err(format!("{} ({})", self.text(), self.status));
        }
        serde_json::from_slice(&self.body).map_err(|e| format!("unexpected reply from the control plane: {e}"))
    }
}

impl Control {
    /// A client for the control plane at `base`; an `https://` one is checked against the
    /// CA certificates in `ca`.
    pub fn new(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<Self, String> {
        let url = ControlUrl::parse(base)?;
        let tls = match ca.filter(|_| url.tls) {
            Some(path) => Some(
                ControlTrust::load(path)
                    .and_then(|t| t.client_config(None, b"http/1.1"))
                    .map_err(|e| format!("--control-ca: {e}"))?,
            ),
            None => None,
        };
        Ok(Control {
            base: base.to_string(),
            token,
            url,
            tls,
        })
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        let stream = self
            .url
            .connect(self.tls.clone(), Duration::from_secs(5))
            .await
            .map_err(|e| format!("control plane at {}: {e}", self.base))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("control plane at {}: {e}", self.base))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A failed exchange, in words. Plain HTTP sent to a TLS port gets a TLS alert back,
    /// which hyper reports as an unparsable response.
    fn explain(&self, e: hyper::Error) -> String {
        if e.is_parse() && !self.url.tls {
            return format!(
                "control plane at {}: this control plane speaks TLS: use https://{} with --control-ca \
                 FILE (its DIR/ca.pem; a `smesh up` demo's is in its smesh-data/)",
                self.base, self.url.authority
            );
        }
        format!("control plane: {e}")
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.url.authority)
            .header("content-type", content_type);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        req.body(Full::new(body)).map_err(|e| format!("invalid request: {e}"))
    }

    pub async fn call(&self, method: Method, path: &str, content_type: &str, body: Bytes) -> Result<Reply, String> {
        let mut sender = self.connect().await?;
        let req = self.request(method, path, content_type, body)?;
        let resp = sender.send_request(req).await.map_err(|e| self.explain(e))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("control plane: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, String> {
        self.call(Method::GET, path, "text/plain", Bytes::new()).await
    }

    /// Streams a response body, calling `line` for each complete line, until it ends.
    pub async fn stream_lines(&self, path: &str, mut line: impl FnMut(&str)) -> Result<(), String> {
        let mut sender = self.connect().await?;
        let req = self.request(Method::GET, path, "text/plain", Bytes::new())?;
        let resp = sender.send_request(req).await.map_err(|e| self.explain(e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!("{} ({status})", String::from_utf8_lossy(&body).trim_end()));
        }
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("control plane: {e}"))?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let rest = pending.split_off(i + 1);
                    line(String::from_utf8_lossy(&pending).trim_end());
                    pending = rest;
                }
            }
        }
        Ok(())
    }
}
