//! Fencing: a node that owned a volume, was cut off or dead while someone else was promoted
//! (`deploy --failover`), and comes back must not serve its stale copy.
//!
//! The agent asks every peer of the last deploy for their copy of each volume it owns. A
//! peer recording a newer epoch (and another owner) means this copy lost: the agent stops and
//! removes the application's container, sets the copy aside under a name of its own (the
//! divergent writes stay there for a person to recover, never destroyed), and routes the
//! application's ports to the new owner. The next deploy then sees exactly one owner.
//!
//! When: once at start, before the supervisor may restart anything, then every
//! [`CHECK_INTERVAL`]. So a returning node serves stale data for at most that long after it
//! can reach a peer that knows the newer epoch, and not at all if it restarts.
//!
//! What it cannot know: a node that reaches no peer holding the volume keeps serving its
//! copy to whoever can still reach it (clients on its side of a partition); every other node
//! routes to the new owner. Nothing here decides to promote anything: only a person does.

use std::sync::Arc;
use std::time::Duration;

use flocker_wire::{Route, RouteTarget, VolumeState};

use crate::ownership;

use super::{Agent, AgentError};

/// How often a running agent looks for newer epochs of the volumes it owns.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Checks every volume this node owns against every peer once; returns the volumes fenced.
pub async fn check(agent: &Agent) -> Vec<String> {
    let Some(desired) = agent.last_desired() else {
        return Vec::new();
    };
    let owned: Vec<VolumeState> = match agent.blocking(|b| b.list()).await {
        Ok(list) => list.into_iter().filter(|v| v.owner == agent.me).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "fencing: cannot list volumes");
            return Vec::new();
        }
    };
    let peers: Vec<&String> = desired.nodes.keys().filter(|n| **n != agent.me).collect();
    let mut fenced = Vec::new();
    for local in owned {
        // All peers at once: a dead one costs one timeout, not one per peer.
        let answers = futures_util::future::join_all(peers.iter().map(|peer| {
            let name = local.name.as_str();
            async move { (*peer, agent.peer_volume(peer, name).await) }
        }))
        .await;
        for (peer, answer) in answers {
            let theirs = match answer {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(volume = %local.name, %peer, error = %e, "fencing: peer did not answer");
                    continue;
                }
            };
            if ownership::must_fence(&agent.me, &local, &theirs) {
                match agent.fence(&local, &theirs).await {
                    Ok(aside) => {
                        tracing::warn!(
                            volume = %local.name,
                            epoch = local.epoch,
                            newer_owner = %theirs.owner,
                            newer_epoch = theirs.epoch,
                            kept_as = %aside,
                            "fenced: another node owns this volume at a newer epoch; its application stopped here and this copy was set aside"
                        );
                        fenced.push(local.name.clone());
                    }
                    Err(e) => {
                        tracing::error!(volume = %local.name, error = %e, "fencing failed: the stale copy may still serve")
                    }
                }
                break;
            }
        }
    }
    fenced
}

/// Checks every [`CHECK_INTERVAL`] until the task is aborted.
pub async fn run(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        check(&agent).await;
    }
}

impl Agent {
    /// Stops the application, sets the stale copy aside and routes to the new owner; returns
    /// the name the copy is kept under.
    async fn fence(&self, local: &VolumeState, newer: &VolumeState) -> Result<String, AgentError> {
        let _converge = self.converge_lock.clone().lock_owned().await;
        let _lock = self.lock_volume(&local.name).await;
        // Re-read under the lock: a converge may have changed it since.
        let Some(current) = self.local_volume(&local.name).await? else {
            return Ok(String::new());
        };
        if !ownership::must_fence(&self.me, &current, newer) {
            return Ok(String::new());
        }
        // The application using the volume; a volume no container uses is named as its
        // application, or is a further volume whose main volume is fenced beside it.
        let application = match self.using_volume(&local.name).await? {
            Some(c) => {
                self.runtime.stop_and_remove(&c.name).await?;
                c.application.name
            }
            None => local.name.clone(),
        };
        let aside = aside_name(&local.name, current.epoch, now_ms());
        let (n, a) = (local.name.clone(), aside.clone());
        self.blocking(move |b| b.set_aside(&n, &a)).await?;
        let routes = reroute(&self.routes.current(), &application, &newer.owner);
        if routes != self.routes.current() {
            let resolver = self.resolver().await?;
            self.routes.set_resolvable(routes, &resolver)?;
        }
        Ok(aside)
    }
}

/// The name a fenced copy is kept under: `NAME.fenced-eEPOCH-UNIXMS`.
pub fn aside_name(volume: &str, epoch: u64, unix_ms: u64) -> String {
    format!("{volume}.fenced-e{epoch}-{unix_ms}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `routes` with every local route of `application` pointed at `owner` instead.
pub fn reroute(routes: &[Route], application: &str, owner: &str) -> Vec<Route> {
    let mut out: Vec<Route> = routes
        .iter()
        .map(|r| {
            if r.application == application && matches!(r.target, RouteTarget::Local { .. }) {
                Route {
                    target: RouteTarget::Node {
                        address: owner.to_string(),
                    },
                    ..r.clone()
                }
            } else {
                r.clone()
            }
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_routes_of_the_fenced_application_point_at_the_new_owner() {
        let routes = vec![
            Route {
                external_port: 6379,
                protocol: flocker_wire::Protocol::Tcp,
                application: "redis".into(),
                target: RouteTarget::Local {
                    internal_port: 6379,
                },
            },
            Route {
                external_port: 80,
                protocol: flocker_wire::Protocol::Tcp,
                application: "web".into(),
                target: RouteTarget::Local { internal_port: 80 },
            },
        ];
        let out = reroute(&routes, "redis", "198.18.0.12");
        assert_eq!(
            out.iter()
                .find(|r| r.application == "redis")
                .map(|r| &r.target),
            Some(&RouteTarget::Node {
                address: "198.18.0.12".into()
            })
        );
        assert_eq!(
            out.iter()
                .find(|r| r.application == "web")
                .map(|r| &r.target),
            Some(&RouteTarget::Local { internal_port: 80 })
        );
    }

    #[test]
    fn aside_names_are_valid_volume_names_that_say_what_they_are() {
        let name = aside_name("redis", 3, 1_733_150_000_000);
        assert_eq!(name, "redis.fenced-e3-1733150000000");
        assert!(crate::volume::check_name(&name).is_ok());
    }
}
