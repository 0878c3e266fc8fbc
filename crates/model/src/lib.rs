//! smesh resources: the types users write in YAML, their parsing and their validation.
//!
//! This crate does no I/O: callers hand it text and a file name, and get back either
//! resources or errors that name the file, the document, the field and the reason.

// Errors are built on the cold path of loading a file; their size does not matter.
#![allow(clippy::result_large_err)]

pub mod duration;
mod error;
mod filters;
#[cfg(test)]
mod fuzz_tests;
mod grpc;
mod parse;
mod policy;
mod qos;
mod ratelimit;
mod resources;
mod security;
mod spiffe;
mod subsets;
mod trace;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use filters::*;
pub use grpc::*;
pub use parse::{load, parse, to_yaml, Source, Sourced};
pub use policy::*;
pub use qos::*;
pub use ratelimit::*;
pub use resources::*;
pub use security::*;
pub use spiffe::{certificate_spiffe_id, SpiffeId};
pub use subsets::{empty_subsets, subset_text};
pub use trace::TracingSpec;
pub use validate::{validate, validate_name};
