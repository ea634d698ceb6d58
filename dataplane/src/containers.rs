//! Containers through the Docker Engine API: the pure translation of an [`Application`] into
//! a [`ContainerSpec`], the [`ContainerRuntime`] seam, and its bollard implementation.
//!
//! Managed containers carry labels: `flocker.managed=true`, `flocker.node=<address>` and the
//! full application JSON in `flocker.application`, so a restarted agent reports exactly what
//! it started. Containers without these labels are never listed, stopped or removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::{
    Config, CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions, UpdateContainerOptions,
};
use bollard::image::CreateImageOptions;
use bollard::models::{
    HealthConfig, HealthStatusEnum, HostConfig, HostConfigLogConfig, ResourcesUlimits,
    RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use flocker_wire::{
    AnswerCheck, Application, ContainerSettings, DesiredState, HealthCheck, Protocol, RouteMap,
};
use futures_util::StreamExt;

use crate::netns_holder;

pub const LABEL_MANAGED: &str = "flocker.managed";
pub const LABEL_NODE: &str = "flocker.node";
pub const LABEL_APPLICATION: &str = "flocker.application";
/// The digest of everything else the container was created with ([`spec_digest`]): a
/// container prepared ahead of its start is started only while it still matches.
pub const LABEL_SPEC: &str = "flocker.spec";

/// Errors of the container runtime.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error(
        "image {image} is not present on this node and could not be pulled (no registry reachable?): {detail}"
    )]
    ImageMissing { image: String, detail: String },
    #[error("container {container}: bad {LABEL_APPLICATION} label: {detail}")]
    BadLabel { container: String, detail: String },
    /// Docker ties a joining container to its holder's ID when it creates it: a container
    /// whose holder was removed must be created anew (the agent's start does).
    #[error("container {container}: its network holder {holder} is gone; it must be created anew")]
    HolderGone { container: String, holder: String },
    /// Docker failed the start itself (a server error): for example a daemon killed during
    /// an earlier start leaves the container's runtime state behind ("failed to start shim:
    /// ... file exists"), and every later start of that container fails the same way. The
    /// agent's start creates such a container anew.
    #[error("container {container}: Docker could not start it: {detail}")]
    StartFailed { container: String, detail: String },
    #[error("{0}")]
    Other(String),
}

/// Everything Docker needs to create one application's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<(u16, Protocol)>,
    /// `host_path:container_path` bind mounts.
    pub binds: Vec<String>,
    pub memory: Option<u64>,
    pub cpu_shares: Option<u64>,
    /// Command, user, capabilities and the rest; its labels are already in `labels`.
    pub settings: ContainerSettings,
    /// Run by Docker inside the container; see `readiness`.
    pub health_check: Option<HealthCheck>,
}

/// A container the agent manages, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub name: String,
    pub application: Application,
    pub running: bool,
    pub ip: Option<String>,
    /// The container's global IPv6 address, on a Docker network with IPv6 enabled.
    pub ip6: Option<String>,
    /// Created but never started (Docker's state `created`): prepared for a move's start.
    /// Only a converge starts it (the supervisor leaves it alone).
    pub never_started: bool,
    /// Its [`LABEL_SPEC`] label, if it has one.
    pub spec_digest: Option<String>,
    /// It runs, but the network holder it joined ([`crate::netns_holder`]) does not: Docker
    /// tore the holder's network down, so the application is unreachable until it is
    /// restarted with its holder (the supervisor does).
    pub holder_down: bool,
}

/// What the agent's restart supervision needs to know of one container, beyond the listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerDetails {
    pub running: bool,
    /// The main process, while the container runs (its `/proc/PID/mountinfo` shows what
    /// the container's volume mount really is).
    pub pid: Option<u32>,
    /// The exit code of the last run, once it has stopped.
    pub exit_code: Option<i64>,
    /// Docker's own restart policy is something other than `no`: Docker may then restart
    /// the container without the agent proving its volume first.
    pub docker_restarts: bool,
    /// Docker's verdict of the container's health check, when it has one.
    pub health: Option<DockerHealth>,
}

/// What Docker says of a container's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerHealth {
    /// `starting`, `healthy` or `unhealthy`.
    pub status: String,
    /// The output of the newest check run (Docker keeps the last five).
    pub last_output: Option<String>,
}

/// The default Docker container name of an application.
pub fn container_name(application: &str) -> String {
    format!("flocker-{application}")
}

/// The Docker container name an application runs under: its `container_name` if it sets
/// one, else the default.
pub fn container_name_of(app: &Application) -> String {
    app.container
        .container_name
        .clone()
        .unwrap_or_else(|| container_name(&app.name))
}

/// The node that serves a link's remote port: the node the route map names for it (a
/// converge request carries the linked ports), else the node hosting the application with
/// that external port and protocol in the desired state, else this node (every node routes
/// every external port).
pub fn link_host(
    desired: &DesiredState,
    routes: Option<&RouteMap>,
    me: &str,
    protocol: Protocol,
    remote_port: u16,
) -> String {
    if let Some(p) = routes.and_then(|m| m.get(protocol, remote_port)) {
        return p.node.clone();
    }
    desired
        .applications
        .values()
        .find(|a| {
            a.ports
                .iter()
                .any(|p| p.external == remote_port && p.protocol == protocol)
        })
        .and_then(|a| desired.node_of(&a.name))
        .unwrap_or(me)
        .to_string()
}

/// Docker-style link variables: `<ALIAS>_PORT_<local>_TCP=tcp://host:remote` (`_UDP` and
/// `udp://` for a UDP port) plus its `_ADDR`, `_PORT` and `_PROTO` siblings.
pub fn link_environment(
    alias: &str,
    protocol: Protocol,
    local: u16,
    host: &str,
    remote: u16,
) -> Vec<String> {
    let alias: String = alias
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let proto = protocol.as_str();
    let base = format!("{alias}_PORT_{local}_{}", proto.to_ascii_uppercase());
    vec![
        format!("{base}={proto}://{host}:{remote}"),
        format!("{base}_ADDR={host}"),
        format!("{base}_PORT={remote}"),
        format!("{base}_PROTO={proto}"),
    ]
}

/// Translates an application into its container. `volume_mounts` are the host path and
/// mount point of each of its volumes; `desired`, `routes` and `me` locate link targets.
pub fn container_spec(
    app: &Application,
    volume_mounts: &[(PathBuf, String)],
    desired: &DesiredState,
    routes: Option<&RouteMap>,
    me: &str,
) -> Result<ContainerSpec, ContainerError> {
    let mut env: Vec<String> = app
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for link in &app.links {
        let host = link_host(desired, routes, me, link.protocol, link.remote_port);
        env.extend(link_environment(
            &link.alias,
            link.protocol,
            link.local_port,
            &host,
            link.remote_port,
        ));
    }
    let json = serde_json::to_string(app).map_err(|e| ContainerError::Other(e.to_string()))?;
    // The config's own labels first, so Flocker's (which a config cannot name) win.
    let mut labels = app.container.labels.clone();
    labels.extend([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_NODE.to_string(), me.to_string()),
        (LABEL_APPLICATION.to_string(), json),
    ]);
    let binds = volume_mounts
        .iter()
        .map(|(host, mountpoint)| format!("{}:{mountpoint}", host.display()))
        .chain(
            app.container
                .node_local_binds
                .iter()
                .map(|(host, target)| format!("{host}:{target}:ro")),
        )
        .collect();
    Ok(ContainerSpec {
        name: container_name_of(app),
        image: app.image.to_string(),
        env,
        labels,
        exposed_ports: exposed_ports(app),
        binds,
        memory: app.mem_limit,
        cpu_shares: app.cpu_shares,
        settings: app.container.clone(),
        health_check: app.health_check.clone(),
    })
}

/// A digest of what Docker is given for `spec` (its name, image, environment, binds and
/// labels other than [`LABEL_SPEC`]; everything else derives from the application, whose
/// JSON is a label): two specs with the same digest create the same container.
pub fn spec_digest(spec: &ContainerSpec) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut part = |section: &str, value: &str| {
        hasher.update(section.as_bytes());
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    };
    part("name", &spec.name);
    part("image", &spec.image);
    for e in &spec.env {
        part("env", e);
    }
    for b in &spec.binds {
        part("bind", b);
    }
    for (k, v) in spec.labels.iter().filter(|(k, _)| k.as_str() != LABEL_SPEC) {
        part("label", k);
        part("value", v);
    }
    hasher.finalize().to_hex().to_string()
}

fn non_empty(list: &[String]) -> Option<Vec<String>> {
    (!list.is_empty()).then(|| list.to_vec())
}

fn non_empty_map(map: &BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!map.is_empty()).then(|| map.clone().into_iter().collect())
}

/// Exposed ports as Docker's API names them (`6379/tcp`).
fn docker_exposed_ports(ports: &[(u16, Protocol)]) -> HashMap<String, HashMap<(), ()>> {
    ports
        .iter()
        .map(|(port, protocol)| (format!("{port}/{protocol}"), HashMap::new()))
        .collect()
}

/// The routed internal ports and the ones only exposed, each once, in order.
fn exposed_ports(app: &Application) -> Vec<(u16, Protocol)> {
    let mut ports: Vec<(u16, Protocol)> =
        app.ports.iter().map(|p| (p.internal, p.protocol)).collect();
    ports.extend(app.container.expose.iter().map(|&p| (p, Protocol::Tcp)));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Docker's health configuration (nanoseconds) from the application's check.
fn docker_health_config(check: &HealthCheck) -> HealthConfig {
    let ns = |ms: u64| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
    HealthConfig {
        test: Some(check.test.clone()),
        interval: Some(ns(check.interval_ms)),
        timeout: Some(ns(check.timeout_ms)),
        retries: Some(i64::from(check.retries)),
        start_period: Some(ns(check.start_period_ms)),
        start_interval: None,
    }
}

/// The container operations the agent needs. [`DockerRuntime`] is the real one.
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// The containers this agent manages, sorted by application name.
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError>;
    /// Makes sure the image is present, pulling it where a registry answers.
    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError>;
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        self.create(spec).await?;
        self.start(&spec.name).await
    }
    /// Creates the container without starting it.
    async fn create(&self, spec: &ContainerSpec) -> Result<(), ContainerError>;
    /// Starts an existing stopped container.
    async fn start(&self, name: &str) -> Result<(), ContainerError>;
    /// Stops and removes; a container that does not exist is not an error.
    async fn stop_and_remove(&self, name: &str) -> Result<(), ContainerError>;
    /// Stops without removing (within the application's stop grace period); one that does not
    /// exist or has stopped already is not an error.
    async fn stop(&self, name: &str) -> Result<(), ContainerError>;
    /// Process, exit code and Docker restart policy of one container.
    async fn details(&self, name: &str) -> Result<ContainerDetails, ContainerError>;
    /// Sets Docker's restart policy to `no`: restarts are the agent's (see `supervisor`).
    async fn disable_docker_restart(&self, name: &str) -> Result<(), ContainerError>;
    /// Whether a TCP socket listens on `port` inside the running container.
    async fn listens_on(&self, name: &str, port: u16) -> Result<bool, ContainerError>;
    /// One try of an answer check on `port` inside the running container whose main process
    /// is `pid` (read by the caller's inspect): `Ok(())` when the reply starts as expected,
    /// else what happened instead (refused, what it answered, no answer within `timeout`).
    async fn answers(
        &self,
        _pid: u32,
        _port: u16,
        _check: &AnswerCheck,
        _timeout: std::time::Duration,
    ) -> Result<Result<(), String>, ContainerError> {
        Ok(Err("this runtime cannot make answer checks".into()))
    }
    /// Removes network holders ([`crate::netns_holder`]) whose application container is
    /// gone (a removal that failed, an agent that died in between); how many it removed.
    async fn remove_orphan_holders(&self) -> Result<usize, ContainerError> {
        Ok(0)
    }
    /// Whether the running container is no longer in its network holder's namespace: the
    /// holder was started again after the container joined it (by hand: `docker restart` of
    /// the holder), which gave the holder a new namespace and left the container in the old
    /// one, with no network. `false` when there is no holder or it cannot be told.
    async fn left_by_holder(&self, _name: &str) -> Result<bool, ContainerError> {
        Ok(false)
    }
}

/// The network namespace of process `pid` (device and inode of `/proc/PID/ns/net`), if it
/// can be read.
fn netns_of(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The Docker Engine through bollard.
pub struct DockerRuntime {
    docker: Docker,
    node: String,
    /// Application containers join a network holder ([`crate::netns_holder`]).
    holders: bool,
    /// A holder this old without its container is an orphan ([`netns_holder::ORPHAN_AFTER`]).
    orphan_after: std::time::Duration,
}

/// How long a create waits for a stop's background removal of the old holder.
const HOLDER_REMOVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A listed container's name, without Docker's leading `/`.
fn summary_name(c: &bollard::models::ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

/// Removes a container (name or ID), killing it if it runs; one that does not exist is not an
/// error.
async fn remove_by_force(docker: &Docker, name: &str) -> Result<(), ContainerError> {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerRuntime {
    /// Connects to the Docker socket at `socket` and negotiates the API version (Debian's
    /// engine speaks 1.41, older than bollard's default). With `holders`, the application
    /// containers it creates join a network holder ([`crate::netns_holder`]).
    pub async fn connect(socket: &Path, node: &str, holders: bool) -> Result<Self, ContainerError> {
        let path = socket.display().to_string();
        let docker = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
        Ok(DockerRuntime {
            docker,
            node: node.to_string(),
            holders,
            orphan_after: netns_holder::ORPHAN_AFTER,
        })
    }

    /// Every container with this agent's managed and node labels, running or not.
    async fn list_ours(&self) -> Result<Vec<bollard::models::ContainerSummary>, ContainerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE}={}", self.node),
            ],
        )]);
        Ok(self
            .docker
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                filters,
                ..Default::default()
            }))
            .await?)
    }

    /// Another age after which a holder without its container is an orphan (tests).
    pub fn with_orphan_age(mut self, age: std::time::Duration) -> Self {
        self.orphan_after = age;
        self
    }

    /// The engine version, for the startup log.
    pub async fn version(&self) -> Result<String, ContainerError> {
        let v = self.docker.version().await?;
        Ok(format!(
            "{} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ))
    }

    /// Stops `name`; one that does not exist or has stopped already is not an error.
    async fn stop_container(&self, name: &str) -> Result<(), ContainerError> {
        // The client's usual 120 s would give up on a stop Docker is still carrying out: a
        // stop may take the longest grace period a config can give, plus a margin to kill.
        let stopper = self
            .docker
            .clone()
            .with_timeout(std::time::Duration::from_millis(
                flocker_wire::container::MAX_STOP_GRACE_MS + 60_000,
            ));
        match stopper
            // No timeout given: Docker waits the container's own stop timeout (the
            // application's `stop_grace_period`, else 10 s) before it kills.
            .stop_container(name, None::<StopContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_by_force(&self, name: &str) -> Result<(), ContainerError> {
        remove_by_force(&self.docker, name).await
    }

    /// The labels of a container; `None` when it does not exist.
    async fn labels_of(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, ContainerError> {
        match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => Ok(Some(info.config.and_then(|c| c.labels).unwrap_or_default())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The ID of `holder` if it is this agent's holder of `container`; `None` when there
    /// is no such container; an error when a container that is not ours has that name.
    async fn holder_id(
        &self,
        holder: &str,
        container: &str,
    ) -> Result<Option<String>, ContainerError> {
        let info = match self
            .docker
            .inspect_container(holder, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => info,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        let label = |key: &str| labels.get(key).map(String::as_str);
        if label(netns_holder::LABEL_HOLDS) != Some(container)
            || label(LABEL_MANAGED) != Some("true")
            || label(LABEL_NODE) != Some(self.node.as_str())
        {
            return Err(ContainerError::Other(format!(
                "a container named {holder} exists that is not the network holder of {container}; rename or remove it"
            )));
        }
        Ok(info.id)
    }

    /// Removes `holder` if it is this agent's holder of `container`; a container that only
    /// happens to have that name is an error, never removed.
    async fn remove_holder(&self, holder: &str, container: &str) -> Result<(), ContainerError> {
        let Some(id) = self.holder_id(holder, container).await? else {
            return Ok(());
        };
        // Nothing to flush: its process only waits.
        match self.remove_by_force(&id).await {
            // 409: a stop's background removal of it is under way; wait for that.
            Err(ContainerError::Docker(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                ..
            })) => self.wait_gone(&id).await,
            other => other,
        }
    }

    /// Waits (at most [`HOLDER_REMOVAL_WAIT`]) until the container `id` no longer exists.
    async fn wait_gone(&self, id: &str) -> Result<(), ContainerError> {
        let deadline = tokio::time::Instant::now() + HOLDER_REMOVAL_WAIT;
        loop {
            match self
                .docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
                Ok(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(ContainerError::Other(format!(
                        "network holder {id} is still being removed after {} s",
                        HOLDER_REMOVAL_WAIT.as_secs()
                    )));
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    async fn create_holder(
        &self,
        holder: &str,
        container: &str,
        settings: &ContainerSettings,
        ports: &[(u16, Protocol)],
    ) -> Result<(), ContainerError> {
        self.ensure_holder_image().await?;
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_NODE.to_string(), self.node.clone()),
        ]);
        let config =
            netns_holder::holder_config(container, settings, labels, docker_exposed_ports(ports));
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: holder.to_string(),
                    platform: None,
                }),
                config,
            )
            .await?;
        Ok(())
    }

    /// Waits (at most [`netns_holder::ADDRESS_SETTLE_WAIT`]) until the global IPv6 addresses
    /// of this node (the bridge's gateway) and of the holder's namespace have passed duplicate
    /// address detection. A move creates the holder during its pre-copy, so this costs its
    /// clients nothing; without it, IPv6 clients routed to the container right after the
    /// start waited about a second (measured on the dual-stack e2e move). Nothing to wait for
    /// without IPv6; a wait that runs out is logged, and the create goes on.
    async fn wait_addresses_settled(&self, holder: &str) {
        let mut files = vec!["/proc/self/net/if_inet6".to_string()];
        match self.details(holder).await {
            Ok(ContainerDetails { pid: Some(pid), .. }) => {
                files.push(format!("/proc/{pid}/net/if_inet6"));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(holder, error = %e, "cannot inspect the network holder"),
        }
        let started = std::time::Instant::now();
        loop {
            let mut tentative = false;
            for file in &files {
                if let Ok(text) = tokio::fs::read_to_string(file).await {
                    tentative |= netns_holder::has_tentative_global_ipv6(&text);
                }
            }
            if !tentative {
                if started.elapsed() > std::time::Duration::from_millis(50) {
                    tracing::info!(
                        holder,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "IPv6 addresses passed duplicate address detection"
                    );
                }
                return;
            }
            if started.elapsed() >= netns_holder::ADDRESS_SETTLE_WAIT {
                tracing::warn!(
                    holder,
                    waited_s = netns_holder::ADDRESS_SETTLE_WAIT.as_secs(),
                    "an IPv6 address is still tentative; IPv6 clients may wait for it after the start"
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn start_holder(&self, holder: &str) -> Result<(), ContainerError> {
        match self
            .docker
            .start_container(holder, None::<StartContainerOptions<String>>)
            .await
        {
            // 304: already running.
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Before the application container `name` starts: the holder it joins, if any, runs
    /// (it is stopped after a node restart).
    async fn ensure_holder_of(&self, name: &str) -> Result<(), ContainerError> {
        let Some(labels) = self.labels_of(name).await? else {
            return Ok(());
        };
        let Some(holder) = labels.get(netns_holder::LABEL_HOLDER) else {
            return Ok(());
        };
        // Only this node's holder of `name` is started, never a container that took its name.
        let Some(id) = self.holder_id(holder, name).await? else {
            return Err(ContainerError::HolderGone {
                container: name.to_string(),
                holder: holder.clone(),
            });
        };
        self.start_holder(&id).await
    }

    /// Imports the holder's image ([`netns_holder::image_tar`]) unless it is present.
    async fn ensure_holder_image(&self) -> Result<(), ContainerError> {
        match self.docker.inspect_image(netns_holder::IMAGE).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let (repo, tag) = netns_holder::IMAGE
            .split_once(':')
            .unwrap_or((netns_holder::IMAGE, "latest"));
        tracing::info!(
            image = netns_holder::IMAGE,
            "importing the network holder's image"
        );
        let mut stream = self.docker.create_image(
            Some(CreateImageOptions::<String> {
                from_src: "-".to_string(),
                repo: repo.to_string(),
                tag: tag.to_string(),
                ..Default::default()
            }),
            Some(bytes::Bytes::from(netns_holder::image_tar())),
            None,
        );
        while let Some(item) = stream.next().await {
            item.map_err(|e| ContainerError::ImageMissing {
                image: netns_holder::IMAGE.to_string(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
        let list = self.list_ours().await?;
        // A container's addresses while it runs: (IPv4, IPv6).
        let addresses = |c: &bollard::models::ContainerSummary| {
            let networks = c
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref());
            let first = |address: fn(&bollard::models::EndpointSettings) -> Option<&String>| {
                networks
                    .and_then(|n| n.values().filter_map(address).find(|ip| !ip.is_empty()))
                    .filter(|_| c.state.as_deref() == Some("running"))
                    .cloned()
            };
            (
                first(|e| e.ip_address.as_ref()),
                first(|e| e.global_ipv6_address.as_ref()),
            )
        };
        // Network holders by name: an application container that joins one has its address
        // (none while the holder does not run).
        let holders: HashMap<String, (bool, (Option<String>, Option<String>))> = list
            .iter()
            .filter(|c| {
                c.labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(netns_holder::LABEL_HOLDS))
            })
            .map(|c| {
                let running = c.state.as_deref() == Some("running");
                (summary_name(c), (running, addresses(c)))
            })
            .collect();
        let mut out = Vec::new();
        for c in list {
            let name = summary_name(&c);
            let (own_ip, own_ip6) = addresses(&c);
            let labels = c.labels.unwrap_or_default();
            let Some(json) = labels.get(LABEL_APPLICATION) else {
                continue;
            };
            let application: Application =
                serde_json::from_str(json).map_err(|e| ContainerError::BadLabel {
                    container: name.clone(),
                    detail: e.to_string(),
                })?;
            let running = c.state.as_deref() == Some("running");
            let never_started = c.state.as_deref() == Some("created");
            let spec_digest = labels.get(LABEL_SPEC).cloned();
            let holder = labels
                .get(netns_holder::LABEL_HOLDER)
                .map(|h| holders.get(h).cloned().unwrap_or_default());
            let holder_down = running && holder.as_ref().is_some_and(|(up, _)| !up);
            let (ip, ip6) = match holder {
                Some((_, addresses)) if running => addresses,
                Some(_) => (None, None),
                None => (own_ip, own_ip6),
            };
            out.push(ManagedContainer {
                name,
                application,
                running,
                ip,
                ip6,
                never_started,
                spec_digest,
                holder_down,
            });
        }
        out.sort_by(|a, b| a.application.name.cmp(&b.application.name));
        Ok(out)
    }

    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(%image, "image not present, pulling");
        let mut stream = self.docker.create_image(
            Some(CreateImageOptions::<String> {
                from_image: image.to_string(),
                ..Default::default()
            }),
            None,
            None,
        );
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        tracing::info!(%image, progress = info.progress.unwrap_or_default(), "{status}");
                    }
                }
                Err(e) => {
                    return Err(ContainerError::ImageMissing {
                        image: image.to_string(),
                        detail: e.to_string(),
                    });
                }
            }
        }
        // A pull that "succeeds" without the image (odd registries) is still a failure.
        self.docker
            .inspect_image(image)
            .await
            .map(drop)
            .map_err(|e| ContainerError::ImageMissing {
                image: image.to_string(),
                detail: e.to_string(),
            })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        // Docker never restarts a managed container by itself: it would do so without the
        // volume proof (after a reboot, before the dataset is mounted). The application's
        // policy is carried out by the agent's supervisor from the label.
        let restart = DockerRestart {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        };
        let settings = &spec.settings;
        let mut config = Config {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: Some(docker_exposed_ports(&spec.exposed_ports)),
            cmd: settings.command.clone(),
            entrypoint: settings.entrypoint.clone(),
            user: settings.user.clone(),
            working_dir: settings.working_dir.clone(),
            hostname: settings.hostname.clone(),
            domainname: settings.domainname.clone(),
            stop_signal: settings.stop_signal.clone(),
            stop_timeout: settings.stop_timeout_seconds(),
            tty: Some(settings.tty),
            open_stdin: Some(settings.stdin_open),
            host_config: Some(HostConfig {
                binds: Some(spec.binds.clone()),
                memory: spec.memory.and_then(|m| i64::try_from(m).ok()),
                cpu_shares: spec.cpu_shares.and_then(|c| i64::try_from(c).ok()),
                nano_cpus: settings.nano_cpus.and_then(|c| i64::try_from(c).ok()),
                cap_add: (!settings.cap_add.is_empty()).then(|| settings.cap_add.clone()),
                cap_drop: (!settings.cap_drop.is_empty()).then(|| settings.cap_drop.clone()),
                init: settings.init,
                tmpfs: non_empty_map(&settings.tmpfs),
                extra_hosts: non_empty(&settings.extra_hosts),
                dns: non_empty(&settings.dns),
                ulimits: (!settings.ulimits.is_empty()).then(|| {
                    settings
                        .ulimits
                        .iter()
                        .map(|(name, limit)| ResourcesUlimits {
                            name: Some(name.clone()),
                            soft: Some(limit.soft),
                            hard: Some(limit.hard),
                        })
                        .collect()
                }),
                shm_size: settings.shm_size.and_then(|s| i64::try_from(s).ok()),
                sysctls: non_empty_map(&settings.sysctls),
                security_opt: non_empty(&settings.security_opt),
                readonly_rootfs: settings.read_only.then_some(true),
                log_config: settings.logging.as_ref().map(|l| HostConfigLogConfig {
                    typ: Some(l.driver.clone()),
                    config: non_empty_map(&l.options),
                }),
                dns_search: non_empty(&settings.dns_search),
                dns_options: non_empty(&settings.dns_opt),
                pids_limit: settings.pids_limit,
                memory_reservation: settings.mem_reservation.and_then(|m| i64::try_from(m).ok()),
                memory_swap: settings.memswap_limit,
                group_add: non_empty(&settings.group_add),
                oom_score_adj: settings.oom_score_adj,
                restart_policy: Some(restart),
                ..Default::default()
            }),
            // An answer check is the agent's own: Docker runs none.
            healthcheck: spec
                .health_check
                .as_ref()
                .filter(|c| c.answer.is_none())
                .map(docker_health_config),
            ..Default::default()
        };
        if self.holders {
            // A fresh holder, so that it carries exactly this spec's network settings.
            let holder = netns_holder::holder_name(&spec.name);
            self.remove_holder(&holder, &spec.name).await?;
            self.create_holder(&holder, &spec.name, &spec.settings, &spec.exposed_ports)
                .await?;
            self.start_holder(&holder).await?;
            self.wait_addresses_settled(&holder).await;
            netns_holder::join_holder(&mut config, &holder);
        }
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: spec.name.clone(),
                    platform: None,
                }),
                config,
            )
            .await?;
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), ContainerError> {
        let began = std::time::Instant::now();
        self.ensure_holder_of(name).await?;
        let holder = began.elapsed();
        match self
            .docker
            .start_container(name, None::<StartContainerOptions<String>>)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    container = name,
                    holder_ms = holder.as_millis() as u64,
                    start_ms = (began.elapsed() - holder).as_millis() as u64,
                    "started"
                );
                Ok(())
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message,
            }) => Err(ContainerError::StartFailed {
                container: name.to_string(),
                detail: message,
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn stop(&self, name: &str) -> Result<(), ContainerError> {
        self.stop_container(name).await
    }

    async fn stop_and_remove(&self, name: &str) -> Result<(), ContainerError> {
        let began = std::time::Instant::now();
        self.stop_container(name).await?;
        let stopped = began.elapsed();
        let holder = self
            .holder_id(&netns_holder::holder_name(name), name)
            .await?;
        let looked_up = began.elapsed();
        self.remove_by_force(name).await?;
        tracing::info!(
            container = name,
            stop_ms = stopped.as_millis() as u64,
            holder_lookup_ms = (looked_up - stopped).as_millis() as u64,
            remove_ms = (began.elapsed() - looked_up).as_millis() as u64,
            "stopped and removed"
        );
        if let Some(id) = holder {
            // Its namespace's teardown takes tens of milliseconds that a move's pause need
            // not wait for, and loads the kernel and dockerd while the final push and the
            // start run: the holder goes in the background, after the pause, by its ID (a
            // holder created meanwhile under the same name is another container, and a
            // create of this one removes the old holder itself). A removal that fails leaves
            // an orphan, which `remove_orphan_holders` finds.
            let docker = self.docker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(netns_holder::REMOVAL_DELAY).await;
                if let Err(e) = remove_by_force(&docker, &id).await {
                    tracing::warn!(holder = %id, error = %e, "cannot remove a network holder; it is retried as an orphan")
                }
            });
        }
        Ok(())
    }

    async fn details(&self, name: &str) -> Result<ContainerDetails, ContainerError> {
        let info = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await?;
        let state = info.state.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let docker_restarts = info
            .host_config
            .and_then(|h| h.restart_policy)
            .and_then(|p| p.name)
            .is_some_and(|n| {
                !matches!(n, RestartPolicyNameEnum::NO | RestartPolicyNameEnum::EMPTY)
            });
        Ok(ContainerDetails {
            running,
            pid: state
                .pid
                .filter(|_| running)
                .and_then(|p| u32::try_from(p).ok())
                .filter(|&p| p > 0),
            exit_code: state.exit_code.filter(|_| !running),
            docker_restarts,
            health: state.health.and_then(|h| {
                let status = match h.status? {
                    HealthStatusEnum::STARTING => "starting",
                    HealthStatusEnum::HEALTHY => "healthy",
                    HealthStatusEnum::UNHEALTHY => "unhealthy",
                    HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => return None,
                };
                let last_output = h
                    .log
                    .and_then(|log| log.into_iter().last())
                    .and_then(|r| r.output);
                Some(DockerHealth {
                    status: status.to_string(),
                    last_output,
                })
            }),
        })
    }

    async fn listens_on(&self, name: &str, port: u16) -> Result<bool, ContainerError> {
        let Some(pid) = self.details(name).await?.pid else {
            return Ok(false);
        };
        let read = move || crate::readiness::process_listens_on(pid, port);
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| ContainerError::Other(e.to_string()))
    }

    async fn answers(
        &self,
        pid: u32,
        port: u16,
        check: &AnswerCheck,
        timeout: std::time::Duration,
    ) -> Result<Result<(), String>, ContainerError> {
        Ok(crate::answer::ask(pid, port, check, timeout).await)
    }

    async fn left_by_holder(&self, name: &str) -> Result<bool, ContainerError> {
        let Some(id) = self
            .holder_id(&netns_holder::holder_name(name), name)
            .await?
        else {
            return Ok(false);
        };
        let (container, holder) = tokio::join!(self.details(name), self.details(&id));
        let (Some(container), Some(holder)) = (container?.pid, holder?.pid) else {
            return Ok(false);
        };
        Ok(matches!(
            (netns_of(container), netns_of(holder)),
            (Some(a), Some(b)) if a != b
        ))
    }

    async fn remove_orphan_holders(&self) -> Result<usize, ContainerError> {
        let list = self.list_ours().await?;
        let names: std::collections::HashSet<String> = list.iter().map(summary_name).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut removed = 0;
        for c in &list {
            let Some(of) = c
                .labels
                .as_ref()
                .and_then(|l| l.get(netns_holder::LABEL_HOLDS))
            else {
                continue;
            };
            // A holder is created just before its container: a young one may be mid-create.
            let age = now.saturating_sub(u64::try_from(c.created.unwrap_or(0)).unwrap_or(0));
            if names.contains(of) || age < self.orphan_after.as_secs() {
                continue;
            }
            let Some(id) = &c.id else { continue };
            tracing::info!(holder = %id, container = %of, "removing a network holder whose container is gone");
            self.remove_by_force(id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    async fn disable_docker_restart(&self, name: &str) -> Result<(), ContainerError> {
        self.docker
            .update_container(
                name,
                UpdateContainerOptions::<String> {
                    restart_policy: Some(DockerRestart {
                        name: Some(RestartPolicyNameEnum::NO),
                        maximum_retry_count: None,
                    }),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use flocker_wire::{Image, Link, PortMap, RestartPolicy, VolumeSpec};

    use super::*;

    fn app(name: &str) -> Application {
        Application {
            name: name.into(),
            image: Image {
                repository: "redis-flocker".into(),
                tag: "latest".into(),
            },
            ports: vec![PortMap {
                internal: 6379,
                external: 16379,
                protocol: Protocol::Tcp,
            }],
            volumes: Default::default(),
            volume: Some(VolumeSpec {
                mountpoint: "/data".into(),
                maximum_size: None,
            }),
            environment: BTreeMap::from([("MODE".into(), "x".into())]),
            links: vec![],
            mem_limit: Some(64 << 20),
            cpu_shares: Some(512),
            restart_policy: RestartPolicy::Always,
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
        }
    }

    #[test]
    fn udp_link_variables_follow_docker_naming() {
        assert_eq!(
            link_environment("dns", Protocol::Udp, 53, "198.18.0.3", 10053),
            vec![
                "DNS_PORT_53_UDP=udp://198.18.0.3:10053",
                "DNS_PORT_53_UDP_ADDR=198.18.0.3",
                "DNS_PORT_53_UDP_PORT=10053",
                "DNS_PORT_53_UDP_PROTO=udp",
            ]
        );
    }

    #[test]
    fn link_variables_follow_docker_naming() {
        assert_eq!(
            link_environment("my-db", Protocol::Tcp, 5432, "198.18.0.2", 15432),
            vec![
                "MY_DB_PORT_5432_TCP=tcp://198.18.0.2:15432",
                "MY_DB_PORT_5432_TCP_ADDR=198.18.0.2",
                "MY_DB_PORT_5432_TCP_PORT=15432",
                "MY_DB_PORT_5432_TCP_PROTO=tcp",
            ]
        );
    }

    #[test]
    fn spec_carries_everything_and_the_application_label() {
        let db = app("db");
        let mut web = app("web");
        web.volume = None;
        web.ports = vec![];
        web.links = vec![Link {
            local_port: 6379,
            remote_port: 16379,
            alias: "redis".into(),
            protocol: Protocol::Tcp,
        }];
        let mut desired = DesiredState::default();
        desired.applications.insert("db".into(), db.clone());
        desired.applications.insert("web".into(), web.clone());
        desired
            .nodes
            .insert("198.18.0.2".into(), BTreeSet::from(["db".to_string()]));
        desired
            .nodes
            .insert("198.18.0.1".into(), BTreeSet::from(["web".to_string()]));

        let spec = container_spec(&web, &[], &desired, None, "198.18.0.1").expect("spec");
        assert!(
            spec.env
                .contains(&"REDIS_PORT_6379_TCP=tcp://198.18.0.2:16379".to_string())
        );
        // What a converge request carries: web's share and the linked port of the map.
        let share = desired.for_node("198.18.0.1");
        let linked = desired.route_map().only([flocker_wire::routes::PortKey {
            port: 16379,
            protocol: Protocol::Tcp,
        }]);
        let sized = container_spec(&web, &[], &share, Some(&linked), "198.18.0.1").expect("spec");
        assert_eq!(sized.env, spec.env);
        assert!(spec.env.contains(&"MODE=x".to_string()));
        assert!(spec.binds.is_empty());

        let spec = container_spec(
            &db,
            &[(PathBuf::from("/pool/flocker/db"), "/data".to_string())],
            &desired,
            None,
            "198.18.0.2",
        )
        .expect("spec");
        assert_eq!(spec.name, "flocker-db");
        assert_eq!(spec.image, "redis-flocker:latest");
        assert_eq!(spec.binds, vec!["/pool/flocker/db:/data"]);
        assert_eq!(spec.exposed_ports, vec![(6379, Protocol::Tcp)]);
        assert_eq!((spec.memory, spec.cpu_shares), (Some(64 << 20), Some(512)));
        let label = &spec.labels[LABEL_APPLICATION];
        let back: Application = serde_json::from_str(label).expect("label json");
        assert_eq!(back, db);
        assert_eq!(spec.labels[LABEL_NODE], "198.18.0.2");
    }

    #[test]
    fn settings_reach_the_spec_and_config_labels_cannot_shadow_flockers() {
        let mut db = app("db");
        db.container.labels = BTreeMap::from([("com.example.team".into(), "storage".into())]);
        db.container.expose = vec![9121, 6379];
        db.container.command = Some(vec!["redis-server".into(), "--save".into(), "60 1".into()]);
        let mut desired = DesiredState::default();
        desired.applications.insert("db".into(), db.clone());
        let spec = container_spec(&db, &[], &desired, None, "198.18.0.2").expect("spec");
        assert_eq!(spec.labels["com.example.team"], "storage");
        assert_eq!(spec.labels[LABEL_MANAGED], "true");
        assert_eq!(
            spec.exposed_ports,
            vec![(6379, Protocol::Tcp), (9121, Protocol::Tcp)]
        );
        assert_eq!(spec.settings, db.container);
    }
}
