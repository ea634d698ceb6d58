//! What the supervisor remembers of each container between passes (restarts made, backoff),
//! kept by the agent so that a converge starting a container clears it. Its own module so
//! that the agent and the supervisor both use it without using each other.

use std::time::Instant;

/// What the supervisor remembers of one container.
#[derive(Debug, Clone, Default)]
pub struct RestartMemory {
    /// Restarts made since a converge last started it (bounded by `on-failure:N`).
    pub restarts: u32,
    /// Consecutive attempts that failed or exited again, for the backoff.
    pub(crate) attempts: u32,
    /// No attempt before this instant.
    pub(crate) not_before: Option<Instant>,
    /// The last proof failure logged, so a lasting problem is logged once.
    pub(crate) last_error: Option<String>,
}

impl RestartMemory {
    /// Tests step past the backoff instead of waiting it out.
    #[cfg(test)]
    pub fn clear_backoff(&mut self) {
        self.attempts = 0;
        self.not_before = None;
    }
}
