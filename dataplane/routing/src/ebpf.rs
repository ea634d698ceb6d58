//! The eBPF backend: `cgroup/connect4` and `cgroup/getpeername4` programs (from
//! `flocker-ebpf`) attached to a cgroup v2 redirect a local or container client's connect to
//! a routed TCP or UDP port on one of the node's addresses straight to the backend, so those
//! packets need no NAT. `cgroup/sendmsg4` does the same for each datagram of an unconnected
//! UDP socket, and `cgroup/recvmsg4` gives the replies the address the client sent to as
//! their source. The `6` variants of the four do the same for IPv6 sockets, over the IPv6
//! routes (`flk_routes6`) and the node's IPv6 addresses (`flk_local6`).
//!
//! TCP and UDP traffic of both families arriving from outside the node meets the TC program
//! `flk_tc_ingress`, attached to the ingress of every interface with a node address (IPv4, or
//! IPv6 other than link-local). A TCP connection's first packet, or a UDP datagram, starts a
//! flow (LRU maps `flk_fwd` and `flk_rev`, keyed by family, protocol and addresses): its
//! packets are rewritten to the backend and redirected, and the replies rewritten back,
//! without netfilter or conntrack. Flows to a backend on another node, and hairpin ones (the
//! backend back out of the interface the client came in on), are source-translated too, to
//! the address of the interface they leave by (`flk_ifaddr`, `flk_ifaddr6`) and a port from
//! 61000-65535. A UDP flow ends after two minutes without a packet, and follows its route at
//! every datagram (a moved route takes a client that keeps its socket along). So while the TC
//! program is on every interface, this backend keeps no nftables routes at all (the table then
//! holds only the services, if any). Where the TC program cannot be loaded or attached, the
//! nftables prerouting and postrouting chains (`Scope::FromOutside`) carry all outside
//! traffic, and a warning says so. `flk_stats` counts the flows the TC program started per
//! family and protocol ([`pinned_stats`]), which shows which path carried them.
//!
//! The route table lives in the BPF hash map `flk_routes`, updated in place element by element.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::HashMap as BpfHashMap,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use tracing::{debug, info, warn};

use crate::{
    Protocol, RouteEntry, RouteKey, RouteTable, RoutingBackend, RoutingError, ServiceTable, mounts,
    nft::{
        NftBackend,
        plan::{ElementDiff, Scope},
    },
    pins::{self, Pins},
    settings::{self, SharedSettings},
    watch::InterfaceWatcher,
};

/// A failure loading, attaching or updating the BPF programs and maps.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the routing BPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("BPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cgroup v2 at {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount cgroup2 at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot list the node's addresses")]
    Addresses(#[source] nix::Error),
    #[error("cannot pin a BPF link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("eBPF pins")]
    Pins(#[from] crate::pins::PinError),
    #[error("BPF link of {name}")]
    Link {
        name: &'static str,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
}

const ROUTES_MAP: &str = "flk_routes";
const LOCAL_MAP: &str = "flk_local";
const IFADDR_MAP: &str = "flk_ifaddr";
const IFADDR6_MAP: &str = "flk_ifaddr6";
const ROUTES6_MAP: &str = "flk_routes6";
const LOCAL6_MAP: &str = "flk_local6";
/// Service address and port -> backend (`crate::services`).
const SERVICES_MAP: &str = "flk_svc";
const PROGRAMS: [&str; 8] = [
    "flk_connect4",
    "flk_getpeername4",
    "flk_sendmsg4",
    "flk_recvmsg4",
    "flk_connect6",
    "flk_getpeername6",
    "flk_sendmsg6",
    "flk_recvmsg6",
];
/// Every map of `routing.bpf.c`, pinned so that they outlive the agent.
const MAPS: [&str; 14] = [
    "flk_svc",
    "flk_routes",
    "flk_local",
    "flk_orig",
    "flk_udp_orig",
    "flk_fwd",
    "flk_rev",
    "flk_ifaddr",
    "flk_ifaddr6",
    "flk_stats",
    "flk_routes6",
    "flk_local6",
    "flk_orig6",
    "flk_udp_orig6",
];
const TC_PROGRAM: &str = "flk_tc_ingress";
/// The load-time constant of `routing.bpf.c` that holds [`EbpfOptions::udp_idle`].
const UDP_IDLE_GLOBAL: &str = "flk_udp_idle_ns";
/// A UDP flow's idle timeout unless configured: conntrack's for UDP streams.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(120);

/// What the programs are loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfOptions {
    /// A UDP flow the TC program carries is over after this long without a datagram either
    /// way: its next datagram starts a new flow (following its route as it is then) and its
    /// translated source port is free again.
    pub udp_idle: Duration,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            udp_idle: DEFAULT_UDP_IDLE,
        }
    }
}
/// `SNAT_FIRST..SNAT_FIRST + SNAT_COUNT` of `routing.bpf.c`: the source ports of translated
/// connections, reserved so that the node's own sockets never pick one.
const SNAT_PORTS: (u16, u16) = (61000, 65535);
/// Where we mount cgroup v2 ourselves when the host has not.
const OWN_CGROUP2_MOUNT: &str = "/run/flocker/cgroup2";

/// A `flk_routes` key: the port as `bpf_sock_addr.user_port` holds it (network order, low half).
pub fn port_key(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes()))
}

/// A `flk_routes` key: the port as [`port_key`] gives it, with the IP protocol number in bits
/// 16-23 (`route_key` of `routing.bpf.c`).
pub fn route_key(key: RouteKey) -> u32 {
    port_key(key.port) | (u32::from(key.protocol.number()) << 16)
}

/// An IPv4 address as `bpf_sock_addr.user_ip4` holds it (network-order bytes).
pub fn addr_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// `FLK_REMOTE` of `routing.bpf.c`: set in the port word of a backend on another node, whose
/// connections the TC program also source-translates.
const REMOTE_FLAG: u32 = 1 << 16;

/// The `flk_routes` contents a table implies: key -> `[addr, port | flags]`.
pub fn route_entries(table: &RouteTable) -> BTreeMap<u32, [u32; 2]> {
    table
        .entries
        .iter()
        .map(|(port, entry)| route_entry(*port, entry))
        .collect()
}

/// One `flk_routes` element.
pub fn route_entry(port: RouteKey, entry: &RouteEntry) -> (u32, [u32; 2]) {
    let backend = entry.backend();
    let flags = match entry {
        RouteEntry::Local { .. } => 0,
        RouteEntry::Remote { .. } => REMOTE_FLAG,
    };
    (
        route_key(port),
        [addr_key(*backend.ip()), port_key(backend.port()) | flags],
    )
}

/// An IPv6 address as `bpf_sock_addr.user_ip6` holds it: four words of network-order bytes.
pub fn addr6_key(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

/// The `flk_routes6` contents a table implies: key -> `[addr0..addr3, port | flags]`.
pub fn route6_entries(table: &RouteTable) -> BTreeMap<u32, [u32; 5]> {
    table
        .entries6
        .iter()
        .map(|(port, entry)| {
            let backend = entry.backend();
            let flags = match entry {
                RouteEntry::Local { .. } => 0,
                RouteEntry::Remote { .. } => REMOTE_FLAG,
            };
            let [a, b, c, d] = addr6_key(*backend.ip());
            (
                route_key(*port),
                [a, b, c, d, port_key(backend.port()) | flags],
            )
        })
        .collect()
}

/// The `flk_svc` contents a service table implies: `[address, port | protocol << 16]` ->
/// `[addr, port]`, in `bpf_sock_addr` byte order like `flk_routes`. Relay ports are not
/// here: connections to them come from other nodes and take the nftables chains.
pub fn service_entries(table: &ServiceTable) -> BTreeMap<[u32; 2], [u32; 2]> {
    table
        .services
        .iter()
        .map(|(key, entry)| {
            let port = RouteKey {
                protocol: key.protocol,
                port: key.port,
            };
            let backend = entry.backend();
            (
                [addr_key(key.address), route_key(port)],
                [addr_key(*backend.ip()), port_key(backend.port())],
            )
        })
        .collect()
}

/// The `flk_local6` contents: the node's own IPv6 addresses, loopback excepted (as for IPv4).
pub fn local6_entries(addrs: impl IntoIterator<Item = Ipv6Addr>) -> BTreeSet<[u32; 4]> {
    addrs
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(addr6_key)
        .collect()
}

/// The node's addresses of both families, each with the interface it is on.
#[derive(Debug, Default)]
pub struct NodeAddresses {
    pub v4: Vec<(String, Ipv4Addr)>,
    pub v6: Vec<(String, Ipv6Addr)>,
}

impl NodeAddresses {
    fn read() -> Result<NodeAddresses, EbpfError> {
        let mut addrs = NodeAddresses::default();
        for ifa in nix::ifaddrs::getifaddrs().map_err(EbpfError::Addresses)? {
            let Some(address) = ifa.address else {
                continue;
            };
            if let Some(v4) = address.as_sockaddr_in() {
                addrs.v4.push((ifa.interface_name, v4.ip()));
            } else if let Some(v6) = address.as_sockaddr_in6() {
                addrs.v6.push((ifa.interface_name, v6.ip()));
            }
        }
        Ok(addrs)
    }
}

/// An IPv6 address a flow may be translated to or arrive on from elsewhere: not loopback,
/// and not link-local (which names no node beyond its link).
fn is_node_address6(ip: &Ipv6Addr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_unicast_link_local()
}

/// An address that reaches this node from elsewhere: not loopback, because a container (same
/// cgroup tree, own network namespace) dialling 127.0.0.1 means itself, not the node.
fn is_node_address(ip: &Ipv4Addr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified()
}

/// The `flk_local` contents: the node's own addresses.
pub fn local_entries(addrs: impl IntoIterator<Item = Ipv4Addr>) -> BTreeSet<u32> {
    addrs
        .into_iter()
        .filter(is_node_address)
        .map(addr_key)
        .collect()
}

/// The interfaces the TC program goes on: every one with a non-loopback IPv4 address or a
/// global IPv6 one (the uplinks outside traffic arrives on, and the bridges or veths behind
/// which containers live).
pub fn tc_interfaces(addrs: &NodeAddresses) -> BTreeSet<String> {
    let v4 = addrs
        .v4
        .iter()
        .filter(|(_, ip)| is_node_address(ip))
        .map(|(name, _)| name.clone());
    let v6 = addrs
        .v6
        .iter()
        .filter(|(_, ip)| is_node_address6(ip))
        .map(|(name, _)| name.clone());
    v4.chain(v6).collect()
}

/// The `flk_ifaddr` contents: each interface's index -> its first node address, the source
/// the TC program gives the connections it translates out of that interface.
pub fn interface_addresses<'a>(
    addrs: impl IntoIterator<Item = &'a (String, Ipv4Addr)>,
    interfaces: &BTreeSet<(String, u32)>,
) -> BTreeMap<u32, u32> {
    let mut entries = BTreeMap::new();
    for (name, ip) in addrs.into_iter().filter(|(_, ip)| is_node_address(ip)) {
        for (_, index) in interfaces.iter().filter(|(n, _)| n == name) {
            entries.entry(*index).or_insert_with(|| addr_key(*ip));
        }
    }
    entries
}

/// The `flk_ifaddr6` contents: each interface's index -> its first global IPv6 address, the
/// source the TC program gives the IPv6 flows it translates out of that interface.
pub fn interface_addresses6<'a>(
    addrs: impl IntoIterator<Item = &'a (String, Ipv6Addr)>,
    interfaces: &BTreeSet<(String, u32)>,
) -> BTreeMap<u32, [u32; 4]> {
    let mut entries = BTreeMap::new();
    for (name, ip) in addrs.into_iter().filter(|(_, ip)| is_node_address6(ip)) {
        for (_, index) in interfaces.iter().filter(|(n, _)| n == name) {
            entries.entry(*index).or_insert_with(|| addr6_key(*ip));
        }
    }
    entries
}

/// The first cgroup v2 mount point listed in `/proc/self/mounts` (`/sys/fs/cgroup` on a unified
/// host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts::mount_points("cgroup2").into_iter().next()
}

/// The cgroup v2 directory to attach to: the configured one, else the host's cgroup v2
/// hierarchy, else a cgroup2 mount of our own.
pub fn resolve_cgroup(configured: Option<&Path>) -> Result<PathBuf, EbpfError> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    if let Some(mounted) = cgroup2_mount() {
        return Ok(mounted);
    }
    let own = PathBuf::from(OWN_CGROUP2_MOUNT);
    std::fs::create_dir_all(&own).map_err(|source| EbpfError::Cgroup {
        path: own.clone(),
        source,
    })?;
    mounts::mount("cgroup2", &own).map_err(|source| EbpfError::Mount {
        path: own.clone(),
        source,
    })?;
    Ok(own)
}

/// One program attachment. A pinned one outlives this process (dropping it only closes our
/// handle); the others, where bpffs or BPF links are unavailable, go with it.
enum Attachment {
    Pinned { link: PinnedLink, path: PathBuf },
    Fd(FdLink),
    Tc(SchedClassifierLink),
}

impl Attachment {
    /// Pins `link` at `path` when pins are in use, replacing whatever an earlier agent left
    /// pinned there.
    fn keep(link: FdLink, path: Option<PathBuf>) -> Result<Attachment, EbpfError> {
        let Some(path) = path else {
            return Ok(Attachment::Fd(link));
        };
        pins::remove(&path);
        match link.pin(&path) {
            Ok(link) => Ok(Attachment::Pinned { link, path }),
            Err(source) => Err(EbpfError::PinLink {
                path,
                source: Box::new(source),
            }),
        }
    }

    /// Where it is pinned, if it is.
    fn pin_path(&self) -> Option<&Path> {
        match self {
            Attachment::Pinned { path, .. } => Some(path),
            Attachment::Fd(_) | Attachment::Tc(_) => None,
        }
    }

    /// Detaches the program now, pinned or not.
    fn detach(self) {
        match self {
            // With the pin gone our handle is the last reference; dropping it detaches.
            Attachment::Pinned { link, .. } => drop(link.unpin()),
            Attachment::Fd(link) => drop(link),
            Attachment::Tc(link) => drop(link),
        }
    }
}

/// Programs attached and maps open. Dropping it keeps pinned programs attached (the next
/// agent takes them over); [`Loaded::detach_all`] detaches everything.
struct Loaded {
    bpf: Ebpf,
    /// Where the maps and links are pinned; `None` where bpffs is unavailable.
    pins: Option<Pins>,
    /// `flk_connect4`, `flk_getpeername4`, `flk_sendmsg4` and `flk_recvmsg4` on the cgroup.
    cgroup_links: Vec<Attachment>,
    routes: RouteTable,
    /// Set while an update is under way (and at first, when pinned maps may hold an earlier
    /// agent's routes); still set at the next apply means the map's contents are unknown, and
    /// that apply compares with what the map holds.
    routes_unknown: bool,
    local: BTreeMap<u32, u32>,
    /// `flk_routes6` and `flk_local6` as installed (compared whole at every sync: IPv6
    /// routes are few next to IPv4 ones so far).
    routes6: BTreeMap<u32, [u32; 5]>,
    local6: BTreeMap<[u32; 4], u32>,
    /// `flk_svc` as installed.
    services: BTreeMap<[u32; 2], [u32; 2]>,
    /// `flk_ifaddr` and `flk_ifaddr6` as installed.
    ifaddr: BTreeMap<u32, u32>,
    ifaddr6: BTreeMap<u32, [u32; 4]>,
    /// Whether `flk_tc_ingress` loaded; without it outside traffic takes the nftables path.
    tc_loaded: bool,
    /// Interfaces (name, index) `flk_tc_ingress` is attached to.
    tc_links: BTreeMap<(String, u32), Attachment>,
    /// Interfaces where attaching failed, warned about once.
    tc_failed: BTreeSet<(String, u32)>,
    /// Whether this instance has turned forwarding on and reserved `SNAT_PORTS`.
    sysctls_set: bool,
    /// Whether this instance has turned IPv6 forwarding on (for the first IPv6 route).
    forwarding6: bool,
    /// Whether older builds' pins and stale links have been removed (once ours were on).
    others_removed: bool,
}

impl Loaded {
    fn attach(cgroup: &Path, options: &EbpfOptions) -> Result<Loaded, EbpfError> {
        let pins = match Pins::open(flocker_ebpf::ROUTING) {
            Ok(pins) => Some(pins),
            Err(error) => {
                warn!(
                    error = %crate::error_chain(&error),
                    "cannot pin the eBPF maps and links: routing stops while the agent restarts"
                );
                None
            }
        };
        let udp_idle_ns = u64::try_from(options.udp_idle.as_nanos()).unwrap_or(u64::MAX);
        let mut loader = EbpfLoader::new();
        loader.override_global(UDP_IDLE_GLOBAL, &udp_idle_ns, true);
        if let Some(pins) = &pins {
            for name in MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut bpf = loader
            .load(flocker_ebpf::ROUTING)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;
        let cgroup_fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut cgroup_links = Vec::new();
        for name in PROGRAMS {
            let program = bpf.program_mut(name).ok_or(EbpfError::Missing {
                kind: "program",
                name,
            })?;
            let program_error = program_error(name);
            let program: &mut CgroupSockAddr = program.try_into().map_err(program_error)?;
            program.load().map_err(program_error)?;
            // aya attaches through a BPF link (kernel >= 5.7), which always coexists with
            // other programs on the cgroup and rejects any attach flag, so "Single" (no
            // flag) is the only mode that works; it does not exclude others' programs. The
            // new program is attached before an earlier agent's pinned one is removed, so
            // connects are redirected throughout.
            let id = program
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            let link = FdLink::try_from(link).map_err(|source| EbpfError::Link {
                name,
                source: Box::new(source),
            })?;
            let path = pins.as_ref().map(|pins| pins.link(name));
            cgroup_links.push(Attachment::keep(link, path)?);
        }
        info!(
            cgroup = %cgroup.display(),
            "eBPF connect/getpeername/sendmsg/recvmsg (4 and 6) attached"
        );
        let tc_loaded = match load_tc(&mut bpf) {
            Ok(()) => true,
            Err(error) => {
                warn!(
                    error = %crate::error_chain(&error),
                    "eBPF TC program unavailable: traffic from outside takes the nftables path"
                );
                false
            }
        };
        // Pinned maps may hold an earlier agent's entries: start from what they hold.
        let local = read_map(&mut bpf, LOCAL_MAP)?;
        let ifaddr = read_map(&mut bpf, IFADDR_MAP)?;
        let ifaddr6 = read_map(&mut bpf, IFADDR6_MAP)?;
        let routes6 = read_map(&mut bpf, ROUTES6_MAP)?;
        let local6 = read_map(&mut bpf, LOCAL6_MAP)?;
        let services = read_map(&mut bpf, SERVICES_MAP)?;
        Ok(Loaded {
            bpf,
            pins,
            cgroup_links,
            routes: RouteTable::default(),
            // Likewise the routes: the first sync compares with what the map holds.
            routes_unknown: true,
            local,
            routes6,
            local6,
            services,
            ifaddr,
            ifaddr6,
            tc_loaded,
            tc_links: BTreeMap::new(),
            tc_failed: BTreeSet::new(),
            sysctls_set: false,
            forwarding6: false,
            others_removed: false,
        })
    }

    /// Detaches every program and removes every pin of this namespace.
    fn detach_all(mut self) {
        for attachment in std::mem::take(&mut self.cgroup_links) {
            attachment.detach();
        }
        for (_, attachment) in std::mem::take(&mut self.tc_links) {
            attachment.detach();
        }
        if let Some(pins) = &self.pins {
            pins.remove_all();
        }
    }

    /// Attaches `flk_tc_ingress` to one interface: in place of the program of the link an
    /// earlier agent pinned for it when that link still works (atomically: no packet misses
    /// the program), else anew.
    fn attach_tc(&mut self, name: &str) -> Result<Attachment, EbpfError> {
        let path = self
            .pins
            .as_ref()
            .map(|pins| pins.link(&format!("tc-{name}")));
        let program = tc_program(&mut self.bpf)?;
        let error = program_error(TC_PROGRAM);
        if let Some(path) = &path
            && let Ok(old) = PinnedLink::from_pin(path)
        {
            let replaced = SchedClassifierLink::try_from(FdLink::from(old))
                .ok()
                .and_then(|link| program.attach_to_link(link).ok());
            if let Some(id) = replaced {
                // The pin already names this link; keep a handle of our own to it.
                drop(program.take_link(id).map_err(error)?);
                let link = PinnedLink::from_pin(path).map_err(|source| EbpfError::Link {
                    name: TC_PROGRAM,
                    source: Box::new(source),
                })?;
                return Ok(Attachment::Pinned {
                    link,
                    path: path.clone(),
                });
            }
            // Its interface went away (a new one has the name), or it is no BPF link.
            pins::remove(path);
        }
        let id = program.attach(name, TcAttachType::Ingress).map_err(error)?;
        let link = program.take_link(id).map_err(error)?;
        if <&FdLink>::try_from(&link).is_err() {
            // Attached over netlink (kernel < 6.6): no link to pin.
            return Ok(Attachment::Tc(link));
        }
        let link = FdLink::try_from(link).map_err(|source| EbpfError::Link {
            name: TC_PROGRAM,
            source: Box::new(source),
        })?;
        Attachment::keep(link, path)
    }

    /// Attaches `flk_tc_ingress` to the interfaces in `wanted` it is not on yet, and forgets
    /// the ones that went away (their links went with them). An interface is known by name
    /// and index, so one deleted and made again under the same name (docker0 when dockerd
    /// restarts) gets the program again.
    fn sync_interfaces(&mut self, addrs: &NodeAddresses) -> Result<(), EbpfError> {
        if !self.tc_loaded {
            return Ok(());
        }
        let wanted = tc_interfaces(addrs);
        // One listing for every interface's index, rather than a lookup per interface.
        let indexes = nix::net::if_::if_nameindex().map_err(EbpfError::Addresses)?;
        let wanted: BTreeSet<(String, u32)> = indexes
            .iter()
            .filter_map(|i| {
                let name = i.name().to_str().ok()?;
                wanted.contains(name).then(|| (name.to_owned(), i.index()))
            })
            .collect();
        self.tc_failed
            .retain(|interface| wanted.contains(interface));
        let ifaddr = interface_addresses(&addrs.v4, &wanted);
        sync_map(&mut self.bpf, IFADDR_MAP, &mut self.ifaddr, ifaddr)?;
        let ifaddr6 = interface_addresses6(&addrs.v6, &wanted);
        sync_map(&mut self.bpf, IFADDR6_MAP, &mut self.ifaddr6, ifaddr6)?;
        let gone: Vec<(String, u32)> = self
            .tc_links
            .keys()
            .filter(|interface| !wanted.contains(*interface))
            .cloned()
            .collect();
        for interface in gone {
            if let Some(attachment) = self.tc_links.remove(&interface) {
                // The interface may be gone already, and its link with it.
                attachment.detach();
            }
        }
        for interface in wanted {
            if self.tc_links.contains_key(&interface) {
                continue;
            }
            let name = interface.0.clone();
            match self.attach_tc(&name) {
                Ok(attachment) => {
                    debug!(interface = %name, "eBPF TC ingress attached");
                    self.tc_failed.remove(&interface);
                    self.tc_links.insert(interface, attachment);
                }
                Err(error) => {
                    if self.tc_failed.insert(interface) {
                        warn!(
                            interface = %name,
                            error = %crate::error_chain(&error),
                            "cannot attach the eBPF TC program: outside traffic on this \
                             interface takes the nftables path"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Once our programs are on (after the first apply): removes an older build's pins, and
    /// links an earlier agent pinned for interfaces that are gone.
    fn remove_stale_pins(&mut self) {
        let Some(pins) = self.pins.as_ref().filter(|_| !self.others_removed) else {
            return;
        };
        pins.remove_other_builds();
        let kept: Vec<&Path> = self
            .cgroup_links
            .iter()
            .chain(self.tc_links.values())
            .filter_map(Attachment::pin_path)
            .collect();
        pins.remove_links_except(&kept);
        self.others_removed = true;
    }

    /// Whether `flk_tc_ingress` is on every interface it should be: then no traffic needs
    /// the nftables chains.
    fn tc_everywhere(&self) -> bool {
        self.tc_loaded && self.tc_failed.is_empty()
    }

    fn sync_routes(&mut self, wanted: &RouteTable) -> Result<(), EbpfError> {
        let unknown = std::mem::replace(&mut self.routes_unknown, true);
        if unknown {
            // What the map holds is unknown (an earlier agent's pinned entries, or an update
            // that failed half way): compare with it and change only what differs, so routes
            // that stay are never missing.
            let mut held = read_map::<u32, [u32; 2]>(&mut self.bpf, ROUTES_MAP)?;
            sync_map(&mut self.bpf, ROUTES_MAP, &mut held, route_entries(wanted))?;
            self.routes = wanted.clone();
            self.routes_unknown = false;
            return Ok(());
        }
        let map_error = map_error(ROUTES_MAP);
        let mut installed = std::mem::take(&mut self.routes);
        let mut map = hash_map::<u32, [u32; 2]>(&mut self.bpf, ROUTES_MAP)?;
        let diff = ElementDiff::between_tables(&installed, wanted);
        // Insert (which overwrites) before removing, so a moved port is never unrouted.
        for element in &diff.add {
            let Some(entry) = wanted.entries.get(&element.port) else {
                continue;
            };
            let (key, value) = route_entry(element.port, entry);
            map.insert(key, value, 0).map_err(map_error)?;
        }
        for element in &diff.delete {
            if !wanted.entries.contains_key(&element.port) {
                map.remove(&route_key(element.port)).map_err(map_error)?;
            }
        }
        diff.patch(&mut installed, wanted);
        self.routes = installed;
        self.routes_unknown = false;
        Ok(())
    }

    fn sync_services(&mut self, wanted: &ServiceTable) -> Result<(), EbpfError> {
        let wanted = service_entries(wanted);
        if self.services == wanted {
            return Ok(());
        }
        let map_error = map_error(SERVICES_MAP);
        let mut map = hash_map::<[u32; 2], [u32; 2]>(&mut self.bpf, SERVICES_MAP)?;
        // Insert (which overwrites) before removing, as for routes.
        for (key, value) in &wanted {
            if self.services.get(key) != Some(value) {
                map.insert(key, value, 0).map_err(map_error)?;
            }
        }
        for key in self
            .services
            .keys()
            .filter(|key| !wanted.contains_key(*key))
        {
            map.remove(key).map_err(map_error)?;
        }
        self.services = wanted;
        Ok(())
    }

    fn sync_local(&mut self, wanted: BTreeSet<u32>) -> Result<(), EbpfError> {
        let wanted = wanted.into_iter().map(|key| (key, 1)).collect();
        sync_map(&mut self.bpf, LOCAL_MAP, &mut self.local, wanted)
    }

    /// `flk_routes6` and `flk_local6`: the IPv6 routes and the node's IPv6 addresses. Routes
    /// are written before addresses are added, so a new address never meets a stale route.
    fn sync_ipv6(
        &mut self,
        table: &RouteTable,
        addrs: &[(String, Ipv6Addr)],
    ) -> Result<(), EbpfError> {
        sync_map(
            &mut self.bpf,
            ROUTES6_MAP,
            &mut self.routes6,
            route6_entries(table),
        )?;
        let local = local6_entries(addrs.iter().map(|(_, ip)| *ip))
            .into_iter()
            .map(|key| (key, 1))
            .collect();
        sync_map(&mut self.bpf, LOCAL6_MAP, &mut self.local6, local)
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError + Copy {
    move |source| EbpfError::Map {
        name,
        source: Box::new(source),
    }
}

/// The hash map `name` of `bpf`, with keys `K` and values `V`.
fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut aya::maps::MapData, K, V>, EbpfError> {
    let map = bpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    BpfHashMap::try_from(map).map_err(map_error(name))
}

/// `struct tuple` of `routing.bpf.c`, the key of `flk_fwd` and `flk_rev`: two 16-byte
/// addresses, two ports, the family and the protocol (byte 37), and padding.
type FlowKey = [u8; 40];
/// Where a flow key holds its IP protocol number.
const FLOW_KEY_PROTOCOL: usize = 37;
/// `struct fwd_nat` and `struct rev_nat` of `routing.bpf.c`.
type FwdNat = [u8; 40];
type RevNat = [u8; 48];

/// How many `protocol` flows the TC program tracks in this network namespace's pinned maps:
/// entries of `flk_fwd` (one per open connection or live UDP flow) and of `flk_rev` (the
/// same, plus translated source ports of closed TCP connections not yet free again). For
/// tests and diagnostics.
pub fn pinned_flow_counts(protocol: Protocol) -> Result<(usize, usize), EbpfError> {
    let pins = Pins::open(flocker_ebpf::ROUTING)?;
    let of_protocol = |key: &FlowKey| key[FLOW_KEY_PROTOCOL] == protocol.number();
    Ok((
        count_pinned::<FwdNat>(&pins, "flk_fwd", of_protocol)?,
        count_pinned::<RevNat>(&pins, "flk_rev", of_protocol)?,
    ))
}

/// What the TC program reports about itself, for the agent's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataplaneStats {
    /// Connections and UDP flows the TC program tracks now (entries of `flk_fwd`, of 262,144).
    pub flows: u64,
    /// New flows left to the kernel's own stack because no translated source port was free,
    /// since the maps were created.
    pub snat_exhausted: u64,
    /// Flows the TC program started since the maps were created, by family and protocol.
    pub started: FlowsStarted,
}

/// Flows started by the TC program (`flk_stats[1..5]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowsStarted {
    pub ipv4_tcp: u64,
    pub ipv4_udp: u64,
    pub ipv6_tcp: u64,
    pub ipv6_udp: u64,
}

/// [`DataplaneStats`] of this network namespace, from the pinned maps.
pub fn pinned_stats() -> Result<DataplaneStats, EbpfError> {
    let pins = Pins::open(flocker_ebpf::ROUTING)?;
    let flows = count_pinned::<FwdNat>(&pins, "flk_fwd", |_| true)?;
    let name = "flk_stats";
    let map_error = map_error(name);
    let data = aya::maps::MapData::from_pin(pins.map(name)).map_err(map_error)?;
    let stats: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_error)?;
    let counter = |index: u32| -> Result<u64, EbpfError> {
        Ok(stats
            .get(&index, 0)
            .map_err(map_error)?
            .iter()
            .copied()
            .fold(0u64, u64::saturating_add))
    };
    Ok(DataplaneStats {
        flows: u64::try_from(flows).unwrap_or(u64::MAX),
        snat_exhausted: counter(0)?,
        started: FlowsStarted {
            ipv4_tcp: counter(1)?,
            ipv4_udp: counter(2)?,
            ipv6_tcp: counter(3)?,
            ipv6_udp: counter(4)?,
        },
    })
}

/// The number of entries of the pinned flow map `name` whose key passes `wanted`.
fn count_pinned<V: aya::Pod>(
    pins: &Pins,
    name: &'static str,
    wanted: impl Fn(&FlowKey) -> bool,
) -> Result<usize, EbpfError> {
    let map_error = map_error(name);
    let data = aya::maps::MapData::from_pin(pins.map(name)).map_err(map_error)?;
    let map: BpfHashMap<_, FlowKey, V> =
        BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_error)?;
    Ok(map.keys().filter_map(Result::ok).filter(wanted).count())
}

/// What the hash map `name` holds.
fn read_map<K: aya::Pod + Ord, V: aya::Pod>(
    bpf: &mut Ebpf,
    name: &'static str,
) -> Result<BTreeMap<K, V>, EbpfError> {
    let map = hash_map::<K, V>(bpf, name)?;
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(map_error(name))
}

/// Brings the hash map `name` (keys `u32`), which holds `installed`, to `wanted`, writing
/// only the elements that differ.
fn sync_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    bpf: &mut Ebpf,
    name: &'static str,
    installed: &mut BTreeMap<K, V>,
    wanted: BTreeMap<K, V>,
) -> Result<(), EbpfError> {
    if *installed == wanted {
        return Ok(());
    }
    let map_error = map_error(name);
    let mut map = hash_map::<K, V>(bpf, name)?;
    for (key, value) in &wanted {
        if installed.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(map_error)?;
        }
    }
    for key in installed.keys().filter(|key| !wanted.contains_key(key)) {
        map.remove(key).map_err(map_error)?;
    }
    *installed = wanted;
    Ok(())
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError + Copy {
    move |source| EbpfError::Program {
        name,
        source: Box::new(source),
    }
}

fn tc_program(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, EbpfError> {
    let program = bpf.program_mut(TC_PROGRAM).ok_or(EbpfError::Missing {
        kind: "program",
        name: TC_PROGRAM,
    })?;
    program.try_into().map_err(program_error(TC_PROGRAM))
}

fn load_tc(bpf: &mut Ebpf) -> Result<(), EbpfError> {
    tc_program(bpf)?.load().map_err(program_error(TC_PROGRAM))
}

/// eBPF at the socket for the node's own and its containers' connections, eBPF at TC ingress
/// for TCP connections from outside, nftables for the rest. While routes are installed, an
/// [`InterfaceWatcher`] re-covers interfaces and addresses as they appear, change or go (the
/// TC program on a re-created bridge, `flk_local` and `flk_ifaddr` for a new address).
pub struct EbpfBackend {
    // Declared first so it stops before the state goes: its callback takes the state.
    watcher: Option<InterfaceWatcher>,
    state: Arc<Mutex<EbpfState>>,
    /// See [`RoutingBackend::keep_ready`]: an empty table keeps the programs loaded.
    keep_ready: bool,
}

/// Everything the backend holds, shared with the watcher's callback.
struct EbpfState {
    cgroup: PathBuf,
    options: EbpfOptions,
    loaded: Option<Loaded>,
    outside: NftBackend,
    settings: SharedSettings,
    /// The table last applied: what a change of interfaces is covered for.
    table: RouteTable,
}

impl EbpfBackend {
    /// Loads and attaches the programs now, so an unsupported kernel is reported at open.
    pub fn open(
        cgroup_path: Option<&Path>,
        settings: SharedSettings,
        options: EbpfOptions,
    ) -> Result<EbpfBackend, EbpfError> {
        let cgroup = resolve_cgroup(cgroup_path)?;
        let loaded = Loaded::attach(&cgroup, &options)?;
        Ok(EbpfBackend {
            watcher: None,
            state: Arc::new(Mutex::new(EbpfState {
                cgroup,
                options,
                loaded: Some(loaded),
                outside: NftBackend::embedded(Scope::FromOutside, settings.clone()),
                settings,
                table: RouteTable::default(),
            })),
            keep_ready: false,
        })
    }

    fn state(&self) -> Result<MutexGuard<'_, EbpfState>, RoutingError> {
        self.state.lock().map_err(|_| RoutingError::Poisoned)
    }

    /// Starts watching interfaces and addresses, in the calling thread's network namespace.
    /// Without a watcher, changes are covered at the next apply, as a warning says.
    fn watch(&mut self) {
        let state = Arc::downgrade(&self.state);
        let on_change = move || {
            let Some(state) = state.upgrade() else {
                return;
            };
            let Ok(mut state) = state.lock() else {
                warn!("eBPF routing state poisoned: interface change not covered");
                return;
            };
            match state.cover_interfaces() {
                Ok(()) => debug!("eBPF routing: interfaces and addresses re-covered"),
                Err(error) => warn!(
                    error = %crate::error_chain(&error),
                    "eBPF routing: cannot cover the changed interfaces and addresses"
                ),
            }
        };
        match InterfaceWatcher::spawn(on_change) {
            Ok(watcher) => self.watcher = Some(watcher),
            Err(error) => warn!(
                error = %crate::error_chain(&error),
                "cannot watch interfaces: a new address or re-created bridge is covered at the next route change only"
            ),
        }
    }
}

impl EbpfState {
    /// Programs `table`; an empty table that is not kept ready never comes here (the
    /// backend's `apply` clears instead).
    fn apply(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        self.program(table)?;
        if self.table != *table {
            self.table = table.clone();
        }
        Ok(())
    }

    /// Programs a non-empty `table` for the node's interfaces and addresses as they are now.
    fn program(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        let loaded = match &mut self.loaded {
            Some(loaded) => loaded,
            None => self
                .loaded
                .insert(Loaded::attach(&self.cgroup, &self.options)?),
        };
        let addrs = NodeAddresses::read()?;
        loaded.sync_local(local_entries(addrs.v4.iter().map(|(_, ip)| *ip)))?;
        loaded.sync_routes(table)?;
        loaded.sync_ipv6(table, &addrs.v6)?;
        loaded.sync_services(&table.services)?;
        loaded.sync_interfaces(&addrs)?;
        loaded.remove_stale_pins();
        debug!(routes = table.entries.len(), "eBPF routes map updated");
        if loaded.tc_everywhere() {
            // The TC program carries all outside traffic: the nftables table holds no routes
            // (and no table at all without services, so nothing of ours makes the node's
            // netfilter run conntrack). Forwarding must be on for its route lookups to
            // succeed, IPv6 forwarding once there is an IPv6 route.
            if !loaded.sysctls_set {
                let mut settings = self.settings.lock().map_err(|_| RoutingError::Poisoned)?;
                settings::enable_forwarding(&mut settings)?;
                settings::reserve_local_ports(&mut settings, SNAT_PORTS.0, SNAT_PORTS.1)?;
                loaded.sysctls_set = true;
            }
            if !loaded.forwarding6 && !table.entries6.is_empty() {
                let mut settings = self.settings.lock().map_err(|_| RoutingError::Poisoned)?;
                settings::enable_ipv6_forwarding(&mut settings)?;
                loaded.forwarding6 = true;
            }
            self.outside.apply(&nftables_share(table))
        } else {
            self.outside.apply(table)
        }
    }

    /// Applies the last table again for the interfaces and addresses there are now: the
    /// routes map is unchanged, `flk_local`, `flk_ifaddr` and the TC links follow the node.
    fn cover_interfaces(&mut self) -> Result<(), RoutingError> {
        if self.table.is_empty() {
            return Ok(());
        }
        let table = std::mem::take(&mut self.table);
        let result = self.program(&table);
        self.table = table;
        result
    }

    fn clear(&mut self) -> Result<(), RoutingError> {
        self.table = RouteTable::default();
        match self.loaded.take() {
            Some(loaded) => {
                loaded.detach_all();
                info!(cgroup = %self.cgroup.display(), "eBPF programs detached");
            }
            // An earlier agent's pinned programs, maps and links go too.
            None => pins::remove_current_namespace()?,
        }
        self.outside.apply(&RouteTable::default())?;
        self.settings
            .lock()
            .map_err(|_| RoutingError::Poisoned)?
            .restore()?;
        Ok(())
    }
}

impl RoutingBackend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        // Loading and verifying the programs takes most of a second: with a route into a
        // container that is about to start, they stay loaded (empty maps route nothing).
        if table.is_empty() && !self.keep_ready {
            // No routes: no programs, no pins, no table, as the node was before.
            return self.clear();
        }
        self.state()?.apply(table)?;
        if self.watcher.is_none() {
            self.watch();
        }
        Ok(())
    }

    fn keep_ready(&mut self, ready: bool) {
        self.keep_ready = ready;
    }

    fn clear(&mut self) -> Result<(), RoutingError> {
        // Stopped before the state is locked: a callback under way holds the lock.
        self.watcher = None;
        self.state()?.clear()
    }

    /// The TC program skips netfilter; only the nftables table, where it carries outside
    /// traffic, can be dropped by a forward filter.
    fn warnings(&self) -> Vec<String> {
        self.state()
            .map(|state| state.outside.warnings())
            .unwrap_or_default()
    }
}

/// The part of `table` the nftables table carries while the TC program is on every
/// interface: no routes (the TC program carries TCP and UDP of both families from outside,
/// the cgroup programs the node's own connections), only the services: those from
/// containers outside the attached cgroup, and every relay.
pub fn nftables_share(table: &RouteTable) -> RouteTable {
    RouteTable {
        services: table.services.clone(),
        ..RouteTable::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::net::SocketAddrV4;

    #[test]
    fn ipv6_map_contents_use_sock_addr_byte_order() {
        let backend: std::net::SocketAddrV6 = "[2001:db8::2]:7000".parse().expect("literal");
        let table = RouteTable {
            entries6: [(RouteKey::udp(53), RouteEntry::Remote { node: backend })].into(),
            ..RouteTable::default()
        };
        let entries = route6_entries(&table);
        assert_eq!(entries.len(), 1);
        let (key, value) = entries.iter().next().expect("one entry");
        assert_eq!(*key, route_key(RouteKey::udp(53)));
        // The words as the kernel stores user_ip6 on this host: network-order bytes.
        let bytes: Vec<u8> = value[..4].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, backend.ip().octets());
        assert_eq!(
            value[4],
            port_key(7000) | REMOTE_FLAG,
            "a backend on another node: the TC program translates the source too"
        );
        let local = local6_entries([
            "::1".parse().expect("literal"),
            "2001:db8::1".parse().expect("literal"),
            "::".parse().expect("literal"),
        ]);
        assert_eq!(
            local,
            BTreeSet::from([addr6_key("2001:db8::1".parse().expect("literal"))])
        );
    }

    #[test]
    fn map_contents_use_sock_addr_byte_order() {
        let table = RouteTable {
            entries: [
                (
                    RouteKey::tcp(80),
                    RouteEntry::Remote {
                        node: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80),
                    },
                ),
                (
                    RouteKey::tcp(6379),
                    RouteEntry::Local {
                        container: SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), 7000),
                    },
                ),
                (
                    RouteKey::udp(53),
                    RouteEntry::Local {
                        container: SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 3), 5353),
                    },
                ),
            ]
            .into(),
            ..RouteTable::default()
        };
        let rendered: Vec<String> = route_entries(&table)
            .iter()
            .map(|(k, [a, p])| {
                format!(
                    "{:02x?} -> {:02x?} {:02x?}",
                    k.to_ne_bytes(),
                    a.to_ne_bytes(),
                    p.to_ne_bytes()
                )
            })
            .collect();
        expect![[r#"
            [
                "[00, 50, 06, 00] -> [c6, 12, 00, 02] [00, 50, 01, 00]",
                "[18, eb, 06, 00] -> [ac, 11, 00, 02] [1b, 58, 00, 00]",
                "[00, 35, 11, 00] -> [ac, 11, 00, 03] [14, e9, 00, 00]",
            ]
        "#]]
        .assert_debug_eq(&rendered);
    }

    #[test]
    fn service_entries_key_by_address_and_port_like_connect_sees_them() {
        let mut table = ServiceTable::default();
        table.services.insert(
            crate::ServiceKey {
                address: Ipv4Addr::new(198, 19, 128, 7),
                protocol: Protocol::Tcp,
                port: 6379,
            },
            RouteEntry::Remote {
                node: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 30001),
            },
        );
        table.relays.insert(
            RouteKey::tcp(30002),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
        );
        let rendered: Vec<String> = service_entries(&table)
            .iter()
            .map(|([a, k], [b, p])| {
                format!(
                    "{:02x?} {:02x?} -> {:02x?} {:02x?}",
                    a.to_ne_bytes(),
                    k.to_ne_bytes(),
                    b.to_ne_bytes(),
                    p.to_ne_bytes()
                )
            })
            .collect();
        assert_eq!(
            rendered,
            vec![
                "[c6, 13, 80, 07] [18, eb, 06, 00] -> [c6, 12, 00, 02] [75, 31, 00, 00]"
                    .to_string()
            ],
            "relays stay out of the socket-level map"
        );
    }

    #[test]
    fn tc_goes_on_every_interface_with_a_node_address_of_either_family() {
        let addrs = NodeAddresses {
            v4: vec![
                ("lo".to_owned(), Ipv4Addr::LOCALHOST),
                ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 1)),
                ("docker0".to_owned(), Ipv4Addr::new(172, 17, 0, 1)),
                ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 9)),
            ],
            v6: vec![
                ("lo".to_owned(), Ipv6Addr::LOCALHOST),
                ("eth1".to_owned(), "2001:db8::1".parse().expect("literal")),
                ("veth7".to_owned(), "fe80::1".parse().expect("literal")),
            ],
        };
        assert_eq!(
            tc_interfaces(&addrs),
            BTreeSet::from(["docker0".to_owned(), "eth0".to_owned(), "eth1".to_owned()]),
            "a link-local address alone makes no interface the node's"
        );
    }

    #[test]
    fn translated_ipv6_flows_leave_with_their_interfaces_first_global_address() {
        let addrs = [
            ("eth0".to_owned(), "fe80::1".parse().expect("literal")),
            ("eth0".to_owned(), "2001:db8::1".parse().expect("literal")),
            ("eth0".to_owned(), "2001:db8::9".parse().expect("literal")),
            (
                "docker0".to_owned(),
                "fd00:19:1::1".parse().expect("literal"),
            ),
        ];
        let interfaces = BTreeSet::from([("eth0".to_owned(), 2), ("docker0".to_owned(), 5)]);
        assert_eq!(
            interface_addresses6(&addrs, &interfaces),
            BTreeMap::from([
                (2, addr6_key("2001:db8::1".parse().expect("literal"))),
                (5, addr6_key("fd00:19:1::1".parse().expect("literal"))),
            ])
        );
    }

    #[test]
    fn nftables_carries_only_services_beside_the_tc_program() {
        let mut table = RouteTable {
            entries: [
                (RouteKey::tcp(80), local(80)),
                (RouteKey::udp(53), local(53)),
            ]
            .into(),
            ..RouteTable::default()
        };
        table.services.relays.insert(
            RouteKey::tcp(30002),
            SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), 80),
        );
        let share = nftables_share(&table);
        assert!(share.entries.is_empty() && share.entries6.is_empty());
        assert_eq!(share.services, table.services);
    }

    fn local(port: u16) -> RouteEntry {
        RouteEntry::Local {
            container: SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), port),
        }
    }

    #[test]
    fn translated_connections_leave_with_their_interfaces_first_address() {
        let addrs = [
            ("lo".to_owned(), Ipv4Addr::LOCALHOST),
            ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 1)),
            ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 9)),
            ("docker0".to_owned(), Ipv4Addr::new(172, 17, 0, 1)),
        ];
        let interfaces = BTreeSet::from([
            ("eth0".to_owned(), 2),
            ("docker0".to_owned(), 5),
            ("gone0".to_owned(), 7),
        ]);
        assert_eq!(
            interface_addresses(&addrs, &interfaces),
            BTreeMap::from([
                (2, addr_key(Ipv4Addr::new(198, 18, 0, 1))),
                (5, addr_key(Ipv4Addr::new(172, 17, 0, 1))),
            ])
        );
    }

    #[test]
    fn loopback_is_never_a_node_address() {
        let local = local_entries([
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::UNSPECIFIED,
        ]);
        assert_eq!(
            local,
            BTreeSet::from([addr_key(Ipv4Addr::new(198, 18, 0, 1))])
        );
    }
}
