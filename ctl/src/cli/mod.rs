//! `flockerctl` subcommands. Each returns an [`Outcome`]; `main` maps it to an exit code in
//! one place: 0 success, 1 invalid configuration (or a failed operation), 2 usage error.
//!
//! This module holds the command line and `validate` and `plan`; [`deploy`] (deploy,
//! status) and [`ca`] hold the rest, each with its own arguments. What they share (output
//! form, exit codes, config loading) is [`output`]'s. Dependencies point one way: this
//! module uses its children, the children use only [`output`] and the library.

pub mod ca;
pub mod deploy;
pub mod output;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use flocker_wire::ClusterState;
use serde_json::json;

use crate::{planner, render};

pub use ca::CaCommand;
pub use deploy::AgentArgs;
pub use output::{Outcome, Output};
use output::{load, print_json};

/// Run databases and other stateful applications in Docker containers on a cluster, and
/// move them together with their data.
///
/// Two YAML files describe the cluster: the DEPLOYMENT config says which node runs which
/// applications; the APPLICATION config says what each application is (image, ports,
/// volume, environment, links, limits). The deployment file always comes first.
#[derive(Debug, Parser)]
#[command(name = "flockerctl", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check both config files and report every problem at once, as FILE:LINE:COLUMN.
    ///
    /// Exit status: 0 valid, 1 invalid configuration, 2 usage error (e.g. missing file).
    ///
    /// Example: flockerctl validate examples/redis/deployment.yml examples/redis/application.yml
    Validate {
        /// Deployment config: `version: 1` and `nodes:` mapping node address -> applications.
        deployment: PathBuf,
        /// Application config: native `version: 1` + `applications:`, or docker-compose form.
        application: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show what deploy would do: an ordered list of phases, each a set of per-node actions.
    ///
    /// Without --state the cluster is taken to be empty. STATE is JSON as the agents report
    /// it: `{"nodes": {"ADDR": <GET /v1/state of that node>, ...}}`.
    ///
    /// Example: flockerctl plan deployment.yml application.yml --state state.json --output json
    Plan {
        deployment: PathBuf,
        application: PathBuf,
        /// Current cluster state (JSON); default: an empty cluster.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Show the whole route table of every node that changes routes, as its agent will
        /// derive it, instead of one summary line per node (JSON: `route_tables`). This is
        /// nodes x ports lines: meant for small clusters or for finding one node's table.
        #[arg(long)]
        route_tables: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Make the cluster match the configuration: ask every node for its state, plan, and
    /// carry the plan out phase by phase. Running it twice changes nothing the second time.
    ///
    /// A started application gets its routes only once it is ready (its health check
    /// passed, or its first port accepts connections); one that is not ready in time fails
    /// the deploy with what its check printed. Volume pushes show bytes, estimated total,
    /// rate and ETA; with `--output json` every agent event (phase, started, progress with
    /// bytes_done/bytes_total/bytes_per_second/eta_seconds, done, failed) is one JSON line
    /// on stderr, and stdout holds the final answer.
    ///
    /// Example: flockerctl deploy --ca-dir ./ca deployment.yml application.yml
    Deploy {
        deployment: PathBuf,
        application: PathBuf,
        #[command(flatten)]
        agents: AgentArgs,
        /// Print the plan and stop without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Print every changing node's whole route table instead of a summary line (see
        /// `plan --route-tables`).
        #[arg(long)]
        route_tables: bool,
        /// Move applications off nodes that do not answer by promoting the newest replica of
        /// each one's volume (see `standby:` in the deployment config). Writes after that
        /// replica's snapshot are lost; the output states how many seconds' worth. Without a
        /// replica nothing is changed. Use only when the node is really gone: a node that
        /// comes back fences itself (stops the application, keeps its copy aside).
        #[arg(long)]
        failover: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show every node's applications (with their health), volumes (owner, epoch, size,
    /// newest snapshot) and routes.
    ///
    /// Example: flockerctl status --ca-dir ./ca deployment.yml application.yml
    Status {
        /// Deployment config naming the nodes to ask.
        deployment: PathBuf,
        /// Application config, to mark where the cluster differs from it.
        application: PathBuf,
        #[command(flatten)]
        agents: AgentArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Cluster certificate authority: create it, issue, renew and revoke certificates.
    ///
    /// Every agent and user needs a certificate from the cluster CA, and each certificate
    /// carries a role. A node certificate lets an agent serve the API and push volumes to
    /// its peers as itself; a user certificate lets flockerctl read state and deploy.
    ///
    /// Typical use:
    ///
    ///   flockerctl ca init --dir ca
    ///   flockerctl ca node 198.18.0.11 --dir ca
    ///       (copy ca/cluster.crt, ca/cluster.crl, ca/nodes/198.18.0.11.{crt,key} to the node)
    ///   flockerctl ca user admin --dir ca
    ///   flockerctl ca renew node 198.18.0.11 --dir ca    (before it expires: 90 days)
    ///   flockerctl ca revoke user admin --dir ca
    ///       (then copy ca/cluster.crl to every node)
    #[command(subcommand, verbatim_doc_comment)]
    Ca(CaCommand),
}

pub fn run(cli: Cli) -> Outcome {
    match cli.command {
        Command::Validate {
            deployment,
            application,
            output,
        } => validate(&deployment, &application, output),
        Command::Plan {
            deployment,
            application,
            state,
            route_tables,
            output,
        } => plan(
            &deployment,
            &application,
            state.as_deref(),
            route_tables,
            output,
        ),
        Command::Deploy {
            deployment,
            application,
            agents,
            dry_run,
            route_tables,
            failover,
            output,
        } => deploy::deploy(
            &deployment,
            &application,
            &agents,
            deploy::DeployFlags {
                dry_run,
                failover,
                route_tables,
            },
            output,
        ),
        Command::Status {
            deployment,
            application,
            agents,
            output,
        } => deploy::status(&deployment, &application, &agents, output),
        Command::Ca(command) => ca::run(command),
    }
}

fn validate(deployment: &Path, application: &Path, output: Output) -> Outcome {
    match load(deployment, application, output) {
        Err(outcome) => outcome,
        Ok(desired) => {
            match output {
                Output::Json => print_json(&json!({
                    "valid": true,
                    "applications": desired.applications.len(),
                    "nodes": desired.nodes.len(),
                })),
                Output::Text => println!(
                    "valid: {} application(s) on {} node(s)",
                    desired.applications.len(),
                    desired.nodes.len()
                ),
            }
            Outcome::Success
        }
    }
}

fn plan(
    deployment: &Path,
    application: &Path,
    state: Option<&Path>,
    route_tables: bool,
    output: Output,
) -> Outcome {
    let desired = match load(deployment, application, output) {
        Ok(desired) => desired,
        Err(outcome) => return outcome,
    };
    let current = match state.map(read_state).transpose() {
        Ok(current) => current.unwrap_or_default(),
        Err(message) => {
            eprintln!("flockerctl: {message}");
            return Outcome::Usage;
        }
    };
    let plan = planner::plan(&desired, &current);
    let routes = render::RouteView::new(&desired, route_tables);
    match output {
        Output::Json if route_tables => print_json(&json!({
            "phases": plan.phases,
            "route_tables": render::route_tables(&plan, &routes),
        })),
        Output::Json => print_json(&json!({ "phases": plan.phases })),
        Output::Text => print!("{}", render::plan_text(&plan, &routes)),
    }
    Outcome::Success
}

fn read_state(path: &Path) -> Result<ClusterState, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}:{}:{}: not a cluster state: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}
