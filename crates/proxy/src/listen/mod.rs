//! Listeners: accept, per-connection handling (mesh TLS or plaintext, detection), the HTTP handler.

pub mod complete;
pub mod detect;
pub mod http;
pub mod server;
