//! Services by name: every application gets a stable virtual address (its *service address*)
//! that every container on every node resolves the application's name (and link aliases) to,
//! and connections to it on the application's service ports reach the application wherever
//! it runs.
//!
//! Both numbers are chosen here, by `flockerctl`, and travel in the [`RouteMap`] (its
//! `services`), so agents never guess:
//!
//! - **Address**: the BLAKE3 hash of the name picks one of the 32,766 addresses of
//!   [`SERVICE_RANGE`] (198.19.128.0/17, inside the benchmarking block 198.18.0.0/15 that no
//!   network routes). Names are taken in order; a name whose address is taken probes the next
//!   hash (`name`, attempt 1, 2, ...). Adding an application moves another's address only when
//!   their hashes collide and the new name sorts first: nothing restarts then (addresses live
//!   in routes and in hosts files the agents rewrite in place), only open connections to the
//!   old address break.
//! - **Relay port**: container addresses are local to their node's Docker bridge, so a
//!   connection from another node travels node to node: the client's node DNATs it to the
//!   hosting node's address and the service port's relay port, which the hosting node accepts
//!   only from cluster node addresses and DNATs on into the container. Relay ports are taken
//!   from [`RELAY_PORTS`] per hosting node (the same hash-and-probe rule, over the service
//!   ports placed on that node), skipping every published external port of the cluster, so a
//!   relay never shadows a published port. A node with more service ports than the range holds
//!   leaves the rest without relay: they are reachable by name only from their own node.
//!
//! The service ports of an application are its `ports` (internal side) and its `expose`
//! ports, as compose describes `expose`: ports reachable from other services, not published.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{Application, DesiredState, Protocol};

/// The range service addresses come from: 198.19.128.0/17.
pub const SERVICE_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 128, 0), 17);

/// The ports relays take on a hosting node (inclusive), below Linux's default ephemeral
/// range (32768-60999) and the eBPF backend's translation ports (61000-65535).
pub const RELAY_PORTS: (u16, u16) = (30000, 32767);

/// One service port: what a client dials on the service address, and the port the hosting
/// node accepts it on from other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    /// Absent when the hosting node had no relay port left for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<u16>,
}

/// An application as the cluster reaches it by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub address: Ipv4Addr,
    /// The node that runs it.
    pub node: String,
    pub ports: Vec<ServicePort>,
}

/// Whether `address` lies in [`SERVICE_RANGE`].
pub fn in_service_range(address: Ipv4Addr) -> bool {
    let (base, bits) = SERVICE_RANGE;
    let mask = u32::MAX << (32 - u32::from(bits));
    u32::from(address) & mask == u32::from(base) & mask
}

/// The `attempt`-th candidate of `name` in a space of `size` slots: the first eight bytes of
/// BLAKE3(`attempt` as 4 little-endian bytes ‖ `name`) modulo `size`.
fn slot(name: &str, attempt: u32, size: u32) -> u32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&attempt.to_le_bytes());
    hasher.update(name.as_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(size)) as u32
}

/// Picks for each key, in order, the first candidate slot that `taken` refuses and no earlier
/// key holds; `None` when all `size` slots are gone.
fn allocate<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    size: u32,
    taken: impl Fn(u32) -> bool,
) -> BTreeMap<&'a str, Option<u32>> {
    let mut used: BTreeSet<u32> = BTreeSet::new();
    let mut out = BTreeMap::new();
    // Once a key found no slot (its linear walk saw every slot), none is left for the rest.
    // Counting the free slots up front instead cost a walk of the whole range per call,
    // which per hosting node (relay ports) was a tenth of planning 1,000 x 10,000.
    let mut exhausted = false;
    for key in keys {
        let mut choice = None;
        if !exhausted {
            // Hash probes first; after as many misses as slots, a linear walk finds what is left.
            for attempt in 0..size.saturating_mul(2) {
                let candidate = if attempt < size {
                    slot(key, attempt, size)
                } else {
                    attempt - size
                };
                if !taken(candidate) && used.insert(candidate) {
                    choice = Some(candidate);
                    break;
                }
            }
            exhausted = choice.is_none();
        }
        out.insert(key, choice);
    }
    out
}

/// The service address of every application name, by the rule in the module docs.
pub fn service_addresses<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<&'a str, Ipv4Addr> {
    let (base, bits) = SERVICE_RANGE;
    let size = 1u32 << (32 - u32::from(bits));
    // Names in order, whatever order they came in; the first and last addresses of the
    // range are never handed out.
    let names: BTreeSet<&str> = names.into_iter().collect();
    let slots = allocate(names, size, |s| s == 0 || s == size - 1);
    slots
        .into_iter()
        .filter_map(|(name, s)| s.map(|s| (name, Ipv4Addr::from(u32::from(base) + s))))
        .collect()
}

/// The service ports of an application: the internal side of its routed ports and its
/// `expose` ports (TCP), each once, in order.
pub fn service_ports(app: &Application) -> Vec<(u16, Protocol)> {
    let mut ports: Vec<(u16, Protocol)> =
        app.ports.iter().map(|p| (p.internal, p.protocol)).collect();
    ports.extend(app.container.expose.iter().map(|&p| (p, Protocol::Tcp)));
    ports.sort_unstable();
    ports.dedup();
    ports.retain(|(port, _)| *port != 0);
    ports
}

impl DesiredState {
    /// Every placed application as a service: its address, node and ports with their relays.
    pub fn services(&self) -> BTreeMap<String, Service> {
        let placement = self.placement();
        let addresses = service_addresses(self.applications.keys().map(String::as_str));
        let published: BTreeSet<u16> = self
            .applications
            .values()
            .flat_map(|a| a.ports.iter().map(|p| p.external))
            .collect();
        let mut services = BTreeMap::new();
        for (node, apps) in &self.nodes {
            // Relay keys of this node: "app/port/proto", in order.
            let keys: Vec<(String, &str, u16, Protocol)> = apps
                .iter()
                .filter_map(|name| self.applications.get(name))
                .flat_map(|app| {
                    service_ports(app).into_iter().map(move |(port, protocol)| {
                        (
                            format!("{}/{port}/{protocol}", app.name),
                            app.name.as_str(),
                            port,
                            protocol,
                        )
                    })
                })
                .collect();
            let (first, last) = RELAY_PORTS;
            let size = u32::from(last - first) + 1;
            let relay_of = |s: u32| first.saturating_add(s as u16);
            let relays = allocate(keys.iter().map(|k| k.0.as_str()), size, |s| {
                published.contains(&relay_of(s))
            });
            for name in apps {
                let (Some(app), Some(address)) = (
                    self.applications.get(name),
                    addresses.get(name.as_str()).copied(),
                ) else {
                    continue;
                };
                if placement.get(name.as_str()) != Some(&node.as_str()) {
                    continue;
                }
                let ports = keys
                    .iter()
                    .filter(|k| k.1 == app.name)
                    .map(|(key, _, port, protocol)| ServicePort {
                        port: *port,
                        protocol: *protocol,
                        relay: relays.get(key.as_str()).copied().flatten().map(relay_of),
                    })
                    .collect();
                services.insert(
                    name.clone(),
                    Service {
                        address,
                        node: node.clone(),
                        ports,
                    },
                );
            }
        }
        services
    }
}

/// One line of a container's hosts file: a service address and the names it answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsEntry {
    pub address: Ipv4Addr,
    pub names: Vec<String>,
}

/// The names a container of `app` resolves: every service by its application name, and each
/// of `app`'s link aliases to the service whose external port the link names (`links` maps an
/// external port to the application that publishes it).
pub fn hosts_entries(
    app: &Application,
    addresses: &BTreeMap<String, Ipv4Addr>,
    publisher: impl Fn(Protocol, u16) -> Option<String>,
) -> Vec<HostsEntry> {
    let mut names: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for (name, address) in addresses {
        names.entry(*address).or_default().insert(name.clone());
    }
    for link in &app.links {
        let target = publisher(link.protocol, link.remote_port);
        if let Some(address) = target.and_then(|t| addresses.get(&t)) {
            names
                .entry(*address)
                .or_default()
                .insert(link.alias.clone());
        }
    }
    names
        .into_iter()
        .map(|(address, names)| HostsEntry {
            address,
            names: names.into_iter().collect(),
        })
        .collect()
}

/// A whole hosts file: localhost, the container's own name when known, its `extra_hosts`
/// (`NAME:ADDRESS` or `NAME=ADDRESS`, as Docker would have written them), then `entries`.
pub fn hosts_file(
    own: Option<(Ipv4Addr, &str)>,
    extra_hosts: &[String],
    entries: &[HostsEntry],
) -> String {
    let mut text = String::from(
        "# Written by flocker-agent: service names resolve to their service addresses.\n\
         127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    if let Some((ip, hostname)) = own {
        text.push_str(&format!("{ip}\t{hostname}\n"));
    }
    for extra in extra_hosts {
        let split = extra.split_once('=').or_else(|| extra.split_once(':'));
        if let Some((name, address)) = split {
            let address = address.trim_start_matches('[').trim_end_matches(']');
            text.push_str(&format!("{address}\t{name}\n"));
        }
    }
    for entry in entries {
        text.push_str(&format!("{}\t{}\n", entry.address, entry.names.join(" ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Image, Link, PortMap, RestartPolicy};

    fn app(name: &str, ports: &[(u16, u16)], expose: &[u16]) -> Application {
        let container = crate::ContainerSettings {
            expose: expose.to_vec(),
            ..Default::default()
        };
        Application {
            name: name.into(),
            image: Image {
                repository: "busybox".into(),
                tag: "latest".into(),
            },
            ports: ports.iter().map(|&(i, e)| PortMap::tcp(i, e)).collect(),
            volume: None,
            volumes: Default::default(),
            environment: BTreeMap::new(),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
            container,
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
        }
    }

    fn desired(apps: Vec<(Application, &str)>) -> DesiredState {
        let mut d = DesiredState::default();
        for (a, node) in apps {
            d.nodes
                .entry(node.to_string())
                .or_default()
                .insert(a.name.clone());
            d.applications.insert(a.name.clone(), a);
        }
        d
    }

    #[test]
    fn addresses_are_in_the_range_and_stable() {
        let names = ["cache", "db", "web"];
        let first = service_addresses(names);
        assert_eq!(first.len(), 3);
        for ip in first.values() {
            assert!(in_service_range(*ip), "{ip}");
            assert_ne!(*ip, Ipv4Addr::new(198, 19, 128, 0));
            assert_ne!(*ip, Ipv4Addr::new(198, 19, 255, 255));
        }
        assert_eq!(service_addresses(names), first, "deterministic");
        // An unrelated name changes nobody's address (no collision among these).
        let more = service_addresses(["aaa", "cache", "db", "web", "zzz"]);
        for name in names {
            assert_eq!(more[name], first[name]);
        }
        assert!(!in_service_range(Ipv4Addr::new(198, 19, 1, 1)));
        assert!(in_service_range(Ipv4Addr::new(198, 19, 200, 1)));
    }

    #[test]
    fn colliding_names_get_distinct_addresses_deterministically() {
        // Far more names than birthday odds allow without a collision in 32,766 slots.
        let names: Vec<String> = (0..3000).map(|i| format!("app{i}")).collect();
        let a = service_addresses(names.iter().map(String::as_str));
        let distinct: BTreeSet<_> = a.values().collect();
        assert_eq!(distinct.len(), names.len(), "every name its own address");
        let first_hash: BTreeSet<_> = names
            .iter()
            .map(|n| slot(n, 0, 1 << 15))
            .collect::<BTreeSet<_>>();
        assert!(
            first_hash.len() < names.len(),
            "the test does exercise collisions"
        );
        let b = service_addresses(names.iter().rev().map(String::as_str));
        assert_eq!(a, b, "order of the input does not matter");
    }

    #[test]
    fn allocation_walks_when_hashes_are_exhausted() {
        let got = allocate(["a", "b", "c", "d"], 3, |s| s == 1);
        let slots: BTreeSet<_> = got.values().flatten().collect();
        assert_eq!(slots, [&0, &2].into_iter().collect());
        assert_eq!(got.values().filter(|s| s.is_none()).count(), 2);
    }

    #[test]
    fn services_carry_ports_relays_and_node() {
        let d = desired(vec![
            (app("cache", &[], &[6379]), "198.18.0.2"),
            (app("web", &[(80, 8080)], &[]), "198.18.0.1"),
        ]);
        let services = d.services();
        let cache = &services["cache"];
        assert_eq!(cache.node, "198.18.0.2");
        assert_eq!(cache.ports.len(), 1);
        assert_eq!(cache.ports[0].port, 6379);
        let relay = cache.ports[0].relay.expect("a relay");
        assert!((RELAY_PORTS.0..=RELAY_PORTS.1).contains(&relay));
        assert_eq!(services["web"].ports[0].port, 80);
        assert_ne!(cache.address, services["web"].address);
        assert_eq!(d.services(), services, "deterministic");
    }

    #[test]
    fn relays_never_take_a_published_port_and_are_unique_per_node() {
        let mut apps = vec![];
        // Publishes the whole relay range but three ports.
        let mut publisher = app("pub", &[], &[]);
        for p in RELAY_PORTS.0..=RELAY_PORTS.1 - 3 {
            publisher.ports.push(PortMap::tcp(1, p));
        }
        apps.push((publisher, "n1"));
        for i in 0..4 {
            apps.push((app(&format!("s{i}"), &[], &[7000]), "n2"));
        }
        let services = desired(apps).services();
        let relays: Vec<Option<u16>> = (0..4)
            .map(|i| services[&format!("s{i}")].ports[0].relay)
            .collect();
        let given: BTreeSet<u16> = relays.iter().flatten().copied().collect();
        assert_eq!(
            given.len(),
            3,
            "three free relay ports for four services: {relays:?}"
        );
        assert!(given.iter().all(|p| *p > RELAY_PORTS.1 - 3));
    }

    #[test]
    fn hosts_entries_name_services_and_link_aliases() {
        let d = desired(vec![
            (app("cache", &[(6379, 16379)], &[]), "n2"),
            (app("web", &[], &[]), "n1"),
        ]);
        let services = d.services();
        let mut web = d.applications["web"].clone();
        web.links.push(Link {
            local_port: 6379,
            remote_port: 16379,
            alias: "redis".into(),
            protocol: Protocol::Tcp,
        });
        let addresses = services
            .iter()
            .map(|(name, s)| (name.clone(), s.address))
            .collect();
        let entries = hosts_entries(&web, &addresses, |_, port| {
            (port == 16379).then(|| "cache".to_string())
        });
        let cache = entries
            .iter()
            .find(|e| e.address == services["cache"].address)
            .expect("cache listed");
        assert_eq!(cache.names, vec!["cache".to_string(), "redis".to_string()]);
        let text = hosts_file(
            Some((Ipv4Addr::new(172, 17, 0, 2), "abc")),
            &["db.example:198.18.5.5".to_string(), "v6=[::1]".to_string()],
            &entries,
        );
        assert!(text.contains("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("198.18.5.5\tdb.example\n"));
        assert!(text.contains("::1\tv6\n"));
        assert!(text.contains("172.17.0.2\tabc\n"));
        assert!(text.contains(&format!("{}\tcache redis\n", services["cache"].address)));
    }
}
