//! The node's route table: the wire routes last set by `SetRoutes` or derived from the
//! cluster's route map by `FollowRoutes` (then with that map's version), persisted (fsync +
//! rename) so a restarted agent reports and re-applies them, and programmed into the kernel
//! through a `flocker-routing` backend. The agent writes no routing code of its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Mutex;

use flocker_routing::{AddressResolver, RouteTable, RoutingBackend, ServiceTable};
use flocker_wire::{Route, ServiceRoute};

use crate::volume::{VolumeError, sidecar};

/// Errors of the route store.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{0}")]
    Table(#[from] flocker_routing::TableErrors),
    #[error("routing backend {backend}: {detail}")]
    Backend {
        backend: &'static str,
        detail: String,
    },
    #[error("route file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("{0}")]
    Volume(#[from] VolumeError),
}

/// Resolves container names from the runtime's view and node names through DNS. A node
/// named by an IP literal has that one address; a node named by a host name has its first
/// address of each family.
pub struct Resolver {
    pub containers: BTreeMap<String, Ipv4Addr>,
    pub containers6: BTreeMap<String, Ipv6Addr>,
}

impl Resolver {
    /// The node's addresses: the literal itself, or what the system resolver answers.
    fn node_addresses(node: &str) -> Vec<IpAddr> {
        if let Ok(ip) = node.parse::<IpAddr>() {
            return vec![ip];
        }
        match (node, 0).to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl AddressResolver for Resolver {
    fn container_address(&self, application: &str) -> Option<Ipv4Addr> {
        self.containers.get(application).copied()
    }

    fn node_address(&self, node: &str) -> Option<Ipv4Addr> {
        Resolver::node_addresses(node)
            .into_iter()
            .find_map(|ip| match ip {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
    }

    fn container_address6(&self, application: &str) -> Option<Ipv6Addr> {
        self.containers6.get(application).copied()
    }

    fn node_address6(&self, node: &str) -> Option<Ipv6Addr> {
        Resolver::node_addresses(node)
            .into_iter()
            .find_map(|ip| match ip {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            })
    }
}

/// The persisted route list and the kernel backend (none: routes are only recorded).
pub struct RouteStore {
    path: PathBuf,
    routes: Mutex<Recorded>,
    backend: Mutex<Option<Box<dyn RoutingBackend>>>,
}

/// What the route file holds: the table, and the version of the route map it was derived
/// from when it was (absent when it was set as a list, or changed since).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    routes: Vec<Route>,
    /// The node's service routes (from the route map's services) and the cluster's nodes,
    /// the peers its relay ports accept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    services: Vec<ServiceRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    peers: Vec<String>,
}

/// The route file as written now, or as agents before route map versions wrote it (the
/// bare list).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RouteFile {
    Recorded(Recorded),
    List(Vec<Route>),
}

impl RouteStore {
    /// Loads the persisted routes (none when the file is missing).
    pub fn open(
        path: PathBuf,
        backend: Option<Box<dyn RoutingBackend>>,
    ) -> Result<Self, RoutesError> {
        let routes = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(RouteFile::Recorded(recorded)) => recorded,
                Ok(RouteFile::List(routes)) => Recorded {
                    version: None,
                    routes,
                    ..Recorded::default()
                },
                Err(e) => {
                    return Err(RoutesError::File {
                        path,
                        detail: e.to_string(),
                    });
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Recorded::default(),
            Err(e) => {
                return Err(RoutesError::File {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        Ok(RouteStore {
            path,
            routes: Mutex::new(routes),
            backend: Mutex::new(backend),
        })
    }

    /// The backend's name, for logs and health.
    pub fn backend_name(&self) -> &'static str {
        self.backend
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.name()))
            .unwrap_or("none")
    }

    /// What keeps routed connections from getting through, for health (see
    /// `RoutingBackend::warnings`).
    pub fn warnings(&self) -> Vec<String> {
        self.backend
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.warnings()))
            .unwrap_or_default()
    }

    pub fn current(&self) -> Vec<Route> {
        self.routes
            .lock()
            .map(|r| r.routes.clone())
            .unwrap_or_default()
    }

    /// The node's recorded service routes: what its containers' hosts files name.
    pub fn services(&self) -> Vec<ServiceRoute> {
        self.routes
            .lock()
            .map(|r| r.services.clone())
            .unwrap_or_default()
    }

    /// The route map version the table follows, if it does.
    pub fn version(&self) -> Option<String> {
        self.routes.lock().ok().and_then(|r| r.version.clone())
    }

    /// What `GET /v1/state` reports: with a version, only the routes into this node's
    /// containers (the rest is the map's); without, the whole table.
    pub fn reported(&self) -> (Vec<Route>, Option<String>) {
        let Ok(r) = self.routes.lock() else {
            return (Vec::new(), None);
        };
        match &r.version {
            Some(v) => (
                r.routes
                    .iter()
                    .filter(|r| matches!(r.target, flocker_wire::RouteTarget::Local { .. }))
                    .cloned()
                    .collect(),
                Some(v.clone()),
            ),
            None => (r.routes.clone(), None),
        }
    }

    /// Resolves, programs and records `routes`. Nothing is recorded when they cannot be
    /// resolved or programmed.
    pub fn set(&self, routes: Vec<Route>, resolver: &Resolver) -> Result<(), RoutesError> {
        self.set_versioned(routes, None, resolver)
    }

    /// [`RouteStore::set`] for a table derived from the route map of `version` (`None`: a
    /// table set as a list).
    pub fn set_versioned(
        &self,
        routes: Vec<Route>,
        version: Option<String>,
        resolver: &Resolver,
    ) -> Result<(), RoutesError> {
        let (services, peers) = self.recorded_services();
        self.set_with_services(routes, version, services, peers, resolver)
    }

    /// [`RouteStore::set_versioned`] with the node's service routes and the cluster's nodes
    /// (the sources its relay ports accept). A local service whose container has no address
    /// yet is left out of the kernel until the next apply, as fencing's routes are.
    pub fn set_with_services(
        &self,
        mut routes: Vec<Route>,
        version: Option<String>,
        mut services: Vec<ServiceRoute>,
        peers: Vec<String>,
        resolver: &Resolver,
    ) -> Result<(), RoutesError> {
        routes.sort();
        services.sort();
        let mut table = RouteTable::from_wire(&routes, resolver)?;
        table.services = service_table(&services, &peers, resolver)?;
        self.program(&table, has_local(&routes, &services))?;
        self.record(Recorded {
            version,
            routes,
            services,
            peers,
        })
    }

    fn recorded_services(&self) -> (Vec<ServiceRoute>, Vec<String>) {
        self.routes
            .lock()
            .map(|r| (r.services.clone(), r.peers.clone()))
            .unwrap_or_default()
    }

    /// Persists the node's route list with its version.
    fn record(&self, recorded: Recorded) -> Result<(), RoutesError> {
        let bytes = serde_json::to_vec(&recorded).map_err(|e| RoutesError::File {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        sidecar_write(&self.path, &bytes)?;
        if let Ok(mut r) = self.routes.lock() {
            *r = recorded;
        }
        Ok(())
    }

    /// Re-programs the recorded routes after a restart (container addresses may have
    /// changed if Docker restarted them).
    pub fn reapply(&self, resolver: &Resolver) -> Result<(), RoutesError> {
        let routes = self.current();
        let (services, peers) = self.recorded_services();
        if routes.is_empty() && services.is_empty() {
            return Ok(());
        }
        let mut table = RouteTable::from_wire(&resolvable(&routes, resolver), resolver)?;
        table.services = service_table(&services, &peers, resolver)?;
        self.program(&table, has_local(&routes, &services))
    }

    /// Records `routes` and programs those that resolve now: local routes to containers that
    /// are not running (yet) are left out of the kernel until [`RouteStore::reapply`] after
    /// they start. For the agent's own corrections (fencing), where one stopped container
    /// must not keep another application's route pointing at a stale copy. The table then
    /// follows no route map version, so the next deploy compares it in full.
    pub fn set_resolvable(
        &self,
        routes: Vec<Route>,
        resolver: &Resolver,
    ) -> Result<(), RoutesError> {
        self.set_resolvable_keeping(routes, resolver, false)
    }

    /// [`RouteStore::set_resolvable`] for the switch of a move (issue 16): the old container
    /// still serves until it stops, so connections the kernel tracks to it are left to
    /// finish there (`RoutingBackend::apply_keeping_connections`).
    pub fn switch_resolvable(
        &self,
        routes: Vec<Route>,
        resolver: &Resolver,
    ) -> Result<(), RoutesError> {
        self.set_resolvable_keeping(routes, resolver, true)
    }

    fn set_resolvable_keeping(
        &self,
        mut routes: Vec<Route>,
        resolver: &Resolver,
        keep_connections: bool,
    ) -> Result<(), RoutesError> {
        routes.sort();
        let (services, peers) = self.recorded_services();
        let mut table = RouteTable::from_wire(&resolvable(&routes, resolver), resolver)?;
        table.services = service_table(&services, &peers, resolver)?;
        self.program_keeping(&table, keep_connections, has_local(&routes, &services))?;
        self.record(Recorded {
            version: None,
            routes,
            services,
            peers,
        })
    }

    /// Programs `table`; `local`: routes into this node's containers are recorded (see
    /// `RoutingBackend::keep_ready`).
    fn program(&self, table: &RouteTable, local: bool) -> Result<(), RoutesError> {
        self.program_keeping(table, false, local)
    }

    fn program_keeping(
        &self,
        table: &RouteTable,
        keep_connections: bool,
        local: bool,
    ) -> Result<(), RoutesError> {
        let mut guard = self.backend.lock().map_err(|_| RoutesError::Backend {
            backend: "unknown",
            detail: "lock poisoned".into(),
        })?;
        if let Some(backend) = guard.as_mut() {
            backend.keep_ready(local);
            let applied = if keep_connections {
                backend.apply_keeping_connections(table)
            } else {
                backend.apply(table)
            };
            applied.map_err(|e| RoutesError::Backend {
                backend: backend.name(),
                detail: flocker_routing::error_chain(&e),
            })?;
        }
        Ok(())
    }
}

/// Whether any route or service route leads into this node's own containers, programmed now
/// or left out until the container runs.
fn has_local(routes: &[Route], services: &[ServiceRoute]) -> bool {
    routes
        .iter()
        .any(|r| matches!(r.target, flocker_wire::RouteTarget::Local { .. }))
        || services
            .iter()
            .any(|s| matches!(s.target, flocker_wire::RouteTarget::Local { .. }))
}

/// The routes that can be programmed now: local ones only where the container has an
/// address (the others are logged and left for a later re-apply).
fn resolvable(routes: &[Route], resolver: &Resolver) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| match &r.target {
            flocker_wire::RouteTarget::Local { .. } => {
                let up = resolver.containers.contains_key(&r.application);
                if !up {
                    tracing::info!(application = %r.application, port = r.external_port, "route left out until its container runs");
                }
                up
            }
            flocker_wire::RouteTarget::Node { .. } => true,
        })
        .cloned()
        .collect()
}

/// The service table of the routes that can be programmed now: local services only where
/// the container has an address.
fn service_table(
    services: &[ServiceRoute],
    peers: &[String],
    resolver: &Resolver,
) -> Result<ServiceTable, RoutesError> {
    let up: Vec<ServiceRoute> = services
        .iter()
        .filter(|s| match &s.target {
            flocker_wire::RouteTarget::Local { .. } => {
                let up = resolver.containers.contains_key(&s.application);
                if !up {
                    tracing::info!(application = %s.application, port = s.port, "service route left out until its container runs");
                }
                up
            }
            flocker_wire::RouteTarget::Node { .. } => true,
        })
        .cloned()
        .collect();
    Ok(ServiceTable::from_wire(&up, peers, resolver)?)
}

fn sidecar_write(path: &std::path::Path, bytes: &[u8]) -> Result<(), RoutesError> {
    sidecar::write_bytes(path, bytes).map_err(RoutesError::from)
}

#[cfg(test)]
mod tests {
    use flocker_wire::RouteTarget;

    use super::*;

    fn route(port: u16, target: RouteTarget) -> Route {
        Route {
            external_port: port,
            protocol: flocker_wire::Protocol::Tcp,
            application: format!("app{port}"),
            target,
        }
    }

    #[test]
    fn nodes_named_by_an_ip_literal_have_that_address_only() {
        let resolver = Resolver {
            containers: BTreeMap::new(),
            containers6: BTreeMap::from([("db".to_string(), "fd00:17::2".parse().expect("ip"))]),
        };
        assert_eq!(
            resolver.node_address6("2001:db8::2"),
            Some("2001:db8::2".parse().expect("ip"))
        );
        assert_eq!(resolver.node_address("2001:db8::2"), None);
        assert_eq!(
            resolver.node_address("198.18.0.2"),
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
        assert_eq!(resolver.node_address6("198.18.0.2"), None);
        // `localhost` resolves through /etc/hosts, offline.
        assert_eq!(
            resolver.node_address("localhost"),
            Some(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            resolver.container_address6("db"),
            Some("fd00:17::2".parse().expect("ip"))
        );
    }

    /// Records, per apply, whether the table was empty and whether it was to keep ready.
    struct KeepReadyBackend {
        ready: bool,
        applied: std::sync::Arc<std::sync::Mutex<Vec<(bool, bool)>>>,
    }

    impl RoutingBackend for KeepReadyBackend {
        fn name(&self) -> &'static str {
            "keep-ready"
        }
        fn keep_ready(&mut self, ready: bool) {
            self.ready = ready;
        }
        fn apply(&mut self, table: &RouteTable) -> Result<(), flocker_routing::RoutingError> {
            if let Ok(mut a) = self.applied.lock() {
                a.push((table.is_empty(), self.ready));
            }
            Ok(())
        }
        fn clear(&mut self) -> Result<(), flocker_routing::RoutingError> {
            Ok(())
        }
    }

    /// A move's target between the switch of the routes and the start: its only route leads
    /// into a container that does not run yet, so the table is empty, and the backend is
    /// told to keep ready (the eBPF backend then keeps its programs loaded instead of taking
    /// most of a second to load them again inside the start). Without a local route, not.
    #[test]
    fn a_route_left_out_until_its_container_runs_keeps_the_backend_ready() {
        let dir = tempfile::tempdir().expect("tempdir");
        let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let backend = KeepReadyBackend {
            ready: false,
            applied: applied.clone(),
        };
        let store = RouteStore::open(dir.path().join("routes.json"), Some(Box::new(backend)))
            .expect("open");
        let local = route(
            6379,
            RouteTarget::Local {
                internal_port: 6379,
            },
        );
        let not_running = Resolver {
            containers: BTreeMap::new(),
            containers6: BTreeMap::new(),
        };
        store
            .switch_resolvable(vec![local.clone()], &not_running)
            .expect("switch");
        let running = Resolver {
            containers: BTreeMap::from([("app6379".to_string(), Ipv4Addr::new(172, 17, 0, 2))]),
            containers6: BTreeMap::new(),
        };
        store.reapply(&running).expect("reapply");
        store.set(Vec::new(), &running).expect("set");
        let applied = applied.lock().map(|a| a.clone()).unwrap_or_default();
        assert_eq!(
            applied,
            vec![(true, true), (false, true), (true, false)],
            "(empty table, keep ready) per apply"
        );
    }

    #[test]
    fn the_version_is_kept_across_a_restart_and_old_route_files_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.json");
        let local = route(8080, RouteTarget::Local { internal_port: 80 });
        let remote = route(
            9090,
            RouteTarget::Node {
                address: "198.18.0.2".into(),
            },
        );
        let resolver = Resolver {
            containers: BTreeMap::from([("app8080".to_string(), Ipv4Addr::new(172, 17, 0, 2))]),
            containers6: BTreeMap::new(),
        };
        let store = RouteStore::open(path.clone(), None).expect("open");
        store
            .set_versioned(
                vec![remote.clone(), local.clone()],
                Some("v1".into()),
                &resolver,
            )
            .expect("set");
        let again = RouteStore::open(path.clone(), None).expect("reopen");
        assert_eq!(again.current(), vec![local.clone(), remote.clone()]);
        assert_eq!(again.reported(), (vec![local.clone()], Some("v1".into())));

        // A table set as a list (or by fencing) follows no version and is reported whole.
        again.set(vec![remote.clone()], &resolver).expect("set");
        assert_eq!(again.reported(), (vec![remote.clone()], None));

        // The bare list agents before route map versions wrote.
        std::fs::write(
            &path,
            serde_json::to_vec(&vec![local.clone()]).expect("json"),
        )
        .expect("write");
        let old = RouteStore::open(path, None).expect("old file");
        assert_eq!(old.reported(), (vec![local], None));
    }
}
