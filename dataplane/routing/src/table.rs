//! The route table each agent derives from the desired cluster state, and its derivation
//! from the wire routes. Pure: no I/O, addresses come from a caller-supplied resolver.
//!
//! A table has one half per address family: `entries` for IPv4 clients, `entries6` for IPv6
//! ones. Nothing translates between the families (no NAT46/64), so a route has an IPv6 entry
//! only where its backend (the container, or the other node) has an IPv6 address, and an
//! IPv4 entry only where it has an IPv4 one.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

pub use flocker_wire::Protocol;
use flocker_wire::{Route, RouteTarget};

use crate::services::ServiceTable;

/// What a route is looked up by: the protocol and the external port. TCP port 53 and UDP port
/// 53 are two routes, possibly to two applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl RouteKey {
    pub fn tcp(port: u16) -> RouteKey {
        RouteKey {
            protocol: Protocol::Tcp,
            port,
        }
    }

    pub fn udp(port: u16) -> RouteKey {
        RouteKey {
            protocol: Protocol::Udp,
            port,
        }
    }
}

/// `80` for TCP (as messages named ports before UDP was routed), `53/udp` for UDP.
impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Tcp => write!(f, "{}", self.port),
            Protocol::Udp => write!(f, "{}/udp", self.port),
        }
    }
}

/// Where a connection to an external port on this node goes; `A` is the backend's socket
/// address, IPv4 unless said otherwise ([`RouteEntry6`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteEntry<A = SocketAddrV4> {
    /// The application runs here: NAT into its container.
    Local { container: A },
    /// The application runs on another node: forward to that node's address and external port.
    Remote { node: A },
}

/// A route for IPv6 clients.
pub type RouteEntry6 = RouteEntry<SocketAddrV6>;

impl<A: Copy> RouteEntry<A> {
    /// The address connections end up at, whichever kind of entry this is.
    pub fn backend(&self) -> A {
        match self {
            RouteEntry::Local { container } => *container,
            RouteEntry::Remote { node } => *node,
        }
    }
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

/// A node's whole route table, keyed by protocol and external port, one map per family, and
/// its service routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Routes for IPv4 clients.
    pub entries: BTreeMap<RouteKey, RouteEntry>,
    /// Routes for IPv6 clients: the same keys where the backend has an IPv6 address.
    pub entries6: BTreeMap<RouteKey, RouteEntry6>,
    /// Service addresses and relay ports (`crate::services`; IPv4).
    pub services: ServiceTable,
}

impl RouteTable {
    /// No route in either family and no service route.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.entries6.is_empty() && self.services.is_empty()
    }

    /// The IPv4 half alone with the services (what the eBPF programs carry).
    pub fn ipv4_only(&self) -> RouteTable {
        RouteTable {
            entries: self.entries.clone(),
            entries6: BTreeMap::new(),
            services: self.services.clone(),
        }
    }
}

/// Resolves the names a wire route mentions into addresses. The agent resolves node
/// names from the deployment once and asks its container runtime for container addresses.
pub trait AddressResolver {
    /// The IPv4 address of the local container running `application`, if it runs.
    fn container_address(&self, application: &str) -> Option<Ipv4Addr>;
    /// The IPv4 address of a node named in a route (an address literal or a known name).
    fn node_address(&self, node: &str) -> Option<Ipv4Addr>;
    /// The IPv6 address of the local container running `application`, if it has one.
    fn container_address6(&self, _application: &str) -> Option<Ipv6Addr> {
        None
    }
    /// The IPv6 address of a node named in a route, if it has one.
    fn node_address6(&self, _node: &str) -> Option<Ipv6Addr> {
        None
    }
}

/// Why wire routes could not be turned into a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("external port {port} is routed twice (applications {first:?} and {second:?})")]
    DuplicatePort {
        port: RouteKey,
        first: String,
        second: String,
    },
    #[error("no container address for application {application:?} (port {port})")]
    UnknownContainer { application: String, port: RouteKey },
    #[error("cannot resolve node {node:?} for application {application:?} (port {port})")]
    UnknownNode {
        node: String,
        application: String,
        port: RouteKey,
    },
    #[error("external port 0 is not routable (application {application:?})")]
    PortZero { application: String },
    #[error("cannot resolve cluster node {node:?} (a peer that may use relay ports)")]
    UnknownPeer { node: String },
    #[error("relay port {relay} is taken twice (application {application:?})")]
    DuplicateRelay {
        relay: RouteKey,
        application: String,
    },
    #[error("service {service} is routed twice (application {application:?})")]
    DuplicateService {
        service: String,
        application: String,
    },
}

/// Every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid routes: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct TableErrors(pub Vec<TableError>);

impl RouteTable {
    /// Derives the table from this node's wire routes. A local route to a container without an
    /// address and a remote route to an unknown node are errors: silently dropping them would
    /// leave a published port dark.
    pub fn from_wire(
        routes: &[Route],
        resolver: &impl AddressResolver,
    ) -> Result<RouteTable, TableErrors> {
        let mut entries = BTreeMap::new();
        let mut entries6 = BTreeMap::new();
        let mut owners: BTreeMap<RouteKey, &str> = BTreeMap::new();
        let mut errors = Vec::new();
        for route in routes {
            let port = RouteKey {
                protocol: route.protocol,
                port: route.external_port,
            };
            if port.port == 0 {
                errors.push(TableError::PortZero {
                    application: route.application.clone(),
                });
                continue;
            }
            if let Some(first) = owners.insert(port, &route.application) {
                errors.push(TableError::DuplicatePort {
                    port,
                    first: first.to_owned(),
                    second: route.application.clone(),
                });
                continue;
            }
            let (v4, v6) = backends(route, port, resolver);
            if v4.is_none() && v6.is_none() {
                errors.push(match &route.target {
                    RouteTarget::Local { .. } => TableError::UnknownContainer {
                        application: route.application.clone(),
                        port,
                    },
                    RouteTarget::Node { address } => TableError::UnknownNode {
                        node: address.clone(),
                        application: route.application.clone(),
                        port,
                    },
                });
                continue;
            }
            entries.extend(v4.map(|entry| (port, entry)));
            entries6.extend(v6.map(|entry| (port, entry)));
        }
        if errors.is_empty() {
            Ok(RouteTable {
                entries,
                entries6,
                services: ServiceTable::default(),
            })
        } else {
            Err(TableErrors(errors))
        }
    }
}

/// A route's backend in each family it has an address in: a local container's addresses,
/// or the other node's (at the same external port).
fn backends(
    route: &Route,
    port: RouteKey,
    resolver: &impl AddressResolver,
) -> (Option<RouteEntry>, Option<RouteEntry6>) {
    match &route.target {
        RouteTarget::Local { internal_port } => (
            resolver
                .container_address(&route.application)
                .map(|ip| RouteEntry::Local {
                    container: SocketAddrV4::new(ip, *internal_port),
                }),
            resolver
                .container_address6(&route.application)
                .map(|ip| RouteEntry::Local {
                    container: SocketAddrV6::new(ip, *internal_port, 0, 0),
                }),
        ),
        RouteTarget::Node { address } => (
            resolver.node_address(address).map(|ip| RouteEntry::Remote {
                node: SocketAddrV4::new(ip, port.port),
            }),
            resolver
                .node_address6(address)
                .map(|ip| RouteEntry::Remote {
                    node: SocketAddrV6::new(ip, port.port, 0, 0),
                }),
        ),
    }
}

/// A resolver over fixed maps; node names that parse as IP literals resolve to themselves (an
/// IPv4 literal has no IPv6 address and the other way round).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    pub containers: BTreeMap<String, Ipv4Addr>,
    pub nodes: BTreeMap<String, Ipv4Addr>,
    pub containers6: BTreeMap<String, Ipv6Addr>,
    pub nodes6: BTreeMap<String, Ipv6Addr>,
}

impl AddressResolver for StaticResolver {
    fn container_address(&self, application: &str) -> Option<Ipv4Addr> {
        self.containers.get(application).copied()
    }

    fn node_address(&self, node: &str) -> Option<Ipv4Addr> {
        self.nodes.get(node).copied().or_else(|| node.parse().ok())
    }

    fn container_address6(&self, application: &str) -> Option<Ipv6Addr> {
        self.containers6.get(application).copied()
    }

    fn node_address6(&self, node: &str) -> Option<Ipv6Addr> {
        self.nodes6.get(node).copied().or_else(|| node.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn local(app: &str, external: u16, internal: u16) -> Route {
        Route {
            external_port: external,
            protocol: Protocol::Tcp,
            application: app.to_owned(),
            target: RouteTarget::Local {
                internal_port: internal,
            },
        }
    }

    fn udp(mut route: Route) -> Route {
        route.protocol = Protocol::Udp;
        route
    }

    fn remote(app: &str, external: u16, node: &str) -> Route {
        Route {
            external_port: external,
            protocol: Protocol::Tcp,
            application: app.to_owned(),
            target: RouteTarget::Node {
                address: node.to_owned(),
            },
        }
    }

    fn check(routes: &[Route], expect: Expect) {
        let resolver = StaticResolver {
            containers: [("redis".to_owned(), Ipv4Addr::new(172, 17, 0, 2))].into(),
            nodes: [("node-b".to_owned(), Ipv4Addr::new(198, 18, 0, 2))].into(),
            containers6: [("redis6".to_owned(), "fd00:17::2".parse().expect("literal"))].into(),
            nodes6: [("node-b".to_owned(), "2001:db8::2".parse().expect("literal"))].into(),
        };
        let rendered = match RouteTable::from_wire(routes, &resolver) {
            Ok(table) => table
                .entries
                .iter()
                .map(|(port, entry)| format!("{port} -> {entry:?}\n"))
                .chain(
                    table
                        .entries6
                        .iter()
                        .map(|(port, entry)| format!("ipv6 {port} -> {entry:?}\n")),
                )
                .collect::<String>(),
            Err(e) => format!("error: {e}\n"),
        };
        expect.assert_eq(&rendered);
    }

    #[test]
    fn local_and_remote_routes() {
        check(
            &[
                local("redis", 6379, 6379),
                remote("web", 80, "node-b"),
                remote("db", 5432, "198.18.0.3"),
            ],
            expect![[r#"
                80 -> Remote { node: 198.18.0.2:80 }
                5432 -> Remote { node: 198.18.0.3:5432 }
                6379 -> Local { container: 172.17.0.2:6379 }
                ipv6 80 -> Remote { node: [2001:db8::2]:80 }
            "#]],
        );
    }

    #[test]
    fn each_family_gets_the_routes_whose_backend_has_an_address_in_it() {
        check(
            &[
                // Only an IPv6 address: IPv4 clients are not routed.
                local("redis6", 6379, 6380),
                remote("web", 80, "2001:db8::3"),
                // Only an IPv4 address: IPv6 clients are not routed.
                remote("db", 5432, "198.18.0.3"),
                udp(remote("dns", 53, "fd00::3")),
            ],
            expect![[r#"
                5432 -> Remote { node: 198.18.0.3:5432 }
                ipv6 80 -> Remote { node: [2001:db8::3]:80 }
                ipv6 6379 -> Local { container: [fd00:17::2]:6380 }
                ipv6 53/udp -> Remote { node: [fd00::3]:53 }
            "#]],
        );
    }

    #[test]
    fn tcp_and_udp_share_a_port_number() {
        check(
            &[
                local("redis", 53, 5353),
                udp(local("redis", 53, 5353)),
                udp(remote("web", 53, "node-b")),
            ],
            expect![[r#"
                error: invalid routes: external port 53/udp is routed twice (applications "redis" and "web")
            "#]],
        );
        check(
            &[local("redis", 53, 5353), udp(remote("web", 53, "node-b"))],
            expect![[r#"
                53 -> Local { container: 172.17.0.2:5353 }
                53/udp -> Remote { node: 198.18.0.2:53 }
                ipv6 53/udp -> Remote { node: [2001:db8::2]:53 }
            "#]],
        );
    }

    #[test]
    fn empty_routes_give_an_empty_table() {
        check(&[], expect![[""]]);
    }

    #[test]
    fn every_error_is_reported() {
        check(
            &[
                local("gone", 1000, 10),
                remote("web", 80, "nowhere"),
                remote("web2", 80, "node-b"),
                local("redis", 0, 1),
            ],
            expect![[r#"
                error: invalid routes: no container address for application "gone" (port 1000); cannot resolve node "nowhere" for application "web" (port 80); external port 80 is routed twice (applications "web" and "web2"); external port 0 is not routable (application "redis")
            "#]],
        );
    }
}
