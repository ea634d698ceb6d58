//! `flockerctl` subcommands. Each returns an [`Outcome`]; `main` maps it to an exit code in
//! one place: 0 success, 1 invalid configuration (or a failed operation), 2 usage error.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use flocker_wire::{ClusterState, DesiredState};
use serde_json::json;

use crate::config::{self, ConfigError, Diagnostic};
use crate::{planner, render};

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
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
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Make the cluster match the configuration: ask every node for its state, plan, and
    /// carry the plan out phase by phase. Running it twice changes nothing the second time.
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
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show every node's applications, volumes (owner, epoch, size, newest snapshot) and routes.
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

/// The role a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A node's agent (NAME is the node's address as the deployment file spells it).
    Node,
    /// A user of flockerctl.
    User,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new cluster CA in DIR.
    ///
    /// Writes the CA certificate cluster.crt, its key cluster.key (keep it off the nodes)
    /// and an empty revocation list cluster.crl; refuses to overwrite an existing CA.
    Init {
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a certificate for the agent on node ADDRESS.
    ///
    /// Writes DIR/nodes/ADDRESS.{crt,key}, signed by the CA in DIR. ADDRESS is the node's
    /// address exactly as the deployment file spells it.
    Node {
        address: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Issue a certificate for user NAME.
    ///
    /// Writes DIR/users/NAME.{crt,key}; flockerctl presents it to the agents (`--user NAME`).
    User {
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Replace a node's or user's certificate with a new key and a fresh lifetime.
    ///
    /// Also the way to give certificates from before roles existed a role. The old
    /// certificate stays valid until it expires; revoke it too if its key may have leaked.
    /// Restart the agent (or flockerctl) that uses the pair to pick the new one up.
    ///
    /// Example: flockerctl ca renew node 198.18.0.11 --dir ca
    Renew {
        role: RoleArg,
        /// The node's address or the user's name, as issued.
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Put a node's or user's certificate on the revocation list DIR/cluster.crl.
    ///
    /// Copy cluster.crl to every node (to the path the agents' --crl names); agents re-read
    /// it on the next connection, without a restart. Write it there atomically (copy to a
    /// temporary name, then rename): an agent refuses every client while the file it was
    /// told to use is missing or unreadable.
    ///
    /// Example: flockerctl ca revoke user alice --dir ca
    Revoke {
        role: RoleArg,
        /// The node's address or the user's name, as issued.
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// How a command ended; `main` turns it into the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The configuration is invalid or an operation failed: exit 1.
    Failure,
    /// The command was used wrongly (missing file, unreadable state): exit 2.
    Usage,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Usage => 2,
        }
    }
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
            output,
        } => plan(&deployment, &application, state.as_deref(), output),
        Command::Deploy {
            deployment,
            application,
            agents,
            dry_run,
            output,
        } => crate::deploy_cli::deploy(&deployment, &application, &agents, dry_run, output),
        Command::Status {
            deployment,
            application,
            agents,
            output,
        } => crate::deploy_cli::status(&deployment, &application, &agents, output),
        Command::Ca(command) => crate::ca_cli::run(command),
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

fn plan(deployment: &Path, application: &Path, state: Option<&Path>, output: Output) -> Outcome {
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
    match output {
        Output::Json => print_json(&json!({ "phases": plan.phases })),
        Output::Text => print!("{}", render::plan_text(&plan)),
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

/// Loads both files, printing problems in the requested form.
pub(crate) fn load(
    deployment: &Path,
    application: &Path,
    output: Output,
) -> Result<DesiredState, Outcome> {
    match config::load_files(deployment, application) {
        Ok(desired) => Ok(desired),
        Err(ConfigError::Usage(message)) => {
            match output {
                Output::Json => print_json(&json!({ "valid": false, "usage_error": message })),
                Output::Text => eprintln!("flockerctl: {message}"),
            }
            Err(Outcome::Usage)
        }
        Err(ConfigError::Invalid(diagnostics)) => {
            report_invalid(&diagnostics, output);
            Err(Outcome::Failure)
        }
    }
}

fn report_invalid(diagnostics: &[Diagnostic], output: Output) {
    match output {
        Output::Json => {
            let errors: Vec<_> = diagnostics
                .iter()
                .map(|d| {
                    json!({
                        "file": d.file.display().to_string(),
                        "line": d.line,
                        "column": d.column,
                        "path": d.path,
                        "message": d.message,
                    })
                })
                .collect();
            print_json(&json!({ "valid": false, "errors": errors }));
        }
        Output::Text => {
            for d in diagnostics {
                eprintln!("{d}");
            }
            eprintln!(
                "flockerctl: {} problem(s) found; nothing was changed",
                diagnostics.len()
            );
        }
    }
}

pub(crate) fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. piped into `head`) is not worth a panic.
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}
