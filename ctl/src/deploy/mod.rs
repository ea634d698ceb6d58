//! The deploy driver: ask every node for its state concurrently, plan, and carry the plan
//! out phase by phase, sending each node its share of a phase in parallel. A phase starts
//! only when every node finished the previous one; the first failure stops the run and is
//! reported with the node and its cause. Running deploy again finishes the job, because the
//! planner starts from whatever state the nodes then report.

pub mod client;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flocker_wire::{Action, ClusterState, ConvergeEvent, ConvergeRequest, DesiredState, Plan};
use indicatif::{ProgressBar, ProgressStyle};

pub use client::{AgentClient, ClientError, Credentials};

/// Errors of a deploy run.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{node}: {step} failed: {error}")]
    StepFailed {
        node: String,
        step: String,
        error: String,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What a deploy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub phases: usize,
    pub actions: usize,
    pub bytes_pushed: u64,
    pub elapsed_ms: u128,
}

/// Asks every node of the deployment for its state, all at once.
pub async fn gather_state(
    client: &AgentClient,
    nodes: impl IntoIterator<Item = &String>,
) -> Result<ClusterState, DeployError> {
    let mut tasks = tokio::task::JoinSet::new();
    for node in nodes {
        let client = client.clone();
        let node = node.clone();
        tasks.spawn(async move {
            let state = client.state(&node).await;
            (node, state)
        });
    }
    let mut cluster = ClusterState::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let Ok((node, state)) = joined else { continue };
        match state {
            Ok(state) => {
                cluster.nodes.insert(node, state);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(cluster),
    }
}

/// Carries out a plan phase by phase. `show_progress` draws a bar for volume pushes.
pub async fn execute(
    client: &AgentClient,
    desired: &DesiredState,
    plan: &Plan,
    show_progress: bool,
) -> Result<Summary, DeployError> {
    let started = Instant::now();
    let mut summary = Summary {
        phases: plan.phases.len(),
        ..Summary::default()
    };
    for (index, phase) in plan.phases.iter().enumerate() {
        let phase_started = Instant::now();
        eprintln!(
            "running phase {}/{}: {}",
            index + 1,
            plan.phases.len(),
            phase.name
        );
        let mut per_node: BTreeMap<&str, Vec<Action>> = BTreeMap::new();
        for action in &phase.actions {
            per_node
                .entry(action.node.as_str())
                .or_default()
                .push(action.action.clone());
            summary.actions += 1;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (node, actions) in per_node {
            let client = client.clone();
            let node = node.to_string();
            let request = ConvergeRequest {
                desired: desired.clone(),
                actions,
            };
            tasks.spawn(async move { run_on_node(&client, &node, &request, show_progress).await });
        }
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(bytes)) => summary.bytes_pushed += bytes,
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    failure.get_or_insert(DeployError::StepFailed {
                        node: "?".into(),
                        step: phase.name.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        eprintln!(
            "  {} done in {} ms",
            phase.name,
            phase_started.elapsed().as_millis()
        );
    }
    summary.elapsed_ms = started.elapsed().as_millis();
    Ok(summary)
}

/// Sends one node its actions and follows the events; returns the bytes it pushed.
async fn run_on_node(
    client: &AgentClient,
    node: &str,
    request: &ConvergeRequest,
    show_progress: bool,
) -> Result<u64, DeployError> {
    let bar = show_progress.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("  {prefix} {msg} {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(node.to_string());
        bar
    });
    let mut pushed = 0u64;
    let mut failed = None;
    let events = client
        .converge(node, request, |event| match event {
            ConvergeEvent::Started { step } => {
                if let Some(bar) = &bar {
                    bar.set_message(step.clone());
                } else {
                    eprintln!("  {node:<15} {step}");
                }
            }
            ConvergeEvent::Progress {
                bytes_done,
                bytes_total,
                ..
            } => {
                pushed = pushed.max(*bytes_done);
                if let Some(bar) = &bar {
                    bar.set_length(bytes_total.unwrap_or(*bytes_done));
                    bar.set_position(*bytes_done);
                }
            }
            ConvergeEvent::Done { .. } => {}
            ConvergeEvent::Failed { step, error } => {
                failed.get_or_insert((step.clone(), error.clone()));
            }
        })
        .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some((step, error)) = failed {
        return Err(DeployError::StepFailed {
            node: node.to_string(),
            step,
            error,
        });
    }
    tracing::debug!(node, events = events.len(), "phase done on node");
    Ok(pushed)
}

/// Default time a node gets to answer a state query or accept a converge request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
