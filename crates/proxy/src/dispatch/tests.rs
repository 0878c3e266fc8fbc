//! Dispatch driven against loopback upstreams.
