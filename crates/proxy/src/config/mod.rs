//! Configuration: the snapshot (lookups and builder), inbound authorization, and the two
//! sources that install snapshots (a watched file, the control plane).

pub mod authz;
pub mod control;
pub mod reload;
mod rule_compile;
pub mod snapshot;
