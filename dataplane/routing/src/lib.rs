//! Routing for the agent: a connection to an application's external port on any node reaches
//! its container. [`RouteTable`] is what a node should route (derived from the wire routes);
//! a [`RoutingBackend`] programs it into the kernel, either nftables over netlink
//! ([`nft::NftBackend`]) or eBPF cgroup hooks plus a TC program for outside traffic, with
//! nftables only where the TC program cannot attach ([`ebpf::EbpfBackend`]). Nothing here shells out.
//!
//! **Architecture invariant:** the pure parts (`table`, `nft::plan`, the map-content functions
//! of `ebpf`, the entry filter of `conntrack`) compute what the kernel should hold as plain
//! data; `nft::netlink`, `conntrack`'s socket calls, `settings` and the aya calls in `ebpf` are
//! the only code that touches the kernel. Netlink sockets are opened per call, in the network
//! namespace of the calling thread.
//!
//! Routes are keyed by protocol and port ([`RouteKey`]): TCP and UDP, each port once per
//! protocol. [`watch`] follows interfaces and addresses through rtnetlink, so the eBPF backend
//! covers a re-created bridge or a new address at once rather than at the next route change.
//!
//! Service addresses ([`ServiceTable`], issue 18): a connection to an application's service
//! address and port reaches its container on this node, or the hosting node's relay port,
//! which accepts only the cluster's node addresses.
//!
//! Known limits:
//! - Services: with the nftables backend, a process of the node itself (not a container)
//!   reaches a service address only when the node has some route covering it (a default
//!   route does): the kernel looks the route up at `connect` before the output chain's DNAT.
//!   The eBPF backend's connect4 rewrites before that. A container dialling its own service
//!   address (hairpin on one bridge port) needs hairpin mode on that port, as for published
//!   ports. The eBPF TC program does not carry relayed connections: they take the nftables
//!   chains. Service addresses are IPv4 only.
//! - Only connections to one of the node's own addresses (`fib daddr type local`).
//!   `127.0.0.1:PORT` and `[::1]:PORT` are not routed: the nftables backend would need
//!   `route_localnet`, and the eBPF backend leaves loopback alone on purpose (a container in the
//!   same cgroup tree dialling its own 127.0.0.1 means itself).
//! - IPv4 and IPv6 are routed separately ([`RouteTable::entries`], [`RouteTable::entries6`]):
//!   an IPv6 client reaches an application only where its backend has an IPv6 address (a
//!   container on a Docker network with IPv6, a node with an IPv6 address). Nothing translates
//!   between the families (no NAT46/64).
//! - IPv6 from outside the node takes the nftables chains with the eBPF backend too: its TC
//!   program handles IPv4 TCP only. Local IPv6 clients are redirected at the socket
//!   (connect6, sendmsg6/recvmsg6). An IPv6 socket dialling an IPv4-mapped node address
//!   (`::ffff:198.18.0.1`) is not redirected by the eBPF backend (connect4 does not see it).
//! - Docker's forward filter is only handled for IPv4 (`ip filter DOCKER-USER`); a Docker
//!   with `ip6tables` enabled (and its IPv6 `FORWARD` policy `DROP`) would drop forwarded
//!   IPv6 connections, and `warnings` does not report `ip6` forward chains yet.
//! - With IPv6 routes installed, IPv6 forwarding is on, and Linux then ignores router
//!   advertisements on interfaces whose `accept_ra` is 1: a node configured by SLAAC needs
//!   `accept_ra = 2` on its uplink.
//! - UDP from outside the node always takes the nftables chains, also with the eBPF backend:
//!   its TC program carries IPv4 TCP only. Local UDP clients are redirected at the socket
//!   (connect4, sendmsg4/recvmsg4), with replies given the address the client sent to.
//! - The nftables backend masquerades the connections it DNATs (needed for forwarding and
//!   hairpin), so a local container sees the node's address, not the outside client's. The
//!   eBPF backend's TC program translates the source only for forwarded and hairpin
//!   connections, so a local container sees outside clients as they are.
//! - The eBPF backend reserves ports 61000-65535 (`ip_local_reserved_ports`) for the source
//!   ports it translates to. Linux's default ephemeral range ends at 60999; where a node's
//!   range reaches further, its own connects lose those ports. Each (node address, backend)
//!   pair has 4,536 of them, and a port is reused 10 s after its connection closed, which
//!   bounds new connections forwarded through a node that does not host the application to
//!   about 450 per second per backend.
//! - Hairpin through a Linux bridge with the nftables backend: where `br_netfilter` is loaded
//!   (dockerd loads it), a container dialling its own published port is DNAT'd inside the
//!   bridge and sent back out of the port it came in on, which needs hairpin mode on that
//!   bridge port (Docker sets it when its userland proxy is off). We leave Docker's ports
//!   alone; the eBPF backend's TC program handles hairpin before the bridge code sees it.
//! - A forward filter that drops by policy: the nftables table marks the connections it
//!   DNATs and keeps one accept rule for that mark in Docker's `DOCKER-USER` chain
//!   (`nft::docker_user`), which gets them past Docker's `FORWARD` policy `DROP`. A dropping
//!   forward chain anywhere else (firewalld, a hand-made `FORWARD DROP` without Docker, a
//!   legacy iptables table) is not changed; it is reported by `RoutingBackend::warnings` and
//!   logged loudly. The eBPF backend's TC path skips netfilter and is not affected.
//! - Moving or removing a route deletes a map element, and committing a transaction that
//!   deletes anything waits for an RCU grace period (10-20 ms here). The nftables backend
//!   expedites grace periods for the length of such a transaction (`rcu`), which brings a move
//!   to about 0.1 ms; where `/sys/kernel/rcu_expedited` cannot be written it stays slow.
//! - Conntrack entries of a moved port are forgotten on a worker thread shortly after the
//!   change (`conntrack::Janitor`), not before `apply` returns.
#![deny(unsafe_code)]

pub mod conntrack;
pub mod ebpf;
pub mod mounts;
pub mod nft;
pub mod pins;
pub mod rcu;
pub mod services;
pub mod settings;
pub mod table;
pub mod watch;

use std::path::PathBuf;

use tracing::{info, warn};

pub use services::{ServiceKey, ServiceTable};
pub use table::{
    AddressResolver, IpFamily, Protocol, RouteEntry, RouteEntry6, RouteKey, RouteTable,
    StaticResolver, TableError, TableErrors,
};

/// Anything a backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("nftables")]
    Netlink(#[from] nft::NetlinkError),
    #[error("our rule in Docker's DOCKER-USER chain")]
    DockerUser(#[from] nft::docker_user::DockerUserError),
    #[error("eBPF")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("kernel settings")]
    Settings(#[from] settings::SettingsError),
    #[error("a routing thread panicked holding the kernel settings")]
    Poisoned,
    #[error("eBPF pins")]
    Pins(#[from] pins::PinError),
}

/// Programs a node's route table into the kernel.
pub trait RoutingBackend: Send {
    /// `"nftables"` or `"ebpf"`.
    fn name(&self) -> &'static str;
    /// Makes the kernel route exactly `table`, replacing whatever this backend installed
    /// before, in one atomic step per kernel object. Idempotent. An empty table removes
    /// everything, like [`RoutingBackend::clear`].
    fn apply(&mut self, table: &RouteTable) -> Result<(), RoutingError>;
    /// [`RoutingBackend::apply`] for routes switched away from a backend that still serves
    /// (a move, before the old container stops): connections already tracked to it are
    /// left to finish there instead of being forgotten, which would cut their replies off.
    /// Backends whose established connections survive a route change anyway keep the
    /// default.
    fn apply_keeping_connections(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        self.apply(table)
    }
    /// Whether routes into this node's own containers are recorded, some perhaps left out
    /// of the table until their container runs (a move's target between the switch of the
    /// routes and the start). A backend whose set-up is slow then keeps it while the table is
    /// empty, so the route takes effect at once when the container starts; with `false`
    /// again, an empty table removes everything. Default: nothing to keep.
    fn keep_ready(&mut self, _ready: bool) {}
    /// Removes everything this backend installed, and puts back the kernel settings it
    /// changed.
    fn clear(&mut self) -> Result<(), RoutingError>;
    /// Problems that keep routed connections from getting through (a forward filter that
    /// drops them), as sentences for logs and the health endpoint.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// eBPF where the kernel allows it, else nftables.
    #[default]
    Auto,
    Nftables,
    Ebpf,
}

/// How to open a backend.
#[derive(Debug, Clone, Default)]
pub struct BackendConfig {
    pub choice: BackendChoice,
    /// The cgroup v2 directory the eBPF programs attach to; the host's root cgroup
    /// (`/sys/fs/cgroup`, or a cgroup2 mount of our own) when `None`.
    pub cgroup_path: Option<PathBuf>,
    /// Where the original values of the kernel settings we change are journaled (in the
    /// agent's state directory), so a restarted agent can put them back; in memory only when
    /// `None`.
    pub settings_journal: Option<PathBuf>,
    /// What the eBPF programs are loaded with (the UDP idle timeout).
    pub ebpf: ebpf::EbpfOptions,
}

/// Opens the chosen backend. `Auto` tries eBPF first and falls back to nftables, logging which
/// one it uses and why.
pub fn open_backend(config: &BackendConfig) -> Result<Box<dyn RoutingBackend>, RoutingError> {
    let settings = settings::KernelSettings::open(config.settings_journal.clone())?.shared();
    let cgroup = config.cgroup_path.as_deref();
    match config.choice {
        BackendChoice::Nftables => {
            info!(
                backend = "nftables",
                "routing backend chosen by configuration"
            );
            Ok(Box::new(nft::NftBackend::with_settings(settings)))
        }
        BackendChoice::Ebpf => {
            let backend = ebpf::EbpfBackend::open(cgroup, settings, config.ebpf)?;
            info!(backend = "ebpf", "routing backend chosen by configuration");
            Ok(Box::new(backend))
        }
        BackendChoice::Auto => match ebpf::EbpfBackend::open(cgroup, settings.clone(), config.ebpf)
        {
            Ok(backend) => {
                info!(backend = "ebpf", "routing backend: eBPF available");
                Ok(Box::new(backend))
            }
            Err(error) => {
                warn!(
                    backend = "nftables",
                    error = %error_chain(&error),
                    "routing backend: eBPF unavailable, falling back to nftables"
                );
                Ok(Box::new(nft::NftBackend::with_settings(settings)))
            }
        },
    }
}

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
