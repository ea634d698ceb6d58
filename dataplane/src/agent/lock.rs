//! The converge lock: one converge at a time per node, and a caller that waits too long
//! gets a clear conflict instead of a hang.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::AgentError;
use crate::limits::CONVERGE_LOCK_WAIT;

/// Takes the converge lock, or fails with a conflict after [`CONVERGE_LOCK_WAIT`].
pub(crate) async fn converge_lock(
    lock: &Arc<Mutex<()>>,
) -> Result<OwnedMutexGuard<()>, AgentError> {
    lock_within(lock, CONVERGE_LOCK_WAIT).await
}

async fn lock_within(
    lock: &Arc<Mutex<()>>,
    wait: Duration,
) -> Result<OwnedMutexGuard<()>, AgentError> {
    tokio::time::timeout(wait, lock.clone().lock_owned())
        .await
        .map_err(|_| {
            AgentError::Conflict(format!(
                "another converge has been running on this node for over {wait:?}; it finishes on its own (every step has a timeout), retry after it"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_converge_lock_is_a_clear_conflict_not_a_hang() {
        let lock = Arc::new(Mutex::new(()));
        let wait = Duration::from_millis(50);
        let held = lock_within(&lock, wait).await.expect("free");
        let err = lock_within(&lock, wait).await.expect_err("held");
        assert_eq!(err.status(), 409);
        assert!(err.to_string().contains("another converge"), "{err}");
        drop(held);
        assert!(converge_lock(&lock).await.is_ok());
    }
}
