//! A simulated cluster for measurement (issue 19): many agents in one process, each serving
//! the real agent API over real mutual TLS on its own loopback address (127.0.0.0/8 is all
//! loopback on Linux), with containers kept in memory ([`SimRuntime`]), directory volumes
//! under one root (put it on a tmpfs) and routes only recorded (no kernel backend). Everything
//! above those seams is the product's code: validation, converge, state, the route store, the
//! schedule file, volume pushes between agents.
//!
//! A test and bench tool behind the `sim` feature (`cargo xtask bench scale`): the agent
//! binary never builds it. What it leaves out: the replication and fencing loops (fencing
//! asks every peer every 5 s, which a thousand agents in one process would spend the machine
//! on) and the restart supervisor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flocker_client::AgentClient;
use flocker_wire::Application;

use crate::agent::Agent;
use crate::containers::{
    ContainerDetails, ContainerError, ContainerRuntime, ContainerSpec, LABEL_APPLICATION,
    ManagedContainer,
};
use crate::routes::{RouteStore, RoutesError};
use crate::server::ServerError;
use crate::tls::{TlsError, TlsFiles, client_config, server_config};
use crate::volume::dir::DirBackend;
use crate::volume::{SystemRunner, VolumeError};

/// Errors starting a simulated cluster.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("node {node}: {source}")]
    Tls { node: String, source: TlsError },
    #[error("node {node}: {source}")]
    Volumes { node: String, source: VolumeError },
    #[error("node {node}: {source}")]
    Routes { node: String, source: RoutesError },
    #[error("node {node}: {source}")]
    Bind { node: String, source: ServerError },
    #[error("node address {0:?} is not an IP address")]
    Address(String),
}

/// The loopback address of simulated node `index`: 127.1.0.1, 127.1.0.2, ... 127.1.0.250,
/// 127.1.1.1, ... (room for 64,000 nodes).
pub fn loopback_address(index: usize) -> String {
    format!("127.1.{}.{}", (index / 250) % 256, index % 250 + 1)
}

/// Containers in memory: every image is present, a started container runs until stopped,
/// and each gets an address of its own (the route table needs one for local routes).
#[derive(Default)]
pub struct SimRuntime {
    containers: Mutex<BTreeMap<String, ManagedContainer>>,
}

/// Container addresses, unique across the process.
static NEXT_IP: AtomicU32 = AtomicU32::new(1);

fn container_ip() -> String {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    format!("172.20.{}.{}", (n >> 8) & 0xff, n & 0xff)
}

fn poisoned() -> ContainerError {
    ContainerError::Other("simulated runtime lock poisoned".into())
}

#[async_trait]
impl ContainerRuntime for SimRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
        let c = self.containers.lock().map_err(|_| poisoned())?;
        Ok(c.values().cloned().collect())
    }

    async fn ensure_image(&self, _image: &str) -> Result<(), ContainerError> {
        Ok(())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        self.create(spec).await?;
        self.start(&spec.name).await
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let json = spec
            .labels
            .get(LABEL_APPLICATION)
            .ok_or_else(|| ContainerError::Other(format!("{}: no application label", spec.name)))?;
        let application: Application =
            serde_json::from_str(json).map_err(|e| ContainerError::Other(e.to_string()))?;
        let mut c = self.containers.lock().map_err(|_| poisoned())?;
        if c.contains_key(&spec.name) {
            return Err(ContainerError::Other(format!("{} exists", spec.name)));
        }
        c.insert(
            spec.name.clone(),
            ManagedContainer {
                name: spec.name.clone(),
                application,
                running: false,
                ip: None,
                ip6: None,
                never_started: true,
                spec_digest: spec.labels.get(crate::containers::LABEL_SPEC).cloned(),
                holder_down: false,
            },
        );
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), ContainerError> {
        let mut c = self.containers.lock().map_err(|_| poisoned())?;
        if let Some(c) = c.get_mut(name) {
            c.running = true;
            c.never_started = false;
            c.ip = Some(container_ip());
        }
        Ok(())
    }

    async fn listens_on(&self, name: &str, _port: u16) -> Result<bool, ContainerError> {
        let c = self.containers.lock().map_err(|_| poisoned())?;
        Ok(c.get(name).is_some_and(|c| c.running))
    }

    async fn stop_and_remove(&self, name: &str) -> Result<(), ContainerError> {
        self.containers.lock().map_err(|_| poisoned())?.remove(name);
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<(), ContainerError> {
        if let Some(c) = self
            .containers
            .lock()
            .map_err(|_| poisoned())?
            .get_mut(name)
        {
            c.running = false;
        }
        Ok(())
    }

    /// A running container is running (readiness judges it by its port, which
    /// [`SimRuntime::listens_on`] says is open); it has no process, so no mount table.
    async fn details(&self, name: &str) -> Result<ContainerDetails, ContainerError> {
        let c = self.containers.lock().map_err(|_| poisoned())?;
        Ok(ContainerDetails {
            running: c.get(name).is_some_and(|c| c.running),
            ..ContainerDetails::default()
        })
    }

    async fn disable_docker_restart(&self, _name: &str) -> Result<(), ContainerError> {
        Ok(())
    }
}

/// One simulated node.
pub struct SimNode {
    pub address: String,
    pub agent: Arc<Agent>,
}

/// Agents serving on their loopback addresses, all on the same port (as a real cluster's
/// agents do), until the runtime they were started on stops.
pub struct SimCluster {
    pub nodes: Vec<SimNode>,
    pub port: u16,
}

impl SimCluster {
    /// Starts an agent for each address, with the certificate `CA/nodes/ADDR.{crt,key}` and
    /// its state (volumes, route file, schedule file) under `ROOT/ADDR`. Call inside a tokio
    /// runtime; the agents serve on its tasks.
    pub async fn start(
        root: &Path,
        ca: &Path,
        addresses: &[String],
        port: u16,
    ) -> Result<SimCluster, SimError> {
        let mut nodes = Vec::with_capacity(addresses.len());
        for address in addresses {
            nodes.push(start_node(root, ca, address, port).await?);
        }
        Ok(SimCluster { nodes, port })
    }
}

async fn start_node(root: &Path, ca: &Path, address: &str, port: u16) -> Result<SimNode, SimError> {
    let node = || address.to_string();
    let dir = root.join(address);
    let files = TlsFiles {
        ca_cert: ca.join("cluster.crt"),
        cert: ca.join(format!("nodes/{address}.crt")),
        key: ca.join(format!("nodes/{address}.key")),
    };
    let tls = |source| SimError::Tls {
        node: node(),
        source,
    };
    let volumes =
        DirBackend::open(&dir.join("volumes"), Arc::new(SystemRunner)).map_err(|source| {
            SimError::Volumes {
                node: node(),
                source,
            }
        })?;
    let routes =
        RouteStore::open(dir.join("routes.json"), None).map_err(|source| SimError::Routes {
            node: node(),
            source,
        })?;
    let agent = Agent::new(
        address.to_string(),
        Arc::new(volumes),
        Arc::new(SimRuntime::default()),
        AgentClient::new(client_config(&files).map_err(tls)?, port),
        routes,
    )
    .with_api_port(port)
    .with_schedule_file(schedule_path(&dir, address));
    let agent = Arc::new(agent);
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| SimError::Address(address.to_string()))?;
    let listener = crate::server::bind((ip, port).into())
        .await
        .map_err(|source| SimError::Bind {
            node: node(),
            source,
        })?;
    tokio::spawn(crate::server::serve(
        listener,
        server_config(&files).map_err(tls)?,
        agent.clone(),
        crate::limits::ServerLimits::default(),
    ));
    Ok(SimNode {
        address: address.to_string(),
        agent,
    })
}

/// Where the agent keeps the last deploy's desired state, as the daemon names it.
fn schedule_path(dir: &Path, address: &str) -> PathBuf {
    dir.join(format!("schedule-{address}.json"))
}
