//! Human-readable rendering of plans for `flockerctl plan` and `flockerctl deploy`.

use std::collections::HashMap;
use std::fmt::Write as _;

use flocker_wire::{Action, DesiredState, Plan, Route, RouteMap, RouteTarget};

/// How plans show `FollowRoutes`: by default a summary per node (the map's version, how
/// many ports lead into the node's containers and how many it forwards); with `detail`, the
/// node's whole table, derived as its agent derives it.
pub struct RouteView {
    map: RouteMap,
    local: HashMap<String, usize>,
    detail: bool,
}

impl RouteView {
    pub fn new(desired: &DesiredState, detail: bool) -> Self {
        let map = desired.route_map();
        let mut local: HashMap<String, usize> = HashMap::new();
        for p in map.ports.values() {
            *local.entry(p.node.clone()).or_default() += 1;
        }
        RouteView { map, local, detail }
    }

    /// The table `node` derives from the map.
    pub fn table(&self, node: &str) -> Vec<Route> {
        self.map.routes_for(node)
    }

    fn follow(&self, node: &str, version: &str) -> String {
        if self.detail {
            return describe_table(&self.map.routes_for(node));
        }
        let local = self.local.get(node).copied().unwrap_or(0);
        let forwarded = self.map.ports.len() - local;
        let short = version.get(..12).unwrap_or(version);
        format!("routes follow map {short} ({local} local, {forwarded} forwarded)")
    }
}

fn describe_table(routes: &[Route]) -> String {
    if routes.is_empty() {
        return "remove all routes".to_string();
    }
    let parts: Vec<String> = routes
        .iter()
        .map(|r| match &r.target {
            RouteTarget::Local { internal_port } => format!(
                "{} -> {} (local :{})",
                r.port_label(),
                r.application,
                internal_port
            ),
            RouteTarget::Node { address } => {
                format!("{} -> {} (on {})", r.port_label(), r.application, address)
            }
        })
        .collect();
    format!("set routes {}", parts.join(", "))
}

/// One line saying what an action does; `routes` shows how a node follows the route map.
pub fn describe(node: &str, action: &Action, routes: &RouteView) -> String {
    match action {
        Action::CreateVolume {
            volume,
            maximum_size,
        } => match maximum_size {
            Some(size) => format!("create volume {volume} (at most {size} bytes)"),
            None => format!("create volume {volume}"),
        },
        Action::PushVolume { volume, to, last } => {
            let when = if *last {
                "final, after stop, handing it over"
            } else {
                "pre-copy, while running"
            };
            format!("push volume {volume} to {to} ({when})")
        }
        Action::Handoff { volume, to } => format!("hand volume {volume} over to {to}"),
        Action::Promote { volume, epoch } => {
            format!("promote this node's replica of volume {volume} to owner at epoch {epoch}")
        }
        Action::PrepareApplication { application } => format!(
            "create {} ({}) without starting it, for the move's start",
            application.name, application.image
        ),
        Action::StartApplication { application } => {
            format!("start {} ({})", application.name, application.image)
        }
        Action::StopApplication { application } => format!("stop {application}"),
        Action::RestartApplication { application } => format!(
            "restart {} in place with new configuration ({})",
            application.name, application.image
        ),
        Action::SetStandby { standby } if standby.is_empty() => {
            "replicate nothing (no standby)".to_string()
        }
        Action::SetStandby { standby } => {
            let parts: Vec<String> = standby
                .iter()
                .map(|(app, s)| {
                    format!("{app} to {} every {} ms", s.nodes.join(", "), s.interval_ms)
                })
                .collect();
            format!("replicate {}", parts.join("; "))
        }
        Action::SetRoutes { routes } => describe_table(routes),
        Action::FollowRoutes { version } => routes.follow(node, version),
        Action::SwitchRoutes { moves } => {
            let parts: Vec<String> = moves
                .iter()
                .map(|m| {
                    let ports: Vec<String> =
                        m.ports.iter().map(|p| p.external.to_string()).collect();
                    let ports = ports.join(", ");
                    if m.node == node {
                        format!(
                            "route {} ({ports}) here, holding new connections until it is ready",
                            m.application
                        )
                    } else {
                        format!("route {} ({ports}) to {}", m.application, m.node)
                    }
                })
                .collect();
            format!("before the stop: {}", parts.join("; "))
        }
    }
}

/// Each node's table for every node the plan tells to follow the route map (JSON of
/// `plan --route-tables`).
pub fn route_tables(
    plan: &Plan,
    routes: &RouteView,
) -> std::collections::BTreeMap<String, Vec<Route>> {
    plan.phases
        .iter()
        .flat_map(|p| &p.actions)
        .filter(|a| matches!(a.action, Action::FollowRoutes { .. }))
        .map(|a| (a.node.clone(), routes.table(&a.node)))
        .collect()
}

/// The whole plan, one phase per block, one action per line.
pub fn plan_text(plan: &Plan, routes: &RouteView) -> String {
    if plan.is_empty() {
        return "nothing to do: the cluster matches the configuration\n".to_string();
    }
    let mut out = String::new();
    let total = plan.phases.len();
    for (i, phase) in plan.phases.iter().enumerate() {
        let _ = writeln!(out, "phase {}/{total}: {}", i + 1, phase.name);
        for action in &phase.actions {
            let _ = writeln!(
                out,
                "  {:<15} {}",
                action.node,
                describe(&action.node, &action.action, routes)
            );
        }
    }
    out
}
