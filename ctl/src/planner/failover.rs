//! Planning around nodes that do not answer: what can still be done, what needs the missing
//! nodes, and, when a person asks for it (`deploy --failover`), which replica takes over a
//! volume whose owner is gone.
//!
//! The rules, all pure:
//! - An application whose volume's owner is unreachable cannot move by the migration protocol
//!   (the owner must push and hand off). It is *blocked*, unless failover is asked for: then the
//!   newest replica among the reachable nodes (highest push sequence) is promoted, at the
//!   highest epoch any reachable copy records plus two, and the move continues from there. Two,
//!   because the dead owner may have recorded a handoff at one more than what its replicas know
//!   (a give-away whose target never heard): a promotion must outrank it, never tie with it.
//! - Failover never invents data: with no replica the whole plan is refused. A volume that no
//!   reachable node knows is not created while some node does not answer (it may live there).
//! - An application placed on an unreachable node is *unknown* (it may well be running) unless
//!   the deployment moves it there from a reachable node, which is *blocked*.
//! - Actions on unreachable nodes are left out; route tables there follow on a later deploy
//!   (and a returning agent fences itself, see the agent's `fencing` module).
//!
//! Everything else is planned as usual, against an effective desired state in which blocked
//! applications stay where they are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use flocker_wire::snapshots::{newest_push, push_sequence, push_time_ms};
use flocker_wire::{Action, ClusterState, DesiredState, NodeAction, Phase, Plan};

/// Why a failover cannot be planned; nothing is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error(
        "cannot fail over `{application}`: the owner of its volume, {owner}, does not answer and no reachable node holds a replica; starting it on an empty volume would lose its data, so nothing was changed"
    )]
    NoReplica { application: String, owner: String },
    #[error("cannot fail over `{application}`: the epoch of its volume cannot grow further")]
    EpochExhausted { application: String },
}

/// A replica promoted to owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub application: String,
    /// The node that owned the volume and does not answer.
    pub lost_owner: String,
    pub node: String,
    pub epoch: u64,
    /// The replica's newest snapshot: every write before it survives.
    pub snapshot: String,
    /// When that snapshot was taken (ms since the Unix epoch), if its name says.
    pub snapshot_time_ms: Option<u64>,
}

/// Something the deployment asks for that needs an unreachable node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub application: String,
    pub reason: String,
}

/// A plan around unreachable nodes, with what it leaves out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Planned {
    pub plan: Plan,
    /// The desired state the plan was made for: blocked applications stay where they are.
    /// Agents are sent this one, so their schedules (replication) match what they run.
    pub effective: DesiredState,
    pub promotions: Vec<Promotion>,
    /// Needs an unreachable node: not done, and the deploy fails.
    pub blocked: Vec<Blocked>,
    /// Placed on an unreachable node and not moving: cannot be checked, left alone.
    pub unknown: Vec<String>,
    /// Unreachable nodes whose route tables would change, left for a later deploy.
    pub stale_routes: Vec<String>,
}

/// Plans `desired` against what the reachable nodes report (`current`), with `unreachable`
/// the nodes that did not answer. With no unreachable node this is exactly [`super::plan`].
pub fn plan_around(
    desired: &DesiredState,
    current: &ClusterState,
    unreachable: &BTreeSet<String>,
    failover: bool,
) -> Result<Planned, FailoverError> {
    let mut effective = desired.clone();
    let mut state = current.clone();
    let mut planned = Planned::default();
    let mut promote_actions = Vec::new();
    // Applications left where they are on a node that does not answer: no action may touch
    // them (not even a reachable replica's "finish the handoff" to that node).
    let mut hands_off: BTreeSet<String> = BTreeSet::new();
    // Indexed once: asked per application, `DesiredState::node_of`,
    // `ClusterState::volume_owner` and a search of every node's containers would each scan
    // the whole cluster, nodes x applications in all (4 s of a no-op deploy at 1,000 x 10,000).
    let placement = desired.placement();
    let volumes = super::VolumeIndex::new(current);
    let running = running_nodes(current);
    for (name, app) in &desired.applications {
        let Some(target) = placement.get(name.as_str()).map(|n| n.to_string()) else {
            continue;
        };
        // All of an application's volumes move together, so its first volume's owner is
        // theirs.
        let lead_volume = app.volumes().next().map(|(volume, _)| volume);
        let owner = lead_volume
            .and_then(|volume| volumes.record(volume))
            .map(|(_, record)| record.owner.clone());
        let running_on = running.get(name.as_str()).map(|n| n.to_string());
        if unreachable.contains(&target) {
            let here = owner
                .as_ref()
                .filter(|o| !unreachable.contains(*o) && **o != target)
                .or(running_on.as_ref());
            match here {
                Some(node) => {
                    planned.blocked.push(Blocked {
                        application: name.clone(),
                        reason: format!("its new node {target} does not answer"),
                    });
                    place(&mut effective, name, node);
                }
                None => {
                    planned.unknown.push(name.clone());
                    hands_off.insert(name.clone());
                }
            }
            continue;
        }
        let owner = match owner {
            Some(o) if unreachable.contains(&o) => o,
            Some(_) => continue,
            // No reachable node knows the volume: it is new, or it lives only on a node that
            // does not answer. Creating an empty one could hide the real data, so wait.
            None if app.has_volumes() && !unreachable.is_empty() => {
                let nodes = unreachable.iter().cloned().collect::<Vec<_>>().join(", ");
                if failover {
                    return Err(FailoverError::NoReplica {
                        application: name.clone(),
                        owner: nodes,
                    });
                }
                planned.blocked.push(Blocked {
                    application: name.clone(),
                    reason: format!(
                        "no reachable node holds its volume, which may live on {nodes} (not answering); an empty one is not created in its place"
                    ),
                });
                place(
                    &mut effective,
                    name,
                    unreachable.iter().next().map_or(&target, |n| n),
                );
                hands_off.insert(name.clone());
                continue;
            }
            None => continue,
        };
        let Some(lead_volume) = lead_volume else {
            continue;
        };
        if !failover {
            let hint = match best_replica(current, lead_volume) {
                Some((node, snapshot)) => format!(
                    "; `flockerctl deploy --failover` promotes the newest replica (on {node}, snapshot {snapshot})"
                ),
                None => "; no reachable node holds a replica, so it cannot fail over".to_string(),
            };
            planned.blocked.push(Blocked {
                application: name.clone(),
                reason: format!("the owner of its volume, {owner}, does not answer{hint}"),
            });
            place(&mut effective, name, &owner);
            hands_off.insert(name.clone());
            continue;
        }
        let Some((node, snapshot)) = best_replica(current, lead_volume) else {
            return Err(FailoverError::NoReplica {
                application: name.clone(),
                owner,
            });
        };
        // Every volume is promoted on the node that holds the newest copy of the first one;
        // one missing there would leave the application half its data.
        let mut epoch = 0;
        for (volume, _) in app.volumes() {
            let held = current
                .nodes
                .get(&node)
                .is_some_and(|n| n.volume(volume).is_some());
            if !held {
                return Err(FailoverError::NoReplica {
                    application: name.clone(),
                    owner,
                });
            }
            let volume_epoch = highest_epoch(current, volume)
                .checked_add(2)
                .ok_or_else(|| FailoverError::EpochExhausted {
                    application: name.clone(),
                })?;
            if let Some(copy) = state
                .nodes
                .get_mut(&node)
                .and_then(|n| n.volumes.iter_mut().find(|v| v.name == volume))
            {
                copy.owner = node.clone();
                copy.epoch = volume_epoch;
            }
            promote_actions.push(NodeAction {
                node: node.clone(),
                action: Action::Promote {
                    volume: volume.to_string(),
                    epoch: volume_epoch,
                },
            });
            epoch = epoch.max(volume_epoch);
        }
        planned.promotions.push(Promotion {
            application: name.clone(),
            lost_owner: owner,
            node,
            epoch,
            snapshot_time_ms: push_time_ms(&snapshot),
            snapshot,
        });
    }
    let mut plan = super::plan(&effective, &state);
    let application_of = volume_applications(desired);
    let mut stale_routes = BTreeSet::new();
    for phase in &mut plan.phases {
        phase.actions.retain(|a| {
            if concerns(&a.action, &application_of).is_some_and(|n| hands_off.contains(n)) {
                return false;
            }
            if !unreachable.contains(&a.node) {
                return true;
            }
            if matches!(
                a.action,
                Action::SetRoutes { .. }
                    | Action::FollowRoutes { .. }
                    | Action::SwitchRoutes { .. }
            ) {
                stale_routes.insert(a.node.clone());
            }
            false
        });
    }
    plan.phases.retain(|p| !p.actions.is_empty());
    if !promote_actions.is_empty() {
        plan.phases.insert(
            0,
            Phase {
                name: "failover".to_string(),
                actions: promote_actions,
            },
        );
    }
    planned.plan = plan;
    planned.effective = effective;
    planned.stale_routes = stale_routes.into_iter().collect();
    Ok(planned)
}

/// The application an action is about (a volume action is about the application whose
/// volume it is); `None` for routes and schedules.
fn concerns<'a>(
    action: &'a Action,
    application_of: &BTreeMap<&'a str, &'a str>,
) -> Option<&'a str> {
    match action {
        Action::CreateVolume { volume, .. }
        | Action::PushVolume { volume, .. }
        | Action::Handoff { volume, .. }
        | Action::Promote { volume, .. } => Some(
            application_of
                .get(volume.as_str())
                .copied()
                .unwrap_or(volume.as_str()),
        ),
        Action::StartApplication { application }
        | Action::RestartApplication { application }
        | Action::PrepareApplication { application } => Some(&application.name),
        Action::StopApplication { application } => Some(application),
        Action::SetRoutes { .. }
        | Action::FollowRoutes { .. }
        | Action::SwitchRoutes { .. }
        | Action::SetStandby { .. } => None,
    }
}

/// Each application with a running container and the first node (by address) it runs on.
fn running_nodes(current: &ClusterState) -> HashMap<&str, &str> {
    let mut running = HashMap::new();
    for (address, node) in &current.nodes {
        // `NodeState::container` finds a node's first container of a name.
        let mut seen = HashSet::new();
        for c in &node.containers {
            if seen.insert(c.application.name.as_str()) && c.running {
                running
                    .entry(c.application.name.as_str())
                    .or_insert(address.as_str());
            }
        }
    }
    running
}

/// Each volume name of the desired state and the application it belongs to.
fn volume_applications(desired: &DesiredState) -> BTreeMap<&str, &str> {
    desired
        .applications
        .values()
        .flat_map(|app| app.volumes().map(|(volume, _)| (volume, app.name.as_str())))
        .collect()
}

/// Moves `name` to `node` in the effective desired state.
fn place(desired: &mut DesiredState, name: &str, node: &str) {
    for apps in desired.nodes.values_mut() {
        apps.remove(name);
    }
    desired
        .nodes
        .entry(node.to_string())
        .or_default()
        .insert(name.to_string());
}

/// The reachable replica with the newest push snapshot: its node and that snapshot. Ties go
/// to the lowest address, so the choice is stable.
fn best_replica(current: &ClusterState, volume: &str) -> Option<(String, String)> {
    let mut best: BTreeMap<u64, (String, String)> = BTreeMap::new();
    for (address, node) in &current.nodes {
        let Some(copy) = node.volume(volume) else {
            continue;
        };
        let Some(newest) = newest_push(&copy.snapshots) else {
            continue;
        };
        let Some(sequence) = push_sequence(newest) else {
            continue;
        };
        best.entry(sequence)
            .or_insert_with(|| (address.clone(), newest.to_string()));
    }
    best.pop_last().map(|(_, choice)| choice)
}

fn highest_epoch(current: &ClusterState, volume: &str) -> u64 {
    current
        .nodes
        .values()
        .filter_map(|n| n.volume(volume))
        .map(|v| v.epoch)
        .max()
        .unwrap_or(0)
}
