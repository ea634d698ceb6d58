//! `flockerctl deploy` and `flockerctl status`: their arguments and the wiring from them to
//! [`crate::deploy`], with text or JSON output.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flocker_wire::snapshots::{newest_push, push_time_ms};
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
    /// Seconds a node gets to accept the connection; a node that does not is reported as
    /// not answering (a dead node costs this long, not `--timeout`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
    /// How many nodes are talked to at once (state queries, and each phase's converge
    /// requests). Each node still gets `--timeout`; more in flight costs descriptors and
    /// memory, fewer costs time on large clusters.
    #[arg(long, default_value_t = deploy::DEFAULT_PARALLEL, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..4096))]
    pub parallel: usize,
}

fn client(agents: &AgentArgs) -> Result<AgentClient, DeployError> {
    let credentials = Credentials::from_ca_dir(&agents.ca_dir, &agents.user);
    let timeout = Duration::from_secs(agents.timeout);
    let connect = Duration::from_secs(agents.connect_timeout).min(timeout);
    Ok(credentials.client(agents.port, timeout, connect)?)
}

fn runtime() -> Result<tokio::runtime::Runtime, DeployError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DeployError::Runtime)
}

/// The switches of `flockerctl deploy`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeployFlags {
    pub dry_run: bool,
    pub failover: bool,
    pub route_tables: bool,
}

pub fn deploy(
    deployment: &Path,
    application: &Path,
    agents: &AgentArgs,
    flags: DeployFlags,
    output: Output,
) -> Outcome {
    let loading = Instant::now();
    let desired = match load(deployment, application, output) {
        Ok(d) => d,
        Err(outcome) => return outcome,
    };
    let timings = Timings {
        load_ms: loading.elapsed().as_millis(),
        ..Timings::default()
    };
    match run_deploy(&desired, agents, flags, output, timings) {
        Ok(()) => Outcome::Success,
        // The JSON answer already says what was blocked.
        Err(DeployError::Blocked(_)) if output == Output::Json => Outcome::Failure,
        Err(e) => fail(&e, output),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How much was lost in a failover: the age of the promoted snapshot when the deploy ran.
fn loss_window_ms(p: &planner::Promotion, now: u64) -> Option<u64> {
    p.snapshot_time_ms.map(|t| now.saturating_sub(t))
}

/// What is said about nodes that do not answer and what that leaves undone (stderr in text
/// mode; in JSON it is part of the answer).
fn report_around(gathered: &deploy::Gathered, planned: &planner::Planned, now: u64) {
    for (node, reason) in &gathered.unreachable {
        eprintln!("flockerctl: warning: node {node} does not answer: {reason}");
    }
    for app in &planned.unknown {
        eprintln!(
            "flockerctl: warning: {app} is placed on a node that does not answer: left as it is, not checked"
        );
    }
    for node in &planned.stale_routes {
        eprintln!(
            "flockerctl: warning: routes on {node} not updated (it does not answer); the next deploy does it, and its agent fences itself on return"
        );
    }
    for b in &planned.blocked {
        eprintln!("flockerctl: {}: not done: {}", b.application, b.reason);
    }
    for p in &planned.promotions {
        let window = match loss_window_ms(p, now) {
            Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
            None => "an unknown time (its snapshot name carries no time)".to_string(),
        };
        eprintln!(
            "flockerctl: failover: {} moves off {} (not answering): the replica on {} (snapshot {}) becomes the owner at epoch {}; writes of the last {window} before this deploy are lost",
            p.application, p.lost_owner, p.node, p.snapshot, p.epoch
        );
    }
}

fn promotions_json(planned: &planner::Planned, now: u64) -> serde_json::Value {
    planned
        .promotions
        .iter()
        .map(|p| {
            json!({
                "application": p.application,
                "lost_owner": p.lost_owner,
                "node": p.node,
                "epoch": p.epoch,
                "snapshot": p.snapshot,
                "snapshot_time_ms": p.snapshot_time_ms,
                "data_loss_window_ms": loss_window_ms(p, now),
            })
        })
        .collect()
}

/// Where a deploy's time went before its first phase, in the JSON answer (`timings`): the
/// scale benchmark reads it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Timings {
    /// Reading and validating both config files.
    load_ms: u128,
    /// Asking every node for its state (connections, handshakes, answers).
    gather_ms: u128,
    /// Planning from the gathered state.
    plan_ms: u128,
}

fn run_deploy(
    desired: &DesiredState,
    agents: &AgentArgs,
    flags: DeployFlags,
    output: Output,
    mut timings: Timings,
) -> Result<(), DeployError> {
    let client = client(agents)?;
    let started = Instant::now();
    runtime()?.block_on(async {
        let gathered = deploy::gather_reachable(&client, desired.nodes.keys(), agents.parallel).await?;
        timings.gather_ms = started.elapsed().as_millis();
        warn_volume_problems(&gathered.state);
        let unreachable: BTreeSet<String> = gathered.unreachable.keys().cloned().collect();
        let planning = Instant::now();
        let planned =
            planner::plan_around(desired, &gathered.state, &unreachable, flags.failover)?;
        timings.plan_ms = planning.elapsed().as_millis();
        let now = now_ms();
        let plan = &planned.plan;
        let blocked: Vec<String> = planned
            .blocked
            .iter()
            .map(|b| format!("{}: {}", b.application, b.reason))
            .collect();
        let around = json!({
            "unreachable": gathered.unreachable,
            "blocked": planned.blocked.iter().map(|b| json!({"application": b.application, "reason": b.reason})).collect::<Vec<_>>(),
            "unknown": planned.unknown,
            "promotions": promotions_json(&planned, now),
        });
        if output == Output::Text {
            let routes = render::RouteView::new(&planned.effective, flags.route_tables);
            print!("{}", render::plan_text(plan, &routes));
        }
        report_around(&gathered, &planned, now);
        let finish = |changed: bool, summary: Option<&deploy::Summary>| {
            if output == Output::Json {
                print_json(&json!({
                    "ok": blocked.is_empty(),
                    "changed": changed,
                    "phases": plan.phases,
                    "summary": summary,
                    "timings": timings,
                    "around": around,
                }));
            }
            if blocked.is_empty() {
                Ok(())
            } else {
                Err(DeployError::Blocked(blocked.clone()))
            }
        };
        if plan.is_empty() || flags.dry_run {
            return finish(false, None);
        }
        let progress = match output {
            Output::Json => deploy::ProgressMode::Json,
            Output::Text if std::io::stderr().is_terminal() => deploy::ProgressMode::Bar,
            Output::Text => deploy::ProgressMode::Lines,
        };
        let mut summary =
            deploy::execute(
            &client,
            &planned.effective,
            &gathered.state,
            plan,
            progress,
            agents.parallel,
        )
        .await?;
        summary.elapsed_ms = started.elapsed().as_millis();
        if output == Output::Text {
            println!(
                "done: {} action(s) in {} phase(s), {} byte(s) of volume data pushed, {} request(s) of {} byte(s) sent, {:.2} s",
                summary.actions,
                summary.phases,
                summary.bytes_pushed,
                summary.requests,
                summary.request_bytes,
                summary.elapsed_ms as f64 / 1000.0
            );
        }
        finish(true, Some(&summary))
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
        runtime()?.block_on(deploy::gather_reachable(
            &client,
            desired.nodes.keys(),
            agents.parallel,
        ))
    });
    match gathered {
        Ok(gathered) => {
            let now = now_ms();
            let volumes = volume_summaries(&gathered.state, now);
            match output {
                Output::Json => print_json(&json!({
                    "nodes": gathered.state.nodes,
                    "volumes": volumes,
                    "unreachable": gathered.unreachable,
                })),
                Output::Text => {
                    print!("{}", status_text(&desired, &gathered.state));
                    print!("{}", replicas_text(&volumes));
                    for (node, reason) in &gathered.unreachable {
                        println!("\nUNREACHABLE      {node}: {reason}");
                    }
                }
            }
            Outcome::Success
        }
        Err(e) => fail(&e, output),
    }
}

/// One volume as `status` reports it: its authoritative record and its replicas.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeSummary {
    pub name: String,
    pub owner: String,
    pub epoch: u64,
    pub replicas: Vec<ReplicaSummary>,
}

/// A copy on another node than the owner's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaSummary {
    pub node: String,
    /// The newest snapshot the replica holds.
    pub snapshot: Option<String>,
    /// How old that snapshot is: what a failover to this replica would lose.
    pub lag_ms: Option<u64>,
    /// The owner and epoch this copy records (older than the volume's when it is stale).
    pub records: String,
}

/// Every volume's record with its replicas and their lag (age of the newest snapshot each
/// holds, which every replica shares with the owner, since only the owner pushes).
pub fn volume_summaries(state: &ClusterState, now_ms: u64) -> Vec<VolumeSummary> {
    let names: BTreeSet<&str> = state
        .nodes
        .values()
        .flat_map(|n| n.volumes.iter().map(|v| v.name.as_str()))
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (_, record) = state.volume_record(name)?;
            let replicas = state
                .nodes
                .iter()
                .filter(|(node, _)| **node != record.owner)
                .filter_map(|(node, n)| n.volume(name).map(|v| (node, v)))
                .map(|(node, v)| {
                    let snapshot = newest_push(&v.snapshots).map(str::to_owned);
                    let lag_ms = snapshot
                        .as_deref()
                        .and_then(push_time_ms)
                        .map(|t| now_ms.saturating_sub(t));
                    ReplicaSummary {
                        node: node.clone(),
                        snapshot,
                        lag_ms,
                        records: format!("{} at epoch {}", v.owner, v.epoch),
                    }
                })
                .collect();
            Some(VolumeSummary {
                name: name.to_string(),
                owner: record.owner.clone(),
                epoch: record.epoch,
                replicas,
            })
        })
        .collect()
}

/// The replica table of `status`.
pub fn replicas_text(volumes: &[VolumeSummary]) -> String {
    let mut out = String::from(
        "\nVOLUME           OWNER            EPOCH  REPLICA          LAG        RECORDS\n",
    );
    for v in volumes {
        if v.replicas.is_empty() {
            out.push_str(&format!(
                "{:<16} {:<16} {:<6} -\n",
                v.name, v.owner, v.epoch
            ));
        }
        for r in &v.replicas {
            let lag = r
                .lag_ms
                .map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
            out.push_str(&format!(
                "{:<16} {:<16} {:<6} {:<16} {:<10} {}\n",
                v.name, v.owner, v.epoch, r.node, lag, r.records
            ));
        }
    }
    out
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
    let mut out = String::from("APPLICATION      NODE             STATE     HEALTH     IMAGE\n");
    for (node, n) in &state.nodes {
        for c in &n.containers {
            let name = &c.application.name;
            let mark = if desired.node_of(name) == Some(node.as_str()) {
                ""
            } else {
                "  (not in deployment)"
            };
            let running = if c.running { "running" } else { "stopped" };
            let health = c.health.map_or("-".to_string(), |h| h.to_string());
            out.push_str(&format!(
                "{name:<16} {node:<16} {running:<9} {health:<10} {}{mark}\n",
                c.application.image
            ));
            if let Some(problem) = &c.volume_problem {
                out.push_str(&format!("  ! volume problem: {problem}\n"));
            }
            if let Some(output) = c
                .health_output
                .as_ref()
                .filter(|_| c.health != Some(flocker_wire::Health::Healthy))
            {
                out.push_str(&format!("  health check: {}\n", output.replace('\n', " ")));
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
                r.port_label(),
                r.application
            ));
        }
        if let Some(version) = &n.routes_version {
            let short = version.get(..12).unwrap_or(version);
            out.push_str(&format!(
                "{node:<16} {:<6} {:<16} forwarded to its node by route map {short}\n",
                "*", "(every other)"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use flocker_wire::{NodeState, VolumeState};

    use super::*;

    fn copy(owner: &str, epoch: u64, snapshot: &str) -> VolumeState {
        VolumeState {
            name: "redis".into(),
            owner: owner.into(),
            epoch,
            snapshots: vec![snapshot.into()],
            used_bytes: 0,
        }
    }

    #[test]
    fn replicas_show_their_lag_from_the_snapshot_time() {
        let mut state = ClusterState::default();
        for (node, v) in [
            (
                "198.18.0.11",
                copy("198.18.0.11", 2, "push-0000000009-10000"),
            ),
            (
                "198.18.0.12",
                copy("198.18.0.11", 2, "push-0000000009-10000"),
            ),
            (
                "198.18.0.13",
                copy("198.18.0.11", 2, "push-0000000004-2000"),
            ),
        ] {
            state.nodes.insert(
                node.into(),
                NodeState {
                    address: node.into(),
                    volumes: vec![v],
                    ..NodeState::default()
                },
            );
        }
        let volumes = volume_summaries(&state, 11_500);
        assert_eq!(volumes.len(), 1);
        let v = &volumes[0];
        assert_eq!((v.owner.as_str(), v.epoch), ("198.18.0.11", 2));
        let lags: Vec<(&str, Option<u64>)> = v
            .replicas
            .iter()
            .map(|r| (r.node.as_str(), r.lag_ms))
            .collect();
        assert_eq!(
            lags,
            vec![("198.18.0.12", Some(1_500)), ("198.18.0.13", Some(9_500))]
        );
        let table = replicas_text(&volumes);
        assert!(table.contains("198.18.0.12      1.5 s"), "{table}");
    }
}
