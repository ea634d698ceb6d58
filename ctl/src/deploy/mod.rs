//! The deploy driver: ask every node for its state concurrently, plan, and carry the plan
//! out phase by phase, sending each node its share of a phase in parallel. At most
//! `parallel` nodes are talked to at once (state queries and converge requests alike), so
//! memory and descriptors stay bounded however many nodes there are; each request carries
//! what its node needs (`DesiredState::for_node`, the route map when it follows one, encoded
//! once and shared), and leaves the node list out for a node that reported holding it
//! (`flocker_wire::node_list`; a node that no longer does refuses with 412 and is sent the
//! list in full within the same phase). A phase starts
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use flocker_wire::{Action, ClusterState, ConvergeEvent, DesiredState, Plan, RouteMap};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::{JoinError, JoinSet};

pub use credentials::{Credentials, CredentialsError};
pub use flocker_client::{
    AgentApi, AgentClient, ClientError, ConvergeBody, EVENT_IDLE_TIMEOUT, EncodedRoutes,
};
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
    #[error("{node}: cannot encode the converge request: {detail}")]
    Encode { node: String, detail: String },
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
    /// Converge requests sent, and their bodies' bytes in total.
    pub requests: usize,
    pub request_bytes: u64,
    /// The route map's JSON, in each request of a node told to follow it.
    pub route_map_bytes: u64,
    /// The largest request's bytes other than the whole route map.
    pub largest_request_beyond_route_map: u64,
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

/// Runs `task(node)` for every node, at most `parallel` at once (at least one), and hands
/// each outcome to `done` as it arrives. A task is made only when a slot is free, so what it
/// holds (a request body) exists for at most `parallel` nodes at a time.
async fn for_each_node<T, Fut>(
    nodes: impl IntoIterator<Item = String>,
    parallel: usize,
    mut task: impl FnMut(&str) -> Fut,
    mut done: impl FnMut(String, Result<T, JoinError>),
) where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut running = PerNode::new();
    let mut nodes = nodes.into_iter();
    loop {
        while running.tasks.len() < parallel.max(1) {
            let Some(node) = nodes.next() else { break };
            let future = task(&node);
            running.spawn(&node, future);
        }
        match running.next().await {
            Some((node, outcome)) => done(node, outcome),
            None => break,
        }
    }
}

/// The state of the nodes that answered, and why the others did not.
#[derive(Debug, Default)]
pub struct Gathered {
    pub state: ClusterState,
    pub unreachable: BTreeMap<String, String>,
}

/// Asks every node for its state, `parallel` at a time, and keeps going without those that
/// do not answer (they are named, with the reason). Fails only when no node answers at all.
pub async fn gather_reachable<A: AgentApi>(
    agents: &A,
    nodes: impl IntoIterator<Item = &String>,
    parallel: usize,
) -> Result<Gathered, DeployError> {
    let mut asked = 0usize;
    let mut gathered = Gathered::default();
    let mut errors: BTreeMap<String, DeployError> = BTreeMap::new();
    let query = |node: &str| {
        asked += 1;
        let (agents, node) = (agents.clone(), node.to_string());
        async move { agents.state(&node).await }
    };
    for_each_node(
        nodes.into_iter().cloned(),
        parallel,
        query,
        |node, joined| {
            let error = match joined {
                Ok(Ok(state)) => {
                    gathered.state.nodes.insert(node, state);
                    return;
                }
                Ok(Err(e)) => DeployError::from(e),
                Err(e) => lost(node.clone(), "state query", &e),
            };
            gathered.unreachable.insert(node.clone(), error.to_string());
            errors.insert(node, error);
        },
    )
    .await;
    // When nobody answers, the first node by address is reported (whichever failed first
    // would make the message depend on timing).
    match errors.into_values().next() {
        Some(e) if asked > 0 && gathered.state.nodes.is_empty() => Err(e),
        _ => Ok(gathered),
    }
}

/// Asks every node of the deployment for its state, `parallel` at a time. Every node must
/// answer: a node that cannot be asked fails the whole query (naming it), since planning as
/// if it were empty would start its applications a second time elsewhere. When several
/// fail, the first by address is reported.
pub async fn gather_state<A: AgentApi>(
    agents: &A,
    nodes: impl IntoIterator<Item = &String>,
    parallel: usize,
) -> Result<ClusterState, DeployError> {
    let mut cluster = ClusterState::default();
    let mut failures: BTreeMap<String, DeployError> = BTreeMap::new();
    let query = |node: &str| {
        let (agents, node) = (agents.clone(), node.to_string());
        async move { agents.state(&node).await }
    };
    for_each_node(
        nodes.into_iter().cloned(),
        parallel,
        query,
        |node, joined| match joined {
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
        },
    )
    .await;
    match failures.into_values().next() {
        Some(e) => Err(e),
        None => Ok(cluster),
    }
}

/// What every node's request of a deploy is made from: the desired state, its placement
/// and route map computed once, and the map's JSON encoded once (the first time a node
/// needs it) and shared by every request that carries it.
struct RequestParts<'a> {
    desired: &'a DesiredState,
    map: RouteMap,
    encoded: Option<EncodedRoutes>,
    /// The version of the desired state's node list, and the nodes that reported holding
    /// it: their requests leave the other nodes out.
    nodes_version: String,
    holding: HashSet<String>,
}

impl<'a> RequestParts<'a> {
    fn new(desired: &'a DesiredState, reported: &ClusterState) -> Self {
        let nodes_version = desired.nodes_version();
        let holding = reported
            .nodes
            .iter()
            .filter(|(_, state)| state.nodes_version.as_deref() == Some(nodes_version.as_str()))
            .map(|(node, _)| node.clone())
            .collect();
        RequestParts {
            desired,
            map: desired.route_map(),
            encoded: None,
            nodes_version,
            holding,
        }
    }

    /// The body for `node`: its share of the desired state (without the node list when it
    /// holds this one, unless `full_list`), the whole route map when it is told to follow
    /// it, else only the ports its started applications link to. Returns the body and how
    /// many of its bytes are the whole route map.
    fn body(
        &mut self,
        node: &str,
        actions: &[Action],
        full_list: bool,
    ) -> Result<(ConvergeBody, usize), DeployError> {
        let encode = |e: serde_json::Error| DeployError::Encode {
            node: node.to_string(),
            detail: e.to_string(),
        };
        let (share, nodes_version) = if !full_list && self.holding.contains(node) {
            let version = Some(self.nodes_version.as_str());
            (self.desired.for_node_alone(node), version)
        } else {
            (self.desired.for_node(node), None)
        };
        let follows = actions
            .iter()
            .any(|a| matches!(a, Action::FollowRoutes { .. }));
        if follows {
            if self.encoded.is_none() {
                self.encoded = Some(EncodedRoutes::encode(&self.map).map_err(encode)?);
            }
            let routes = self.encoded.as_ref();
            let body =
                ConvergeBody::encode(&share, routes, actions, nodes_version).map_err(encode)?;
            return Ok((body, routes.map_or(0, EncodedRoutes::len)));
        }
        let linked: Vec<flocker_wire::routes::PortKey> = actions
            .iter()
            .filter_map(|a| match a {
                Action::StartApplication { application }
                | Action::RestartApplication { application }
                | Action::PrepareApplication { application } => Some(application),
                _ => None,
            })
            .flat_map(|app| {
                app.links.iter().map(|l| flocker_wire::routes::PortKey {
                    port: l.remote_port,
                    protocol: l.protocol,
                })
            })
            .collect();
        let routes = if linked.is_empty() {
            None
        } else {
            Some(EncodedRoutes::encode(&self.map.only(linked)).map_err(encode)?)
        };
        let body = ConvergeBody::encode(&share, routes.as_ref(), actions, nodes_version)
            .map_err(encode)?;
        Ok((body, 0))
    }
}

/// Carries out a plan phase by phase, talking to at most `parallel` nodes at once, showing
/// progress as `mode` says. `reported` is the state the nodes reported (which node list
/// each holds).
pub async fn execute<A: AgentApi>(
    agents: &A,
    desired: &DesiredState,
    reported: &ClusterState,
    plan: &Plan,
    mode: ProgressMode,
    parallel: usize,
) -> Result<Summary, DeployError> {
    let started = Instant::now();
    let mut summary = Summary {
        phases: plan.phases.len(),
        ..Summary::default()
    };
    let mut parts = RequestParts::new(desired, reported);
    // Containers prepared for a move's start, until a start phase begins.
    let mut prepared: Vec<(String, String)> = Vec::new();
    for (index, phase) in plan.phases.iter().enumerate() {
        let phase_started = Instant::now();
        if phase.name.starts_with("start") {
            prepared.clear();
        }
        prepared.extend(phase.actions.iter().filter_map(|a| match &a.action {
            Action::PrepareApplication { application } => {
                Some((a.node.clone(), application.name.clone()))
            }
            _ => None,
        }));
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
        let mut per_node: BTreeMap<&str, Vec<&Action>> = BTreeMap::new();
        for action in &phase.actions {
            per_node
                .entry(action.node.as_str())
                .or_default()
                .push(&action.action);
            summary.actions += 1;
        }

        let mut failures: BTreeMap<String, DeployError> = BTreeMap::new();
        let mut bytes_pushed = 0u64;
        let mut nodes: Vec<String> = per_node.keys().map(|n| n.to_string()).collect();
        // A node that lost the node list it reported (restarted without its state, or another
        // deploy came between) refuses before doing anything; it gets the list in full.
        for full_list in [false, true] {
            let mut resend = Vec::new();
            let mut now_holding = Vec::new();
            let left_out: HashSet<String> = nodes
                .iter()
                .filter(|n| !full_list && parts.holding.contains(*n))
                .cloned()
                .collect();
            let send = |node: &str| {
                let actions: Vec<Action> = per_node
                    .get(node)
                    .map(|a| a.iter().map(|a| (*a).clone()).collect())
                    .unwrap_or_default();
                let body = parts.body(node, &actions, full_list);
                if let Ok((body, routes_len)) = &body {
                    summary.requests += 1;
                    summary.request_bytes += body.len() as u64;
                    summary.route_map_bytes = summary.route_map_bytes.max(*routes_len as u64);
                    let own = (body.len() - routes_len) as u64;
                    summary.largest_request_beyond_route_map =
                        summary.largest_request_beyond_route_map.max(own);
                }
                let (agents, node) = (agents.clone(), node.to_string());
                async move {
                    let (body, _) = body?;
                    run_on_node(&agents, &node, body, mode).await
                }
            };
            for_each_node(nodes, parallel, send, |node, joined| match joined {
                Ok(Ok(bytes)) => {
                    bytes_pushed += bytes;
                    now_holding.push(node);
                }
                Ok(Err(e)) if left_out.contains(&node) && wants_full_list(&e) => resend.push(node),
                Ok(Err(e)) => {
                    failures.insert(node, e);
                }
                Err(e) => {
                    let error = lost(node.clone(), &format!("phase {}", phase.name), &e);
                    failures.insert(node, error);
                }
            })
            .await;
            // A node that accepted a request holds its node list from then on.
            parts.holding.extend(now_holding);
            if resend.is_empty() {
                break;
            }
            tracing::info!(
                nodes = resend.len(),
                "nodes no longer hold the node list they reported: sending it in full"
            );
            nodes = resend;
        }
        summary.bytes_pushed += bytes_pushed;
        if let Some(e) = failures.into_values().next() {
            discard_prepared(agents, &mut parts, &prepared, mode).await;
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

/// After a phase failed before any start: removes the containers the `prepare` phase
/// created (never started: nothing starts them before the start phase), so a move that did
/// not finish leaves none behind. Best effort: a node that cannot be told keeps its
/// never-started container until the next deploy starts or removes it.
async fn discard_prepared<A: AgentApi>(
    agents: &A,
    parts: &mut RequestParts<'_>,
    prepared: &[(String, String)],
    mode: ProgressMode,
) {
    for (node, application) in prepared {
        let actions = [Action::StopApplication {
            application: application.clone(),
        }];
        let result = match parts.body(node, &actions, true) {
            Ok((body, _)) => run_on_node(agents, node, body, mode).await.map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tracing::info!(node = %node, application = %application, "removed the container prepared for the move")
            }
            Err(e) => {
                tracing::warn!(node = %node, application = %application, error = %e, "cannot remove the container prepared for the move; the next deploy will")
            }
        }
    }
}

/// Whether a node refused a request because it does not hold the node list the request
/// named (HTTP 412, before doing anything): the list in full cures it.
fn wants_full_list(e: &DeployError) -> bool {
    matches!(e, DeployError::Client(c) if c.status().map(|s| s.as_u16()) == Some(412))
}

/// Sends one node its actions and follows the events; returns the bytes it pushed.
async fn run_on_node<A: AgentApi>(
    agents: &A,
    node: &str,
    request: ConvergeBody,
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

/// How many nodes are talked to at once unless `--parallel` says otherwise.
pub const DEFAULT_PARALLEL: usize = 64;

/// Default time a node gets to answer a state query or accept a converge request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
