//! The eBPF backend's UDP idle timeout, with real programs in network namespaces: a node, an
//! outside client on a bridge with it, and a "container" namespace behind the node running a
//! UDP echo server. A UDP flow the TC program carries is over after the configured idle time
//! (`EbpfOptions::udp_idle`, the agent's `--udp-idle-timeout`): the client's next datagram
//! starts a new flow, which `flk_stats` counts. A datagram within the idle time keeps its flow.
//! The default (120 s) is loaded again by a "restarted agent" over the same pins, and then a
//! pause as long as before keeps the flow.
//!
//! Needs root and `ip`.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, ensure};
use flocker_e2e::netns::{Cgroup, Netns, Switch, veth};
use flocker_routing::{
    BackendChoice, BackendConfig, RouteEntry, RouteKey, RouteTable, RoutingBackend,
    ebpf::EbpfOptions, open_backend,
};

// This test uses two of the suites' helpers.
#[allow(dead_code)]
mod common;
use common::{pin_dir, serve_udp, udp_exchange};

const PORT: u16 = 7300;
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 2);
/// The idle time under test: short enough for a test, long against the exchanges' timing.
const IDLE: Duration = Duration::from_secs(2);
/// How long the client pauses to let its flow go idle (longer than `IDLE` by a margin for the
/// kernel's coarse clock).
const PAUSE: Duration = Duration::from_millis(3500);

struct Lab {
    node: Netns,
    cgroup: Cgroup,
    outside: Netns,
    _container: Netns,
    _switch: Switch,
    state: tempfile::TempDir,
}

impl Lab {
    fn build() -> anyhow::Result<Lab> {
        let mut switch = Switch::create("uisw")?;
        let node = Netns::create("uin1")?;
        switch.plug(&node, "eth0", &format!("{NODE}/24"))?;
        let outside = Netns::create("uiout")?;
        switch.plug(&outside, "eth0", "198.18.7.100/24")?;
        let container = Netns::create("uic1")?;
        veth(&node, "ctr0", &container, "eth0")?;
        node.ip(&["addr", "add", "198.19.77.1/24", "dev", "ctr0"])?;
        container.ip(&["addr", "add", &format!("{CONTAINER}/24"), "dev", "eth0"])?;
        container.ip(&["route", "add", "default", "via", "198.19.77.1"])?;
        serve_udp(&container, SocketAddr::from((CONTAINER, PORT)), "c1")?;
        Ok(Lab {
            cgroup: Cgroup::create("uin1")?,
            node,
            outside,
            _container: container,
            _switch: switch,
            state: tempfile::tempdir()?,
        })
    }

    /// The eBPF backend on the node, as the agent opens it, with `options`.
    fn open(&self, options: EbpfOptions) -> anyhow::Result<Box<dyn RoutingBackend>> {
        let config = BackendConfig {
            choice: BackendChoice::Ebpf,
            cgroup_path: Some(self.cgroup.path().to_owned()),
            settings_journal: Some(flocker_routing::settings::journal_path(
                self.state.path(),
                self.node.name(),
            )),
            ebpf: options,
        };
        Ok(self.node.run(|| open_backend(&config))??)
    }

    fn apply(
        &self,
        backend: &mut Box<dyn RoutingBackend>,
        table: &RouteTable,
    ) -> anyhow::Result<()> {
        self.node
            .run(|| backend.apply(table))?
            .context("applying the routes")
    }

    /// UDP flows the node's TC program has started so far.
    fn udp_flows_started(&self) -> anyhow::Result<u64> {
        Ok(self
            .node
            .run(flocker_routing::ebpf::pinned_stats)??
            .started
            .ipv4_udp)
    }
}

impl Drop for Lab {
    /// A failed run leaves no pins behind (they outlive the namespace otherwise).
    fn drop(&mut self) {
        if let Ok(dir) = pin_dir(&self.node) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn table() -> RouteTable {
    let container = SocketAddrV4::new(CONTAINER, PORT);
    RouteTable {
        entries: [(RouteKey::udp(PORT), RouteEntry::Local { container })].into(),
        ..RouteTable::default()
    }
}

/// One exchange through the node; checks the echo and that it came from the node's address.
fn exchange(socket: &UdpSocket, payload: &str) -> anyhow::Result<()> {
    let to = SocketAddrV4::new(NODE, PORT);
    let (reply, from) = udp_exchange(socket, to, payload.as_bytes())?
        .with_context(|| format!("no answer to {payload:?} through {to}"))?;
    ensure!(
        reply == format!("c1:{payload}").as_bytes(),
        "answer to {payload:?}: {:?}",
        String::from_utf8_lossy(&reply)
    );
    ensure!(
        from == SocketAddr::V4(to),
        "answer came from {from}, not {to}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, ip, and eBPF (cgroup v2, TC)"]
fn an_idle_udp_flow_ends_after_the_configured_time() -> anyhow::Result<()> {
    let lab = Lab::build()?;
    let mut backend = lab.open(EbpfOptions { udp_idle: IDLE })?;
    lab.apply(&mut backend, &table())?;
    let client = lab.outside.run(|| UdpSocket::bind("0.0.0.0:0"))??;

    let before = lab.udp_flows_started()?;
    exchange(&client, "first")?;
    let first = lab.udp_flows_started()?;
    ensure!(
        first == before + 1,
        "the first datagram started {} flows, not 1",
        first - before
    );
    exchange(&client, "within the idle time")?;
    ensure!(
        lab.udp_flows_started()? == first,
        "a datagram within the idle time started a new flow"
    );

    std::thread::sleep(PAUSE);
    exchange(&client, "after the idle time")?;
    let second = lab.udp_flows_started()?;
    ensure!(
        second == first + 1,
        "after {PAUSE:?} idle (timeout {IDLE:?}) the next datagram started {} flows, not 1",
        second - first
    );

    // A restarted agent with the default timeout: the same pause keeps the flow.
    drop(backend);
    let mut backend = lab.open(EbpfOptions::default())?;
    lab.apply(&mut backend, &table())?;
    exchange(&client, "after the restart")?;
    let third = lab.udp_flows_started()?;
    std::thread::sleep(PAUSE);
    exchange(&client, "after the same pause")?;
    ensure!(
        lab.udp_flows_started()? == third,
        "with the default idle timeout a {PAUSE:?} pause started a new flow"
    );

    lab.node.run(|| backend.clear())??;
    Ok(())
}
