//! The agent's behaviour behind the API: reporting state, carrying out converge actions,
//! receiving pushes and taking over volumes. Everything it knows comes from Docker (labels),
//! its volumes (ownership records) and the route file, so a restarted agent reports the same
//! state as before.
//!
//! **Architecture invariant:** every request is checked completely before anything changes;
//! a refused request (4xx) has no effect.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::Method;
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedMutexGuard, mpsc};
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use flocker_wire::{
    Action, Application, ContainerState, ConvergeEvent, ConvergeRequest, DesiredState, NodeState,
    Route, RouteTarget, VolumeState,
};

use crate::containers::{ContainerError, ContainerRuntime, ManagedContainer, container_spec};
use crate::ownership::{self, HandoffStep, OwnershipError, RecordOrder, TakeOver};
use crate::peer::{PeerClient, PeerError};
use crate::routes::{Resolver, RouteStore, RoutesError};
use crate::transfer;
use crate::volume::{Record, VolumeBackend, VolumeError, check_name, next_push_snapshot};

/// At most this many pushes per pre-copy: the first and its catch-up passes.
const PRE_COPY_PASSES: u32 = 3;
/// A pre-copy pass that took at least this long is followed by another.
const CATCH_UP_AFTER: Duration = Duration::from_secs(1);

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
    Peer(#[from] PeerError),
    #[error(transparent)]
    Routes(#[from] RoutesError),
    #[error(transparent)]
    Stream(#[from] transfer::TransferError),
    #[error("transfer of volume {volume:?}: {detail}")]
    Transfer { volume: String, detail: String },
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
            AgentError::Container(ContainerError::ImageMissing { .. }) => 422,
            AgentError::Routes(RoutesError::Table(_)) => 400,
            // A stream that fails verification or ends early is the sender's fault; a sink
            // that cannot take verified data (full pool) is ours.
            AgentError::Stream(transfer::TransferError::Stream(
                flocker_stream::StreamError::SinkWrite(_),
            )) => 500,
            AgentError::Stream(_) => 400,
            AgentError::Peer(_) => 502,
            _ => 500,
        }
    }
}

/// Query of `POST /v1/volumes/NAME/receive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveParams {
    pub snapshot: String,
    pub base: Option<String>,
    /// The sender's ownership record, which the received copy adopts.
    pub owner: String,
    pub epoch: u64,
    pub from: String,
    pub quota: Option<u64>,
    /// The target's copy is a stale replica sharing no snapshot with the sender: replace it
    /// with this full stream. Never honoured for a copy the target owns.
    pub replace: bool,
}

impl ReceiveParams {
    /// Parses `a=b&c=d` (names are restricted, so no percent-decoding is needed).
    pub fn parse(query: &str) -> Result<Self, AgentError> {
        let map: HashMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| {
            map.get(k).map(|v| v.to_string()).ok_or_else(|| {
                AgentError::BadRequest(format!("receive: missing query parameter {k:?}"))
            })
        };
        let num = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| AgentError::BadRequest(format!("receive: {k}={v:?} is not a number")))
        };
        Ok(ReceiveParams {
            snapshot: get("snapshot")?,
            base: map.get("base").map(|s| s.to_string()),
            owner: get("owner")?,
            epoch: num("epoch", &get("epoch")?)?,
            from: get("from")?,
            quota: map.get("quota").map(|q| num("quota", q)).transpose()?,
            replace: map.get("replace") == Some(&"1"),
        })
    }

    fn query(&self) -> String {
        let mut q = format!(
            "snapshot={}&owner={}&epoch={}&from={}",
            self.snapshot, self.owner, self.epoch, self.from
        );
        if let Some(b) = &self.base {
            q.push_str(&format!("&base={b}"));
        }
        if let Some(quota) = self.quota {
            q.push_str(&format!("&quota={quota}"));
        }
        if self.replace {
            q.push_str("&replace=1");
        }
        q
    }
}

/// Answer of a receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    pub snapshot: String,
    pub bytes: u64,
}

/// Body of `POST /v1/volumes/NAME/handoff`: "you own it at `epoch`", sent by `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeOverRequest {
    pub epoch: u64,
    pub from: String,
}

/// One node's agent.
pub struct Agent {
    me: String,
    volumes: Arc<dyn VolumeBackend>,
    runtime: Arc<dyn ContainerRuntime>,
    peers: PeerClient,
    routes: RouteStore,
    converge_lock: Arc<Mutex<()>>,
    volume_locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Progress events of one action.
type Events = mpsc::Sender<ConvergeEvent>;

impl Agent {
    pub fn new(
        me: String,
        volumes: Arc<dyn VolumeBackend>,
        runtime: Arc<dyn ContainerRuntime>,
        peers: PeerClient,
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
        }
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

    /// Problems with routing on this node (a forward filter dropping routed connections).
    pub fn routing_warnings(&self) -> Vec<String> {
        self.routes.warnings()
    }

    /// One lock per volume name: a push, receive or handoff of V excludes the others on V,
    /// while operations on different volumes (possibly waiting on each other across nodes)
    /// never block each other.
    async fn lock_volume(&self, name: &str) -> OwnedMutexGuard<()> {
        let lock = match self.volume_locks.lock() {
            Ok(mut map) => map.entry(name.to_string()).or_default().clone(),
            Err(_) => Arc::new(Mutex::new(())),
        };
        lock.lock_owned().await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VolumeBackend) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let backend = self.volumes.clone();
        tokio::task::spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(AgentError::from)
    }

    async fn local_volume(&self, name: &str) -> Result<Option<VolumeState>, AgentError> {
        let name = name.to_string();
        self.blocking(move |b| b.get(&name)).await
    }

    /// `GET /v1/state`.
    pub async fn state(&self) -> Result<NodeState, AgentError> {
        let containers = self
            .runtime
            .list_managed()
            .await?
            .into_iter()
            .map(|c| ContainerState {
                application: c.application,
                running: c.running,
                ip: c.ip,
            })
            .collect();
        let volumes = self.blocking(|b| b.list()).await?;
        Ok(NodeState {
            address: self.me.clone(),
            containers,
            volumes,
            routes: self.routes.current(),
        })
    }

    async fn resolver(&self) -> Result<Resolver, AgentError> {
        let containers = self
            .runtime
            .list_managed()
            .await?
            .into_iter()
            .filter_map(|c| {
                let ip: Ipv4Addr = c.ip.as_deref()?.parse().ok()?;
                Some((c.application.name, ip))
            })
            .collect();
        Ok(Resolver { containers })
    }

    /// Re-programs the recorded routes (agent start).
    pub async fn reapply_routes(&self) -> Result<(), AgentError> {
        let resolver = self.resolver().await?;
        Ok(self.routes.reapply(&resolver)?)
    }

    /// `POST /v1/converge`: checks the whole request, then carries the actions out in
    /// order on a task of its own (it finishes even if the caller goes away), streaming
    /// events. Stops at the first failed action.
    pub async fn converge(
        self: &Arc<Self>,
        request: ConvergeRequest,
    ) -> Result<mpsc::Receiver<ConvergeEvent>, AgentError> {
        let guard = self.converge_lock.clone().lock_owned().await;
        self.validate(&request).await?;
        let (tx, rx) = mpsc::channel(64);
        let agent = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            for action in &request.actions {
                let step = step_name(action);
                let _ = tx.send(ConvergeEvent::Started { step: step.clone() }).await;
                tracing::info!(%step, "converge step");
                match agent.execute(&request.desired, action, &step, &tx).await {
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

    /// Everything that can be known to fail before acting. Pulls missing images, which
    /// changes no state the API reports.
    async fn validate(&self, request: &ConvergeRequest) -> Result<(), AgentError> {
        let volumes: BTreeMap<String, VolumeState> = self
            .blocking(|b| b.list())
            .await?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let mut created: Vec<&str> = Vec::new();
        let bad = |s: String| Err(AgentError::BadRequest(s));
        for action in &request.actions {
            match action {
                Action::CreateVolume { volume, .. } => {
                    check_name(volume)?;
                    if let Some(v) = volumes.get(volume) {
                        if v.owner != self.me {
                            return Err(AgentError::Conflict(format!(
                                "create volume {volume:?}: a copy already exists here, owned by {} at epoch {}",
                                v.owner, v.epoch
                            )));
                        }
                    }
                    created.push(volume);
                }
                Action::StartApplication { application }
                | Action::RestartApplication { application } => {
                    self.validate_application(request, application, &volumes, &created)?;
                    self.runtime
                        .ensure_image(&application.image.to_string())
                        .await?;
                }
                Action::StopApplication { application } => check_name(application)?,
                Action::PushVolume { volume, to, .. } | Action::Handoff { volume, to } => {
                    check_name(volume)?;
                    if to == &self.me {
                        return bad(format!(
                            "volume {volume:?}: cannot push or hand off to this node itself ({to})"
                        ));
                    }
                    if to.is_empty() || to.contains(['/', '?', '&', ' ']) {
                        return bad(format!("volume {volume:?}: invalid target node {to:?}"));
                    }
                    let Some(v) = volumes.get(volume) else {
                        return Err(AgentError::NotFound(format!(
                            "volume {volume:?} does not exist on this node ({})",
                            self.me
                        )));
                    };
                    if v.owner != self.me && &v.owner != to {
                        ownership::check_owner(&self.me, v)?;
                    }
                }
                Action::SetRoutes { routes } => {
                    let mut seen = BTreeMap::new();
                    for r in routes {
                        if let Some(first) = seen.insert(r.external_port, &r.application) {
                            return bad(format!(
                                "set routes: external port {} is routed twice (applications {first:?} and {:?})",
                                r.external_port, r.application
                            ));
                        }
                        if matches!(r.target, RouteTarget::Local { .. })
                            && !request.desired.applications.contains_key(&r.application)
                        {
                            return bad(format!(
                                "set routes: local route to unknown application {:?}",
                                r.application
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_application(
        &self,
        request: &ConvergeRequest,
        app: &Application,
        volumes: &BTreeMap<String, VolumeState>,
        created: &[&str],
    ) -> Result<(), AgentError> {
        check_name(&app.name)?;
        if !request.desired.applications.contains_key(&app.name) {
            return Err(AgentError::BadRequest(format!(
                "unknown application {:?}: not in the desired state",
                app.name
            )));
        }
        if app.volume.is_some() && !created.contains(&app.name.as_str()) {
            match volumes.get(&app.name) {
                None => {
                    return Err(AgentError::Conflict(format!(
                        "application {:?} needs volume {:?}, which does not exist on this node ({})",
                        app.name, app.name, self.me
                    )));
                }
                Some(v) => ownership::check_owner(&self.me, v)?,
            }
        }
        Ok(())
    }

    async fn execute(
        &self,
        desired: &DesiredState,
        action: &Action,
        step: &str,
        events: &Events,
    ) -> Result<(), AgentError> {
        match action {
            Action::CreateVolume {
                volume,
                maximum_size,
            } => self.create_volume(volume, *maximum_size).await,
            Action::StartApplication { application } => {
                self.start_application(desired, application, false).await
            }
            Action::RestartApplication { application } => {
                self.start_application(desired, application, true).await
            }
            Action::StopApplication { application } => self.stop_application(application).await,
            Action::PushVolume { volume, to, last } => {
                self.push_volume(volume, to, *last, step, events).await
            }
            Action::Handoff { volume, to } => self.handoff(volume, to).await,
            Action::SetRoutes { routes } => self.set_routes(routes.clone()).await,
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

    async fn managed(&self, application: &str) -> Result<Option<ManagedContainer>, AgentError> {
        Ok(self
            .runtime
            .list_managed()
            .await?
            .into_iter()
            .find(|c| c.application.name == application))
    }

    async fn start_application(
        &self,
        desired: &DesiredState,
        app: &Application,
        replace: bool,
    ) -> Result<(), AgentError> {
        let existing = self.managed(&app.name).await?;
        if let Some(c) = &existing {
            if !replace && &c.application == app {
                if !c.running {
                    self.runtime.start(&c.name).await?;
                }
                return Ok(());
            }
        }
        let volume_path = match &app.volume {
            Some(_) => {
                // Ownership may have moved since validation (another request in between).
                let v = self.local_volume(&app.name).await?.ok_or_else(|| {
                    AgentError::Conflict(format!("volume {:?} does not exist here", app.name))
                })?;
                ownership::check_owner(&self.me, &v)?;
                let n = app.name.clone();
                Some(self.blocking(move |b| b.mountpoint(&n)).await?)
            }
            None => None,
        };
        let spec = container_spec(app, volume_path.as_deref(), desired, &self.me)?;
        if let Some(c) = existing {
            self.runtime.stop_and_remove(&c.name).await?;
        }
        self.runtime.create_and_start(&spec).await?;
        Ok(())
    }

    async fn stop_application(&self, application: &str) -> Result<(), AgentError> {
        // Only a container carrying our labels is ever stopped, whatever its name.
        if let Some(c) = self.managed(application).await? {
            self.runtime.stop_and_remove(&c.name).await?;
        } else {
            tracing::debug!(application, "not running here, nothing to stop");
        }
        Ok(())
    }

    async fn remote_volume(
        &self,
        node: &str,
        name: &str,
    ) -> Result<Option<VolumeState>, AgentError> {
        let (status, body) = self
            .peers
            .request(
                node,
                Method::GET,
                &format!("/v1/volumes/{name}"),
                crate::peer::full(Bytes::new()),
            )
            .await?;
        if status == hyper::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(PeerError::Status {
                node: node.to_string(),
                status,
                message: crate::peer::error_message(&body),
            }
            .into());
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| {
            PeerError::Json {
                node: node.to_string(),
                detail: e.to_string(),
            }
            .into()
        })
    }

    /// Pushes the volume to `to`. A pre-copy (`last` false) that took long is followed by
    /// catch-up passes while the application still runs, as live VM migration does: each
    /// carries only what changed during the one before (and lets the target finish writing
    /// the big one out), so the final push after the stop is left with the last moments only.
    async fn push_volume(
        &self,
        name: &str,
        to: &str,
        last: bool,
        step: &str,
        events: &Events,
    ) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        for pass in 1..=PRE_COPY_PASSES {
            let started = std::time::Instant::now();
            let pushed = self.push_pass(name, to, last, step, events).await?;
            let quick = started.elapsed() < CATCH_UP_AFTER;
            if last || !pushed || quick {
                break;
            }
            tracing::info!(
                volume = name,
                to,
                pass,
                took_ms = started.elapsed().as_millis() as u64,
                "pre-copy took long: catching up while the application runs"
            );
        }
        Ok(())
    }

    /// One push of everything since the newest snapshot both sides hold; `false` when there
    /// was nothing to push (the target already owns the volume). The caller holds the lock.
    async fn push_pass(
        &self,
        name: &str,
        to: &str,
        last: bool,
        step: &str,
        events: &Events,
    ) -> Result<bool, AgentError> {
        let local = self
            .local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))?;
        if local.owner == to {
            // A retry after the handoff: the target already holds everything.
            tracing::info!(
                volume = name,
                to,
                last,
                "already handed off, nothing to push"
            );
            return Ok(false);
        }
        ownership::check_owner(&self.me, &local)?;
        if last && self.managed(name).await?.is_some_and(|c| c.running) {
            // The final push is what the handoff relies on: nothing may be written after it.
            return Err(AgentError::Conflict(format!(
                "final push of volume {name:?}: application {name:?} still runs here; stop it first"
            )));
        }
        let remote = self.remote_volume(to, name).await?;
        let (base, replace) = match &remote {
            None => (None, false),
            Some(r) => match ownership::newest_common(&local.snapshots, &r.snapshots) {
                Some(common) => (Some(common.to_string()), false),
                // A replica left behind by an earlier move, whose snapshots were pruned
                // since: it is not the only copy (we own the volume), so it may be replaced.
                None if r.owner != to && r.epoch <= local.epoch => (None, true),
                None => {
                    return Err(AgentError::Conflict(format!(
                        "{to} holds a copy of volume {name:?} sharing no snapshot with this node; remove that copy first"
                    )));
                }
            },
        };
        let snapshot = next_push_snapshot(&local.snapshots);
        let quota = {
            let (n, s) = (name.to_string(), snapshot.clone());
            self.blocking(move |b| {
                b.snapshot(&n, &s)?;
                b.quota(&n)
            })
            .await?
        };
        let params = ReceiveParams {
            snapshot: snapshot.clone(),
            base: base.clone(),
            owner: local.owner.clone(),
            epoch: local.epoch,
            from: self.me.clone(),
            quota,
            replace,
        };
        tracing::info!(volume = name, to, %snapshot, base = ?base, last, "pushing");
        let sent = Arc::new(AtomicU64::new(0));
        let (n, b, s) = (name.to_string(), base.clone(), snapshot.clone());
        let mut source = self
            .blocking(move |be| be.send(&n, b.as_deref(), &s))
            .await?;
        let (writer, reader) = tokio::io::duplex(1 << 20);
        let mut bridge = SyncIoBridge::new(writer);
        let counter = sent.clone();
        let sender = tokio::task::spawn_blocking(move || {
            let result = transfer::send(&mut source, &mut bridge, counter);
            drop(bridge);
            let finished = source.finish();
            (result, finished)
        });
        let body = StreamBody::new(ReaderStream::new(reader).map_ok(Frame::data)).boxed();
        let ticker = {
            let (events, step, sent) = (events.clone(), step.to_string(), sent.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = events
                        .send(ConvergeEvent::Progress {
                            step: step.clone(),
                            bytes_done: sent.load(Ordering::Relaxed),
                            bytes_total: None,
                        })
                        .await;
                }
            })
        };
        let answer: Result<ReceiveReport, PeerError> = self
            .peers
            .json(
                to,
                Method::POST,
                &format!("/v1/volumes/{name}/receive?{}", params.query()),
                body,
            )
            .await;
        ticker.abort();
        let (send_result, send_finished) = sender
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let transfer_err = |detail: String| AgentError::Transfer {
            volume: name.to_string(),
            detail,
        };
        let report = answer?;
        let bytes = send_result.map_err(|e| transfer_err(e.to_string()))?;
        send_finished?;
        if report.snapshot != snapshot {
            return Err(transfer_err(format!(
                "{to} confirmed snapshot {:?}, expected {snapshot:?}",
                report.snapshot
            )));
        }
        let _ = events
            .send(ConvergeEvent::Progress {
                step: step.to_string(),
                bytes_done: bytes,
                bytes_total: Some(bytes),
            })
            .await;
        // Both sides now hold `snapshot`: older push snapshots are no longer a base.
        let mut all = local.snapshots.clone();
        all.push(snapshot.clone());
        let prune = ownership::prunable(&all, &snapshot);
        let n = name.to_string();
        self.blocking(move |b| {
            for s in &prune {
                b.destroy_snapshot(&n, s)?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(volume = name, to, %snapshot, bytes, "pushed");
        Ok(true)
    }

    /// Everything a receive can be refused for before reading the stream; returns this
    /// node's copy, if any.
    async fn check_receive(
        &self,
        name: &str,
        params: &ReceiveParams,
    ) -> Result<Option<VolumeState>, AgentError> {
        check_name(name)?;
        check_name(&params.snapshot)?;
        if let Some(b) = &params.base {
            check_name(b)?;
        }
        let local = self.local_volume(name).await?;
        ownership::check_receive(&self.me, &params.from, local.as_ref())?;
        match (&local, &params.base) {
            (None, Some(base)) => Err(AgentError::Conflict(format!(
                "volume {name:?}: incremental stream from {base:?}, but this node has no copy"
            ))),
            (Some(v), None) if params.replace && v.owner != self.me && v.epoch <= params.epoch => {
                Ok(local)
            }
            (Some(_), None) => Err(AgentError::Conflict(format!(
                "volume {name:?}: full stream refused, this node already has a copy"
            ))),
            (Some(v), Some(base)) if !v.snapshots.contains(base) => Err(AgentError::Conflict(
                format!("volume {name:?}: this copy does not hold base snapshot {base:?}"),
            )),
            (Some(v), _) if v.snapshots.contains(&params.snapshot) => {
                Err(AgentError::Conflict(format!(
                    "volume {name:?}: this copy already holds snapshot {:?}",
                    params.snapshot
                )))
            }
            _ => Ok(local),
        }
    }

    /// `POST /v1/volumes/NAME/receive`: applies a pushed stream to this node's copy.
    pub async fn receive(
        &self,
        name: &str,
        params: ReceiveParams,
        body: hyper::body::Incoming,
    ) -> Result<ReceiveReport, AgentError> {
        let _lock = self.lock_volume(name).await;
        let local = match self.check_receive(name, &params).await {
            Ok(local) => local,
            Err(e) => {
                // An HTTP/1.1 client still writing the stream would see a broken connection
                // instead of this answer: read the stream away first.
                drain(body).await;
                return Err(e);
            }
        };
        let (n, b, s) = (
            name.to_string(),
            params.base.clone(),
            params.snapshot.clone(),
        );
        let replace_stale = local.is_some() && params.base.is_none();
        let mut sink = match self
            .blocking(move |be| {
                if replace_stale {
                    // check_receive allowed it: a stale replica this node does not own.
                    tracing::info!(volume = %n, "replacing a stale replica with a full stream");
                    be.destroy_replica(&n)?;
                }
                be.receive(&n, b.as_deref(), &s)
            })
            .await
        {
            Ok(sink) => sink,
            Err(e) => {
                drain(body).await;
                return Err(e);
            }
        };
        let stream = body
            .into_data_stream()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let mut bridge = SyncIoBridge::new(StreamReader::new(stream));
        let (bytes, sink) = tokio::task::spawn_blocking(move || {
            match transfer::receive(&mut bridge, &mut sink) {
                Ok(n) => Ok((n, sink)),
                Err(e) => {
                    // Dropping the sink unfinished discards the partial receive; read the
                    // rest of the stream away so the sender gets this answer.
                    drop(sink);
                    let _ = std::io::copy(&mut bridge, &mut std::io::sink());
                    Err(AgentError::from(e))
                }
            }
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
        let (owner, epoch) =
            ownership::received_record(local.as_ref(), &params.owner, params.epoch);
        let record = Record { owner, epoch };
        let writable = record.owner == self.me;
        let (n, snap) = (name.to_string(), params.snapshot.clone());
        let local = local.filter(|_| !replace_stale);
        let quota = params.quota.filter(|_| local.is_none());
        self.blocking(move |b| {
            sink.finish()?;
            b.set_record(&n, &record, writable, RecordOrder::TakeOver)?;
            if let Some(q) = quota {
                b.set_quota(&n, q)?;
            }
            if let Some(v) = b.get(&n)? {
                for s in ownership::prunable(&v.snapshots, &snap) {
                    b.destroy_snapshot(&n, &s)?;
                }
            }
            Ok(())
        })
        .await?;
        tracing::info!(volume = name, from = %params.from, snapshot = %params.snapshot, bytes, "received");
        Ok(ReceiveReport {
            snapshot: params.snapshot,
            bytes,
        })
    }

    async fn handoff(&self, name: &str, to: &str) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        let local = self
            .local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))?;
        if local.owner == self.me {
            if let Some(c) = self.managed(name).await? {
                if c.running {
                    return Err(AgentError::Conflict(format!(
                        "application {name:?} still runs here; stop it before handing its volume off"
                    )));
                }
            }
        }
        let remote = if local.owner == to {
            None
        } else {
            self.remote_volume(to, name).await?
        };
        let step = ownership::plan_handoff(
            &self.me,
            &local,
            to,
            remote.as_ref().map(|r| r.snapshots.as_slice()),
        )?;
        let epoch = match step {
            HandoffStep::GiveAway { epoch } => {
                let record = Record {
                    owner: to.to_string(),
                    epoch,
                };
                let n = name.to_string();
                self.blocking(move |b| b.set_record(&n, &record, false, RecordOrder::GiveAway))
                    .await?;
                tracing::info!(volume = name, to, epoch, "recorded handoff");
                epoch
            }
            HandoffStep::RetellTarget { epoch } => epoch,
        };
        let body = serde_json::to_vec(&TakeOverRequest {
            epoch,
            from: self.me.clone(),
        })
        .map_err(|e| AgentError::Internal(e.to_string()))?;
        let theirs: VolumeState = self
            .peers
            .json(
                to,
                Method::POST,
                &format!("/v1/volumes/{name}/handoff"),
                crate::peer::full(body),
            )
            .await?;
        if theirs.owner != to || theirs.epoch != epoch {
            return Err(AgentError::Conflict(format!(
                "{to} reports volume {name:?} owned by {} at epoch {} after the handoff at epoch {epoch}",
                theirs.owner, theirs.epoch
            )));
        }
        tracing::info!(volume = name, to, epoch, "handoff complete");
        Ok(())
    }

    /// `POST /v1/volumes/NAME/handoff`: this node becomes the owner at `epoch`.
    pub async fn take_over(
        &self,
        name: &str,
        request: TakeOverRequest,
    ) -> Result<VolumeState, AgentError> {
        check_name(name)?;
        let _lock = self.lock_volume(name).await;
        let local = self.local_volume(name).await?.ok_or_else(|| {
            AgentError::NotFound(format!(
                "volume {name:?} does not exist on this node ({}): push it first",
                self.me
            ))
        })?;
        match ownership::accept_ownership(&self.me, &local, request.epoch)? {
            TakeOver::AlreadyOwner => {}
            TakeOver::Record => {
                let record = Record {
                    owner: self.me.clone(),
                    epoch: request.epoch,
                };
                let n = name.to_string();
                self.blocking(move |b| b.set_record(&n, &record, true, RecordOrder::TakeOver))
                    .await?;
                tracing::info!(volume = name, from = %request.from, epoch = request.epoch, "took ownership");
            }
        }
        self.local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} vanished")))
    }

    /// `GET /v1/volumes/NAME`.
    pub async fn volume(&self, name: &str) -> Result<VolumeState, AgentError> {
        check_name(name)?;
        self.local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))
    }

    async fn set_routes(&self, routes: Vec<Route>) -> Result<(), AgentError> {
        let resolver = self.resolver().await?;
        Ok(self.routes.set(routes, &resolver)?)
    }
}

/// Reads a request body to its end (bounded in time), discarding it.
pub async fn drain(body: hyper::body::Incoming) {
    let mut body = body;
    let _ = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    })
    .await;
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
        Action::StartApplication { application } => format!("start {}", application.name),
        Action::StopApplication { application } => format!("stop {application}"),
        Action::RestartApplication { application } => format!("restart {}", application.name),
        Action::SetRoutes { routes } => format!("set-routes ({} routes)", routes.len()),
    }
}

/// Used by the converge stream: one JSON line per event.
pub fn event_line(event: &ConvergeEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}
