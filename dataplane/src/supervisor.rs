//! Restarts of managed containers, carried out by the agent instead of Docker.
//!
//! Docker's own restart policy restarts a container whenever its daemon likes (after a crash,
//! when `dockerd` or the host comes back), without asking whether the container's volume is
//! mounted: after a reboot it can start a database on the bare directory of a dataset that is
//! not mounted yet, and that database then comes up empty and writes outside its volume. So
//! every managed container is created with Docker's policy `no` (and older ones are switched
//! to it when the agent starts), and this supervisor applies the application's policy: it
//! restarts an exited container only after proving its volume, with Docker's backoff
//! (doubling from 1 s, at most 60 s). While the agent is down nothing restarts, which is the
//! point: nothing starts unproven.
//!
//! A supervision pass takes the converge lock without waiting: it never races a converge
//! that is stopping or moving the same application.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::restart_memory::RestartMemory;

use flocker_wire::RestartPolicy;

use crate::agent::Agent;

/// How often exited containers are looked for.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The first retry delay after a failed restart or a quick exit; doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A container that runs this long past its last restart has its backoff reset.
const STABLE: Duration = Duration::from_secs(10);

/// Whether the application's policy asks for a restart of a container that exited with
/// `exit_code` after `restarts` supervisor restarts.
pub fn wants_restart(policy: &RestartPolicy, exit_code: Option<i64>, restarts: u32) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        RestartPolicy::OnFailure {
            maximum_retry_count,
        } => exit_code != Some(0) && maximum_retry_count.is_none_or(|max| restarts < max),
    }
}

/// The delay before attempt number `attempts + 1`.
pub fn backoff(attempts: u32) -> Duration {
    FIRST_DELAY
        .saturating_mul(1u32 << attempts.min(16))
        .min(MAX_DELAY)
}

/// Runs supervision passes until the task is aborted.
/// The daemon calls [`adopt`] and the first fencing check before this.
pub async fn run(agent: Arc<Agent>) {
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passes: u64 = 0;
    loop {
        ticker.tick().await;
        if passes.is_multiple_of(HOLDER_CHECK_EVERY) {
            pass_checking_holders(&agent).await;
        } else {
            pass(&agent).await;
        }
        if passes.is_multiple_of(ORPHAN_SWEEP_EVERY) {
            sweep_orphan_holders(&agent).await;
        }
        passes += 1;
    }
}

/// Whether a running container is still in its holder's namespace takes three Docker
/// inspects: looked at on every fifth pass, not on each.
const HOLDER_CHECK_EVERY: u64 = 5;

/// Holders become orphans only after a minute ([`crate::netns_holder::ORPHAN_AFTER`]): a
/// Docker listing for them once a minute, not on every pass.
const ORPHAN_SWEEP_EVERY: u64 = 60;

/// Removes network holders left without their container, unless a converge runs.
async fn sweep_orphan_holders(agent: &Agent) {
    let Ok(_guard) = agent.converge_lock.clone().try_lock_owned() else {
        return;
    };
    if let Err(e) = agent.runtime.remove_orphan_holders().await {
        tracing::warn!(error = %e, "supervisor: cannot remove orphaned network holders");
    }
}

/// Switches containers created before the agent supervised restarts to Docker's policy `no`.
pub async fn adopt(agent: &Agent) {
    let Ok(containers) = agent.runtime.list_managed().await else {
        return;
    };
    for c in containers {
        match agent.runtime.details(&c.name).await {
            Ok(d) if d.docker_restarts => match agent.runtime.disable_docker_restart(&c.name).await
            {
                Ok(()) => tracing::info!(
                    container = %c.name,
                    "Docker's restart policy set to `no`: the agent restarts it after proving its volume"
                ),
                Err(e) => {
                    tracing::warn!(container = %c.name, error = %e, "cannot change Docker's restart policy")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(container = %c.name, error = %e, "cannot inspect container"),
        }
    }
}

/// One pass: every exited container whose policy asks for it, and whose backoff has passed,
/// is restarted once its volume is proven; so is a running one whose network holder stopped.
pub async fn pass(agent: &Agent) {
    pass_with(agent, false).await
}

/// A [`pass`] that also restarts a running container its network holder left
/// ([`crate::containers::ContainerRuntime::left_by_holder`]).
pub async fn pass_checking_holders(agent: &Agent) {
    pass_with(agent, true).await
}

/// Whether `container` runs outside its holder's namespace; `false` when that cannot be told.
async fn left_by_holder(agent: &Agent, container: &str) -> bool {
    match agent.runtime.left_by_holder(container).await {
        Ok(left) => left,
        Err(e) => {
            tracing::debug!(container, error = %e, "supervisor: cannot compare its namespace with its holder's");
            false
        }
    }
}

async fn pass_with(agent: &Agent, check_holders: bool) {
    let Ok(_guard) = agent.converge_lock.clone().try_lock_owned() else {
        return;
    };
    let containers = match agent.runtime.list_managed().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "supervisor: cannot list containers");
            return;
        }
    };
    let now = Instant::now();
    for c in containers {
        let memory = remembered(agent, &c.name);
        // Running without the network holder it joined: Docker tore its network down. It
        // is restarted with its holder, whatever its policy (it did not fail), after its
        // backoff (a holder that keeps stopping does not cause a restart loop).
        // So is one its holder left: the holder was started again after the container
        // joined it, in a namespace of its own.
        let holder_lost =
            c.running && (c.holder_down || (check_holders && left_by_holder(agent, &c.name).await));
        if holder_lost {
            if memory.not_before.is_some_and(|t| now < t) {
                continue;
            }
            tracing::warn!(container = %c.name, "its network holder does not run, or runs in a namespace the container is not in, so it has no network: restarting it with its holder");
            if let Err(e) = agent.runtime.stop(&c.name).await {
                tracing::error!(container = %c.name, error = %e, "cannot stop a container whose network holder stopped");
                continue;
            }
        } else if c.running {
            // Ran well past its backoff: a later exit starts the backoff over.
            if memory.attempts > 0 && memory.not_before.is_some_and(|t| now >= t + STABLE) {
                update(agent, &c.name, |m| {
                    m.attempts = 0;
                    m.last_error = None;
                });
            }
            continue;
        }
        // Prepared for a move's start (`PrepareApplication`): only that converge starts it,
        // once this node owns its volumes.
        if c.never_started {
            continue;
        }
        if memory.not_before.is_some_and(|t| now < t) {
            continue;
        }
        let details = match agent.runtime.details(&c.name).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(container = %c.name, error = %e, "supervisor: cannot inspect");
                continue;
            }
        };
        if !holder_lost
            && !wants_restart(
                &c.application.restart_policy,
                details.exit_code,
                memory.restarts,
            )
        {
            continue;
        }
        let delay = backoff(memory.attempts);
        let outcome = match agent.owns_all_volumes(&c.application).await {
            Ok(true) => agent.prove_volumes(&c.application).await.map(drop),
            Ok(false) => {
                tracing::warn!(container = %c.name, "not restarted: this node does not own all its volumes");
                continue;
            }
            Err(e) => Err(e),
        };
        let outcome = match outcome.and_then(|()| agent.check_files(&c.application)) {
            Ok(()) => agent.runtime.start(&c.name).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                agent.metrics.restarted(&c.application.name);
                // Its routes were left out while it was down (or its address changed).
                if let Err(e) = agent.reapply_routes().await {
                    tracing::warn!(container = %c.name, error = %e, "cannot re-apply routes after the restart");
                }
                tracing::info!(
                    container = %c.name,
                    exit_code = ?details.exit_code,
                    restart = memory.restarts + 1,
                    "restarted an exited container (its volume proven first)"
                );
                update(agent, &c.name, |m| {
                    m.restarts += 1;
                    m.attempts += 1;
                    m.not_before = Some(now + delay);
                    m.last_error = None;
                });
            }
            Err(e) => {
                let text = e.to_string();
                if memory.last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(container = %c.name, error = %text, "not restarting an exited container");
                }
                update(agent, &c.name, |m| {
                    m.attempts += 1;
                    m.not_before = Some(now + delay);
                    m.last_error = Some(text);
                });
            }
        }
    }
}

fn remembered(agent: &Agent, container: &str) -> RestartMemory {
    agent
        .restarts
        .lock()
        .ok()
        .and_then(|m| m.get(container).cloned())
        .unwrap_or_default()
}

fn update(agent: &Agent, container: &str, change: impl FnOnce(&mut RestartMemory)) {
    if let Ok(mut m) = agent.restarts.lock() {
        change(m.entry(container.to_string()).or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_decide_like_docker() {
        let on_failure = |max| RestartPolicy::OnFailure {
            maximum_retry_count: max,
        };
        assert!(!wants_restart(&RestartPolicy::Never, Some(1), 0));
        assert!(wants_restart(&RestartPolicy::Always, Some(0), 100));
        assert!(!wants_restart(&on_failure(None), Some(0), 0));
        assert!(wants_restart(&on_failure(None), Some(137), 50));
        assert!(wants_restart(&on_failure(Some(2)), Some(1), 1));
        assert!(!wants_restart(&on_failure(Some(2)), Some(1), 2));
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(6), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }
}
