//! The cluster planner: a pure function from (desired state, current state) to an ordered
//! [`Plan`] of phases. Nothing here does I/O; the deploy driver carries plans out.
//!
//! Phases, in order (empty ones are left out):
//!
//! 0. `failover` (only from [`plan_around`] with failover asked for): replicas of volumes whose
//!    owner does not answer are promoted.
//! 1. `finish-handoff`: a handoff that a crash interrupted is completed first.
//! 2. `create-volumes`: volumes of applications that have none anywhere yet.
//! 3. `pre-copy`: moved applications' volumes are pushed while they still run.
//!    Then `prepare`: the node each of them moves to creates its container, not started, on
//!    the replicas the pre-copy left, so that the move's start is only `docker start`.
//! 4. `hold`, then `switch-routes`: first each node an application with volumes moves to
//!    routes its ports to itself and holds new connections until the application is ready
//!    there; then every node routes those ports to it (hold, don't refuse: clients see a
//!    pause, not a refused connection). The target goes first so that no node ever forwards
//!    a port to a node that still forwards it back.
//! 5. `stop`: containers that must not run where they are (removed, or moved away with
//!    their volumes).
//! 6. `final-push`: the small incremental push of moved volumes after their application
//!    stopped, which carries the handoff: its receive makes the new node the owner at the
//!    next epoch (one round trip), then the old node records the volume handed over.
//! 7. `handoff`: only to finish a handoff whose target never heard of it (a crash).
//! 8. `start`: new containers start; changed ones restart in place. (A container prepared for
//!    a move whose connections its new node holds was started there already, as soon as the
//!    final push made that node the owner: this phase finds it running and waits until ready.)
//! 9. `routes`: every node that does not yet route by the desired state's route map is told
//!    to follow it (`FollowRoutes` with the map's version; each agent derives its own table),
//!    only now that every container the routes point at is up (and every node switched
//!    before the stop, whose table then follows no version). A node that left the deployment
//!    gets an empty table.
//! 10. `retire`: applications without volumes that moved stop on their old node, now that
//!     the new container is ready and routed to (make before break: they never stop serving).
//! 11. `standby`: every node whose replication schedule (the `standby:` entries of the
//!     applications it hosts) differs gets the new one, once the volumes are where they go.
//!
//! **Architecture invariant:** planning a cluster that matches its desired state yields the
//! empty plan, so `flockerctl deploy` run twice changes nothing the second time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flocker_wire::routes::MovedPorts;
use flocker_wire::{Action, ClusterState, DesiredState, NodeAction, Phase, Plan, VolumeState};

/// Computes the plan that turns `current` into `desired`.
///
/// Its cost grows with nodes + applications: placements and volume records are indexed once
/// (asking `DesiredState::node_of` or `ClusterState::volume_record` per application would
/// scan every node each time), and routes are compared by map version, not table by table.
pub fn plan(desired: &DesiredState, current: &ClusterState) -> Plan {
    let mut phases = PhaseSet::default();
    let placement = desired.placement();
    let volumes = VolumeIndex::new(current);
    let mut moving = Vec::new();
    for (name, app) in &desired.applications {
        let Some(&target) = placement.get(name.as_str()) else {
            continue;
        };
        // Every volume of the application goes through the same phases: pushed together
        // while it runs, once more after its one stop, handed off before its one start.
        let mut moves = false;
        let mut all_pre_copied = true;
        for (volume, spec) in app.volumes() {
            let planned = plan_volume(
                VolumeToPlace {
                    application: name,
                    volume,
                    maximum_size: spec.maximum_size,
                    target,
                },
                current,
                &volumes,
                &mut phases,
            );
            moves |= planned != VolumePlan::Stays;
            all_pre_copied &= planned == VolumePlan::MovesPreCopied;
        }
        let target_has_container = current
            .nodes
            .get(target)
            .is_some_and(|n| n.container(name).is_some());
        if moves && all_pre_copied && !target_has_container {
            phases.prepare.push(on(
                target,
                Action::PrepareApplication {
                    application: app.clone(),
                },
            ));
        }
        if moves && !app.ports.is_empty() {
            moving.push(MovedPorts {
                application: name.clone(),
                node: target.to_string(),
                ports: app.ports.clone(),
            });
        }
        plan_container(current, app, target, &mut phases);
    }
    plan_stops(desired, &placement, current, &mut phases);
    let switched = plan_switch(desired, moving, &mut phases);
    plan_routes(desired, current, &switched, &mut phases);
    plan_standby(desired, &placement, current, &mut phases);
    phases.into_plan(desired)
}

/// Every copy of every volume, by volume name, in node order: the same records
/// [`ClusterState::volume_record`] and [`ClusterState::ownership_settled`] read, found
/// without scanning every node per volume.
struct VolumeIndex<'a> {
    copies: HashMap<&'a str, Vec<(&'a str, &'a VolumeState)>>,
}

impl<'a> VolumeIndex<'a> {
    fn new(current: &'a ClusterState) -> Self {
        let mut copies: HashMap<&str, Vec<(&str, &VolumeState)>> = HashMap::new();
        for (node, state) in &current.nodes {
            for v in &state.volumes {
                let here = copies.entry(v.name.as_str()).or_default();
                // `NodeState::volume` finds a node's first copy of a name.
                if !here.iter().any(|(n, _)| *n == node.as_str()) {
                    here.push((node.as_str(), v));
                }
            }
        }
        VolumeIndex { copies }
    }

    /// As [`ClusterState::volume_record`]: the copy with the highest epoch, the last node
    /// in address order among equals.
    fn record(&self, volume: &str) -> Option<(&'a str, &'a VolumeState)> {
        self.copies
            .get(volume)?
            .iter()
            .copied()
            .max_by_key(|(_, v)| v.epoch)
    }

    /// Nodes whose copy still names the node itself owner exactly one epoch below `record`
    /// (the volume's record, [`Self::record`]): a final push carried the handoff to the
    /// owner, whose answer never came back (a partition, a crash), so the source did not
    /// record it. A failover promotes two epochs up, so a copy left behind by one is never
    /// among these: fencing sets it aside.
    fn unrecorded_pushed_handoffs(&self, record: &VolumeState) -> Vec<&'a str> {
        self.copies
            .get(record.name.as_str())
            .map_or_else(Vec::new, |copies| {
                copies
                    .iter()
                    .filter(|(node, v)| {
                        *node != record.owner
                            && v.owner == *node
                            && v.epoch.checked_add(1) == Some(record.epoch)
                    })
                    .map(|(node, _)| *node)
                    .collect()
            })
    }

    /// As [`ClusterState::ownership_settled`].
    fn settled(&self, volume: &str) -> bool {
        let Some((_, record)) = self.record(volume) else {
            return true;
        };
        self.copies.get(volume).is_some_and(|copies| {
            copies.iter().any(|(node, v)| {
                *node == record.owner && v.owner == record.owner && v.epoch == record.epoch
            })
        })
    }
}

/// The plan's phases, filled in any order and emitted in protocol order.
#[derive(Default)]
struct PhaseSet {
    finish_handoff: Vec<NodeAction>,
    create_volumes: Vec<NodeAction>,
    pre_copy: Vec<NodeAction>,
    prepare: Vec<NodeAction>,
    hold: Vec<NodeAction>,
    switch_routes: Vec<NodeAction>,
    stop: Vec<NodeAction>,
    final_push: Vec<NodeAction>,
    handoff: Vec<NodeAction>,
    start: Vec<NodeAction>,
    routes: Vec<NodeAction>,
    retire: Vec<NodeAction>,
    standby: Vec<NodeAction>,
}

impl PhaseSet {
    fn into_plan(self, desired: &DesiredState) -> Plan {
        let mut named = vec![
            ("finish-handoff".to_owned(), self.finish_handoff),
            ("create-volumes".to_owned(), self.create_volumes),
            ("pre-copy".to_owned(), self.pre_copy),
            ("prepare".to_owned(), self.prepare),
            ("hold".to_owned(), self.hold),
            ("switch-routes".to_owned(), self.switch_routes),
            ("stop".to_owned(), self.stop),
            ("final-push".to_owned(), self.final_push),
            ("handoff".to_owned(), self.handoff),
        ];
        named.extend(start_waves(self.start, desired));
        named.push(("routes".to_owned(), self.routes));
        named.push(("retire".to_owned(), self.retire));
        named.push(("standby".to_owned(), self.standby));
        Plan {
            phases: named
                .into_iter()
                .filter(|(_, actions)| !actions.is_empty())
                .map(|(name, mut actions)| {
                    // Within a phase order does not matter; sorting by node keeps output stable.
                    actions.sort_by(|a, b| a.node.cmp(&b.node));
                    Phase { name, actions }
                })
                .collect(),
        }
    }
}

/// Splits the starts by `depends_on`: `start` holds the applications that wait for nothing
/// being started, `start-2` those that wait only for the first, and so on. An application
/// whose dependency is already running (not started by this plan) does not wait.
fn start_waves(starts: Vec<NodeAction>, desired: &DesiredState) -> Vec<(String, Vec<NodeAction>)> {
    let started: BTreeSet<String> = starts
        .iter()
        .filter_map(|a| started_application(&a.action))
        .collect();
    let mut depth: BTreeMap<String, usize> = BTreeMap::new();
    // Waves are ordered, so a dependency's depth is known before its dependents'. A cycle
    // was refused by validation; should one arrive anyway, everything stays in one wave.
    if let Ok(waves) = flocker_wire::checks::start_order(desired) {
        for name in waves.into_iter().flatten() {
            let wait = desired.applications.get(&name).map_or(0, |app| {
                app.depends_on
                    .iter()
                    .filter(|d| started.contains(*d))
                    .map(|d| depth.get(d).map_or(0, |n| n + 1))
                    .max()
                    .unwrap_or(0)
            });
            depth.insert(name, wait);
        }
    }
    let mut waves: BTreeMap<usize, Vec<NodeAction>> = BTreeMap::new();
    for action in starts {
        let level = started_application(&action.action)
            .and_then(|name| depth.get(&name).copied())
            .unwrap_or(0);
        waves.entry(level).or_default().push(action);
    }
    waves
        .into_values()
        .enumerate()
        .map(|(i, actions)| {
            let name = if i == 0 {
                "start".to_owned()
            } else {
                format!("start-{}", i + 1)
            };
            (name, actions)
        })
        .collect()
}

fn started_application(action: &Action) -> Option<String> {
    match action {
        Action::StartApplication { application } | Action::RestartApplication { application } => {
            Some(application.name.clone())
        }
        _ => None,
    }
}

fn on(node: &str, action: Action) -> NodeAction {
    NodeAction {
        node: node.to_string(),
        action,
    }
}

/// One volume of an application and the node the application is placed on.
struct VolumeToPlace<'a> {
    application: &'a str,
    volume: &'a str,
    maximum_size: Option<u64>,
    target: &'a str,
}

/// What [`plan_volume`] planned for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumePlan {
    /// Created on, or already owned by, the application's node.
    Stays,
    /// Moves there, pushed only after the application stopped (it was not running).
    Moves,
    /// Moves there, pre-copied while the application runs: the replica exists there before
    /// the stop.
    MovesPreCopied,
}

/// Volume steps for an application placed on `target`: create, or move by the migration
/// protocol (pre-copy while running, final push after stop carrying the handoff), or finish
/// a handoff that was interrupted.
fn plan_volume(
    place: VolumeToPlace<'_>,
    current: &ClusterState,
    volumes: &VolumeIndex<'_>,
    phases: &mut PhaseSet,
) -> VolumePlan {
    let VolumeToPlace {
        application,
        volume: name,
        maximum_size,
        target,
    } = place;
    let Some((holder, record)) = volumes.record(name) else {
        phases.create_volumes.push(on(
            target,
            Action::CreateVolume {
                volume: name.to_string(),
                maximum_size,
            },
        ));
        return VolumePlan::Stays;
    };
    let owner = record.owner.as_str();
    for source in volumes.unrecorded_pushed_handoffs(record) {
        // The source records the handoff it made (its agent checks that the application is
        // stopped there and that the owner holds its newest snapshot), so the volume has one
        // owner again.
        let running = current
            .nodes
            .get(source)
            .and_then(|n| n.container(application))
            .is_some_and(|c| c.running);
        if !running {
            phases.finish_handoff.push(handoff(source, name, owner));
        }
    }
    let settled = volumes.settled(name);
    if owner == target {
        if !settled {
            // The holder recorded "handed to target" but the target never heard: tell it again.
            phases.handoff.push(handoff(holder, name, target));
        }
        return VolumePlan::Stays;
    }
    if !settled {
        // Finish the earlier handoff to `owner` before moving on from there.
        phases.finish_handoff.push(handoff(holder, name, owner));
    }
    let running_on_owner = current
        .nodes
        .get(owner)
        .and_then(|n| n.container(application))
        .is_some_and(|c| c.running);
    if running_on_owner {
        phases.pre_copy.push(push(owner, name, target, false));
    }
    // The final push hands the volume over with its stream: no `handoff` step of its own.
    phases.final_push.push(push(owner, name, target, true));
    if running_on_owner {
        VolumePlan::MovesPreCopied
    } else {
        VolumePlan::Moves
    }
}

fn push(from: &str, volume: &str, to: &str, last: bool) -> NodeAction {
    on(
        from,
        Action::PushVolume {
            volume: volume.to_string(),
            to: to.to_string(),
            last,
        },
    )
}

fn handoff(from: &str, volume: &str, to: &str) -> NodeAction {
    on(
        from,
        Action::Handoff {
            volume: volume.to_string(),
            to: to.to_string(),
        },
    )
}

/// Starts the application on its node, or restarts it in place when its configuration
/// changed or it is not running.
fn plan_container(
    current: &ClusterState,
    app: &flocker_wire::Application,
    target: &str,
    phases: &mut PhaseSet,
) {
    let name = app.name.as_str();
    let existing = current.nodes.get(target).and_then(|n| n.container(name));
    let action = match existing {
        None => Action::StartApplication {
            application: app.clone(),
        },
        // An unhealthy container does not match either: routes would lead to it (after a
        // move whose start failed, say), so it is restarted and must become ready again.
        Some(c)
            if c.application != *app
                || !c.running
                || c.health == Some(flocker_wire::Health::Unhealthy) =>
        {
            Action::RestartApplication {
                application: app.clone(),
            }
        }
        Some(_) => return,
    };
    phases.start.push(on(target, action));
}

/// Stops every managed container that runs where the desired state does not place it.
///
/// An application without volumes that moves is stopped on its old node only after its new
/// container is ready and the routes lead there (`retire`, after `routes`): it never stops
/// serving, and a new container that never becomes ready fails the deploy while the old one
/// still serves. One with volumes stops before its final push, as the protocol requires,
/// and a removed one stops at once.
fn plan_stops(
    desired: &DesiredState,
    placement: &HashMap<&str, &str>,
    current: &ClusterState,
    phases: &mut PhaseSet,
) {
    for (node, state) in &current.nodes {
        for container in &state.containers {
            let name = &container.application.name;
            let Some(placed) = placement.get(name.as_str()) else {
                phases.stop.push(stop(node, name));
                continue;
            };
            if *placed == node.as_str() {
                continue;
            }
            let stateless = desired
                .applications
                .get(name)
                .is_some_and(|app| !app.has_volumes());
            if stateless {
                phases.retire.push(stop(node, name));
            } else {
                phases.stop.push(stop(node, name));
            }
        }
    }
}

fn stop(node: &str, application: &str) -> NodeAction {
    on(
        node,
        Action::StopApplication {
            application: application.to_string(),
        },
    )
}

/// Before the stop of a move, every node of the deployment routes the moving applications'
/// ports to their new node (`SwitchRoutes`), which holds new connections until the
/// application is ready there. The new nodes switch their own moves first (`hold`): while
/// the others switch in parallel, a node that already forwards a port to the new node can
/// never meet a new node that still forwards it back (a loop that resets connections).
/// Returns the nodes switched: their tables then follow no route map version, so the
/// `routes` phase sends them the map again.
///
/// Only applications with volumes switch early: one without moves make before break (its
/// old copy serves until the routes phase), which is better than holding.
fn plan_switch(
    desired: &DesiredState,
    moving: Vec<MovedPorts>,
    phases: &mut PhaseSet,
) -> BTreeSet<String> {
    if moving.is_empty() {
        return BTreeSet::new();
    }
    let mut to_each: BTreeMap<&str, Vec<MovedPorts>> = BTreeMap::new();
    for m in &moving {
        to_each.entry(m.node.as_str()).or_default().push(m.clone());
    }
    for (node, moves) in to_each {
        phases.hold.push(on(node, Action::SwitchRoutes { moves }));
    }
    for node in desired.nodes.keys() {
        phases.switch_routes.push(on(
            node,
            Action::SwitchRoutes {
                moves: moving.clone(),
            },
        ));
    }
    desired.nodes.keys().cloned().collect()
}

/// Every node of the deployment that does not route by the desired route map yet is told
/// to follow it; a node that left the deployment and still routes gets an empty table.
///
/// A node reporting the map's version routes by it. One reporting no version (its table was
/// set as a list, or fencing changed it) is compared table by table (when the map carries no services), which costs its
/// applications' worth of work but keeps a matching table from being sent again.
fn plan_routes(
    desired: &DesiredState,
    current: &ClusterState,
    switched: &BTreeSet<String>,
    phases: &mut PhaseSet,
) {
    let map = desired.route_map();
    let version = map.version();
    for node in desired.nodes.keys() {
        let state = current.nodes.get(node);
        let follows = match state.map(|s| (&s.routes_version, &s.routes)) {
            Some((Some(v), _)) => *v == version,
            // Services travel only in the map: a node without its version has none of them.
            Some((None, routes)) => {
                let mut have = routes.clone();
                have.sort();
                have == map.routes_for(node) && map.services.is_empty()
            }
            None => map.ports.is_empty() && map.services.is_empty(),
        };
        if !follows || switched.contains(node) {
            phases.routes.push(on(
                node,
                Action::FollowRoutes {
                    version: version.clone(),
                },
            ));
        }
    }
    for (node, state) in &current.nodes {
        let routes_something = !state.routes.is_empty() || state.routes_version.is_some();
        if !desired.nodes.contains_key(node) && routes_something {
            phases
                .routes
                .push(on(node, Action::SetRoutes { routes: Vec::new() }));
        }
    }
}

mod failover;
pub use failover::{Blocked, FailoverError, Planned, Promotion, plan_around};

/// Every node whose replication schedule differs from the deployment's `standby:` for the
/// applications it hosts.
fn plan_standby(
    desired: &DesiredState,
    placement: &HashMap<&str, &str>,
    current: &ClusterState,
    phases: &mut PhaseSet,
) {
    let mut wanted_by_node: HashMap<&str, BTreeMap<String, flocker_wire::Standby>> = HashMap::new();
    for (app, standby) in &desired.standby {
        if let Some(&node) = placement.get(app.as_str()) {
            wanted_by_node
                .entry(node)
                .or_default()
                .insert(app.clone(), standby.clone());
        }
    }
    for node in desired.nodes.keys() {
        let wanted = wanted_by_node.remove(node.as_str()).unwrap_or_default();
        let have = current.nodes.get(node).map(|n| &n.standby);
        if have.map_or(!wanted.is_empty(), |h| *h != wanted) {
            phases
                .standby
                .push(on(node, Action::SetStandby { standby: wanted }));
        }
    }
}

#[cfg(test)]
mod simulate;
#[cfg(test)]
mod tests;
