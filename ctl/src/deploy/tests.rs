//! The deploy driver against fake agents: what each node is asked, in which order, and how
//! unreachable, refusing, failing and panicking nodes are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use flocker_client::StatusCode;
use flocker_client::{AgentApi, ClientError};
use flocker_wire::{
    Action, ClusterState, ConvergeEvent, ConvergeRequest, DesiredState, NodeAction, NodeState,
    Phase, Plan,
};

use super::{DeployError, ProgressMode, execute, gather_reachable, gather_state};

const A: &str = "10.0.0.1";
const B: &str = "10.0.0.2";
const C: &str = "10.0.0.3";

/// How a fake node answers a state query.
#[derive(Clone)]
enum StateReply {
    State(NodeState),
    Unreachable,
    Panic,
}

type ConvergeReply =
    Arc<dyn Fn(&str, &ConvergeRequest) -> Result<Vec<ConvergeEvent>, ClientError> + Send + Sync>;

/// The converge requests each node got, in order: (node, actions).
type ConvergeLog = Arc<Mutex<Vec<(String, Vec<Action>)>>>;

/// Agents that answer from a script and log every converge request they get.
#[derive(Clone)]
struct FakeAgents {
    states: Arc<BTreeMap<String, StateReply>>,
    converge: ConvergeReply,
    log: ConvergeLog,
}

impl FakeAgents {
    fn new(states: &[(&str, StateReply)]) -> Self {
        FakeAgents {
            states: Arc::new(
                states
                    .iter()
                    .map(|(n, r)| (n.to_string(), r.clone()))
                    .collect(),
            ),
            converge: Arc::new(|_, request| Ok(done_events(request))),
            log: Arc::default(),
        }
    }

    fn converging(
        mut self,
        reply: impl Fn(&str, &ConvergeRequest) -> Result<Vec<ConvergeEvent>, ClientError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.converge = Arc::new(reply);
        self
    }

    /// The converge requests each node got, in order, as (node, actions).
    fn log(&self) -> Vec<(String, Vec<Action>)> {
        self.log.lock().expect("log").clone()
    }
}

fn unreachable(node: &str) -> ClientError {
    ClientError::Connect {
        node: node.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    }
}

impl AgentApi for FakeAgents {
    fn state(&self, node: &str) -> impl Future<Output = Result<NodeState, ClientError>> + Send {
        let reply = self.states.get(node).cloned();
        let node = node.to_string();
        async move {
            match reply {
                Some(StateReply::State(state)) => Ok(state),
                Some(StateReply::Panic) => panic!("fake agent {node} panicked"),
                Some(StateReply::Unreachable) | None => Err(unreachable(&node)),
            }
        }
    }

    fn converge<F>(
        &self,
        node: &str,
        body: flocker_client::ConvergeBody,
        mut on_event: F,
    ) -> impl Future<Output = Result<Vec<ConvergeEvent>, ClientError>> + Send
    where
        F: FnMut(&ConvergeEvent) + Send,
    {
        let request = body.decode().expect("the driver sends a valid request");
        let request = &request;
        self.log
            .lock()
            .expect("log")
            .push((node.to_string(), request.actions.clone()));
        let reply = (self.converge)(node, request);
        async move {
            let events = reply?;
            for event in &events {
                on_event(event);
            }
            Ok(events)
        }
    }
}

fn step(action: &Action) -> String {
    match action {
        Action::CreateVolume { volume, .. } => format!("create-volume {volume}"),
        Action::PushVolume { volume, to, .. } => format!("push {volume} to {to}"),
        Action::Handoff { volume, to } => format!("handoff {volume} to {to}"),
        Action::Promote { volume, epoch } => format!("promote {volume} at {epoch}"),
        Action::PrepareApplication { application } => format!("prepare {}", application.name),
        Action::StartApplication { application } => format!("start {}", application.name),
        Action::StopApplication { application } => format!("stop {application}"),
        Action::RestartApplication { application } => format!("restart {}", application.name),
        Action::SetRoutes { .. } | Action::FollowRoutes { .. } => "routes".to_string(),
        Action::SwitchRoutes { .. } => "switch-routes".to_string(),
        Action::SetStandby { .. } => "standby".to_string(),
    }
}

/// Started and Done for every action, as an agent that did everything.
fn done_events(request: &ConvergeRequest) -> Vec<ConvergeEvent> {
    request
        .actions
        .iter()
        .flat_map(|a| {
            let step = step(a);
            [
                ConvergeEvent::Started { step: step.clone() },
                ConvergeEvent::Done { step },
            ]
        })
        .collect()
}

fn node_state(address: &str, volume: Option<&str>) -> NodeState {
    NodeState {
        address: address.to_string(),
        volumes: volume
            .map(|name| {
                vec![flocker_wire::VolumeState {
                    name: name.to_string(),
                    owner: address.to_string(),
                    epoch: 1,
                    snapshots: vec![],
                    used_bytes: 0,
                }]
            })
            .unwrap_or_default(),
        ..NodeState::default()
    }
}

fn nodes(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn desired(names: &[&str]) -> DesiredState {
    let mut d = DesiredState::default();
    for n in names {
        d.nodes.insert(n.to_string(), BTreeSet::new());
    }
    d
}

fn phase(name: &str, actions: &[(&str, Action)]) -> Phase {
    Phase {
        name: name.to_string(),
        actions: actions
            .iter()
            .map(|(node, action)| NodeAction {
                node: node.to_string(),
                action: action.clone(),
            })
            .collect(),
    }
}

fn create(volume: &str) -> Action {
    Action::CreateVolume {
        volume: volume.to_string(),
        maximum_size: None,
    }
}

fn push(volume: &str, to: &str) -> Action {
    Action::PushVolume {
        volume: volume.to_string(),
        to: to.to_string(),
        last: false,
    }
}

fn handoff(volume: &str, to: &str) -> Action {
    Action::Handoff {
        volume: volume.to_string(),
        to: to.to_string(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn gather_state_asks_every_node() {
    let agents = FakeAgents::new(&[
        (A, StateReply::State(node_state(A, Some("db")))),
        (B, StateReply::State(node_state(B, None))),
    ]);
    let got = runtime()
        .block_on(gather_state(&agents, &nodes(&[A, B]), 2))
        .expect("state");
    let expected = ClusterState {
        nodes: BTreeMap::from([
            (A.to_string(), node_state(A, Some("db"))),
            (B.to_string(), node_state(B, None)),
        ]),
    };
    assert_eq!(got, expected);
}

#[test]
fn an_unreachable_node_fails_the_query_naming_it() {
    let agents = FakeAgents::new(&[
        (A, StateReply::State(node_state(A, Some("db")))),
        (B, StateReply::Unreachable),
    ]);
    let err = runtime()
        .block_on(gather_state(&agents, &nodes(&[A, B]), 2))
        .expect_err("B is unreachable");
    assert!(
        matches!(&err, DeployError::Client(ClientError::Connect { node, .. }) if node == B),
        "{err}"
    );
    assert!(err.to_string().contains(B), "{err}");
}

#[test]
fn a_node_whose_query_panicked_is_an_error_not_an_empty_node() {
    let agents = FakeAgents::new(&[
        (A, StateReply::State(node_state(A, Some("db")))),
        (B, StateReply::Panic),
    ]);
    let err = runtime()
        .block_on(gather_state(&agents, &nodes(&[A, B]), 2))
        .expect_err("B's state is unknown");
    match &err {
        DeployError::Lost { node, what, reason } => {
            assert_eq!((node.as_str(), what.as_str()), (B, "state query"));
            assert!(reason.contains("panicked"), "{reason}");
        }
        other => panic!("expected a lost node, got {other}"),
    }
    assert!(err.to_string().starts_with(B), "{err}");
}

#[test]
fn with_several_failures_the_first_node_by_address_is_reported() {
    let agents = FakeAgents::new(&[
        (A, StateReply::State(node_state(A, None))),
        (B, StateReply::Panic),
        (C, StateReply::Unreachable),
    ]);
    for _ in 0..5 {
        let err = runtime()
            .block_on(gather_state(&agents, &nodes(&[C, B, A]), 2))
            .expect_err("two nodes fail");
        assert!(
            matches!(&err, DeployError::Lost { node, .. } if node == B),
            "{err}"
        );
    }
}

#[test]
fn execute_sends_each_node_its_share_phase_by_phase() {
    let agents = FakeAgents::new(&[]).converging(|node, request| {
        let mut events = done_events(request);
        // A push reports its progress, as agents do every second.
        if node == A
            && request
                .actions
                .iter()
                .any(|a| matches!(a, Action::PushVolume { .. }))
        {
            events.insert(
                1,
                ConvergeEvent::Progress {
                    step: "push db".into(),
                    bytes_done: 4096,
                    bytes_total: None,
                },
            );
            events.insert(
                2,
                ConvergeEvent::Progress {
                    step: "push db".into(),
                    bytes_done: 8192,
                    bytes_total: Some(8192),
                },
            );
        }
        Ok(events)
    });
    let plan = Plan {
        phases: vec![
            phase(
                "create-volumes",
                &[(A, create("db")), (B, create("cache")), (A, create("logs"))],
            ),
            phase("pre-copy", &[(A, push("db", B))]),
            phase("handoff", &[(A, handoff("db", B))]),
        ],
    };
    let d = desired(&[A, B]);
    let summary = runtime()
        .block_on(execute(
            &agents,
            &d,
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            2,
        ))
        .expect("deploy");
    assert_eq!(
        (summary.phases, summary.actions, summary.bytes_pushed),
        (3, 5, 8192)
    );
    let mut log = agents.log();
    // Within a phase nodes run in parallel; phases run in order.
    log[..2].sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        log,
        vec![
            (A.to_string(), vec![create("db"), create("logs")]),
            (B.to_string(), vec![create("cache")]),
            (A.to_string(), vec![push("db", B)]),
            (A.to_string(), vec![handoff("db", B)]),
        ]
    );
}

#[test]
fn a_failed_step_stops_the_run_before_the_next_phase() {
    let agents = FakeAgents::new(&[]).converging(|node, request| {
        let mut events = done_events(request);
        if node == B {
            events.push(ConvergeEvent::Failed {
                step: "create-volume cache".into(),
                error: "pool is full".into(),
            });
        }
        Ok(events)
    });
    let plan = Plan {
        phases: vec![
            phase("create-volumes", &[(A, create("db")), (B, create("cache"))]),
            phase("pre-copy", &[(A, push("db", B))]),
        ],
    };
    let err = runtime()
        .block_on(execute(
            &agents,
            &desired(&[A, B]),
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            2,
        ))
        .expect_err("B failed");
    assert_eq!(
        err.to_string(),
        format!("{B}: create-volume cache failed: pool is full")
    );
    assert!(
        agents
            .log()
            .iter()
            .all(|(_, actions)| !actions.contains(&push("db", B))),
        "the next phase ran: {:?}",
        agents.log()
    );
}

fn application(name: &str) -> flocker_wire::Application {
    flocker_wire::Application {
        name: name.into(),
        image: flocker_wire::Image {
            repository: name.into(),
            tag: "latest".into(),
        },
        ports: vec![],
        volume: Some(flocker_wire::VolumeSpec {
            mountpoint: "/data".into(),
            maximum_size: None,
        }),
        volumes: BTreeMap::new(),
        environment: BTreeMap::new(),
        links: vec![],
        mem_limit: None,
        cpu_shares: None,
        restart_policy: flocker_wire::RestartPolicy::Never,
        container: Default::default(),
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check: None,
    }
}

/// A move that fails after its `prepare` phase and before its start leaves no prepared
/// container behind; one that fails from the start on leaves the start's container alone.
#[test]
fn a_move_failing_before_its_start_removes_the_prepared_container() {
    let stop_db = Action::StopApplication {
        application: "db".into(),
    };
    let final_push = Action::PushVolume {
        volume: "db".into(),
        to: B.into(),
        last: true,
    };
    let fails_at = |failing: &'static str| {
        FakeAgents::new(&[]).converging(move |_, request| {
            let mut events = done_events(request);
            if let Some(a) = request.actions.first()
                && step(a) == failing
            {
                events.push(ConvergeEvent::Failed {
                    step: failing.into(),
                    error: "broken".into(),
                });
            }
            Ok(events)
        })
    };
    let plan = Plan {
        phases: vec![
            phase("pre-copy", &[(A, push("db", B))]),
            phase(
                "prepare",
                &[(
                    B,
                    Action::PrepareApplication {
                        application: application("db"),
                    },
                )],
            ),
            phase("stop", &[(A, stop_db.clone())]),
            phase("final-push", &[(A, final_push)]),
            phase(
                "start",
                &[(
                    B,
                    Action::StartApplication {
                        application: application("db"),
                    },
                )],
            ),
        ],
    };
    let run = |agents: &FakeAgents| {
        runtime().block_on(execute(
            agents,
            &desired(&[A, B]),
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            2,
        ))
    };
    let agents = fails_at("push db to 10.0.0.2");
    // The pre-copy's push fails first: nothing was prepared yet, nothing to remove.
    run(&agents).expect_err("the pre-copy failed");
    assert_eq!(agents.log().len(), 1, "{:?}", agents.log());

    let agents = fails_at("stop db");
    let err = run(&agents).expect_err("the stop failed");
    assert!(err.to_string().contains("stop db failed"), "{err}");
    let log = agents.log();
    assert_eq!(
        log.last(),
        Some(&(B.to_string(), vec![stop_db.clone()])),
        "the prepared container is removed: {log:?}"
    );

    let agents = fails_at("start db");
    run(&agents).expect_err("the start failed");
    assert!(
        !agents
            .log()
            .iter()
            .any(|(node, actions)| node == B && actions.contains(&stop_db)),
        "a started container is not removed: {:?}",
        agents.log()
    );
}

#[test]
fn a_refused_converge_is_reported_with_the_agents_status_and_message() {
    let agents = FakeAgents::new(&[]).converging(|node, _| {
        Err(ClientError::Refused {
            node: node.to_string(),
            status: StatusCode::CONFLICT,
            message: "another converge has been running on this node".into(),
        })
    });
    let plan = Plan {
        phases: vec![phase("create-volumes", &[(A, create("db"))])],
    };
    let err = runtime()
        .block_on(execute(
            &agents,
            &desired(&[A]),
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            2,
        ))
        .expect_err("refused");
    assert!(
        matches!(&err, DeployError::Client(e) if e.status() == Some(StatusCode::CONFLICT)),
        "{err}"
    );
    assert!(err.to_string().contains("another converge"), "{err}");
}

#[test]
fn a_converge_that_panicked_names_its_node_and_phase() {
    let agents = FakeAgents::new(&[]).converging(|node, request| {
        if node == B {
            panic!("fake agent {node} panicked");
        }
        Ok(done_events(request))
    });
    let plan = Plan {
        phases: vec![phase("start", &[(A, create("db")), (B, create("cache"))])],
    };
    let err = runtime()
        .block_on(execute(
            &agents,
            &desired(&[A, B]),
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            2,
        ))
        .expect_err("B panicked");
    assert!(
        matches!(&err, DeployError::Lost { node, what, .. } if node == B && what == "phase start"),
        "{err}"
    );
}

#[test]
fn an_empty_plan_asks_nobody() {
    let agents = FakeAgents::new(&[]);
    let summary = runtime()
        .block_on(execute(
            &agents,
            &desired(&[A]),
            &ClusterState::default(),
            &Plan::default(),
            ProgressMode::Lines,
            2,
        ))
        .expect("nothing to do");
    assert_eq!((summary.phases, summary.actions), (0, 0));
    assert!(agents.log().is_empty());
}

#[test]
fn gather_reachable_names_the_nodes_that_do_not_answer_and_keeps_the_rest() {
    let agents = FakeAgents::new(&[
        (A, StateReply::State(node_state(A, Some("db")))),
        (B, StateReply::Panic),
        (C, StateReply::Unreachable),
    ]);
    let gathered = runtime()
        .block_on(gather_reachable(&agents, &nodes(&[A, B, C]), 2))
        .expect("A answers");
    assert_eq!(gathered.state.nodes.keys().collect::<Vec<_>>(), vec![A]);
    assert_eq!(
        gathered.unreachable.keys().collect::<Vec<_>>(),
        vec![B, C],
        "a panicked query is not an empty node either"
    );
    assert!(
        gathered.unreachable[B].contains("panicked"),
        "{:?}",
        gathered.unreachable
    );
}

#[test]
fn gather_reachable_fails_when_no_node_answers() {
    let agents = FakeAgents::new(&[(A, StateReply::Unreachable), (B, StateReply::Unreachable)]);
    let err = runtime()
        .block_on(gather_reachable(&agents, &nodes(&[A, B]), 2))
        .expect_err("nobody answers");
    assert!(err.to_string().contains(A), "{err}");
}

/// Agents that count how many are asked at once and keep every converge request.
#[derive(Clone, Default)]
struct Counting {
    in_flight: Arc<Mutex<(usize, usize)>>,
    requests: Arc<Mutex<Vec<(String, ConvergeRequest)>>>,
}

impl Counting {
    async fn busy(&self) {
        {
            let mut n = self.in_flight.lock().expect("count");
            n.0 += 1;
            n.1 = n.1.max(n.0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        self.in_flight.lock().expect("count").0 -= 1;
    }

    fn most_at_once(&self) -> usize {
        self.in_flight.lock().expect("count").1
    }
}

impl AgentApi for Counting {
    fn state(&self, node: &str) -> impl Future<Output = Result<NodeState, ClientError>> + Send {
        let (me, node) = (self.clone(), node.to_string());
        async move {
            me.busy().await;
            Ok(node_state(&node, None))
        }
    }

    fn converge<F>(
        &self,
        node: &str,
        body: flocker_client::ConvergeBody,
        mut on_event: F,
    ) -> impl Future<Output = Result<Vec<ConvergeEvent>, ClientError>> + Send
    where
        F: FnMut(&ConvergeEvent) + Send,
    {
        let request = body.decode().expect("the driver sends a valid request");
        let events = done_events(&request);
        self.requests
            .lock()
            .expect("requests")
            .push((node.to_string(), request));
        let me = self.clone();
        async move {
            me.busy().await;
            for e in &events {
                on_event(e);
            }
            Ok(events)
        }
    }
}

fn service(name: &str, external: u16, links_to: Option<u16>) -> flocker_wire::Application {
    flocker_wire::Application {
        name: name.into(),
        image: flocker_wire::Image {
            repository: "busybox".into(),
            tag: "latest".into(),
        },
        ports: vec![flocker_wire::PortMap::tcp(80, external)],
        volumes: Default::default(),
        volume: None,
        environment: BTreeMap::new(),
        links: links_to
            .map(|remote_port| flocker_wire::Link {
                local_port: 80,
                remote_port,
                alias: "peer".into(),
                protocol: flocker_wire::Protocol::Tcp,
            })
            .into_iter()
            .collect(),
        mem_limit: None,
        cpu_shares: None,
        restart_policy: flocker_wire::RestartPolicy::Never,
        container: Default::default(),
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check: None,
    }
}

#[test]
fn no_more_nodes_than_parallel_are_asked_at_once() {
    let names: Vec<String> = (0..40).map(|i| format!("10.0.1.{i}")).collect();
    let agents = Counting::default();
    let state = runtime()
        .block_on(gather_state(&agents, &names, 3))
        .expect("state");
    assert_eq!(state.nodes.len(), 40);
    assert!(agents.most_at_once() <= 3, "{}", agents.most_at_once());
    let gathered = runtime()
        .block_on(gather_reachable(&agents, &names, 1))
        .expect("state");
    assert_eq!(gathered.state.nodes.len(), 40);

    let agents = Counting::default();
    let mut d = DesiredState::default();
    for n in &names {
        d.nodes.insert(n.clone(), BTreeSet::new());
    }
    let plan = crate::planner::plan(&d, &state);
    assert!(plan.is_empty(), "nothing to route, nothing to do");
    d.applications
        .insert("web".into(), service("web", 8080, None));
    d.nodes
        .get_mut(&names[0])
        .expect("node")
        .insert("web".into());
    let plan = crate::planner::plan(&d, &state);
    runtime()
        .block_on(execute(
            &agents,
            &d,
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            4,
        ))
        .expect("deploy");
    assert!(agents.most_at_once() <= 4, "{}", agents.most_at_once());
    // Start on one node, routes on all 40.
    assert_eq!(agents.requests.lock().expect("requests").len(), 41);
}

/// Each request carries the node's own applications, every node's address in its first request
/// (the list's version in later ones), and the route map only where the node follows it
/// (whole) or links to another port (that port only).
#[test]
fn each_node_gets_its_share_and_the_map_only_where_it_needs_it() {
    let mut d = desired(&[A, B, C]);
    d.applications
        .insert("web".into(), service("web", 8080, Some(9090)));
    d.applications
        .insert("api".into(), service("api", 9090, None));
    d.nodes.get_mut(A).expect("a").insert("web".into());
    d.nodes.get_mut(B).expect("b").insert("api".into());
    let plan = crate::planner::plan(&d, &ClusterState::default());
    let agents = Counting::default();
    let summary = runtime()
        .block_on(execute(
            &agents,
            &d,
            &ClusterState::default(),
            &plan,
            ProgressMode::Lines,
            8,
        ))
        .expect("deploy");
    let map = d.route_map();
    let requests = agents.requests.lock().expect("requests").clone();
    // A node's first request carries every node's address; it holds them from then on, so
    // its later ones name the list's version instead.
    let mut holding = BTreeSet::new();
    for (node, request) in &requests {
        if holding.insert(node) {
            assert_eq!(request.desired, d.for_node(node), "{node}");
            assert_eq!(request.nodes_version, None, "{node}");
        } else {
            assert_eq!(request.desired, d.for_node_alone(node), "{node}");
            assert_eq!(request.nodes_version, Some(d.nodes_version()), "{node}");
        }
        let follows = request
            .actions
            .iter()
            .any(|a| matches!(a, Action::FollowRoutes { version } if *version == map.version()));
        let starts_web = request.actions.iter().any(
            |a| matches!(a, Action::StartApplication { application } if application.name == "web"),
        );
        let expected = if follows {
            Some(map.clone())
        } else if starts_web {
            Some(map.only([flocker_wire::routes::PortKey {
                port: 9090,
                protocol: flocker_wire::Protocol::Tcp,
            }]))
        } else {
            None
        };
        assert_eq!(request.routes, expected, "{node}: {:?}", request.actions);
    }
    // start on A and B, routes on all three.
    assert_eq!(requests.len(), 5);
    let map_bytes = serde_json::to_vec(&map).expect("json").len() as u64;
    assert_eq!(summary.route_map_bytes, map_bytes);
    assert_eq!(summary.requests, 5);
}

/// Every converge request each node got, in order.
type RequestLog = Arc<Mutex<Vec<(String, ConvergeRequest)>>>;

fn precondition_failed(node: &str) -> ClientError {
    ClientError::Refused {
        node: node.to_string(),
        status: StatusCode::PRECONDITION_FAILED,
        message: "this node holds another node list: send the node list in full".into(),
    }
}

fn reporting_list(address: &str, version: Option<&str>) -> StateReply {
    StateReply::State(NodeState {
        nodes_version: version.map(str::to_string),
        ..node_state(address, None)
    })
}

/// A node that reported the current node list gets its share without the list, naming the
/// version; one that reported another list or none gets it in full; one that reported the
/// list but refuses (412: it lost it since) is sent it in full within the same phase, and
/// the plan goes on.
#[test]
fn the_node_list_goes_only_to_nodes_that_do_not_hold_it() {
    let mut d = desired(&[A, B, C]);
    d.applications
        .insert("web".into(), service("web", 8080, None));
    d.nodes.get_mut(A).expect("a").insert("web".into());
    let version = d.nodes_version();
    let states = FakeAgents::new(&[
        (A, reporting_list(A, Some(&version))),
        (
            B,
            reporting_list(B, Some("0123456789abcdef0123456789abcdef")),
        ),
        (C, reporting_list(C, Some(&version))),
    ]);
    let reported = runtime()
        .block_on(gather_state(&states, &nodes(&[A, B, C]), 3))
        .expect("state");
    let log: RequestLog = Arc::default();
    let seen = log.clone();
    let agents = FakeAgents::new(&[]).converging(move |node, request| {
        seen.lock()
            .expect("log")
            .push((node.to_string(), request.clone()));
        if node == C && request.nodes_version.is_some() {
            return Err(precondition_failed(node));
        }
        Ok(done_events(request))
    });
    let plan = Plan {
        phases: vec![
            phase(
                "create-volumes",
                &[(A, create("a")), (B, create("b")), (C, create("c"))],
            ),
            phase("pre-copy", &[(C, push("c", A))]),
        ],
    };
    let summary = runtime()
        .block_on(execute(
            &agents,
            &d,
            &reported,
            &plan,
            ProgressMode::Lines,
            3,
        ))
        .expect("deploy");
    let log = log.lock().expect("log").clone();
    let of = |node: &str| -> Vec<&ConvergeRequest> {
        log.iter()
            .filter(|(n, _)| n == node)
            .map(|(_, r)| r)
            .collect()
    };
    let a = of(A);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].desired, d.for_node_alone(A));
    assert_eq!(a[0].nodes_version.as_deref(), Some(version.as_str()));
    assert_eq!(a[0].desired.nodes.len(), 1, "no other node's address");
    let b = of(B);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].desired, d.for_node(B));
    assert_eq!(b[0].nodes_version, None);
    // C: refused with the version, then the full list; it holds the list from then on, so
    // the next phase names the version again (and this fake refuses it again, and so on).
    let c = of(C);
    assert_eq!(c.len(), 4, "{c:?}");
    assert_eq!(c[0].nodes_version.as_deref(), Some(version.as_str()));
    assert_eq!(
        (c[1].nodes_version.as_ref(), &c[1].desired),
        (None, &d.for_node(C))
    );
    assert_eq!(c[1].actions, vec![create("c")]);
    assert_eq!(c[2].nodes_version.as_deref(), Some(version.as_str()));
    assert_eq!(c[3].nodes_version, None);
    assert_eq!(c[3].actions, vec![push("c", A)]);
    assert_eq!(summary.requests, 6);
}

/// A node that refuses the full list with 412 too fails the phase: the list is re-sent once.
#[test]
fn a_node_refusing_the_full_list_fails_the_phase() {
    let d = desired(&[A, B]);
    let version = d.nodes_version();
    let states = FakeAgents::new(&[
        (A, reporting_list(A, Some(&version))),
        (B, reporting_list(B, None)),
    ]);
    let reported = runtime()
        .block_on(gather_state(&states, &nodes(&[A, B]), 2))
        .expect("state");
    let agents = FakeAgents::new(&[]).converging(|node, _| Err(precondition_failed(node)));
    // B was sent the list in full at once: its 412 is not cured by sending it again.
    let plan = Plan {
        phases: vec![phase(
            "create-volumes",
            &[(A, create("a")), (B, create("b"))],
        )],
    };
    let err = runtime()
        .block_on(execute(
            &agents,
            &d,
            &reported,
            &plan,
            ProgressMode::Lines,
            2,
        ))
        .expect_err("refused twice");
    assert!(
        matches!(&err, DeployError::Client(e) if e.status() == Some(StatusCode::PRECONDITION_FAILED)),
        "{err}"
    );
    let log = agents.log();
    assert_eq!(
        log.iter().filter(|(n, _)| n == A).count(),
        2,
        "A: with the version, then in full: {log:?}"
    );
    assert_eq!(log.iter().filter(|(n, _)| n == B).count(), 1, "{log:?}");
}
