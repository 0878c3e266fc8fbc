//! Resilience: retry policy, circuit breaking, retry budget, load shedding, rate limits, deadlines.

pub mod budget;
pub mod circuit;
pub mod deadline;
pub mod policy;
pub mod ratelimit;
pub mod shed;
