//! A model of what each action does to the cluster state, checking the protocol's
//! invariants after every step. Test-only: it is how the property tests show that a plan
//! reaches the desired state without ever breaking an invariant on the way.

use flocker_wire::{
    Action, ClusterState, ContainerState, DesiredState, NodeState, Plan, Route, RouteMap,
    RouteTarget, VolumeState,
};

/// Applies every action of every phase in order, checking invariants after each action.
/// `desired` is what the plan was made for: the deploy sends its route map with
/// `FollowRoutes`.
pub fn apply_plan(
    plan: &Plan,
    desired: &DesiredState,
    state: &mut ClusterState,
) -> Result<(), String> {
    apply_plan_checking(plan, desired, state, check_invariants)
}

/// [`apply_plan`] with a chosen invariant check (a cluster whose stateless applications run
/// twice after a node returned is checked for its volumes only).
pub fn apply_plan_checking(
    plan: &Plan,
    desired: &DesiredState,
    state: &mut ClusterState,
    check_invariants: fn(&ClusterState) -> Result<(), String>,
) -> Result<(), String> {
    let map = desired.route_map();
    for phase in &plan.phases {
        for action in &phase.actions {
            apply(&action.node, &action.action, &map, state)
                .map_err(|e| format!("phase {} on {}: {e}", phase.name, action.node))?;
            check_invariants(state)
                .map_err(|e| format!("after phase {} on {}: {e}", phase.name, action.node))?;
        }
    }
    Ok(())
}

fn node_mut<'a>(state: &'a mut ClusterState, node: &str) -> &'a mut NodeState {
    state
        .nodes
        .entry(node.to_string())
        .or_insert_with(|| NodeState {
            address: node.to_string(),
            ..NodeState::default()
        })
}

fn volume_mut<'a>(
    state: &'a mut ClusterState,
    node: &str,
    name: &str,
) -> Option<&'a mut VolumeState> {
    state
        .nodes
        .get_mut(node)?
        .volumes
        .iter_mut()
        .find(|v| v.name == name)
}

fn apply(
    node: &str,
    action: &Action,
    map: &RouteMap,
    state: &mut ClusterState,
) -> Result<(), String> {
    match action {
        Action::CreateVolume { volume, .. } => {
            if state.volume_record(volume).is_some() {
                return Err(format!("volume {volume} already exists somewhere"));
            }
            node_mut(state, node).volumes.push(VolumeState {
                name: volume.clone(),
                owner: node.to_string(),
                epoch: 1,
                snapshots: vec![],
                used_bytes: 0,
            });
        }
        Action::PushVolume { volume, to, last } => {
            let in_use = state.nodes.values().any(|n| {
                n.containers
                    .iter()
                    .any(|c| c.running && c.application.uses_volume(volume))
            });
            if *last && in_use {
                return Err(format!("final push of {volume} while its application runs"));
            }
            let source = volume_mut(state, node, volume)
                .ok_or_else(|| format!("no copy of {volume} to push"))?;
            if source.owner != node {
                return Err(format!("push of {volume} from a node that does not own it"));
            }
            let snapshot = format!("push-{}", source.snapshots.len() + 1);
            source.snapshots.push(snapshot);
            let copy = source.clone();
            match volume_mut(state, to, volume) {
                Some(target) => target.snapshots = copy.snapshots,
                None => node_mut(state, to).volumes.push(copy),
            }
            if *last {
                // The final push carries the handoff: the target records itself owner at
                // the next epoch, then the source records it handed over.
                let epoch = source_epoch(state, node, volume)? + 1;
                for holder in [to.as_str(), node] {
                    if let Some(v) = volume_mut(state, holder, volume) {
                        v.owner = to.clone();
                        v.epoch = epoch;
                    }
                }
            }
        }
        Action::Handoff { volume, to } => {
            let source = volume_mut(state, node, volume)
                .ok_or_else(|| format!("no copy of {volume} to hand off"))?
                .clone();
            let epoch = if source.owner == node {
                source.epoch + 1
            } else if source.owner == to.as_str() {
                source.epoch
            } else {
                return Err(format!(
                    "{node} neither owns {volume} nor handed it to {to}"
                ));
            };
            let target = volume_mut(state, to, volume)
                .ok_or_else(|| format!("{to} holds no copy of {volume}"))?;
            if target.snapshots.last() != source.snapshots.last() {
                return Err(format!("{to} lacks the newest snapshot of {volume}"));
            }
            target.owner = to.clone();
            target.epoch = epoch;
            if let Some(source) = volume_mut(state, node, volume) {
                source.owner = to.clone();
                source.epoch = epoch;
            }
        }
        Action::Promote { volume, epoch } => {
            let highest = state
                .nodes
                .values()
                .filter_map(|n| n.volume(volume))
                .map(|v| v.epoch)
                .max()
                .unwrap_or(0);
            let copy = volume_mut(state, node, volume)
                .ok_or_else(|| format!("{node} holds no replica of {volume} to promote"))?;
            if copy.owner == node {
                return Err(format!("{node} already owns {volume}"));
            }
            if *epoch <= highest {
                return Err(format!(
                    "promotion of {volume} at epoch {epoch} does not outrank epoch {highest}"
                ));
            }
            copy.owner = node.to_string();
            copy.epoch = *epoch;
        }
        Action::StartApplication { application } | Action::RestartApplication { application } => {
            for (volume, _) in application.volumes() {
                let owned = state
                    .nodes
                    .get(node)
                    .and_then(|n| n.volume(volume))
                    .is_some_and(|v| v.owner == node)
                    && state.volume_owner(volume) == Some(node);
                if !owned {
                    return Err(format!(
                        "{} started without owning its volume {volume}",
                        application.name
                    ));
                }
            }
            let n = node_mut(state, node);
            n.containers
                .retain(|c| c.application.name != application.name);
            n.containers.push(ContainerState {
                application: application.clone(),
                running: true,
                ip: None,
                volume_problem: None,
                health: None,
                health_output: None,
            });
        }
        Action::PrepareApplication { application } => {
            // Created, never started: it uses nothing until the start.
            let n = node_mut(state, node);
            if n.container(&application.name).is_none() {
                n.containers.push(ContainerState {
                    application: application.clone(),
                    running: false,
                    ip: None,
                    volume_problem: None,
                    health: None,
                    health_output: None,
                });
            }
        }
        Action::StopApplication { application } => {
            node_mut(state, node)
                .containers
                .retain(|c| &c.application.name != application);
        }
        Action::SetStandby { standby } => {
            node_mut(state, node).standby = standby.clone();
        }
        Action::SetRoutes { routes } => {
            check_routes_lead_somewhere(node, routes, state)?;
            let n = node_mut(state, node);
            n.routes = routes.clone();
            n.routes_version = None;
        }
        Action::SwitchRoutes { moves } => {
            // The moved ports lead to nodes where the application does not run yet: the
            // target holds connections until its start, so no route check here. The agent
            // then reports its whole table and no version.
            let n = node_mut(state, node);
            let full = match n.routes_version.take() {
                Some(_) => map.routes_for(node),
                None => std::mem::take(&mut n.routes),
            };
            let mut routes: Vec<Route> = full
                .into_iter()
                .filter(|r| {
                    !moves.iter().any(|m| {
                        m.application == r.application
                            || m.ports
                                .iter()
                                .any(|p| p.external == r.external_port && p.protocol == r.protocol)
                    })
                })
                .collect();
            routes.extend(moves.iter().flat_map(|m| m.routes_for(node)));
            routes.sort();
            n.routes = routes;
        }
        Action::FollowRoutes { version } => {
            if *version != map.version() {
                return Err(format!(
                    "routes follow version {version}, not the plan's map"
                ));
            }
            check_routes_lead_somewhere(node, &map.routes_for(node), state)?;
            // What the agent reports: the version and its local routes.
            let n = node_mut(state, node);
            n.routes = map.local_routes(node);
            n.routes_version = Some(version.clone());
        }
    }
    Ok(())
}

/// The epoch `node`'s copy of `volume` records.
fn source_epoch(state: &ClusterState, node: &str, volume: &str) -> Result<u64, String> {
    state
        .nodes
        .get(node)
        .and_then(|n| n.volume(volume))
        .map(|v| v.epoch)
        .ok_or_else(|| format!("{node} holds no copy of {volume}"))
}

/// Every route leads to a node where its application runs (or one that did not answer).
fn check_routes_lead_somewhere(
    node: &str,
    routes: &[Route],
    state: &ClusterState,
) -> Result<(), String> {
    for route in routes {
        let host = match &route.target {
            RouteTarget::Local { .. } => node,
            RouteTarget::Node { address } => address.as_str(),
        };
        // A node the state knows nothing about did not answer: what runs there is
        // unknown, and routes to it are left as the deployment says.
        let up = state
            .nodes
            .get(host)
            .is_none_or(|n| n.container(&route.application).is_some_and(|c| c.running));
        if !up {
            return Err(format!(
                "route for {} points at {host} where it does not run",
                route.application
            ));
        }
    }
    Ok(())
}

/// One owner per volume, one node per application with volumes (one without may run on
/// two nodes while it moves: its old copy retires once the new one serves).
pub fn check_invariants(state: &ClusterState) -> Result<(), String> {
    check_volumes(state)?;
    let mut running: Vec<&str> = state
        .nodes
        .values()
        .flat_map(|n| n.containers.iter())
        .filter(|c| c.running && c.application.has_volumes())
        .map(|c| c.application.name.as_str())
        .collect();
    running.sort();
    let before = running.len();
    running.dedup();
    if running.len() != before {
        return Err("an application runs on two nodes".to_string());
    }
    Ok(())
}

/// One writable copy and one owner per epoch for every volume, and no application with a
/// volume running where its volume is not owned.
pub fn check_volumes(state: &ClusterState) -> Result<(), String> {
    let mut volumes: Vec<&str> = state
        .nodes
        .values()
        .flat_map(|n| n.volumes.iter().map(|v| v.name.as_str()))
        .collect();
    volumes.sort();
    volumes.dedup();
    for volume in volumes {
        let writable = state
            .nodes
            .iter()
            .filter(|(address, n)| n.volume(volume).is_some_and(|v| &v.owner == *address))
            .count();
        if writable > 1 {
            return Err(format!("volume {volume} has {writable} writable copies"));
        }
        let Some((_, record)) = state.volume_record(volume) else {
            return Err(format!("volume {volume} has no owner"));
        };
        let rivals = state
            .nodes
            .values()
            .filter_map(|n| n.volume(volume))
            .filter(|v| v.epoch == record.epoch && v.owner != record.owner)
            .count();
        if rivals > 0 {
            return Err(format!(
                "volume {volume} has two owners at epoch {}",
                record.epoch
            ));
        }
        for (address, node) in &state.nodes {
            let in_use = node
                .containers
                .iter()
                .any(|c| c.running && c.application.uses_volume(volume));
            if in_use && record.owner != *address {
                return Err(format!(
                    "{volume} is used on {address}, which does not own it"
                ));
            }
        }
    }
    Ok(())
}

/// Whether `state` is what `desired` describes (containers, volume ownership, routes).
pub fn matches(desired: &DesiredState, state: &ClusterState) -> Result<(), String> {
    for (name, app) in &desired.applications {
        let Some(node) = desired.node_of(name) else {
            continue;
        };
        let container = state
            .nodes
            .get(node)
            .and_then(|n| n.container(name))
            .ok_or_else(|| format!("{name} does not run on {node}"))?;
        if container.application != *app || !container.running {
            return Err(format!("{name} on {node} runs the wrong configuration"));
        }
        for (volume, _) in app.volumes() {
            if state.volume_owner(volume) != Some(node) {
                return Err(format!("{name}'s volume {volume} is not owned by {node}"));
            }
        }
    }
    for (node, n) in &state.nodes {
        for c in &n.containers {
            if desired.node_of(&c.application.name) != Some(node.as_str()) {
                return Err(format!("{} still runs on {node}", c.application.name));
            }
        }
        let (wanted, version) = if desired.nodes.contains_key(node) {
            let map = desired.route_map();
            match n.routes_version {
                Some(_) => (map.local_routes(node), Some(map.version())),
                None => (desired.routes_for(node), None),
            }
        } else {
            (vec![], None)
        };
        if n.routes != wanted || n.routes_version.is_some() && n.routes_version != version {
            return Err(format!("routes of {node} differ"));
        }
        if desired.nodes.contains_key(node) && n.standby != desired.standby_for(node) {
            return Err(format!("replication schedule of {node} differs"));
        }
    }
    Ok(())
}

/// The state of a cluster that already matches `desired`, as its agents would report it.
pub fn realize(desired: &DesiredState) -> ClusterState {
    let mut state = ClusterState::default();
    for (node, apps) in &desired.nodes {
        let n = node_mut(&mut state, node);
        for name in apps {
            let Some(app) = desired.applications.get(name) else {
                continue;
            };
            n.containers.push(ContainerState {
                application: app.clone(),
                running: true,
                ip: None,
                volume_problem: None,
                health: None,
                health_output: None,
            });
            for (volume, _) in app.volumes() {
                n.volumes.push(VolumeState {
                    name: volume.to_string(),
                    owner: node.clone(),
                    epoch: 1,
                    snapshots: vec![],
                    used_bytes: 0,
                });
            }
        }
        // As today's agents report it: the map's version and the local routes.
        let map = desired.route_map();
        n.routes = map.local_routes(node);
        n.routes_version = Some(map.version());
        n.standby = desired.standby_for(node);
    }
    state
}

/// What a returning agent does (the agent's fencing): a copy it owns at an epoch some other
/// copy outranks becomes a replica of the newer owner, and its application stops.
pub fn fence(state: &mut ClusterState) {
    let records: Vec<(String, String, u64)> = state
        .nodes
        .values()
        .flat_map(|n| n.volumes.iter())
        .map(|v| v.name.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|name| {
            state
                .volume_record(&name)
                .map(|(_, r)| (name.clone(), r.owner.clone(), r.epoch))
        })
        .collect();
    for (address, node) in state.nodes.iter_mut() {
        for (name, owner, epoch) in &records {
            let stale = node
                .volumes
                .iter_mut()
                .find(|v| &v.name == name && &v.owner == address && v.epoch < *epoch);
            if let Some(copy) = stale {
                copy.owner = owner.clone();
                copy.epoch = *epoch;
                node.containers.retain(|c| &c.application.name != name);
            }
        }
    }
}
