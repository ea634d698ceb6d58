//! The agent's behaviour behind the API: reporting state and carrying out converge actions
//! (containers, volumes, routes). `validate.rs` checks a converge request before anything
//! happens; `migrate.rs` holds the migration protocol (push, receive, handoff, take-over). Everything it knows comes from Docker (labels),
//! its volumes (ownership records) and the route file, so a restarted agent reports the same
//! state as before.
//!
//! **Architecture invariant:** every request is checked completely before anything changes;
//! a refused request (4xx) has no effect.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Mutex, OwnedMutexGuard, mpsc};

use flocker_client::{AgentClient, ClientError};

use flocker_wire::{
    Action, Application, ContainerState, ConvergeEvent, ConvergeRequest, DesiredState, NodeState,
    Route, RouteMap, VolumeState,
};

use crate::containers::{
    ContainerError, ContainerRuntime, LABEL_SPEC, ManagedContainer, container_spec,
};
use crate::metrics::Metrics;
use crate::ownership::{self, OwnershipError};
use crate::readiness::{self, ReadinessError};
use crate::routes::{Resolver, RouteStore, RoutesError};
use crate::transfer;
use crate::volume::mountinfo::{self, FsLocation};
use crate::volume::{VolumeBackend, VolumeError};

mod early_start;
pub mod fencing;
mod lock;
mod migrate;
pub mod node_list;
pub mod replication;
mod switch;
mod validate;

/// The longest a single volume backend call (a `zfs` command, a directory copy for a `dir`
/// snapshot) may take before the request fails.
const STORAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

pub use flocker_wire::transfer::{ReceiveParams, ReceiveReport, TakeOverRequest};
pub use migrate::drain;

/// Everything a request can fail with; [`AgentError::status`] maps it to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Peer(#[from] ClientError),
    #[error(transparent)]
    Routes(#[from] RoutesError),
    #[error(transparent)]
    NotReady(#[from] ReadinessError),
    #[error(transparent)]
    Stream(#[from] transfer::TransferError),
    #[error("transfer of volume {volume:?}: {detail}")]
    Transfer { volume: String, detail: String },
    #[error(transparent)]
    NodeList(#[from] node_list::NodeListError),
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    /// The HTTP status: 4xx for what the caller got wrong, 5xx for what failed here.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::BadRequest(_) => 400,
            AgentError::NotFound(_) => 404,
            AgentError::Forbidden(_) => 403,
            AgentError::Conflict(_) | AgentError::Ownership(_) => 409,
            AgentError::Volume(VolumeError::InvalidName(_)) => 400,
            AgentError::Volume(VolumeError::NotFound(_)) => 404,
            AgentError::Volume(VolumeError::Exists(_)) => 409,
            AgentError::Volume(VolumeError::NotProven { .. }) => 409,
            AgentError::Container(ContainerError::ImageMissing { .. }) => 422,
            AgentError::Routes(RoutesError::Table(_)) => 400,
            // A stream that fails verification or ends early is the sender's fault; a sink
            // that cannot take verified data (full pool), start or commit is ours.
            AgentError::Stream(transfer::TransferError::Stream(
                flocker_stream::StreamError::SinkWrite(_) | flocker_stream::StreamError::Backend(_),
            )) => 500,
            AgentError::Stream(_) => 400,
            AgentError::Peer(_) => 502,
            // The sender may send the node list in full: a precondition of the request failed.
            AgentError::NodeList(e) if e.wants_full_list() => 412,
            AgentError::NodeList(_) => 400,
            _ => 500,
        }
    }
}

/// One node's agent.
pub struct Agent {
    me: String,
    pub(crate) volumes: Arc<dyn VolumeBackend>,
    pub(crate) runtime: Arc<dyn ContainerRuntime>,
    peers: AgentClient,
    pub(crate) routes: RouteStore,
    /// Held by a converge from validation to its last action, and by each restart
    /// supervision pass, so the supervisor never restarts what a converge is stopping.
    pub(crate) converge_lock: Arc<Mutex<()>>,
    volume_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The agent API's own port, never routed to an application.
    api_port: Option<u16>,
    /// Restarts the supervisor made, per container name (cleared when a converge starts it).
    pub(crate) restarts: std::sync::Mutex<HashMap<String, crate::restart_memory::RestartMemory>>,
    /// The desired state of the last converge: which peers exist (fencing asks them) and
    /// which volumes replicate where (see `replication`). Kept in `schedule_file` so that a
    /// restarted agent resumes both before the next deploy.
    desired: std::sync::Mutex<Option<node_list::Held>>,
    schedule_file: Option<std::path::PathBuf>,
    /// Per volume, the newest snapshot each peer was last seen to hold after a push: pruning
    /// keeps it, so every standby keeps an incremental base.
    pushed_to: std::sync::Mutex<HashMap<String, HashMap<String, String>>>,
    /// Bytes per second for replication pushes.
    replication_rate: Option<u64>,
    /// Where secrets and configs are written; applications with files are refused without.
    pub(crate) files: Option<crate::files::FileStore>,
    /// The containers' hosts files (service names); without, containers keep Docker's.
    hosts: Option<crate::hosts::HostsFiles>,
    /// Bytes per second for the pushes of a move (`--move-rate-limit`).
    move_rate: Option<u64>,
    /// How long a start waits for its application to be ready (see `readiness`).
    ready_timeout: std::time::Duration,
    /// Connections held for applications moving here until they are ready (`crate::hold`).
    pub(crate) holds: crate::hold::HoldSet,
    /// Applications prepared here for a move, started as soon as their final push lands
    /// (`early_start`).
    prepared_starts: early_start::PreparedStarts,
    pub(crate) metrics: Arc<Metrics>,
}

/// How long a start waits for readiness unless `--ready-timeout` says otherwise.
pub const DEFAULT_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Progress events of one action.
type Events = mpsc::Sender<ConvergeEvent>;

impl Agent {
    pub fn new(
        me: String,
        volumes: Arc<dyn VolumeBackend>,
        runtime: Arc<dyn ContainerRuntime>,
        peers: AgentClient,
        routes: RouteStore,
    ) -> Self {
        Agent {
            me,
            volumes,
            runtime,
            peers,
            routes,
            converge_lock: Arc::new(Mutex::new(())),
            volume_locks: std::sync::Mutex::new(HashMap::new()),
            restarts: std::sync::Mutex::new(HashMap::new()),
            api_port: None,
            desired: std::sync::Mutex::new(None),
            schedule_file: None,
            pushed_to: std::sync::Mutex::new(HashMap::new()),
            replication_rate: None,
            files: None,
            hosts: None,
            move_rate: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            holds: crate::hold::HoldSet::default(),
            prepared_starts: early_start::PreparedStarts::default(),
            metrics: Metrics::new(),
        }
    }

    /// Before the supervisor restarts a container on its own: its files are all there.
    pub(crate) fn check_files(&self, app: &Application) -> Result<(), AgentError> {
        match &self.files {
            Some(store) => store
                .check(app)
                .map_err(|e| AgentError::Conflict(e.to_string())),
            None if app.files.is_empty() => Ok(()),
            None => Err(AgentError::Conflict(format!(
                "application {:?} mounts secrets or configs, and this agent has no file store",
                app.name
            ))),
        }
    }

    /// Writes applications' secrets and configs into `store`.
    pub fn with_file_store(self, store: crate::files::FileStore) -> Self {
        self.with_file_store_if(Some(store))
    }

    /// Gives every container it creates a hosts file naming the cluster's services.
    pub fn with_hosts_files(mut self, hosts: crate::hosts::HostsFiles) -> Self {
        self.hosts = Some(hosts);
        self
    }

    /// Rewrites, in place, the hosts file of every managed container that has one, from the
    /// node's service routes as recorded now. A failure is logged: routing goes on, and the
    /// next route change or start writes again.
    pub(crate) async fn refresh_hosts(&self) {
        let Some(hosts) = &self.hosts else {
            return;
        };
        let containers = match self.runtime.list_managed().await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers to rewrite their hosts files");
                return;
            }
        };
        let services = self.routes.services();
        let routes = self.routes.current();
        for c in containers {
            let ip: Option<Ipv4Addr> = c.ip.as_deref().and_then(|ip| ip.parse().ok());
            let hostname = match (ip, c.running) {
                (Some(_), true) => self
                    .runtime
                    .details(&c.name)
                    .await
                    .ok()
                    .and_then(|d| d.pid)
                    .and_then(crate::hosts::container_hostname),
                _ => None,
            };
            let own = ip.zip(hostname.as_deref());
            let text = crate::hosts::content(&c.application, &services, &routes, own);
            if let Err(e) = hosts.rewrite(&c.name, &text) {
                tracing::warn!(container = %c.name, error = %e, "cannot rewrite the hosts file");
            }
        }
    }

    /// [`Agent::with_file_store`] when there is one.
    pub fn with_file_store_if(mut self, store: Option<crate::files::FileStore>) -> Self {
        self.files = store;
        self
    }

    /// Writes an application's files and returns their read-only bind mounts.
    fn write_files(
        &self,
        desired: &DesiredState,
        app: &Application,
    ) -> Result<Vec<String>, AgentError> {
        if app.files.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.files.as_ref().ok_or_else(|| {
            AgentError::Conflict(format!(
                "application {:?} mounts secrets or configs, and this agent has no file store (it could not mount its tmpfs; see its log)",
                app.name
            ))
        })?;
        store
            .write(app, desired.files.get(&app.name))
            .map_err(|e| match e {
                // What the request sent is wrong; failing to write it is this node's fault.
                crate::files::FilesError::Missing { .. }
                | crate::files::FilesError::Digest { .. } => AgentError::BadRequest(e.to_string()),
                _ => AgentError::Internal(e.to_string()),
            })?;
        Ok(app
            .files
            .iter()
            .map(|m| format!("{}:{}:ro", store.path(&app.name, m).display(), m.target))
            .collect())
    }

    /// Caps the pushes of a move at `bytes_per_second`.
    pub fn with_move_rate(mut self, bytes_per_second: Option<u64>) -> Self {
        self.move_rate = bytes_per_second;
        self
    }

    /// How long a start waits for its application to be ready before it fails.
    pub fn with_ready_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long a connection to an application moving here is held at most (`crate::hold`).
    pub fn with_hold_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.holds = crate::hold::HoldSet::new(timeout);
        self
    }

    /// This agent's metrics (served by `metrics::serve` when configured).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Caps replication pushes at `bytes_per_second`.
    pub fn with_replication_rate(mut self, bytes_per_second: Option<u64>) -> Self {
        self.replication_rate = bytes_per_second;
        self
    }

    /// Keeps the last converge's desired state in `path` (and loads it now, if present).
    pub fn with_schedule_file(mut self, path: std::path::PathBuf) -> Self {
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<DesiredState>(&bytes) {
                Ok(d) => {
                    if let Ok(mut slot) = self.desired.lock() {
                        *slot = Some(node_list::Held::new(d));
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable schedule file; the next deploy rewrites it")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the schedule file")
            }
        }
        self.schedule_file = Some(path);
        self
    }

    /// The desired state of the last converge, if any.
    pub fn last_desired(&self) -> Option<DesiredState> {
        self.desired
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(|held| held.desired.clone()))
    }

    /// Remembers (and persists) the desired state a converge was validated against.
    fn remember_desired(&self, desired: &DesiredState) {
        // Secrets are kept only where the container reads them, never in the schedule.
        let desired = &DesiredState {
            files: BTreeMap::new(),
            ..desired.clone()
        };
        if let Ok(mut slot) = self.desired.lock() {
            *slot = Some(node_list::Held::new(desired.clone()));
        }
        let Some(path) = &self.schedule_file else {
            return;
        };
        match serde_json::to_vec_pretty(desired) {
            Ok(bytes) => {
                if let Err(e) = crate::volume::sidecar::write_bytes(path, &bytes) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot record the schedule");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the schedule"),
        }
    }

    /// The port the agent API listens on, which routes must never take.
    pub fn with_api_port(mut self, port: u16) -> Self {
        self.api_port = Some(port);
        self
    }

    pub fn address(&self) -> &str {
        &self.me
    }

    pub fn volume_kind(&self) -> &'static str {
        self.volumes.kind()
    }

    pub fn routing_name(&self) -> &'static str {
        self.routes.backend_name()
    }

    /// The node's whole recorded route table (what is programmed into the kernel).
    pub fn route_table(&self) -> Vec<Route> {
        self.routes.current()
    }

    /// Problems with routing on this node (a forward filter dropping routed connections).
    pub fn routing_warnings(&self) -> Vec<String> {
        self.routes.warnings()
    }

    /// One lock per volume name: a push, receive or handoff of V excludes the others on V,
    /// while operations on different volumes (possibly waiting on each other across nodes)
    /// never block each other.
    async fn lock_volume(&self, name: &str) -> OwnedMutexGuard<()> {
        self.volume_lock(name).lock_owned().await
    }

    /// The lock that orders everything done to one volume on this node.
    fn volume_lock(&self, name: &str) -> Arc<Mutex<()>> {
        match self.volume_locks.lock() {
            Ok(mut map) => map.entry(name.to_string()).or_default().clone(),
            Err(_) => Arc::new(Mutex::new(())),
        }
    }

    /// Runs a volume backend call on a blocking thread, waiting at most
    /// [`STORAGE_TIMEOUT`]: a filesystem that stops answering (a wedged FUSE daemon) must
    /// fail the request, not hold the converge lock forever. The stuck thread is abandoned.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VolumeBackend) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let backend = self.volumes.clone();
        let call = tokio::task::spawn_blocking(move || f(backend.as_ref()));
        match tokio::time::timeout(STORAGE_TIMEOUT, call).await {
            Ok(joined) => joined
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(AgentError::from),
            Err(_) => Err(AgentError::Internal(format!(
                "the {} volume backend did not answer within {} s (a hung filesystem or storage daemon?)",
                self.volumes.kind(),
                STORAGE_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn local_volume(&self, name: &str) -> Result<Option<VolumeState>, AgentError> {
        let name = name.to_string();
        self.blocking(move |b| b.get(&name)).await
    }

    /// `GET /v1/state`.
    pub async fn state(&self) -> Result<NodeState, AgentError> {
        let listed = self.runtime.list_managed().await?;
        // Readiness is judged for every running container at once (a Docker inspect each).
        let healths = futures_util::future::join_all(listed.iter().map(|c| async move {
            if !c.running {
                return (None, None);
            }
            match readiness::check(self.runtime.as_ref(), &c.name, &c.application).await {
                Ok(v) => (Some(v.health), v.output),
                Err(e) => {
                    tracing::debug!(container = %c.name, error = %e, "cannot judge readiness");
                    (None, None)
                }
            }
        }))
        .await;
        let mut containers = Vec::new();
        for (c, (health, health_output)) in listed.into_iter().zip(healths) {
            let mut volume_problem = None;
            if c.running {
                for (volume, spec) in c.application.volumes() {
                    volume_problem = self.volume_problem(&c.name, volume, &spec.mountpoint).await;
                    if volume_problem.is_some() {
                        break;
                    }
                }
            }
            containers.push(ContainerState {
                application: c.application,
                running: c.running,
                ip: c.ip,
                volume_problem,
                health,
                health_output,
            });
        }
        let volumes = self.blocking(|b| b.list()).await?;
        let (routes, routes_version) = self.routes.reported();
        let (standby, nodes_version) = match self.desired.lock() {
            Ok(held) => match held.as_ref() {
                Some(h) => (
                    h.desired.standby_for(&self.me),
                    Some(h.nodes_version.clone()),
                ),
                None => Default::default(),
            },
            Err(_) => Default::default(),
        };
        Ok(NodeState {
            address: self.me.clone(),
            containers,
            volumes,
            routes,
            routes_version,
            standby,
            nodes_version,
        })
    }

    /// Whether a running container really runs on its volume: the volume is still proven
    /// on the host, and the container's mount at `mountpoint` is that same filesystem and
    /// directory (not the bare directory an unmounted volume left when it started).
    async fn volume_problem(
        &self,
        container: &str,
        volume: &str,
        mountpoint: &str,
    ) -> Option<String> {
        let v = volume.to_string();
        let host_path = match self.blocking(move |b| b.verify(&v)).await {
            Ok(path) => path,
            Err(e) => return Some(e.to_string()),
        };
        let pid = match self.runtime.details(container).await {
            Ok(d) => d.pid?,
            Err(e) => {
                tracing::debug!(container, error = %e, "cannot inspect container");
                return None;
            }
        };
        let inside = std::path::PathBuf::from(mountpoint);
        let read = move || -> std::io::Result<Option<(FsLocation, FsLocation)>> {
            let host = mountinfo::parse(&std::fs::read_to_string("/proc/self/mountinfo")?);
            let ctr = mountinfo::parse(&std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?);
            Ok(mountinfo::locate(&host, &host_path).zip(mountinfo::locate(&ctr, &inside)))
        };
        match tokio::task::spawn_blocking(read).await {
            Ok(Ok(Some((host, ctr)))) if host != ctr => Some(format!(
                "the container's {mountpoint} is {ctr}, not its volume ({host}): it was started while \
                 the volume was not mounted, and its writes do not reach the volume"
            )),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::debug!(container, error = %e, "cannot read mount tables");
                None
            }
            Err(e) => {
                tracing::debug!(container, error = %e, "mount table task failed");
                None
            }
        }
    }

    /// The proven path of `volume` (mounted first where safe): see [`VolumeBackend::prove`].
    /// Whether this node's copy of `volume` records this node as its owner.
    pub(crate) async fn owns_volume(&self, volume: &str) -> Result<bool, AgentError> {
        Ok(self
            .local_volume(volume)
            .await?
            .is_some_and(|v| v.owner == self.me))
    }

    /// Whether this node owns every volume of `app` (true for an application without one).
    pub(crate) async fn owns_all_volumes(&self, app: &Application) -> Result<bool, AgentError> {
        for (volume, _) in app.volumes() {
            if !self.owns_volume(volume).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Proves every volume of `app` mounted: each one's host path and mount point.
    pub(crate) async fn prove_volumes(
        &self,
        app: &Application,
    ) -> Result<Vec<(std::path::PathBuf, String)>, AgentError> {
        let mut mounts = Vec::new();
        for (volume, spec) in app.volumes() {
            mounts.push((self.prove_volume(volume).await?, spec.mountpoint.clone()));
        }
        Ok(mounts)
    }

    pub(crate) async fn prove_volume(
        &self,
        volume: &str,
    ) -> Result<std::path::PathBuf, AgentError> {
        let v = volume.to_string();
        self.blocking(move |b| b.prove(&v)).await
    }

    async fn resolver(&self) -> Result<Resolver, AgentError> {
        let managed = self.runtime.list_managed().await?;
        let containers = managed
            .iter()
            .filter_map(|c| {
                let ip: Ipv4Addr = c.ip.as_deref()?.parse().ok()?;
                Some((c.application.name.clone(), ip))
            })
            .collect();
        let containers6 = managed
            .iter()
            .filter_map(|c| {
                let ip: Ipv6Addr = c.ip6.as_deref()?.parse().ok()?;
                Some((c.application.name.clone(), ip))
            })
            .collect();
        Ok(Resolver {
            containers,
            containers6,
        })
    }

    /// Re-programs the recorded routes (agent start).
    pub async fn reapply_routes(&self) -> Result<Resolver, AgentError> {
        let resolver = self.resolver().await?;
        self.routes.reapply(&resolver)?;
        Ok(resolver)
    }

    /// `POST /v1/converge`: checks the whole request, then carries the actions out in
    /// order on a task of its own (it finishes even if the caller goes away), streaming
    /// events. Stops at the first failed action.
    pub async fn converge(
        self: &Arc<Self>,
        request: ConvergeRequest,
    ) -> Result<mpsc::Receiver<ConvergeEvent>, AgentError> {
        let mut request = request;
        let guard = lock::converge_lock(&self.converge_lock).await?;
        // Under the lock: the list held changes only when a converge is accepted.
        if let Some(named) = request.nodes_version.take() {
            let held = self
                .desired
                .lock()
                .map_err(|_| AgentError::Internal("the held desired state is poisoned".into()))?;
            node_list::complete(&mut request.desired, &named, held.as_ref(), &self.me)?;
        }
        self.validate(&request).await?;
        self.remember_desired(&request.desired);
        let (tx, rx) = mpsc::channel(64);
        let agent = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            for action in &request.actions {
                let step = step_name(action);
                let _ = tx.send(ConvergeEvent::Started { step: step.clone() }).await;
                tracing::info!(%step, "converge step");
                let result = agent.execute(&request, action, &step, &tx).await;
                agent
                    .metrics
                    .converge_action(action_kind(action), result.is_ok());
                match result {
                    Ok(()) => {
                        let _ = tx.send(ConvergeEvent::Done { step }).await;
                    }
                    Err(e) => {
                        tracing::warn!(%step, error = %e, "converge step failed");
                        let _ = tx
                            .send(ConvergeEvent::Failed {
                                step,
                                error: e.to_string(),
                            })
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn execute(
        &self,
        request: &ConvergeRequest,
        action: &Action,
        step: &str,
        events: &Events,
    ) -> Result<(), AgentError> {
        let desired = &request.desired;
        let routes = request.routes.as_ref();
        match action {
            Action::CreateVolume {
                volume,
                maximum_size,
            } => self.create_volume(volume, *maximum_size).await,
            Action::PrepareApplication { application } => {
                self.prepare_application(desired, routes, application).await;
                Ok(())
            }
            Action::StartApplication { application } => {
                self.prepared_starts.forget(&application.name);
                self.start_application(desired, routes, application, false, step, events)
                    .await
            }
            Action::RestartApplication { application } => {
                self.prepared_starts.forget(&application.name);
                self.start_application(desired, routes, application, true, step, events)
                    .await
            }
            Action::StopApplication { application } => {
                self.prepared_starts.forget(application);
                self.stop_application(application).await
            }
            Action::PushVolume { volume, to, last } => {
                self.push_volume(volume, to, *last, step, events).await
            }
            Action::Handoff { volume, to } => {
                let started = std::time::Instant::now();
                let result = self.handoff(volume, to).await;
                self.metrics.move_phase("handoff", started.elapsed());
                result
            }
            Action::Promote { volume, epoch } => self.promote(volume, *epoch).await,
            Action::SetRoutes { routes } => {
                let result = self.set_routes(routes.clone(), None).await;
                self.release_rerouted_holds();
                self.refresh_hosts().await;
                result
            }
            Action::SwitchRoutes { moves } => self.switch_routes(moves).await,
            Action::FollowRoutes { version } => {
                // Validation made sure the request carries the map of this version.
                let map = routes.ok_or_else(|| {
                    AgentError::BadRequest("follow routes: the request carries no route map".into())
                })?;
                let resolver = self.resolver().await?;
                let started = std::time::Instant::now();
                let result = self.routes.set_with_services(
                    map.routes_for(&self.me),
                    Some(version.clone()),
                    map.service_routes_for(&self.me),
                    desired.nodes.keys().cloned().collect(),
                    &resolver,
                );
                self.metrics
                    .routes_applied(result.is_ok().then_some(map.ports.len()), started.elapsed());
                result?;
                self.release_rerouted_holds();
                self.refresh_hosts().await;
                Ok(())
            }
            // The schedule is the request's desired state, remembered when it was accepted.
            Action::SetStandby { .. } => Ok(()),
        }
    }

    async fn create_volume(&self, name: &str, maximum_size: Option<u64>) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        match self.local_volume(name).await? {
            Some(v) if v.owner == self.me => Ok(()),
            Some(v) => Err(AgentError::Conflict(format!(
                "create volume {name:?}: a copy already exists here, owned by {} at epoch {}",
                v.owner, v.epoch
            ))),
            None => {
                let (n, me) = (name.to_string(), self.me.clone());
                self.blocking(move |b| b.create(&n, maximum_size, &me))
                    .await
            }
        }
    }

    /// The container using `volume`, if any runs or stands stopped here.
    async fn using_volume(&self, volume: &str) -> Result<Option<ManagedContainer>, AgentError> {
        Ok(self
            .runtime
            .list_managed()
            .await?
            .into_iter()
            .find(|c| c.application.uses_volume(volume)))
    }

    async fn managed(&self, application: &str) -> Result<Option<ManagedContainer>, AgentError> {
        Ok(self
            .runtime
            .list_managed()
            .await?
            .into_iter()
            .find(|c| c.application.name == application))
    }

    /// Starts the application and waits until it is ready; connections held for it (a move
    /// here) then go to it, or are reset when the start fails.
    async fn start_application(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
        replace: bool,
        step: &str,
        events: &Events,
    ) -> Result<(), AgentError> {
        self.holds.starting(&app.name);
        let started = std::time::Instant::now();
        let result = match self.start_container(desired, routes, app, replace).await {
            Ok(started_now) => {
                self.wait_until_ready(app, started, started_now, step, events)
                    .await
            }
            Err(e) => Err(e),
        };
        self.end_hold(app, &result).await;
        result.map(drop)
    }

    /// After a start: held connections go to the application once it is ready, at its
    /// address as the routes re-applied after the readiness found it, or are reset when the
    /// start failed.
    async fn end_hold(&self, app: &Application, result: &Result<Option<Ipv4Addr>, AgentError>) {
        let address = match result {
            Ok(Some(ip)) => Some(*ip),
            // The routes could not be re-applied: ask Docker.
            Ok(None) => self
                .managed(&app.name)
                .await
                .ok()
                .flatten()
                .and_then(|c| c.ip?.parse::<Ipv4Addr>().ok()),
            Err(_) => None,
        };
        match address {
            Some(ip) => self.holds.ready(&app.name, ip),
            None => self.holds.release(&app.name),
        }
        if result.is_ok() {
            // Its hosts file gets its own name; after the held connections went on, which
            // need the route (re-applied once ready) but not this.
            self.refresh_hosts().await;
        }
    }

    /// Waits until the application whose container was started at `started` is ready, then
    /// re-applies the routes into it; returns its address as they found it (`None` when
    /// they could not be re-applied). `started_now`: this start started the container (the
    /// metrics count a start once, not again for a start that found it running, as a move's
    /// start phase does after the start that followed the final push).
    async fn wait_until_ready(
        &self,
        app: &Application,
        started: std::time::Instant,
        started_now: bool,
        step: &str,
        events: &Events,
    ) -> Result<Option<Ipv4Addr>, AgentError> {
        let container_started = started.elapsed();
        // Routes to it come in a later phase of the plan: the start is done only once the
        // application answers, so traffic never reaches a container still starting up.
        let name = crate::containers::container_name_of(app);
        let bound = readiness::wait_bound(app, self.ready_timeout);
        let waiting = |output: &str| {
            let _ = events.try_send(ConvergeEvent::Started {
                step: format!("{step}: waiting until ready ({output})"),
            });
        };
        let ready = readiness::wait_ready(self.runtime.as_ref(), &name, app, bound, waiting).await;
        if started_now {
            self.metrics.ready_wait(ready.is_ok(), started.elapsed());
        }
        if ready.is_ok() {
            tracing::info!(
                application = %app.name,
                container_started_ms = container_started.as_millis() as u64,
                ready_ms = started.elapsed().as_millis() as u64,
                "started and ready"
            );
            if started_now {
                self.metrics.move_phase("start", started.elapsed());
            }
        }
        ready?;
        // A container started anew has a new address: the recorded routes and service
        // routes into it follow at once (its hosts file follows in `end_hold`).
        match self.reapply_routes().await {
            Ok(resolver) => Ok(resolver.containers.get(&app.name).copied()),
            Err(e) => {
                tracing::warn!(application = %app.name, error = %e, "cannot re-apply routes after the start");
                Ok(None)
            }
        }
    }

    /// Creates (or replaces) and starts the application's container, its volume proven;
    /// `false` when it found it running already.
    async fn start_container(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
        replace: bool,
    ) -> Result<bool, AgentError> {
        // Three reads at once (a move's start is in the clients' pause), judged in the order
        // the checks need them.
        let began = std::time::Instant::now();
        let (existing, records, volume_mounts) = tokio::join!(
            self.managed(&app.name),
            futures_util::future::join_all(
                app.volumes()
                    .map(|(volume, _)| async move { (volume, self.local_volume(volume).await) })
            ),
            // Never start on a bare directory, even an existing container whose bind mount
            // names the right path: every path must be its volume right now.
            self.prove_volumes(app)
        );
        let existing = existing?;
        for (volume, record) in records {
            // Ownership may have moved since validation (another request in between).
            let v = record?.ok_or_else(|| {
                AgentError::Conflict(format!("volume {volume:?} does not exist here"))
            })?;
            ownership::check_owner(&self.me, &v)?;
        }
        let volume_mounts = volume_mounts?;
        tracing::debug!(application = %app.name, checks_ms = began.elapsed().as_millis() as u64, "checked before the start");
        self.forget_restarts(app);
        if let Some(c) = &existing
            && !replace
            && !c.never_started
            && &c.application == app
        {
            if c.running {
                return Ok(false);
            }
            // Its files may be gone (a node restart empties the tmpfs).
            self.write_files(desired, app)?;
            if !self.start_or_recreate(&c.name).await? {
                return Ok(true);
            }
        }
        let spec = self.spec_for(desired, routes, app, &volume_mounts)?;
        if let Some(c) = existing {
            // Prepared during the move's pre-copy (`prepare_application`): only started,
            // while it is exactly what would be created now.
            if c.never_started
                && c.spec_digest.as_deref() == spec.labels.get(LABEL_SPEC).map(String::as_str)
            {
                tracing::info!(application = %app.name, "starting the container prepared during the pre-copy");
                if !self.start_or_recreate(&c.name).await? {
                    return Ok(true);
                }
            }
            if c.never_started {
                tracing::info!(application = %app.name, "the prepared container no longer matches: creating it anew");
            }
            self.runtime.stop_and_remove(&c.name).await?;
        }
        self.runtime.create_and_start(&spec).await?;
        Ok(true)
    }

    /// Starts an existing container; `true` when it must be created anew instead, because
    /// the network holder it was created to join is gone, or Docker failed the start itself
    /// (it is not running, and the application's data lives in its volumes, so removing it
    /// loses only its writable layer; a spec that cannot start fails the create instead).
    async fn start_or_recreate(&self, container: &str) -> Result<bool, AgentError> {
        match self.runtime.start(container).await {
            Ok(()) => Ok(false),
            Err(e @ (ContainerError::HolderGone { .. } | ContainerError::StartFailed { .. })) => {
                tracing::warn!(container, error = %e, "creating the container anew");
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The container of `app` on `volume_mounts`, with its files written and its hosts file,
    /// labelled with its digest ([`crate::containers::spec_digest`]).
    fn spec_for(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
        volume_mounts: &[(std::path::PathBuf, String)],
    ) -> Result<crate::containers::ContainerSpec, AgentError> {
        let mut spec = container_spec(app, volume_mounts, desired, routes, &self.me)?;
        spec.binds.extend(self.write_files(desired, app)?);
        if let Some(hosts) = &self.hosts {
            // Its own name is added once it runs (`refresh_hosts`).
            let text =
                crate::hosts::content(app, &self.routes.services(), &self.routes.current(), None);
            hosts
                .write(&spec.name, &text)
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            spec.binds.push(format!(
                "{}:{}",
                hosts.path(&spec.name).display(),
                crate::hosts::CONTAINER_PATH
            ));
        }
        let digest = crate::containers::spec_digest(&spec);
        spec.labels.insert(LABEL_SPEC.to_string(), digest);
        Ok(spec)
    }

    /// `PrepareApplication`: creates, without starting, the container of an application
    /// moving here, on the replicas its pre-copy left, so that the move's start is only
    /// `docker start` (`start_container` starts it while it still matches). It never starts
    /// here: this node does not own the volumes yet, and the supervisor leaves a container
    /// that never started alone. Best effort: whatever fails is logged, and the start then
    /// creates the container as it always did.
    async fn prepare_application(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
    ) {
        let prepared = self.try_prepare(desired, routes, app).await;
        match &prepared {
            Ok(true) => self.prepared_starts.remember(desired, routes, app),
            _ => self.prepared_starts.forget(&app.name),
        }
        match prepared {
            Ok(true) => {
                tracing::info!(application = %app.name, "prepared the container for the move's start")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(application = %app.name, error = %e, "cannot prepare the container; the start creates it")
            }
        }
    }

    async fn try_prepare(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
    ) -> Result<bool, AgentError> {
        if let Some(c) = self.managed(&app.name).await? {
            tracing::debug!(application = %app.name, container = %c.name, "a container stands here already; the start decides what to do with it");
            return Ok(false);
        }
        let mut mounts = Vec::new();
        for (volume, spec) in app.volumes() {
            // The replica the pre-copy left, mounted where the start will prove it.
            let v = volume.to_string();
            let path = self.blocking(move |b| b.verify(&v)).await?;
            mounts.push((path, spec.mountpoint.clone()));
        }
        let spec = self.spec_for(desired, routes, app, &mounts)?;
        self.runtime.create(&spec).await?;
        Ok(true)
    }

    /// A converge (re)starts the application: the supervisor's restart count begins anew.
    fn forget_restarts(&self, app: &Application) {
        if let Ok(mut r) = self.restarts.lock() {
            r.remove(&crate::containers::container_name_of(app));
        }
    }

    async fn stop_application(&self, application: &str) -> Result<(), AgentError> {
        // Only a container carrying our labels is ever stopped, whatever its name.
        if let Some(c) = self.managed(application).await? {
            self.runtime.stop_and_remove(&c.name).await?;
            if let Some(hosts) = &self.hosts
                && let Err(e) = hosts.remove(&c.name)
            {
                tracing::warn!(application, error = %e, "cannot remove the hosts file");
            }
        } else {
            tracing::debug!(application, "not running here, nothing to stop");
        }
        if let Some(store) = &self.files
            && let Err(e) = store.remove(application)
        {
            tracing::warn!(application, error = %e, "cannot remove the application's secrets and configs");
        }
        Ok(())
    }

    async fn set_routes(
        &self,
        routes: Vec<Route>,
        version: Option<String>,
    ) -> Result<(), AgentError> {
        let resolver = self.resolver().await?;
        let count = routes.len();
        let started = std::time::Instant::now();
        let result = self.routes.set_versioned(routes, version, &resolver);
        self.metrics
            .routes_applied(result.is_ok().then_some(count), started.elapsed());
        Ok(result?)
    }
}

/// The wire name of an action's kind, the `kind` label of the converge metrics.
pub fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::CreateVolume { .. } => "create-volume",
        Action::PushVolume { .. } => "push-volume",
        Action::Handoff { .. } => "handoff",
        Action::Promote { .. } => "promote",
        Action::PrepareApplication { .. } => "prepare-application",
        Action::StartApplication { .. } => "start-application",
        Action::StopApplication { .. } => "stop-application",
        Action::RestartApplication { .. } => "restart-application",
        Action::SetRoutes { .. } => "set-routes",
        Action::FollowRoutes { .. } => "follow-routes",
        Action::SwitchRoutes { .. } => "switch-routes",
        Action::SetStandby { .. } => "set-standby",
    }
}

/// A short human name of an action for progress events.
pub fn step_name(action: &Action) -> String {
    match action {
        Action::CreateVolume { volume, .. } => format!("create-volume {volume}"),
        Action::PushVolume { volume, to, last } => {
            format!(
                "push-volume {volume} to {to}{}",
                if *last { " (last)" } else { "" }
            )
        }
        Action::Handoff { volume, to } => format!("handoff {volume} to {to}"),
        Action::Promote { volume, epoch } => format!("promote {volume} at epoch {epoch}"),
        Action::PrepareApplication { application } => format!("prepare {}", application.name),
        Action::StartApplication { application } => format!("start {}", application.name),
        Action::StopApplication { application } => format!("stop {application}"),
        Action::RestartApplication { application } => format!("restart {}", application.name),
        Action::SetRoutes { routes } => format!("set-routes ({} routes)", routes.len()),
        Action::FollowRoutes { version } => {
            format!("follow-routes {}", version.get(..12).unwrap_or(version))
        }
        Action::SwitchRoutes { moves } => {
            let names: Vec<&str> = moves.iter().map(|m| m.application.as_str()).collect();
            format!("switch-routes {}", names.join(", "))
        }
        Action::SetStandby { standby } => format!("set-standby ({} volumes)", standby.len()),
    }
}

/// Used by the converge stream: one JSON line per event.
pub fn event_line(event: &ConvergeEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}
