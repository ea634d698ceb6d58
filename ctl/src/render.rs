//! Human-readable rendering of plans for `flockerctl plan` and `flockerctl deploy`.

use std::fmt::Write as _;

use flocker_wire::{Action, Plan, RouteTarget};

/// One line saying what an action does.
pub fn describe(action: &Action) -> String {
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
                "final, after stop"
            } else {
                "pre-copy, while running"
            };
            format!("push volume {volume} to {to} ({when})")
        }
        Action::Handoff { volume, to } => format!("hand volume {volume} over to {to}"),
        Action::Promote { volume, epoch } => {
            format!("promote this node's replica of volume {volume} to owner at epoch {epoch}")
        }
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
        Action::SetRoutes { routes } if routes.is_empty() => "remove all routes".to_string(),
        Action::SetRoutes { routes } => {
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
    }
}

/// The whole plan, one phase per block, one action per line.
pub fn plan_text(plan: &Plan) -> String {
    if plan.is_empty() {
        return "nothing to do: the cluster matches the configuration\n".to_string();
    }
    let mut out = String::new();
    let total = plan.phases.len();
    for (i, phase) in plan.phases.iter().enumerate() {
        let _ = writeln!(out, "phase {}/{total}: {}", i + 1, phase.name);
        for action in &phase.actions {
            let _ = writeln!(out, "  {:<15} {}", action.node, describe(&action.action));
        }
    }
    out
}
