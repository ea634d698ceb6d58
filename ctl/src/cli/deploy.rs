//! `flockerctl deploy` and `flockerctl status`: their arguments and the wiring from them to
//! [`crate::deploy`], with text or JSON output.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flocker_wire::{ClusterState, DesiredState, RouteTarget};
use serde_json::json;

use super::output::{Outcome, Output, fail, load, print_json};
use crate::deploy::{self, AgentClient, Credentials, DeployError};
use crate::{planner, render};

/// How to reach the agents.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// CA directory written by `flockerctl ca` (cluster.crt and users/USER.{crt,key}).
    #[arg(long, env = "FLOCKER_CA_DIR", default_value = ".")]
    pub ca_dir: PathBuf,
    /// User certificate to present to the agents.
    #[arg(long, env = "FLOCKER_USER", default_value = "admin")]
    pub user: String,
    /// The agents' API port.
    #[arg(long, default_value_t = 4523)]
    pub port: u16,
    /// Seconds a node gets to answer a state query.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

fn client(agents: &AgentArgs) -> Result<AgentClient, DeployError> {
    let credentials = Credentials::from_ca_dir(&agents.ca_dir, &agents.user);
    Ok(credentials.client(agents.port, Duration::from_secs(agents.timeout))?)
}

fn runtime() -> Result<tokio::runtime::Runtime, DeployError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DeployError::Runtime)
}

pub fn deploy(
    deployment: &Path,
    application: &Path,
    agents: &AgentArgs,
    dry_run: bool,
    output: Output,
) -> Outcome {
    let desired = match load(deployment, application, output) {
        Ok(d) => d,
        Err(outcome) => return outcome,
    };
    match run_deploy(&desired, agents, dry_run, output) {
        Ok(()) => Outcome::Success,
        Err(e) => fail(&e, output),
    }
}

fn run_deploy(
    desired: &DesiredState,
    agents: &AgentArgs,
    dry_run: bool,
    output: Output,
) -> Result<(), DeployError> {
    let client = client(agents)?;
    let started = Instant::now();
    runtime()?.block_on(async {
        let current = deploy::gather_state(&client, desired.nodes.keys()).await?;
        warn_volume_problems(&current);
        let plan = planner::plan(desired, &current);
        if output == Output::Text {
            print!("{}", render::plan_text(&plan));
        }
        if plan.is_empty() || dry_run {
            if output == Output::Json {
                print_json(&json!({ "ok": true, "changed": false, "phases": plan.phases }));
            }
            return Ok(());
        }
        let progress = output == Output::Text && std::io::stderr().is_terminal();
        let mut summary = deploy::execute(&client, desired, &plan, progress).await?;
        summary.elapsed_ms = started.elapsed().as_millis();
        match output {
            Output::Json => print_json(&json!({
                "ok": true,
                "changed": true,
                "phases": plan.phases,
                "summary": summary,
            })),
            Output::Text => println!(
                "done: {} action(s) in {} phase(s), {} byte(s) of volume data pushed, {:.2} s",
                summary.actions,
                summary.phases,
                summary.bytes_pushed,
                summary.elapsed_ms as f64 / 1000.0
            ),
        }
        Ok(())
    })
}

pub fn status(
    deployment: &Path,
    application: &Path,
    agents: &AgentArgs,
    output: Output,
) -> Outcome {
    let desired = match load(deployment, application, output) {
        Ok(d) => d,
        Err(outcome) => return outcome,
    };
    let gathered = client(agents).and_then(|client| {
        runtime()?.block_on(deploy::gather_state(&client, desired.nodes.keys()))
    });
    match gathered {
        Ok(state) => {
            match output {
                Output::Json => print_json(&json!({ "nodes": state.nodes })),
                Output::Text => print!("{}", status_text(&desired, &state)),
            }
            Outcome::Success
        }
        Err(e) => fail(&e, output),
    }
}

/// A container that runs without its volume (not mounted, or started on the bare directory)
/// is left running, since its writes since then need a person's decision; the deploy says
/// so on stderr rather than report the cluster healthy.
fn warn_volume_problems(state: &ClusterState) {
    for (node, n) in &state.nodes {
        for c in &n.containers {
            if let Some(problem) = &c.volume_problem {
                eprintln!(
                    "flockerctl: warning: {node}: application {:?} runs without its volume: {problem}",
                    c.application.name
                );
            }
        }
    }
}

/// The status tables: applications, volumes, routes.
pub fn status_text(desired: &DesiredState, state: &ClusterState) -> String {
    let mut out = String::from("APPLICATION      NODE             STATE     IMAGE\n");
    for (node, n) in &state.nodes {
        for c in &n.containers {
            let name = &c.application.name;
            let mark = if desired.node_of(name) == Some(node.as_str()) {
                ""
            } else {
                "  (not in deployment)"
            };
            let running = if c.running { "running" } else { "stopped" };
            out.push_str(&format!(
                "{name:<16} {node:<16} {running:<9} {}{mark}\n",
                c.application.image
            ));
            if let Some(problem) = &c.volume_problem {
                out.push_str(&format!("  ! volume problem: {problem}\n"));
            }
        }
    }
    out.push_str(
        "\nVOLUME           NODE             OWNER            EPOCH  SIZE        NEWEST SNAPSHOT\n",
    );
    for (node, n) in &state.nodes {
        for v in &n.volumes {
            let owner = if &v.owner == node {
                "(this node)".to_string()
            } else {
                v.owner.clone()
            };
            out.push_str(&format!(
                "{:<16} {node:<16} {owner:<16} {:<6} {:<11} {}\n",
                v.name,
                v.epoch,
                v.used_bytes,
                v.snapshots.last().map(String::as_str).unwrap_or("-")
            ));
        }
    }
    out.push_str("\nNODE             PORT   APPLICATION      TARGET\n");
    for (node, n) in &state.nodes {
        for r in &n.routes {
            let target = match &r.target {
                RouteTarget::Local { internal_port } => format!("local container :{internal_port}"),
                RouteTarget::Node { address } => format!("node {address}"),
            };
            out.push_str(&format!(
                "{node:<16} {:<6} {:<16} {target}\n",
                r.external_port, r.application
            ));
        }
    }
    out
}
