//! Routing rules and what a rule applies to a request: filters, faults, mirrors.

pub mod fault;
pub mod filters;
pub mod mirror;
pub mod rule;
