//! HTTP building blocks without policy: the one body type, headers, error responses, replay
//! and tee, request-head helpers, the upstream connection pools and HTTP/2 client, and
//! building the request an upstream sees.

pub mod body;
pub mod errors;
pub mod h2_upstream;
pub mod head_timeout;
pub mod headers;
pub mod pool;
pub mod recycle;
pub mod replay;
pub mod request;
pub mod resets;
pub(crate) mod saved_head;
pub mod tee;
#[cfg(test)]
pub(crate) mod test_bodies;
