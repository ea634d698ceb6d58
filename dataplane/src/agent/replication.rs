//! Continuous replication to standby nodes: every volume this node owns, whose application
//! the last deploy placed here with `standby:` nodes, is pushed incrementally to each standby
//! every interval, over the same agent-to-agent path and checks as a move's pre-copy. The
//! standby keeps a read-only replica recording owner and epoch, which `deploy --failover` can
//! promote.
//!
//! What it keeps: nothing about progress. The schedule is the last deploy's desired state
//! (kept in the agent's state directory, like the route table); what to send is derived each
//! round from both sides' snapshots, so a restarted agent simply carries on.
//!
//! A move always wins: a round finding the volume busy (a push, handoff or receive holds its
//! lock) is skipped, never queued. A standby that fails is retried with a doubling backoff
//! (from the interval up to [`MAX_BACKOFF`]), and the others go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Agent;

/// How often the loop looks for due work.
const TICK: Duration = Duration::from_millis(250);
/// The longest wait before retrying a standby that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// When each (volume, standby) is due next, and how many times in a row it failed.
#[derive(Debug, Default)]
struct Due {
    at: HashMap<(String, String), (Instant, u32)>,
}

impl Due {
    fn ready(&self, key: &(String, String), now: Instant) -> bool {
        self.at.get(key).is_none_or(|(t, _)| now >= *t)
    }

    fn succeeded(&mut self, key: (String, String), interval: Duration, now: Instant) {
        self.at.insert(key, (now + interval, 0));
    }

    fn failed(&mut self, key: (String, String), interval: Duration, now: Instant) -> Duration {
        let failures = self.at.get(&key).map_or(0, |(_, f)| *f).saturating_add(1);
        let wait = backoff(interval, failures);
        self.at.insert(key, (now + wait, failures));
        wait
    }
}

/// The wait after `failures` failures in a row: the interval doubled per failure, at most
/// [`MAX_BACKOFF`] (but never less than the interval).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let doubled = interval.saturating_mul(1u32 << failures.min(16));
    doubled.min(MAX_BACKOFF.max(interval))
}

/// Runs replication rounds until the task is aborted.
pub async fn run(agent: Arc<Agent>) {
    let mut due = Due::default();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        round(&agent, &mut due).await;
    }
}

/// One round: every due (volume, standby) pair is pushed once.
async fn round(agent: &Agent, due: &mut Due) {
    let Some(desired) = agent.last_desired() else {
        return;
    };
    for (application, standby) in &desired.standby {
        if desired.node_of(application) != Some(agent.me.as_str()) {
            continue;
        }
        let Some(app) = desired.applications.get(application) else {
            continue;
        };
        let interval = Duration::from_millis(standby.interval_ms);
        for (volume, _) in app.volumes() {
            for node in &standby.nodes {
                replicate_due(agent, due, volume, node, interval).await;
            }
        }
    }
}

/// Pushes `volume` to the standby `node` if it is due and this node owns it.
async fn replicate_due(agent: &Agent, due: &mut Due, volume: &str, node: &str, interval: Duration) {
    let key = (volume.to_string(), node.to_string());
    if !due.ready(&key, Instant::now()) {
        return;
    }
    // Only the owner pushes; a copy this node does not own (yet) waits for the move.
    match agent.local_volume(volume).await {
        Ok(Some(v)) if v.owner == agent.me => {}
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(volume, error = %e, "replication: cannot read the volume");
            return;
        }
    }
    let started = Instant::now();
    match agent.replicate_once(volume, node).await {
        Ok(true) => {
            agent.metrics.replicated(volume, node);
            tracing::debug!(volume, standby = %node, took_ms = started.elapsed().as_millis() as u64, "replicated");
            due.succeeded(key, interval, Instant::now());
        }
        Ok(false) => {
            tracing::debug!(volume, standby = %node, "replication skipped: the volume is busy");
        }
        Err(e) => {
            if refused_as_stale(&e) {
                // The standby owns it now (a failover): this copy is stale. Fence at once
                // rather than at the next periodic check.
                tracing::warn!(volume, standby = %node, "the standby owns this volume now: fencing");
                super::fencing::check(agent).await;
            }
            let wait = due.failed(key, interval, Instant::now());
            tracing::warn!(volume, standby = %node, error = %e, retry_in_s = wait.as_secs(), "replication failed");
        }
    }
}

/// Whether a push was refused because the target's copy outranks ours.
fn refused_as_stale(error: &super::AgentError) -> bool {
    matches!(
        error,
        super::AgentError::Peer(flocker_client::ClientError::Refused { status, .. }) if status.as_u16() == 409
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_up_to_a_minute() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(2), 0), s(2));
        assert_eq!(backoff(s(2), 1), s(4));
        assert_eq!(backoff(s(2), 5), s(60));
        assert_eq!(backoff(s(2), u32::MAX), s(60));
        // An interval longer than the cap is never shortened.
        assert_eq!(backoff(s(300), 3), s(300));
    }

    #[test]
    fn a_failed_standby_waits_and_a_success_resets() {
        let now = Instant::now();
        let mut due = Due::default();
        let key = ("db".to_string(), "n2".to_string());
        assert!(due.ready(&key, now));
        let wait = due.failed(key.clone(), Duration::from_secs(1), now);
        assert_eq!(wait, Duration::from_secs(2));
        assert!(!due.ready(&key, now + Duration::from_secs(1)));
        assert!(due.ready(&key, now + Duration::from_secs(2)));
        due.succeeded(key.clone(), Duration::from_secs(1), now);
        assert_eq!(
            due.failed(key, Duration::from_secs(1), now),
            Duration::from_secs(2)
        );
    }
}
