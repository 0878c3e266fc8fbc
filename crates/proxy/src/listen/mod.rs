//! Listeners: sockets, accept and drain, per-connection handling (mesh TLS or plaintext,
//! detection), the HTTP handler.

pub mod accept;
pub mod complete;
pub mod detect;
pub mod http;
pub mod server;
