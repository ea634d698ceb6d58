//! The service part of a node's routes (`flocker_wire::services`): connections to a service
//! address and port go to the local container, or to the hosting node's relay port; relay
//! ports lead into this node's containers, for connections from cluster nodes only. Pure: the
//! backends program it (`nft::services`, the eBPF map `flk_svc`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use flocker_wire::{RouteTarget, ServiceRoute};

use crate::table::{AddressResolver, Protocol, RouteEntry, RouteKey, TableError, TableErrors};

/// What a connection to a service is looked up by: the service address, protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub address: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// A node's service routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    /// Service address and port -> the local container (`Local`) or the hosting node's
    /// address and relay port (`Remote`).
    pub services: BTreeMap<ServiceKey, RouteEntry>,
    /// Relay ports of this node -> the local container they lead into.
    pub relays: BTreeMap<RouteKey, SocketAddrV4>,
    /// The cluster's node addresses: the only sources a relay port accepts.
    pub peers: BTreeSet<Ipv4Addr>,
}

impl ServiceTable {
    /// Nothing to route (peers alone route nothing).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.relays.is_empty()
    }

    /// Derives the table from the node's wire service routes and the cluster's node names.
    /// As with port routes, a local service without a container address or a remote one
    /// whose node does not resolve is an error, not a silent gap. Services are IPv4 only (their
    /// addresses and relay ports): a node that resolves to IPv6 addresses alone is no peer and
    /// hosts no service for the others, which is not an error (its port routes carry IPv6).
    pub fn from_wire(
        routes: &[ServiceRoute],
        peers: &[String],
        resolver: &impl AddressResolver,
    ) -> Result<ServiceTable, TableErrors> {
        let mut table = ServiceTable::default();
        let mut errors = Vec::new();
        for peer in peers {
            match resolver.node_address(peer) {
                Some(ip) => {
                    table.peers.insert(ip);
                }
                None if resolver.node_address6(peer).is_some() => {}
                None => errors.push(TableError::UnknownPeer { node: peer.clone() }),
            }
        }
        for route in routes {
            let key = ServiceKey {
                address: route.address,
                protocol: route.protocol,
                port: route.port,
            };
            let port = RouteKey {
                protocol: route.protocol,
                port: route.port,
            };
            if route.port == 0 || route.relay == Some(0) {
                errors.push(TableError::PortZero {
                    application: route.application.clone(),
                });
                continue;
            }
            let entry = match &route.target {
                RouteTarget::Local { internal_port } => {
                    let Some(ip) = resolver.container_address(&route.application) else {
                        errors.push(TableError::UnknownContainer {
                            application: route.application.clone(),
                            port,
                        });
                        continue;
                    };
                    let container = SocketAddrV4::new(ip, *internal_port);
                    if let Some(relay) = route.relay {
                        let relay = RouteKey {
                            protocol: route.protocol,
                            port: relay,
                        };
                        if table.relays.insert(relay, container).is_some() {
                            errors.push(TableError::DuplicateRelay {
                                relay,
                                application: route.application.clone(),
                            });
                        }
                    }
                    RouteEntry::Local { container }
                }
                RouteTarget::Node { address }
                    if resolver.node_address(address).is_none()
                        && resolver.node_address6(address).is_some() =>
                {
                    continue;
                }
                RouteTarget::Node { address } => {
                    let (Some(ip), Some(relay)) = (resolver.node_address(address), route.relay)
                    else {
                        errors.push(TableError::UnknownNode {
                            node: address.clone(),
                            application: route.application.clone(),
                            port,
                        });
                        continue;
                    };
                    RouteEntry::Remote {
                        node: SocketAddrV4::new(ip, relay),
                    }
                }
            };
            if table.services.insert(key, entry).is_some() {
                errors.push(TableError::DuplicateService {
                    service: key.to_string(),
                    application: route.application.clone(),
                });
            }
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(TableErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::StaticResolver;

    fn route(
        app: &str,
        last: u8,
        port: u16,
        relay: Option<u16>,
        target: RouteTarget,
    ) -> ServiceRoute {
        ServiceRoute {
            application: app.into(),
            address: Ipv4Addr::new(198, 19, 128, last),
            port,
            protocol: Protocol::Tcp,
            relay,
            target,
        }
    }

    fn resolver() -> StaticResolver {
        StaticResolver {
            containers: [("cache".to_owned(), Ipv4Addr::new(172, 17, 0, 2))].into(),
            nodes: [("node-b".to_owned(), Ipv4Addr::new(198, 18, 0, 2))].into(),
            ..StaticResolver::default()
        }
    }

    #[test]
    fn local_services_get_a_relay_and_remote_ones_go_to_the_relay() {
        let routes = [
            route(
                "cache",
                1,
                6379,
                Some(30001),
                RouteTarget::Local {
                    internal_port: 6379,
                },
            ),
            route(
                "web",
                2,
                80,
                Some(30002),
                RouteTarget::Node {
                    address: "node-b".into(),
                },
            ),
        ];
        let peers = ["198.18.0.1".to_string(), "node-b".to_string()];
        let table = ServiceTable::from_wire(&routes, &peers, &resolver()).expect("table");
        let key = |last, port| ServiceKey {
            address: Ipv4Addr::new(198, 19, 128, last),
            protocol: Protocol::Tcp,
            port,
        };
        assert_eq!(
            table.services[&key(1, 6379)],
            RouteEntry::Local {
                container: "172.17.0.2:6379".parse().expect("addr")
            }
        );
        assert_eq!(
            table.services[&key(2, 80)],
            RouteEntry::Remote {
                node: "198.18.0.2:30002".parse().expect("addr")
            }
        );
        assert_eq!(
            table.relays[&RouteKey::tcp(30001)],
            "172.17.0.2:6379".parse::<SocketAddrV4>().expect("addr")
        );
        assert_eq!(table.relays.len(), 1, "only local services are relayed");
        assert_eq!(table.peers.len(), 2);
        assert!(!table.is_empty());
    }

    #[test]
    fn every_problem_is_reported() {
        let routes = [
            route(
                "gone",
                1,
                6379,
                Some(30001),
                RouteTarget::Local {
                    internal_port: 6379,
                },
            ),
            route(
                "web",
                2,
                80,
                None,
                RouteTarget::Node {
                    address: "node-b".into(),
                },
            ),
        ];
        let error = ServiceTable::from_wire(&routes, &["nowhere".into()], &resolver())
            .expect_err("refused");
        assert_eq!(error.0.len(), 3, "{error}");
    }

    #[test]
    fn a_node_named_by_ipv6_alone_is_no_peer_and_hosts_no_service_here() {
        let routes = [route(
            "web",
            2,
            80,
            Some(30002),
            RouteTarget::Node {
                address: "fd00:18::12".into(),
            },
        )];
        let peers = ["198.18.0.1".to_string(), "fd00:18::12".to_string()];
        let table = ServiceTable::from_wire(&routes, &peers, &resolver()).expect("table");
        assert!(table.services.is_empty(), "{table:?}");
        assert_eq!(table.peers.len(), 1);
        // A name that resolves to nothing at all is still an error.
        let error = ServiceTable::from_wire(&routes, &["nowhere".into()], &resolver())
            .expect_err("refused");
        assert_eq!(error.0.len(), 1, "{error}");
    }
}
