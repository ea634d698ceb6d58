//! The deploy driver: ask every node for its state concurrently, plan, and carry the plan
//! out phase by phase, sending each node its share of a phase in parallel. A phase starts
//! only when every node finished the previous one; the first failure stops the run and is
//! reported with the node and its cause. Running deploy again finishes the job, because the
//! planner starts from whatever state the nodes then report.
//!
//! The driver talks to agents through [`AgentApi`] (in production
//! [`flocker_client::AgentClient`], built by [`Credentials::client`]), so it is tested with
//! fake agents.

pub mod credentials;
pub mod progress;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use flocker_wire::{Action, ClusterState, ConvergeEvent, ConvergeRequest, DesiredState, Plan};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::{JoinError, JoinSet};

pub use credentials::{Credentials, CredentialsError};
pub use flocker_client::{AgentApi, AgentClient, ClientError, EVENT_IDLE_TIMEOUT};
pub use progress::ProgressMode;
use progress::PushRate;

/// Errors of a deploy run.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{node}: {step} failed: {error}")]
    StepFailed {
        node: String,
        step: String,
        error: String,
    },
    /// The task talking to a node ended without an answer (it panicked or was cancelled).
    /// What the node did is unknown, which is not the same as "nothing".
    #[error("{node}: {what} ended without an answer: {reason}")]
    Lost {
        node: String,
        what: String,
        reason: String,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Failover(#[from] crate::planner::FailoverError),
    /// The rest was done; these need nodes that do not answer.
    #[error("not done, because it needs a node that does not answer: {}", .0.join("; "))]
    Blocked(Vec<String>),
}

/// What a deploy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub phases: usize,
    pub actions: usize,
    pub bytes_pushed: u64,
    pub elapsed_ms: u128,
}

/// One task per node, remembering which task talks to which node, so that a task that
/// panicked is still put down to its node.
struct PerNode<T> {
    tasks: JoinSet<T>,
    nodes: HashMap<tokio::task::Id, String>,
}

impl<T: Send + 'static> PerNode<T> {
    fn new() -> Self {
        PerNode {
            tasks: JoinSet::new(),
            nodes: HashMap::new(),
        }
    }

    fn spawn(&mut self, node: &str, task: impl Future<Output = T> + Send + 'static) {
        let id = self.tasks.spawn(task).id();
        self.nodes.insert(id, node.to_string());
    }

    /// The next task to finish, with its node; a task that did not finish yields its
    /// [`JoinError`].
    async fn next(&mut self) -> Option<(String, Result<T, JoinError>)> {
        let joined = self.tasks.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let node = self.nodes.remove(&id).unwrap_or_else(|| "?".to_string());
        Some((node, joined.map(|(_, out)| out)))
    }
}

fn lost(node: String, what: &str, e: &JoinError) -> DeployError {
    let reason = if e.is_panic() {
        "the task panicked".to_string()
    } else {
        e.to_string()
    };
    DeployError::Lost {
        node,
        what: what.to_string(),
        reason,
    }
}

/// The state of the nodes that answered, and why the others did not.
#[derive(Debug, Default)]
pub struct Gathered {
    pub state: ClusterState,
    pub unreachable: BTreeMap<String, String>,
}

/// Asks every node for its state, all at once, and keeps going without those that do not
/// answer (they are named, with the reason). Fails only when no node answers at all.
pub async fn gather_reachable<A: AgentApi>(
    agents: &A,
    nodes: impl IntoIterator<Item = &String>,
) -> Result<Gathered, DeployError> {
    let mut tasks = PerNode::new();
    let mut asked = 0usize;
    for node in nodes {
        let agents = agents.clone();
        let name = node.clone();
        tasks.spawn(node, async move { agents.state(&name).await });
        asked += 1;
    }
    let mut gathered = Gathered::default();
    let mut errors: BTreeMap<String, DeployError> = BTreeMap::new();
    while let Some((node, joined)) = tasks.next().await {
        let error = match joined {
            Ok(Ok(state)) => {
                gathered.state.nodes.insert(node, state);
                continue;
            }
            Ok(Err(e)) => DeployError::from(e),
            Err(e) => lost(node.clone(), "state query", &e),
        };
        gathered.unreachable.insert(node.clone(), error.to_string());
        errors.insert(node, error);
    }
    // When nobody answers, the first node by address is reported (whichever failed first
    // would make the message depend on timing).
    match errors.into_values().next() {
        Some(e) if asked > 0 && gathered.state.nodes.is_empty() => Err(e),
        _ => Ok(gathered),
    }
}

/// Asks every node of the deployment for its state, all at once. Every node must answer:
/// a node that cannot be asked fails the whole query (naming it), since planning as if it
/// were empty would start its applications a second time elsewhere. When several fail, the
/// first by address is reported.
pub async fn gather_state<A: AgentApi>(
    agents: &A,
    nodes: impl IntoIterator<Item = &String>,
) -> Result<ClusterState, DeployError> {
    let mut tasks = PerNode::new();
    for node in nodes {
        let agents = agents.clone();
        let name = node.clone();
        tasks.spawn(node, async move { agents.state(&name).await });
    }
    let mut cluster = ClusterState::default();
    let mut failures: BTreeMap<String, DeployError> = BTreeMap::new();
    while let Some((node, joined)) = tasks.next().await {
        match joined {
            Ok(Ok(state)) => {
                cluster.nodes.insert(node, state);
            }
            Ok(Err(e)) => {
                failures.insert(node, e.into());
            }
            Err(e) => {
                let error = lost(node.clone(), "state query", &e);
                failures.insert(node, error);
            }
        }
    }
    match failures.into_values().next() {
        Some(e) => Err(e),
        None => Ok(cluster),
    }
}

/// Carries out a plan phase by phase, showing progress as `mode` says.
pub async fn execute<A: AgentApi>(
    agents: &A,
    desired: &DesiredState,
    plan: &Plan,
    mode: ProgressMode,
) -> Result<Summary, DeployError> {
    let started = Instant::now();
    let mut summary = Summary {
        phases: plan.phases.len(),
        ..Summary::default()
    };
    for (index, phase) in plan.phases.iter().enumerate() {
        let phase_started = Instant::now();
        if mode == ProgressMode::Json {
            let line = progress::phase_json("phase", index, plan.phases.len(), &phase.name);
            eprintln!("{line}");
        } else {
            eprintln!(
                "running phase {}/{}: {}",
                index + 1,
                plan.phases.len(),
                phase.name
            );
        }
        let mut per_node: BTreeMap<&str, Vec<Action>> = BTreeMap::new();
        for action in &phase.actions {
            per_node
                .entry(action.node.as_str())
                .or_default()
                .push(action.action.clone());
            summary.actions += 1;
        }
        let mut tasks = PerNode::new();
        for (node, actions) in per_node {
            let agents = agents.clone();
            let name = node.to_string();
            let request = ConvergeRequest {
                desired: desired.clone(),
                actions,
            };
            tasks.spawn(node, async move {
                run_on_node(&agents, &name, &request, mode).await
            });
        }
        let mut failures: BTreeMap<String, DeployError> = BTreeMap::new();
        while let Some((node, joined)) = tasks.next().await {
            match joined {
                Ok(Ok(bytes)) => summary.bytes_pushed += bytes,
                Ok(Err(e)) => {
                    failures.insert(node, e);
                }
                Err(e) => {
                    let error = lost(node.clone(), &format!("phase {}", phase.name), &e);
                    failures.insert(node, error);
                }
            }
        }
        if let Some(e) = failures.into_values().next() {
            return Err(e);
        }
        if mode != ProgressMode::Json {
            eprintln!(
                "  {} done in {} ms",
                phase.name,
                phase_started.elapsed().as_millis()
            );
        }
    }
    summary.elapsed_ms = started.elapsed().as_millis();
    Ok(summary)
}

/// Sends one node its actions and follows the events; returns the bytes it pushed.
async fn run_on_node<A: AgentApi>(
    agents: &A,
    node: &str,
    request: &ConvergeRequest,
    mode: ProgressMode,
) -> Result<u64, DeployError> {
    let bar = (mode == ProgressMode::Bar).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix} {msg} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(node.to_string());
        bar
    });
    let mut pushed = 0u64;
    let mut failed = None;
    let mut push: Option<PushRate> = None;
    let events = agents
        .converge(node, request, |event| {
            let mut figures = None;
            match event {
                ConvergeEvent::Started { step } => {
                    if let Some(bar) = &bar {
                        bar.set_message(step.clone());
                    } else if mode == ProgressMode::Lines {
                        eprintln!("  {node:<15} {step}");
                    }
                }
                ConvergeEvent::Progress {
                    step,
                    bytes_done,
                    bytes_total,
                } => {
                    pushed = pushed.max(*bytes_done);
                    let now = Instant::now();
                    let rate = match push.take() {
                        Some(p) if p.step() == step => p,
                        _ => PushRate::new(step, *bytes_done, now),
                    };
                    figures = Some(rate.figures(*bytes_done, *bytes_total, now));
                    push = Some(rate);
                    if let Some(bar) = &bar {
                        bar.set_length(bytes_total.unwrap_or(*bytes_done).max(*bytes_done));
                        bar.set_position(*bytes_done);
                    }
                }
                ConvergeEvent::Done { .. } => {}
                ConvergeEvent::Failed { step, error } => {
                    failed.get_or_insert((step.clone(), error.clone()));
                }
            }
            if mode == ProgressMode::Json {
                eprintln!("{}", progress::event_json(node, event, figures));
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
