//! Wire types shared by `flockerctl` and `flocker-agent`: the resolved application model,
//! the desired cluster state, the state a node reports, and the plan that moves one to the
//! other. Plain data with serde, no behaviour beyond small helpers: everything that talks
//! to Docker, ZFS or the kernel lives in `dataplane`, everything that parses YAML in `ctl`.
//!
//! The JSON of these types *is* the agent API (`GET /v1/state`, `POST /v1/converge`), so
//! renaming a field is a protocol change.

#![forbid(unsafe_code)]

pub mod address;
pub mod checks;
pub mod container;
pub mod files;
pub mod image;
#[cfg(feature = "logging")]
pub mod logging;
pub mod node_list;
pub mod routes;
pub mod services;
pub mod snapshots;
pub mod transfer;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use container::ContainerSettings;
pub use files::{FileContent, FileKind, FileMount};
pub use routes::{PortRoute, RouteMap, ServiceRoute};
pub use services::{Service, ServicePort};

/// The version of the agent API these types describe.
pub const API_VERSION: u32 = 1;

/// A Docker image reference, split into repository and tag (`latest` when none was given).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub repository: String,
    pub tag: String,
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// The transport protocol of a routed port. TCP is the default and is left out of the JSON,
/// so the wire form of every TCP port, link and route is what it was before UDP existed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// Both protocols, TCP first.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// For `skip_serializing_if`: TCP is the default and is not written.
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }

    /// `"tcp"` or `"udp"`, as Docker and compose spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The IP protocol number (`IPPROTO_TCP` or `IPPROTO_UDP`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// Parses `"tcp"` or `"udp"` (lower case, as compose writes them).
    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port the application listens on (`internal`) and the cluster-wide port routed to
/// it from every node (`external`), for one protocol. The same external port may be published
/// once per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMap {
    pub internal: u16,
    pub external: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

impl PortMap {
    /// A TCP port.
    pub fn tcp(internal: u16, external: u16) -> PortMap {
        PortMap {
            internal,
            external,
            protocol: Protocol::Tcp,
        }
    }
}

/// The application's volume: where it is mounted in the container and an optional quota.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Absolute path inside the container.
    pub mountpoint: String,
    /// Quota in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_size: Option<u64>,
}

/// A link to another application's external port, exposed in the container as Docker-style
/// `<ALIAS>_PORT_<local_port>_TCP=tcp://<host>:<remote_port>` variables (`_UDP=udp://...`
/// for a UDP port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub local_port: u16,
    pub remote_port: u16,
    pub alias: String,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// What Docker does when the container exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RestartPolicy {
    #[default]
    Never,
    Always,
    /// Like `always` for Flocker's supervisor, which restarts the application whenever it
    /// exits; kept apart so a compose file's `unless-stopped` reads back as written.
    UnlessStopped,
    OnFailure {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maximum_retry_count: Option<u32>,
    },
}

/// One application, fully resolved from either config dialect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    pub image: Image,
    #[serde(default)]
    pub ports: Vec<PortMap>,
    /// The application's main volume, named as the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeSpec>,
    /// Further volumes, by full volume name (`APP.KEY`): they move with the application in
    /// the same move as its main volume. See [`Application::volumes`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, VolumeSpec>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub links: Vec<Link>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Command, user, labels, capabilities and the rest of how the container runs.
    #[serde(default, skip_serializing_if = "ContainerSettings::is_empty")]
    pub container: ContainerSettings,
    /// Applications whose containers start before this one's within a deploy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Secrets and configs mounted read-only; their content is in
    /// [`DesiredState::files`], never here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileMount>,
    /// How the agent tells that the application is ready for traffic; `None` means its
    /// first port accepts connections (or, without ports, that it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

impl Application {
    /// Every volume of the application with its volume name: the main volume (named as the
    /// application) first, then the further ones in name order.
    pub fn volumes(&self) -> impl Iterator<Item = (&str, &VolumeSpec)> {
        self.volume
            .iter()
            .map(|spec| (self.name.as_str(), spec))
            .chain(
                self.volumes
                    .iter()
                    .map(|(name, spec)| (name.as_str(), spec)),
            )
    }

    /// Whether the application keeps data in at least one volume.
    pub fn has_volumes(&self) -> bool {
        self.volume.is_some() || !self.volumes.is_empty()
    }

    /// Whether `volume` is one of the application's volumes.
    pub fn uses_volume(&self, volume: &str) -> bool {
        self.volumes().any(|(name, _)| name == volume)
    }
}

/// The volume name of an application's further volume `key`: `APP.KEY`.
pub fn further_volume_name(application: &str, key: &str) -> String {
    format!("{application}.{key}")
}

/// A health check (compose `healthcheck:`, native `health_check:`): either a command Docker
/// runs inside the container (`test`), or an answer the agent itself reads (`answer`). With a
/// command the application is ready once the check passed, and unhealthy once `retries`
/// checks in a row failed after `start_period_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Docker's form: `["CMD", program, args...]`, `["CMD-SHELL", command]`, or `["NONE"]`
    /// (no check: the application is ready as soon as it runs). Empty with `answer`.
    pub test: Vec<String>,
    pub interval_ms: u64,
    /// With `answer`: how long one try may take (connect, send, read).
    pub timeout_ms: u64,
    pub retries: u32,
    #[serde(default)]
    pub start_period_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerCheck>,
}

/// A readiness check the agent makes itself, tried every few milliseconds while the
/// application starts: a TCP connection to `127.0.0.1:PORT` inside the container, `send`
/// written, and the application is ready once its reply starts with `expect`. A database that
/// listens before it has loaded its data (Redis answers `-LOADING` then) is not ready yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerCheck {
    /// Written once connected; empty sends nothing (for a server that greets first).
    #[serde(default)]
    pub send: String,
    /// What the reply must start with; never empty.
    pub expect: String,
    /// The port inside the container; `None` is the application's first TCP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl HealthCheck {
    /// Docker's defaults: every 30 s, 30 s timeout, 3 retries, no start period.
    pub fn with_test(test: Vec<String>) -> Self {
        HealthCheck {
            test,
            interval_ms: 30_000,
            timeout_ms: 30_000,
            retries: 3,
            start_period_ms: 0,
            answer: None,
        }
    }

    /// An answer check, each try bounded by 1 s.
    pub fn with_answer(answer: AnswerCheck) -> Self {
        HealthCheck {
            test: Vec::new(),
            timeout_ms: 1_000,
            answer: Some(answer),
            ..HealthCheck::with_test(Vec::new())
        }
    }

    /// A check that says "ready as soon as it runs" (`disable: true`, `test: [NONE]`).
    pub fn disabled() -> Self {
        HealthCheck::with_test(vec!["NONE".into()])
    }

    pub fn is_disabled(&self) -> bool {
        self.test.first().map(String::as_str) == Some("NONE")
    }
}

/// Whether a running application is ready for traffic, as its node judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Started, not ready yet.
    Starting,
    Healthy,
    /// Its health check failed `retries` times in a row, or it exited.
    Unhealthy,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// What the cluster should look like: the applications and which node runs each.
///
/// Node keys are node addresses exactly as the deployment file spells them (IP or hostname).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub applications: BTreeMap<String, Application>,
    pub nodes: BTreeMap<String, BTreeSet<String>>,
    /// Standby replicas per application (with a volume); absent for none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub standby: BTreeMap<String, Standby>,
    /// The content of each application's secrets and configs, by application and file
    /// name. Only what a node runs needs to reach it; nothing here is ever logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, BTreeMap<String, FileContent>>,
}

/// Where and how often an application's volume is replicated: its owner pushes an
/// incremental snapshot to each standby node every `interval_ms`, leaving a read-only replica
/// that a failover can promote.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standby {
    pub nodes: Vec<String>,
    pub interval_ms: u64,
}

/// The shortest replication interval accepted: each pass snapshots and pushes.
pub const MIN_REPLICATION_INTERVAL_MS: u64 = 1_000;
/// The longest replication interval accepted (one day).
pub const MAX_REPLICATION_INTERVAL_MS: u64 = 86_400_000;

impl DesiredState {
    /// The standby entries of the applications placed on `node`: what its agent replicates.
    pub fn standby_for(&self, node: &str) -> BTreeMap<String, Standby> {
        self.standby
            .iter()
            .filter(|(app, _)| self.node_of(app) == Some(node))
            .map(|(app, s)| (app.clone(), s.clone()))
            .collect()
    }

    /// The node an application is placed on, if any.
    pub fn node_of(&self, application: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(_, apps)| apps.contains(application))
            .map(|(node, _)| node.as_str())
    }

    /// Every node's route table as the desired state implies it.
    pub fn routes_for(&self, node: &str) -> Vec<Route> {
        let mut routes = Vec::new();
        for (host, apps) in &self.nodes {
            for name in apps {
                let Some(app) = self.applications.get(name) else {
                    continue;
                };
                for port in &app.ports {
                    let target = if host == node {
                        RouteTarget::Local {
                            internal_port: port.internal,
                        }
                    } else {
                        RouteTarget::Node {
                            address: host.clone(),
                        }
                    };
                    routes.push(Route {
                        external_port: port.external,
                        protocol: port.protocol,
                        application: name.clone(),
                        target,
                    });
                }
            }
        }
        routes.sort();
        routes
    }
}

/// A container the agent manages, with the configuration it was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerState {
    pub application: Application,
    pub running: bool,
    /// The container's address on the node's container network, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Why this container's volume is not what it runs on, when that is so: the volume is
    /// not mounted (any more), or the container was started on the bare directory an
    /// unmounted volume leaves behind. Its writes then do not reach the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_problem: Option<String>,
    /// Readiness of a running container (absent from agents before health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// What the health check (or the port probe) last said, when not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_output: Option<String>,
}

/// One copy of a volume on a node. Owner and epoch are read from the volume itself.
///
/// The copy is writable (this node owns the volume) exactly when `owner` is the reporting
/// node's address. A copy whose owner is another node is a read-only replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    /// The volume's name, which is its application's name.
    pub name: String,
    pub owner: String,
    pub epoch: u64,
    /// Snapshot names, oldest first.
    #[serde(default)]
    pub snapshots: Vec<String>,
    #[serde(default)]
    pub used_bytes: u64,
}

/// Where connections to an external port go from one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RouteTarget {
    /// The application runs here: NAT into its container at this port.
    Local { internal_port: u16 },
    /// The application runs on another node: forward to that node, same external port.
    Node { address: String },
}

/// One entry of a node's route table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub external_port: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    pub application: String,
    pub target: RouteTarget,
}

impl Route {
    /// The route's port as people read it: `6379` for TCP, `5353/udp` for UDP.
    pub fn port_label(&self) -> String {
        match self.protocol {
            Protocol::Tcp => self.external_port.to_string(),
            Protocol::Udp => format!("{}/udp", self.external_port),
        }
    }
}

/// What one node reports at `GET /v1/state`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    pub address: String,
    /// Only the containers this agent manages; everything else on the host is invisible.
    #[serde(default)]
    pub containers: Vec<ContainerState>,
    #[serde(default)]
    pub volumes: Vec<VolumeState>,
    /// The node's route table; only its local routes when `routes_version` is set.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The version of the cluster's [`RouteMap`] the node routes by, when its table is that
    /// map's: `routes` then lists only the routes into its own containers (the others are the
    /// map's entries for other nodes). Absent when the table was set as a list (`SetRoutes`)
    /// or changed since (fencing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_version: Option<String>,
    /// The replication schedule this node follows for the applications it hosts (from the
    /// last deploy); the planner compares it with the deployment's `standby:`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub standby: BTreeMap<String, Standby>,
    /// The version of the node list the agent holds from the last deploy (see
    /// [`node_list`]); absent before its first converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_version: Option<String>,
}

impl NodeState {
    pub fn container(&self, application: &str) -> Option<&ContainerState> {
        self.containers
            .iter()
            .find(|c| c.application.name == application)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeState> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// The state of the whole cluster, keyed by node address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeState>,
}

impl ClusterState {
    /// The newest ownership record of a volume: among all copies, the one with the highest
    /// epoch. Its `owner` is the volume's owner, even while a handoff is half done (the
    /// source has recorded "handed to T at epoch e+1" but T has not yet recorded it).
    pub fn volume_record(&self, volume: &str) -> Option<(&str, &VolumeState)> {
        self.nodes
            .iter()
            .filter_map(|(address, node)| node.volume(volume).map(|v| (address.as_str(), v)))
            .max_by_key(|(_, v)| v.epoch)
    }

    /// The node that owns a volume, by the newest ownership record.
    pub fn volume_owner(&self, volume: &str) -> Option<&str> {
        self.volume_record(volume).map(|(_, v)| v.owner.as_str())
    }

    /// True when the owner's own copy records it as owner at the newest epoch, i.e. no
    /// handoff is half done.
    pub fn ownership_settled(&self, volume: &str) -> bool {
        match self.volume_record(volume) {
            None => true,
            Some((_, record)) => self
                .nodes
                .get(&record.owner)
                .and_then(|n| n.volume(volume))
                .is_some_and(|v| v.owner == record.owner && v.epoch == record.epoch),
        }
    }
}

/// One step a node carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// Create an empty volume owned by this node at epoch 1.
    CreateVolume {
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maximum_size: Option<u64>,
    },
    /// Snapshot the volume and stream it to `to` (incremental from the newest snapshot both
    /// hold). `last` marks the final push after the application stopped, which also hands
    /// the volume off: its receive makes `to` the owner at the next epoch in the same round
    /// trip, and the sender then records the volume as handed to `to`.
    PushVolume {
        volume: String,
        to: String,
        last: bool,
    },
    /// Give ownership to `to` at the next epoch, once `to` holds the newest snapshot.
    Handoff { volume: String, to: String },
    /// Failover: this node's read-only replica becomes the owning copy at `epoch`, because
    /// the owner cannot be reached. Chosen by a person (`deploy --failover`), never by an
    /// agent on its own.
    Promote { volume: String, epoch: u64 },
    /// Create the application's container without starting it, on the node a move takes it
    /// to, while the pre-copy runs: the move's start is then only `docker start`. The
    /// container starts only through `StartApplication`, once this node owns its volumes.
    PrepareApplication { application: Application },
    /// Create and start the application's container (a prepared one that still matches
    /// is only started).
    StartApplication { application: Application },
    /// Stop and remove the application's container.
    StopApplication { application: String },
    /// Replace the running container with one built from the new configuration.
    RestartApplication { application: Application },
    /// Replace this node's route table.
    SetRoutes { routes: Vec<Route> },
    /// Route by the cluster's route map of this version, which the converge request
    /// carries (`ConvergeRequest::routes`): the node derives its own table from it.
    FollowRoutes { version: String },
    /// Before the stop of a move: the ports of each moving application lead to the node it
    /// moves to from now on. That node holds new TCP connections to them until the
    /// application is ready there (see `dataplane/src/hold.rs`); the table follows no route
    /// map version until the `routes` phase sends the map again.
    SwitchRoutes { moves: Vec<routes::MovedPorts> },
    /// The replication schedule for the applications this node hosts. The converge request's
    /// desired state carries it; the action makes a node that has nothing else to do take it.
    SetStandby { standby: BTreeMap<String, Standby> },
}

/// An action and the node that carries it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAction {
    pub node: String,
    #[serde(flatten)]
    pub action: Action,
}

/// A set of actions that may run in parallel; a phase starts when the previous one is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    pub actions: Vec<NodeAction>,
}

/// An ordered list of phases. Empty when the cluster already matches.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub phases: Vec<Phase>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.phases.is_empty()
    }

    /// The actions a given node carries out, phase by phase.
    pub fn actions_for<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Action> + 'a {
        self.phases
            .iter()
            .flat_map(|p| p.actions.iter())
            .filter(move |a| a.node == node)
            .map(|a| &a.action)
    }
}

/// Body of `POST /v1/converge`: the desired state as far as this node needs it
/// ([`DesiredState::for_node`]: its applications, every node's address), the route map when
/// it routes by one (`FollowRoutes`, the whole map) or links to other applications (the
/// linked ports), and the actions of one phase that this node must carry out. Re-sending the
/// same request is harmless: every action is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvergeRequest {
    pub desired: DesiredState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<RouteMap>,
    pub actions: Vec<Action>,
    /// Set when `desired` leaves the other nodes out ([`DesiredState::for_node_alone`]):
    /// the version of the node list the agent is to complete it with from the list it holds
    /// (see [`node_list`]). An agent holding another version refuses the request (412).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_version: Option<String>,
}

/// One line of the newline-delimited JSON stream that answers `POST /v1/converge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConvergeEvent {
    Started {
        step: String,
    },
    Progress {
        step: String,
        bytes_done: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes_total: Option<u64>,
    },
    Done {
        step: String,
    },
    Failed {
        step: String,
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, ports: &[(u16, u16)]) -> Application {
        Application {
            name: name.into(),
            image: Image {
                repository: "busybox".into(),
                tag: "latest".into(),
            },
            ports: ports
                .iter()
                .map(|&(internal, external)| PortMap::tcp(internal, external))
                .collect(),
            volumes: Default::default(),
            volume: None,
            environment: BTreeMap::new(),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
        }
    }

    #[test]
    fn routes_point_local_on_the_host_and_remote_elsewhere() {
        let mut desired = DesiredState::default();
        desired
            .applications
            .insert("web".into(), app("web", &[(80, 8080)]));
        desired
            .nodes
            .insert("198.18.0.1".into(), ["web".to_string()].into());
        desired.nodes.insert("198.18.0.2".into(), BTreeSet::new());
        assert_eq!(
            desired.routes_for("198.18.0.1")[0].target,
            RouteTarget::Local { internal_port: 80 }
        );
        assert_eq!(
            desired.routes_for("198.18.0.2")[0].target,
            RouteTarget::Node {
                address: "198.18.0.1".into()
            }
        );
    }

    #[test]
    fn node_action_json_is_flat() {
        let action = NodeAction {
            node: "n1".into(),
            action: Action::Handoff {
                volume: "db".into(),
                to: "n2".into(),
            },
        };
        let json = serde_json::to_string(&action).expect("serialize");
        assert_eq!(
            json,
            r#"{"node":"n1","action":"handoff","volume":"db","to":"n2"}"#
        );
        let back: NodeAction = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, action);
    }

    #[test]
    fn tcp_is_left_out_of_the_json_and_udp_is_written() {
        let tcp = PortMap::tcp(80, 8080);
        assert_eq!(
            serde_json::to_string(&tcp).expect("serialize"),
            r#"{"internal":80,"external":8080}"#
        );
        let udp = PortMap {
            protocol: Protocol::Udp,
            ..tcp
        };
        let json = serde_json::to_string(&udp).expect("serialize");
        assert_eq!(json, r#"{"internal":80,"external":8080,"protocol":"udp"}"#);
        assert_eq!(serde_json::from_str::<PortMap>(&json).expect("parse"), udp);
        assert!(
            serde_json::from_str::<PortMap>(r#"{"internal":1,"external":2,"protocol":"sctp"}"#)
                .is_err()
        );
        let mut desired = DesiredState::default();
        let mut dns = app("dns", &[(5353, 53)]);
        dns.ports.push(PortMap {
            protocol: Protocol::Udp,
            ..dns.ports[0]
        });
        desired.applications.insert("dns".into(), dns);
        desired.nodes.insert("n1".into(), ["dns".into()].into());
        let routes = desired.routes_for("n2");
        assert_eq!(
            routes.iter().map(|r| r.protocol).collect::<Vec<_>>(),
            vec![Protocol::Tcp, Protocol::Udp]
        );
    }

    #[test]
    fn restart_policy_round_trips() {
        let p = RestartPolicy::OnFailure {
            maximum_retry_count: Some(3),
        };
        let json = serde_json::to_string(&p).expect("serialize");
        assert_eq!(json, r#"{"name":"on-failure","maximum_retry_count":3}"#);
        assert_eq!(
            serde_json::from_str::<RestartPolicy>(&json).expect("parse"),
            p
        );
    }
}
