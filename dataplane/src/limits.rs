//! Every wait the agent makes on someone else has a bound, and they all live here: how long
//! an unauthenticated connection may take to finish its TLS handshake and how many may be
//! pending, how long a request may take to send its headers and its body, how many
//! connections an agent serves at once, how long a peer agent may stay silent, and how long
//! a converge waits for the one before it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::agent::AgentError;

/// How long a converge waits for the converge before it to finish; converges of one node
/// run one at a time, and deploy sends them one after the other, so waiting longer only
/// hides a second deploy running against the same node.
pub const CONVERGE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Bounds of the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// From accept to a finished mutual TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections still in their handshake (not yet authenticated). When a new one arrives
    /// and this many are pending, the oldest pending one is closed: a flood of idle
    /// connections cannot keep a real client from being served.
    pub max_pending_handshakes: usize,
    /// Authenticated connections served at once; more are closed right after the handshake.
    pub max_connections: usize,
    /// For a request's headers to arrive, counted from the start of the connection or the
    /// end of the previous request (so it also closes idle keep-alive connections).
    pub header_timeout: Duration,
    /// For a whole JSON request body.
    pub json_body_timeout: Duration,
    /// For a streamed body (volume pushes) to deliver its next bytes.
    pub body_idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 128,
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            json_body_timeout: Duration::from_secs(60),
            body_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Bounds of the client agents use to talk to each other: connect 5 s, TLS handshake
/// 10 s, 60 s without progress.
pub use flocker_client::Timeouts as PeerTimeouts;

/// Takes the converge lock, or fails with a conflict after [`CONVERGE_LOCK_WAIT`].
pub async fn converge_lock(lock: &Arc<Mutex<()>>) -> Result<OwnedMutexGuard<()>, AgentError> {
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
