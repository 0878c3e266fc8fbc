//! A small HTTP client for the control plane's API (one request per connection).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

pub struct Control {
    /// `http://host:port` without a trailing slash.
    pub base: String,
    pub token: Option<String>,
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
    fn authority(&self) -> Result<(String, String), String> {
        let rest = self
            .base
            .strip_prefix("http://")
            .ok_or_else(|| format!("control URL {:?} must start with http://", self.base))?;
        let host = rest.trim_end_matches('/').to_string();
        Ok((host.clone(), host))
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        let (addr, _) = self.authority()?;
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("cannot reach the control plane at {}: {e}", self.base))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("control plane at {}: {e}", self.base))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let (_, host) = self.authority()?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", content_type);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        req.body(Full::new(body)).map_err(|e| format!("invalid request: {e}"))
    }

    pub async fn call(&self, method: Method, path: &str, content_type: &str, body: Bytes) -> Result<Reply, String> {
        let mut sender = self.connect().await?;
        let req = self.request(method, path, content_type, body)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("control plane: {e}"))?;
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
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("control plane: {e}"))?;
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
