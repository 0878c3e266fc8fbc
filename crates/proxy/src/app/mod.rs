//! Deployment modes, wiring only: the workers apart from any mode, a workload, the sidecar
//! (`smesh proxy`); and what the process runs beside its listeners: the admin server and the
//! active health checker.

pub mod admin;
pub mod health;
pub mod options;
pub mod sidecar;
pub mod source;
pub mod workers;
pub mod workload;
