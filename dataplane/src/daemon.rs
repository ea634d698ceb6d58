//! Builds an [`Agent`] from an [`AgentConfig`] and runs it: opens the backends (saying which
//! and why), loads the certificates, re-applies recorded routes and serves the API until
//! SIGINT or SIGTERM.

use std::sync::Arc;

use flocker_client::AgentClient;

use crate::agent::Agent;
use crate::config::{AgentConfig, RoutingChoice, VolumeSpec};
use crate::containers::{ContainerError, DockerRuntime};
use crate::routes::{RouteStore, RoutesError};
use crate::tls::{self, TlsError};
use crate::volume::{Runner, SystemRunner};
use crate::volume::{VolumeBackend, VolumeError, btrfs, dir, zfs};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Tls(#[from] TlsError),
    #[error("volume backend: {0}")]
    Volume(#[from] VolumeError),
    #[error("docker at {socket}: {source}")]
    Docker {
        socket: String,
        #[source]
        source: ContainerError,
    },
    #[error("routing backend: {0}")]
    Routing(String),
    #[error("routes: {0}")]
    Routes(#[from] RoutesError),
    #[error("state dir {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Opens the configured volume backend.
pub fn open_volumes(spec: &VolumeSpec) -> Result<Arc<dyn VolumeBackend>, VolumeError> {
    let runner: Arc<dyn Runner> = Arc::new(SystemRunner);
    Ok(match spec {
        VolumeSpec::Zfs { dataset } => {
            let b = zfs::ZfsBackend::open(dataset, runner)?;
            tracing::info!(
                backend = "zfs",
                parent = b.root(),
                "volume backend: ZFS datasets (configured)"
            );
            Arc::new(b)
        }
        VolumeSpec::Btrfs { path } => {
            tracing::info!(backend = "btrfs", path = %path.display(), "volume backend: btrfs subvolumes (configured)");
            Arc::new(btrfs::BtrfsBackend::open(path, runner)?)
        }
        VolumeSpec::Dir { path } => {
            tracing::info!(
                backend = "dir",
                path = %path.display(),
                "volume backend: plain directories (no snapshots of their own, full copies on push, quotas not enforced)"
            );
            Arc::new(dir::DirBackend::open(path, runner)?)
        }
    })
}

fn open_routing(
    choice: RoutingChoice,
    bpf_cgroup: Option<&std::path::Path>,
    settings_journal: std::path::PathBuf,
    udp_idle: std::time::Duration,
) -> Result<Option<Box<dyn flocker_routing::RoutingBackend>>, StartError> {
    use flocker_routing::{BackendChoice, BackendConfig, open_backend};
    let choice = match choice {
        RoutingChoice::None => {
            tracing::warn!(
                "routing backend: none (configured): routes are recorded and reported, not programmed"
            );
            return Ok(None);
        }
        RoutingChoice::Auto => BackendChoice::Auto,
        RoutingChoice::Nftables => BackendChoice::Nftables,
        RoutingChoice::Ebpf => BackendChoice::Ebpf,
    };
    let config = BackendConfig {
        choice,
        cgroup_path: bpf_cgroup.map(std::path::Path::to_path_buf),
        settings_journal: Some(settings_journal),
        ebpf: flocker_routing::ebpf::EbpfOptions { udp_idle },
    };
    open_backend(&config)
        .map(Some)
        .map_err(|e| StartError::Routing(flocker_routing::error_chain(&e)))
}

/// Builds the agent and its TLS configuration.
pub async fn build(
    config: &AgentConfig,
) -> Result<(Arc<Agent>, Arc<rustls::ServerConfig>), StartError> {
    let trust = tls::trust(&config.tls, config.crl.as_deref())?;
    tls::warn_if_expiring(&config.tls.cert);
    match &config.crl {
        Some(crl) => {
            tracing::info!(crl = %crl.display(), "checking certificates against the revocation list")
        }
        None => tracing::warn!(
            "no revocation list (--crl): revoked certificates are accepted until they expire"
        ),
    }
    let server_tls = tls::server_config_with(&config.tls, &trust)?;
    let client_tls = tls::client_config_with(&config.tls, &trust)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    })?;
    let volumes = {
        let spec = config.volumes.clone();
        tokio::task::spawn_blocking(move || open_volumes(&spec))
            .await
            .map_err(|e| StartError::Routing(e.to_string()))??
    };
    let runtime = DockerRuntime::connect(
        &config.docker_socket,
        &config.node_address,
        config.netns_holders,
    )
    .await
    .map_err(|source| StartError::Docker {
        socket: config.docker_socket.display().to_string(),
        source,
    })?;
    match runtime.version().await {
        Ok(v) => {
            tracing::info!(docker = %v, socket = %config.docker_socket.display(), netns_holders = config.netns_holders, "container runtime: Docker")
        }
        Err(source) => {
            return Err(StartError::Docker {
                socket: config.docker_socket.display().to_string(),
                source,
            });
        }
    }
    // Per node, like the route file: test clusters run several agents on one state dir.
    let journal = flocker_routing::settings::journal_path(&config.state_dir, &config.node_address);
    let routing = open_routing(
        config.routing,
        config.bpf_cgroup.as_deref(),
        journal,
        config.udp_idle_timeout,
    )?;
    // Named after the node so that several agents on one host (test clusters) can share a
    // state directory without sharing a route table.
    let route_file = config
        .state_dir
        .join(format!("routes-{}.json", config.node_address));
    let routes = RouteStore::open(route_file, routing)?;
    let agent = Arc::new(
        Agent::new(
            config.node_address.clone(),
            volumes,
            Arc::new(runtime),
            AgentClient::new(client_tls, config.peer_port),
            routes,
        )
        .with_api_port(config.listen.port())
        .with_replication_rate(config.replication_rate_limit)
        .with_file_store_if(file_store(config))
        .with_hosts_files(crate::hosts::HostsFiles::new(
            config
                .state_dir
                .join(format!("hosts-{}", bind_safe(&config.node_address))),
        ))
        .with_move_rate(config.move_rate_limit)
        .with_ready_timeout(config.ready_timeout)
        .with_hold_timeout(config.hold_timeout)
        .with_schedule_file(
            config
                .state_dir
                .join(format!("schedule-{}.json", config.node_address)),
        ),
    );
    if let Err(e) = agent.reapply_routes().await {
        tracing::warn!(error = %e, "could not re-apply recorded routes; the next converge will");
    }
    Ok((agent, server_tls))
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(config: AgentConfig) -> Result<(), StartError> {
    let (agent, tls) = build(&config).await?;
    let listener = crate::server::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, node = %config.node_address, "serving the agent API over mutual TLS");
    let limits = crate::limits::ServerLimits::default();
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = crate::metrics::bind(addr).await?;
            tracing::info!(listen = %addr, "serving Prometheus metrics at /metrics (plain HTTP)");
            if agent.routing_name() == "ebpf" {
                tokio::spawn(sample_dataplane(agent.metrics()));
            }
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                agent.metrics(),
            )))
        }
        None => None,
    };
    let background = tokio::spawn(background(agent.clone()));
    let server = tokio::spawn(crate::server::serve(listener, tls, agent, limits));
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.abort();
    background.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    Ok(())
}

/// The agent's own work besides answering requests. Order matters at start: a copy another
/// node owns now (a failover while this node was away) is fenced before the supervisor may
/// restart its application or replication may push it.
async fn background(agent: std::sync::Arc<Agent>) {
    crate::supervisor::adopt(&agent).await;
    crate::agent::fencing::check(&agent).await;
    tokio::join!(
        crate::supervisor::run(agent.clone()),
        crate::agent::fencing::run(agent.clone()),
        crate::agent::replication::run(agent),
    );
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The node's address as part of the name of a directory containers bind-mount from: the
/// colons of an IPv6 literal would split Docker's `SOURCE:TARGET` bind syntax, so they
/// become `_` (IPv4 addresses and host names are left as they are).
fn bind_safe(node_address: &str) -> String {
    node_address.replace(':', "_")
}

/// The tmpfs for secrets and configs; without one, applications that mount files are
/// refused (with the reason) and everything else works.
fn file_store(config: &AgentConfig) -> Option<crate::files::FileStore> {
    let root = config
        .state_dir
        .join(format!("files-{}", bind_safe(&config.node_address)));
    match crate::files::FileStore::on_tmpfs(root) {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!(error = %e, "no file store: applications with secrets or configs will be refused");
            None
        }
    }
}

/// How often the eBPF data plane's figures are read for the metrics.
const DATAPLANE_SAMPLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads the eBPF TC program's figures from its pinned maps every few seconds (walking the
/// flow map costs too much to do on every scrape).
async fn sample_dataplane(metrics: std::sync::Arc<crate::metrics::Metrics>) {
    let mut warned = false;
    loop {
        match tokio::task::spawn_blocking(flocker_routing::ebpf::pinned_stats).await {
            Ok(Ok(stats)) => metrics.dataplane(stats),
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot read the eBPF data plane's figures for the metrics");
            }
            _ => {}
        }
        tokio::time::sleep(DATAPLANE_SAMPLE).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn directories_named_after_an_ipv6_node_hold_no_colon() {
        assert_eq!(super::bind_safe("fd00:18::11"), "fd00_18__11");
        assert_eq!(super::bind_safe("198.18.0.11"), "198.18.0.11");
        assert_eq!(super::bind_safe("node-a.example"), "node-a.example");
    }
}
