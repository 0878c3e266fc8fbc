//! The stop signal every background loop watches (a `watch` channel that turns true).

use tokio::sync::watch;

/// Resolves once `shutdown` holds true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
