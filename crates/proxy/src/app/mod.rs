//! What the process runs beside its listeners: the admin server and the active health checker.

pub mod admin;
pub mod health;
