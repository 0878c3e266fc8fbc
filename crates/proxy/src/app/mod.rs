//! What the process runs beside its listeners: the admin server and the active health
//! checker; and the workers that run the listeners, whatever the mode.

pub mod admin;
pub mod health;
pub mod workers;
