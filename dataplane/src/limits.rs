//! Every wait the agent makes on someone else has a bound, and they all live here: how long
//! an unauthenticated connection may take to finish its TLS handshake and how many may be
//! pending, how long a request may take to send its headers and its body, how many
//! connections an agent serves at once, how long a peer agent may stay silent, and how long
//! a converge waits for the one before it.

use std::time::Duration;

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
