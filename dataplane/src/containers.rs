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
use flocker_wire::{Application, ContainerSettings, DesiredState, HealthCheck, Protocol, RouteMap};
use futures_util::StreamExt;

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
    /// Process, exit code and Docker restart policy of one container.
    async fn details(&self, name: &str) -> Result<ContainerDetails, ContainerError>;
    /// Sets Docker's restart policy to `no`: restarts are the agent's (see `supervisor`).
    async fn disable_docker_restart(&self, name: &str) -> Result<(), ContainerError>;
    /// Whether a TCP socket listens on `port` inside the running container.
    async fn listens_on(&self, name: &str, port: u16) -> Result<bool, ContainerError>;
}

/// The Docker Engine through bollard.
pub struct DockerRuntime {
    docker: Docker,
    node: String,
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
    /// engine speaks 1.41, older than bollard's default).
    pub async fn connect(socket: &Path, node: &str) -> Result<Self, ContainerError> {
        let path = socket.display().to_string();
        let docker = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
        Ok(DockerRuntime {
            docker,
            node: node.to_string(),
        })
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
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE}={}", self.node),
            ],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                filters,
                ..Default::default()
            }))
            .await?;
        let mut out = Vec::new();
        for c in list {
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default();
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
            let networks = c.network_settings.and_then(|n| n.networks);
            let first = |address: fn(&bollard::models::EndpointSettings) -> Option<&String>| {
                networks
                    .as_ref()
                    .and_then(|n| n.values().filter_map(address).find(|ip| !ip.is_empty()))
                    .filter(|_| running)
                    .cloned()
            };
            let ip = first(|e| e.ip_address.as_ref());
            let ip6 = first(|e| e.global_ipv6_address.as_ref());
            out.push(ManagedContainer {
                name,
                application,
                running,
                ip,
                ip6,
                never_started,
                spec_digest,
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
        let config = Config {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: Some(
                spec.exposed_ports
                    .iter()
                    .map(|(port, protocol)| (format!("{port}/{protocol}"), HashMap::new()))
                    .collect(),
            ),
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
            healthcheck: spec.health_check.as_ref().map(docker_health_config),
            ..Default::default()
        };
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
        self.docker
            .start_container(name, None::<StartContainerOptions<String>>)
            .await?;
        Ok(())
    }

    async fn stop_and_remove(&self, name: &str) -> Result<(), ContainerError> {
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
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
        match self
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
