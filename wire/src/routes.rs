//! The cluster's route map: which node serves each external port. Every node routes every
//! external port, so a node's whole route table follows from this one map and its own
//! address ([`RouteMap::routes_for`]). `flockerctl` sends the map (serialised once, the same
//! bytes to every node) instead of a table per node, and names it by its [`RouteMap::version`]:
//! a node that reports that version already routes by it and needs nothing.
//!
//! The map's size grows with the applications, the plan's with what changes: holding every
//! node's table on the control side would grow with nodes x applications.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{DesiredState, Protocol, Route, RouteTarget, services::Service};

/// An external port and its protocol: the key of the route map. In JSON it is the port
/// number for TCP (`"6379"`) and `PORT/udp` for UDP (`"53/udp"`), so a map of TCP ports
/// reads as it did before UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// First, so keys order by port and then protocol, as route tables do.
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protocol {
            Protocol::Tcp => write!(f, "{}", self.port),
            other => write!(f, "{}/{other}", self.port),
        }
    }
}

impl std::str::FromStr for PortKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (port, protocol) = match text.split_once('/') {
            Some((port, protocol)) => (
                port,
                Protocol::parse(protocol).ok_or_else(|| format!("unknown protocol in {text:?}"))?,
            ),
            None => (text, Protocol::Tcp),
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{text:?} is not a port"))?;
        Ok(PortKey { protocol, port })
    }
}

impl Serialize for PortKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where one external port leads: the application that claims it, the node it runs on and
/// the port it listens on there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRoute {
    pub application: String,
    pub node: String,
    pub internal_port: u16,
}

/// External port (per protocol) -> where it leads, for the whole cluster, and every
/// application as a service reached by name (`crate::services`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMap {
    pub ports: BTreeMap<PortKey, PortRoute>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
}

/// Where connections to one service port go from one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRoute {
    pub application: String,
    pub address: std::net::Ipv4Addr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    /// The port the hosting node accepts this service port on from other nodes (none when
    /// that node had no relay port left: then only its own node routes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<u16>,
    /// `Local { internal_port }`: into this node's container (and the relay port leads
    /// there too); `Node { address }`: to that node's relay port.
    pub target: RouteTarget,
}

/// The external ports of one application that moves, and the node it moves to: what
/// [`crate::Action::SwitchRoutes`] sets on every node before the application stops.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovedPorts {
    pub application: String,
    pub node: String,
    pub ports: Vec<crate::PortMap>,
}

impl MovedPorts {
    /// The routes of these ports on `node`: into its own container when the application
    /// moves there, to the new node otherwise.
    pub fn routes_for(&self, node: &str) -> Vec<Route> {
        self.ports
            .iter()
            .map(|p| {
                let key = PortKey {
                    port: p.external,
                    protocol: p.protocol,
                };
                let to = PortRoute {
                    application: self.application.clone(),
                    node: self.node.clone(),
                    internal_port: p.internal,
                };
                route(key, &to, node)
            })
            .collect()
    }
}

impl RouteMap {
    /// The route table of `node`: its own applications' ports locally, every other port
    /// forwarded to the node that serves it.
    pub fn routes_for(&self, node: &str) -> Vec<Route> {
        self.ports
            .iter()
            .map(|(&key, p)| route(key, p, node))
            .collect()
    }

    /// Where an external port of a protocol leads, if anywhere.
    pub fn get(&self, protocol: Protocol, port: u16) -> Option<&PortRoute> {
        self.ports.get(&PortKey { protocol, port })
    }

    /// Only the routes of `node` that lead into its own containers.
    pub fn local_routes(&self, node: &str) -> Vec<Route> {
        self.ports
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(&key, p)| route(key, p, node))
            .collect()
    }

    /// The map restricted to `ports` (those a node's links name), for a request that needs
    /// to locate a few ports rather than route them all.
    pub fn only(&self, ports: impl IntoIterator<Item = PortKey>) -> RouteMap {
        RouteMap {
            ports: ports
                .into_iter()
                .filter_map(|key| self.ports.get(&key).map(|p| (key, p.clone())))
                .collect(),
            services: BTreeMap::new(),
        }
    }

    /// The service routes of `node`: every service port with a relay, into the local
    /// container where the service runs here, to the hosting node's relay port elsewhere. A
    /// port without relay is routed only on its own node.
    pub fn service_routes_for(&self, node: &str) -> Vec<ServiceRoute> {
        let mut routes = Vec::new();
        for (name, service) in &self.services {
            let here = service.node == node;
            for port in &service.ports {
                let (relay, target) = match (port.relay, here) {
                    (relay, true) => (
                        relay,
                        RouteTarget::Local {
                            internal_port: port.port,
                        },
                    ),
                    (Some(relay), false) => (
                        Some(relay),
                        RouteTarget::Node {
                            address: service.node.clone(),
                        },
                    ),
                    (None, false) => continue,
                };
                routes.push(ServiceRoute {
                    application: name.clone(),
                    address: service.address,
                    port: port.port,
                    protocol: port.protocol,
                    relay,
                    target,
                });
            }
        }
        routes.sort();
        routes
    }

    /// A short name of the map's content: equal maps have equal versions. It is the hex of
    /// the first 16 bytes of the BLAKE3 hash of the map's JSON (keys in order, so the JSON
    /// is canonical), computed without holding that JSON.
    pub fn version(&self) -> String {
        crate::node_list::content_version(self)
    }
}

fn route(key: PortKey, p: &PortRoute, node: &str) -> Route {
    let target = if p.node == node {
        RouteTarget::Local {
            internal_port: p.internal_port,
        }
    } else {
        RouteTarget::Node {
            address: p.node.clone(),
        }
    };
    Route {
        external_port: key.port,
        protocol: key.protocol,
        application: p.application.clone(),
        target,
    }
}

impl DesiredState {
    /// The cluster's route map as the desired state implies it. An external port claimed
    /// twice (which validation refuses) keeps the first claim by node, then application.
    pub fn route_map(&self) -> RouteMap {
        let mut ports = BTreeMap::new();
        for (node, apps) in &self.nodes {
            for name in apps {
                let Some(app) = self.applications.get(name) else {
                    continue;
                };
                for port in &app.ports {
                    let key = PortKey {
                        protocol: port.protocol,
                        port: port.external,
                    };
                    ports.entry(key).or_insert_with(|| PortRoute {
                        application: name.clone(),
                        node: node.clone(),
                        internal_port: port.internal,
                    });
                }
            }
        }
        RouteMap {
            ports,
            services: self.services(),
        }
    }

    /// Application -> node, built once: [`DesiredState::node_of`] scans every node, which
    /// repeated for every application costs nodes x applications.
    pub fn placement(&self) -> HashMap<&str, &str> {
        self.nodes
            .iter()
            .flat_map(|(node, apps)| apps.iter().map(move |a| (a.as_str(), node.as_str())))
            .collect()
    }

    /// What `node` needs of the desired state to act: its own applications in full, their
    /// standby entries and secrets, and every node's address (the peers it pushes to and asks when
    /// fencing) with only its own placement filled in. The rest of the cluster reaches it
    /// as the [`RouteMap`].
    pub fn for_node(&self, node: &str) -> DesiredState {
        self.share_of(node, true)
    }

    /// [`DesiredState::for_node`], with every other node's address only when `with_peers`.
    pub(crate) fn share_of(&self, node: &str, with_peers: bool) -> DesiredState {
        let mine = self.nodes.get(node);
        let applications = mine
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.applications
                    .get(name)
                    .map(|a| (name.clone(), a.clone()))
            })
            .collect();
        let nodes = self
            .nodes
            .keys()
            .filter(|n| with_peers || *n == node)
            .map(|n| {
                let apps = if n == node {
                    mine.cloned().unwrap_or_default()
                } else {
                    Default::default()
                };
                (n.clone(), apps)
            })
            .collect();
        let standby = self
            .standby
            .iter()
            .filter(|(app, _)| mine.is_some_and(|m| m.contains(*app)))
            .map(|(app, s)| (app.clone(), s.clone()))
            .collect();
        // Secrets and configs only of the applications it runs: no node holds another's.
        let files = self
            .files
            .iter()
            .filter(|(app, _)| mine.is_some_and(|m| m.contains(*app)))
            .map(|(app, f)| (app.clone(), f.clone()))
            .collect();
        DesiredState {
            applications,
            nodes,
            standby,
            files,
        }
    }
}

#[cfg(test)]
mod port_key_tests {
    use super::*;

    #[test]
    fn keys_read_as_before_for_tcp_and_name_udp() {
        let mut map = RouteMap::default();
        for (protocol, port) in [(Protocol::Tcp, 53), (Protocol::Udp, 53)] {
            map.ports.insert(
                PortKey { protocol, port },
                PortRoute {
                    application: "dns".into(),
                    node: "198.18.0.1".into(),
                    internal_port: 53,
                },
            );
        }
        let json = serde_json::to_string(&map).expect("json");
        assert!(
            json.starts_with("{\"ports\":{\"53\":{") && json.contains("\"53/udp\":{"),
            "{json}"
        );
        let back: RouteMap = serde_json::from_str(&json).expect("back");
        assert_eq!(back, map);
        assert!(serde_json::from_str::<RouteMap>("{\"ports\":{\"53/sctp\":{}}}").is_err());
        assert!(map.get(Protocol::Udp, 53).is_some() && map.get(Protocol::Tcp, 54).is_none());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::{Application, Image, PortMap, RestartPolicy, Standby};

    fn app(name: &str, ports: Vec<PortMap>) -> Application {
        Application {
            name: name.into(),
            image: Image {
                repository: "busybox".into(),
                tag: "latest".into(),
            },
            ports,
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
    fn moved_ports_lead_into_the_new_node_and_to_it_from_elsewhere() {
        let moved = MovedPorts {
            application: "db".into(),
            node: "198.18.0.2".into(),
            ports: vec![
                PortMap::tcp(6379, 16379),
                PortMap {
                    internal: 53,
                    external: 5353,
                    protocol: Protocol::Udp,
                },
            ],
        };
        let here = moved.routes_for("198.18.0.2");
        assert_eq!(
            here.iter().map(|r| &r.target).collect::<Vec<_>>(),
            [
                &RouteTarget::Local {
                    internal_port: 6379
                },
                &RouteTarget::Local { internal_port: 53 }
            ]
        );
        let elsewhere = moved.routes_for("198.18.0.3");
        assert!(elsewhere.iter().all(|r| r.application == "db"
            && r.target
                == RouteTarget::Node {
                    address: "198.18.0.2".into()
                }));
        assert_eq!(
            elsewhere
                .iter()
                .map(|r| (r.external_port, r.protocol))
                .collect::<Vec<_>>(),
            [(16379, Protocol::Tcp), (5353, Protocol::Udp)]
        );
    }

    /// A valid random deployment: up to 8 nodes, up to 30 applications with 0 to 3 ports
    /// each (external ports claimed once), each placed on a node or on none.
    fn deployment() -> impl Strategy<Value = DesiredState> {
        (
            1usize..8,
            prop::collection::vec((0usize..4, prop::option::of(0usize..8), 1u16..60000), 0..30),
        )
            .prop_map(|(node_count, apps)| {
                let nodes: Vec<String> = (0..node_count)
                    .map(|i| format!("198.18.0.{}", i + 1))
                    .collect();
                let mut desired = DesiredState::default();
                for n in &nodes {
                    desired.nodes.insert(n.clone(), BTreeSet::new());
                }
                let mut next_port = 1u16;
                for (i, (port_count, place, internal)) in apps.into_iter().enumerate() {
                    let name = format!("app{i}");
                    let ports = (0..port_count)
                        .map(|_| {
                            next_port += 7;
                            PortMap {
                                internal,
                                external: next_port,
                                // Some UDP ports, so the map keys by protocol too.
                                protocol: if next_port.is_multiple_of(3) {
                                    crate::Protocol::Udp
                                } else {
                                    crate::Protocol::Tcp
                                },
                            }
                        })
                        .collect();
                    desired.applications.insert(name.clone(), app(&name, ports));
                    if let Some(p) = place {
                        let node = &nodes[p % nodes.len()];
                        desired
                            .nodes
                            .entry(node.clone())
                            .or_default()
                            .insert(name.clone());
                        if i % 3 == 0 {
                            desired.standby.insert(
                                name.clone(),
                                Standby {
                                    nodes: vec![],
                                    interval_ms: 1000,
                                },
                            );
                        }
                    }
                }
                desired
            })
    }

    proptest! {
        /// Every node's table derived from the map is exactly the full table the planner
        /// used to send it.
        #[test]
        fn every_node_derives_the_table_the_full_state_implies(desired in deployment()) {
            let map = desired.route_map();
            for node in desired.nodes.keys() {
                prop_assert_eq!(map.routes_for(node), desired.routes_for(node));
                let local: Vec<Route> = desired
                    .routes_for(node)
                    .into_iter()
                    .filter(|r| matches!(r.target, RouteTarget::Local { .. }))
                    .collect();
                prop_assert_eq!(map.local_routes(node), local);
            }
            // The map travels as JSON: what a node decodes derives the same table.
            let json = serde_json::to_vec(&map).expect("encode");
            let back: RouteMap = serde_json::from_slice(&json).expect("decode");
            prop_assert_eq!(back.version(), map.version());
            for node in desired.nodes.keys() {
                prop_assert_eq!(back.routes_for(node), desired.routes_for(node));
            }
        }

        /// A node's share keeps what it acts on: its applications, its standby entries,
        /// every node's address, and the placement that concerns it.
        #[test]
        fn a_nodes_share_holds_what_it_acts_on(desired in deployment()) {
            let placement = desired.placement();
            for node in desired.nodes.keys() {
                let share = desired.for_node(node);
                prop_assert_eq!(share.nodes.keys().collect::<Vec<_>>(), desired.nodes.keys().collect::<Vec<_>>());
                prop_assert_eq!(share.standby_for(node), desired.standby_for(node));
                for (name, app) in &desired.applications {
                    let here = placement.get(name.as_str()) == Some(&node.as_str());
                    prop_assert_eq!(share.applications.get(name) == Some(app), here);
                    prop_assert_eq!(share.node_of(name) == Some(node.as_str()), here);
                }
                prop_assert!(crate::checks::desired_problems(&share).is_empty());
            }
        }
    }

    #[test]
    fn the_version_changes_with_any_port_and_only_then() {
        let mut desired = DesiredState::default();
        desired
            .applications
            .insert("web".into(), app("web", vec![PortMap::tcp(80, 8080)]));
        desired
            .nodes
            .insert("198.18.0.1".into(), ["web".to_string()].into());
        desired.nodes.insert("198.18.0.2".into(), BTreeSet::new());
        let before = desired.route_map().version();
        assert_eq!(before.len(), 32);
        assert_eq!(desired.clone().route_map().version(), before);
        let mut moved = desired.clone();
        moved.nodes.insert("198.18.0.1".into(), BTreeSet::new());
        moved
            .nodes
            .insert("198.18.0.2".into(), ["web".to_string()].into());
        assert_ne!(moved.route_map().version(), before);
        let mut renumbered = desired.clone();
        renumbered
            .applications
            .insert("web".into(), app("web", vec![PortMap::tcp(81, 8080)]));
        assert_ne!(renumbered.route_map().version(), before);
    }
}
