//! One conformance suite run against every routing backend, in network namespaces: three nodes
//! and an outside client on a bridge, a "container" namespace on the docker0 bridge of node 1
//! and one on node 2's, each running an echo server that prefixes its reply with its name,
//! over TCP and over UDP on the same port number (two routes, one per protocol). Every UDP
//! exchange also checks that the reply comes from the address the client sent to.
//!
//! Every node runs a real `dockerd`, started as on a real host (forwarding left to Docker), so
//! the suite runs under Docker's defaults: iptables `FORWARD` policy `DROP`, a `DOCKER-USER`
//! chain, `br_netfilter` loaded. Halfway through, dockerd restarts on two nodes (it rewrites
//! its chains) and `DOCKER-USER` is flushed on the third; routing must carry on.
//!
//! Needs root, `ip`, `nft` and `iptables` (only to read rulesets, and to flush a chain as
//! Docker or firewalld may), `dockerd` and `socat` (the clients).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use flocker_e2e::{
    docker::Dockerd,
    netns::{Cgroup, Netns, Switch},
};
use flocker_routing::{BackendChoice, RouteKey, RouteTable, StaticResolver, conntrack};
use flocker_wire::{Protocol, Route, RouteTarget};

mod common;
use common::{
    UDP_TRIES, apply_all, expect_docker_user_rule, load_nft, nft, open_all, pin_dir, run_in, serve,
    serve_udp, tc_flows_started, udp_exchange,
};

const PORT: u16 = 7000;
const UNROUTED_PORT: u16 = 7100;
/// An address node 1 gains while routes are installed.
const NEW_ADDRESS: &str = "198.18.0.201/24";

fn node_ip(i: usize) -> String {
    format!("198.18.0.{}", i + 1)
}

struct Lab {
    // Dropped first: the daemons inside the namespaces.
    dockerds: Vec<Dockerd>,
    /// The agents' state directory: the kernel settings journals.
    state: tempfile::TempDir,
    nodes: Vec<Netns>,
    cgroups: Vec<Cgroup>,
    outside: Netns,
    containers: Vec<Netns>,
    // Dropped last: the bridge the others are plugged into.
    _switch: Switch,
}

impl Lab {
    fn build(tag: &str) -> anyhow::Result<Lab> {
        let mut switch = Switch::create(&format!("{tag}sw"))?;
        let mut nodes = Vec::new();
        let mut cgroups = Vec::new();
        for i in 0..3 {
            let node = Netns::create(&format!("{tag}n{}", i + 1))?;
            switch.plug(&node, "eth0", &format!("{}/24", node_ip(i)))?;
            nodes.push(node);
            cgroups.push(Cgroup::create(&format!("{tag}n{}", i + 1))?);
        }
        let outside = Netns::create(&format!("{tag}out"))?;
        switch.plug(&outside, "eth0", "198.18.0.100/24")?;
        // Each node's dockerd owns the node's container network (docker0, 198.19.N.0/24).
        let mut dockerds = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            dockerds.push(Dockerd::start(
                node,
                &format!("{tag}n{}", i + 1),
                &format!("198.19.{}.1/24", i + 1),
            )?);
            let forward = nft(node, &["list", "chain", "ip", "filter", "FORWARD"])?;
            ensure!(
                forward.contains("policy drop"),
                "dockerd in {} left the FORWARD policy at accept:\n{forward}",
                node.name()
            );
        }
        // The "containers" of nodes 1 and 2 hang off docker0, where Docker's own rules treat
        // them as its containers (their traffic out is accepted, traffic in is not unless
        // published). They are namespaces rather than Docker containers so that the echo
        // servers run in this process.
        let mut containers = Vec::new();
        for (i, node) in nodes.iter().take(2).enumerate() {
            let c = Netns::create(&format!("{tag}c{}", i + 1))?;
            flocker_e2e::netns::veth(node, "ctr0", &c, "eth0")?;
            node.ip(&["link", "set", "ctr0", "master", "docker0"])?;
            // As Docker sets it without its userland proxy: with br_netfilter loaded (dockerd
            // loads it), a hairpin connection DNAT'd in the bridge goes back out of the port
            // it came in on.
            node.ip(&[
                "link",
                "set",
                "ctr0",
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ])?;
            c.ip(&[
                "addr",
                "add",
                &format!("198.19.{}.2/24", i + 1),
                "dev",
                "eth0",
            ])?;
            c.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{}.1", i + 1),
            ])?;
            containers.push(c);
        }
        // Container networks are reachable through their node (what an overlay or static
        // routes give a real cluster).
        for (i, node) in nodes.iter().enumerate() {
            for c in 0..2 {
                if c != i {
                    node.ip(&[
                        "route",
                        "add",
                        &format!("198.19.{}.0/24", c + 1),
                        "via",
                        &node_ip(c),
                    ])?;
                }
            }
        }
        for (i, name) in ["c1", "c2"].into_iter().enumerate() {
            let addr: SocketAddr = format!("198.19.{}.2:{PORT}", i + 1).parse()?;
            serve(&containers[i], addr, name)?;
            serve_udp(&containers[i], addr, name)?;
        }
        serve(
            &nodes[0],
            format!("{}:{UNROUTED_PORT}", node_ip(0)).parse()?,
            "n1",
        )?;
        Ok(Lab {
            dockerds,
            state: tempfile::tempdir()?,
            nodes,
            cgroups,
            outside,
            containers,
            _switch: switch,
        })
    }
}

/// Connects with socat from `ns` (inside `cgroup` if given), sends `payload`, returns the
/// reply, or `None` when the connection fails.
fn dial(ns: &Netns, cgroup: Option<&Path>, ip: &str, port: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let target = format!("TCP:{ip}:{port},connect-timeout=3");
    let mut cmd = match cgroup {
        Some(cg) => ns.command_in_cgroup(cg, "socat"),
        None => ns.command("socat"),
    };
    cmd.args(["-t", "3", "-", &target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().ok()?;
    let mut stdin = child.stdin.take()?;
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output().ok()?;
    let _ = writer.join();
    if !out.status.success() {
        eprintln!(
            "dial {ip}:{port} from {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
}

fn payload(seed: u32) -> Vec<u8> {
    // 64 KiB of non-repeating bytes: more than one segment, so reordering or truncation shows.
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..65_536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Asserts that a connection reaches the server `expected` with the bytes intact.
fn expect_reaches(
    what: &str,
    ns: &Netns,
    cgroup: Option<&Path>,
    ip: &str,
    port: u16,
    expected: &str,
) -> anyhow::Result<()> {
    let data = payload(u32::from(port) ^ ip.len() as u32);
    let Some(reply) = dial(ns, cgroup, ip, port, &data) else {
        bail!("{what}: connection to {ip}:{port} failed, expected to reach {expected}");
    };
    let prefix = format!("{expected}:");
    ensure!(
        reply.starts_with(prefix.as_bytes()),
        "{what}: {ip}:{port} answered {:?}, expected {expected}",
        String::from_utf8_lossy(&reply[..reply.len().min(8)])
    );
    ensure!(
        reply[prefix.len()..] == data[..],
        "{what}: bytes through {ip}:{port} were not echoed intact ({} of {} bytes)",
        reply.len() - prefix.len(),
        data.len()
    );
    Ok(())
}

/// `count` connections in a row from `ns`, each echoed intact by `expected`: enough to cycle
/// through translations (the eBPF backend's source ports, conntrack's entries) rather than
/// one lucky connection.
fn expect_burst(
    what: &str,
    ns: &Netns,
    ip: &str,
    port: u16,
    expected: &str,
    count: u32,
) -> anyhow::Result<()> {
    let addr = std::net::SocketAddrV4::new(ip.parse()?, port);
    ns.run(|| -> anyhow::Result<()> {
        for i in 0..count {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
                    .with_context(|| format!("{what}: connection {i} of {count} to {addr}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let data = i.to_be_bytes();
            stream.write_all(&data)?;
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut reply = Vec::new();
            stream
                .read_to_end(&mut reply)
                .with_context(|| format!("{what}: reply {i} of {count}"))?;
            let want = [format!("{expected}:").as_bytes(), &data[..]].concat();
            ensure!(
                reply == want,
                "{what}: connection {i} of {count} answered {:?}",
                String::from_utf8_lossy(&reply)
            );
        }
        Ok(())
    })?
}

/// How a UDP client addresses the routed port: `sendto` on an unconnected socket (the eBPF
/// backend's sendmsg4/recvmsg4), or `connect` then `send` (connect4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UdpMode {
    SendTo,
    Connected,
}

/// A UDP request/response from `ns` inside `cgroup`, through socat (only a process can be
/// put in a cgroup): the answer, and for `SendTo` the source socat saw it come from.
fn dial_udp_in_cgroup(
    ns: &Netns,
    cgroup: &Path,
    to: SocketAddrV4,
    payload: &[u8],
    mode: UdpMode,
) -> anyhow::Result<Option<(Vec<u8>, Option<String>)>> {
    let target = match mode {
        UdpMode::SendTo => format!("UDP-SENDTO:{to}"),
        UdpMode::Connected => format!("UDP:{to}"),
    };
    for _ in 0..UDP_TRIES {
        let mut child = ns
            .command_in_cgroup(cgroup, "socat")
            .args(["-d", "-d", "-t", "0.7", "-", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("socat stdin")?
            .write_all(payload)?;
        let out = child.wait_with_output()?;
        if out.stdout.is_empty() {
            continue;
        }
        // socat -d -d logs "received packet with N bytes from AF=2 IP:PORT".
        let stderr = String::from_utf8_lossy(&out.stderr);
        let source = stderr.lines().find_map(|l| {
            l.split_once("bytes from AF=2 ")
                .map(|(_, a)| a.trim().to_owned())
        });
        return Ok(Some((out.stdout, source)));
    }
    Ok(None)
}

/// Asserts a UDP request/response through `to` reaches the server `expected`, from a fresh
/// socket in `ns` (inside `cgroup` if given), and that the answer comes from `to`.
fn expect_udp_reaches(
    what: &str,
    ns: &Netns,
    cgroup: Option<&Path>,
    to: SocketAddrV4,
    expected: &str,
    mode: UdpMode,
) -> anyhow::Result<()> {
    let payload = format!("{what} {mode:?}").into_bytes();
    let want = [expected.as_bytes(), b":", &payload].concat();
    let (reply, source) = match cgroup {
        Some(cgroup) => {
            let Some((reply, source)) = dial_udp_in_cgroup(ns, cgroup, to, &payload, mode)? else {
                bail!("{what}: no UDP answer from {to} ({mode:?}), expected {expected}");
            };
            (reply, source)
        }
        None => {
            let exchanged = ns.run(|| -> anyhow::Result<_> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                if mode == UdpMode::Connected {
                    socket.connect(to)?;
                }
                udp_exchange(&socket, to, &payload)
            })??;
            let Some((reply, from)) = exchanged else {
                bail!("{what}: no UDP answer from {to} ({mode:?}), expected {expected}");
            };
            (reply, Some(from.to_string()))
        }
    };
    ensure!(
        reply == want,
        "{what}: UDP {to} answered {:?}, expected {:?}",
        String::from_utf8_lossy(&reply),
        String::from_utf8_lossy(&want)
    );
    if mode == UdpMode::SendTo {
        ensure!(
            source.as_deref() == Some(to.to_string().as_str()),
            "{what}: the UDP answer came from {source:?}, not from {to}, where the client sent"
        );
    }
    Ok(())
}

fn expect_udp_closed(what: &str, ns: &Netns, to: SocketAddrV4) -> anyhow::Result<()> {
    let answer = ns.run(|| -> anyhow::Result<_> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        udp_exchange(&socket, to, b"x")
    })??;
    ensure!(answer.is_none(), "{what}: UDP {to} still answers");
    Ok(())
}

/// Within a second of `since`, a connection from `ns` to `ip:port` is echoed by `expected`
/// (the bound for covering a changed interface without a route change).
fn expect_within_a_second(
    what: &str,
    ns: &Netns,
    since: Instant,
    ip: &str,
    port: u16,
    expected: &str,
) -> anyhow::Result<()> {
    let addr = SocketAddrV4::new(ip.parse()?, port);
    let want = [expected.as_bytes(), b":", what.as_bytes()].concat();
    let deadline = since + Duration::from_secs(1);
    loop {
        let attempt = ns.run(|| -> anyhow::Result<Vec<u8>> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200))?;
            stream.set_read_timeout(Some(Duration::from_millis(300)))?;
            stream.write_all(what.as_bytes())?;
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply)?;
            Ok(reply)
        })?;
        let last = match attempt {
            Ok(reply) if reply == want => return Ok(()),
            Ok(reply) => format!("answered {:?}", String::from_utf8_lossy(&reply)),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "{what}: {addr} does not work within a second ({last}, {:?} after the change)",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes node `i`'s container bridge and makes it again as Docker had it (address, the
/// container's port with hairpin on): no route changes.
fn recreate_bridge(lab: &Lab, i: usize) -> anyhow::Result<()> {
    let node = &lab.nodes[i];
    node.ip(&["link", "del", "docker0"])?;
    node.ip(&["link", "add", "docker0", "type", "bridge"])?;
    node.ip(&[
        "addr",
        "add",
        &format!("198.19.{}.1/24", i + 1),
        "dev",
        "docker0",
    ])?;
    node.ip(&["link", "set", "docker0", "up"])?;
    node.ip(&["link", "set", "ctr0", "master", "docker0"])?;
    node.ip(&[
        "link",
        "set",
        "ctr0",
        "type",
        "bridge_slave",
        "hairpin",
        "on",
    ])?;
    Ok(())
}

fn expect_closed(what: &str, ns: &Netns, ip: &str, port: u16) -> anyhow::Result<()> {
    ensure!(
        dial(ns, None, ip, port, b"x").is_none(),
        "{what}: {ip}:{port} still answers"
    );
    Ok(())
}

/// A listed ruleset as its tables' chains, sets and maps, each with its table's name, in
/// sorted order: dockerd recreates its chains when it restarts, which changes the order
/// they are listed in but not what they hold.
fn chains_of(ruleset: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut table = "";
    let mut block: Option<String> = None;
    for line in ruleset.lines() {
        if line.starts_with("table ") {
            table = line;
        } else if let Some(current) = block.as_mut() {
            current.push_str(line);
            current.push('\n');
            if line == "\t}" {
                blocks.extend(block.take());
            }
        } else if line.starts_with('\t') && line.ends_with('{') {
            block = Some(format!("{table}\n{line}\n"));
        }
    }
    blocks.sort();
    blocks
}

/// The per-namespace settings the backends change, and the host's RCU switch.
fn kernel_settings(node: &Netns) -> anyhow::Result<Vec<String>> {
    use flocker_routing::settings::{
        IP_FORWARD, RCU_EXPEDITED, RESERVED_PORTS, RP_FILTER_ALL, RP_FILTER_DEFAULT,
    };
    node.run(|| {
        [
            IP_FORWARD,
            RP_FILTER_ALL,
            RP_FILTER_DEFAULT,
            RESERVED_PORTS,
            RCU_EXPEDITED,
        ]
        .iter()
        .map(|p| Ok(format!("{p}={}", std::fs::read_to_string(p)?.trim())))
        .collect::<anyhow::Result<Vec<String>>>()
    })?
}

const FOREIGN: &str = "table ip foreign {
    set blocked { type ipv4_addr; elements = { 198.18.5.5 } }
    chain input { type filter hook input priority 0; policy accept; ct state established accept; tcp dport 9999 counter accept; }
    chain pre { type nat hook prerouting priority -150; policy accept; tcp dport 9998 counter; }
}
";

/// The route tables of every node when `host` (node index) runs the application: TCP and
/// UDP on `PORT`.
fn tables(host: usize) -> anyhow::Result<Vec<RouteTable>> {
    let resolver = StaticResolver {
        containers: [(
            "echo".to_owned(),
            format!("198.19.{}.2", host + 1).parse::<Ipv4Addr>()?,
        )]
        .into(),
        ..StaticResolver::default()
    };
    (0..3)
        .map(|i| {
            let target = if i == host {
                RouteTarget::Local {
                    internal_port: PORT,
                }
            } else {
                RouteTarget::Node {
                    address: node_ip(host),
                }
            };
            let routes = Protocol::ALL.map(|protocol| Route {
                external_port: PORT,
                protocol,
                application: "echo".to_owned(),
                target: target.clone(),
            });
            RouteTable::from_wire(&routes, &resolver).context("deriving the route table")
        })
        .collect()
}

/// Every way in to the port reaches the server named `server` on node `host`.
fn check_reachable(lab: &Lab, host: usize, server: &str) -> anyhow::Result<()> {
    for i in 0..3 {
        let ip = node_ip(i);
        expect_reaches(
            &format!("outside -> node{}", i + 1),
            &lab.outside,
            None,
            &ip,
            PORT,
            server,
        )?;
        expect_reaches(
            &format!("node{} itself", i + 1),
            &lab.nodes[i],
            Some(lab.cgroups[i].path()),
            &ip,
            PORT,
            server,
        )?;
        // A container on a node other than the host, dialling every node.
        let other = if host == 0 { 1 } else { 0 };
        expect_reaches(
            &format!("container on node{} -> node{}", other + 1, i + 1),
            &lab.containers[other],
            Some(lab.cgroups[other].path()),
            &ip,
            PORT,
            server,
        )?;
    }
    // Containers outside the connect4 cgroup (as Docker's are), dialling their own node: the
    // one hosting the application reaches itself (hairpin), the other goes on to the host.
    for c in 0..2 {
        expect_reaches(
            &format!("container on node{} -> node{0}, outside the cgroup", c + 1),
            &lab.containers[c],
            None,
            &node_ip(c),
            PORT,
            server,
        )?;
    }
    check_udp_reachable(lab, host, server)
}

/// Every way in to the UDP port reaches `server` on node `host`, answering from the address
/// the client sent to.
fn check_udp_reachable(lab: &Lab, host: usize, server: &str) -> anyhow::Result<()> {
    let other = if host == 0 { 1 } else { 0 };
    for i in 0..3 {
        let to = SocketAddrV4::new(node_ip(i).parse()?, PORT);
        let node = format!("node{}", i + 1);
        expect_udp_reaches(
            &format!("UDP outside -> {node}"),
            &lab.outside,
            None,
            to,
            server,
            UdpMode::SendTo,
        )?;
        for mode in [UdpMode::SendTo, UdpMode::Connected] {
            expect_udp_reaches(
                &format!("UDP {node} itself"),
                &lab.nodes[i],
                Some(lab.cgroups[i].path()),
                to,
                server,
                mode,
            )?;
            expect_udp_reaches(
                &format!("UDP container on node{} -> {node}", other + 1),
                &lab.containers[other],
                Some(lab.cgroups[other].path()),
                to,
                server,
                mode,
            )?;
        }
    }
    for c in 0..2 {
        expect_udp_reaches(
            &format!(
                "UDP container on node{} -> node{0}, outside the cgroup",
                c + 1
            ),
            &lab.containers[c],
            None,
            SocketAddrV4::new(node_ip(c).parse()?, PORT),
            server,
            UdpMode::SendTo,
        )?;
    }
    Ok(())
}

fn conformance(choice: BackendChoice, tag: &str, name: &str) -> anyhow::Result<()> {
    let lab = Lab::build(tag)?;
    load_nft(&lab.nodes[0], FOREIGN).context("loading the foreign table")?;
    // Stateless (no counters): Docker's rules count the packets that pass.
    let ruleset_before: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| nft(n, &["-s", "list", "ruleset"]))
        .collect::<anyhow::Result<_>>()?;
    let settings_before: Vec<Vec<String>> = lab
        .nodes
        .iter()
        .map(kernel_settings)
        .collect::<anyhow::Result<_>>()?;
    let foreign_before = nft(&lab.nodes[0], &["list", "table", "ip", "foreign"])?;

    let mut backends = open_all(&lab.nodes, &lab.cgroups, lab.state.path(), choice)?;
    for b in &backends {
        ensure!(b.name() == name, "opened {} instead of {name}", b.name());
    }

    // The application on node 1.
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    // Applying the same table again changes nothing (idempotent).
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    for node in &lab.nodes {
        // The nftables backend's table comes with our rule; the eBPF backend's TC program
        // carries TCP and UDP from outside past netfilter, so it needs neither.
        expect_docker_user_rule(node, "iptables", choice != BackendChoice::Ebpf)?;
    }
    let started_before = tc_flows_started(&lab.nodes, choice)?;
    check_reachable(&lab, 0, "c1")?;
    if choice == BackendChoice::Ebpf {
        // The TC program, not a fallback, carried the outside clients: on the hosting node
        // (local backend, and the hairpin of its own container) and on the forwarding ones,
        // for TCP and for UDP.
        let started = tc_flows_started(&lab.nodes, choice)?;
        for (i, (before, now)) in started_before.iter().zip(&started).enumerate() {
            ensure!(
                now.ipv4_tcp > before.ipv4_tcp && now.ipv4_udp > before.ipv4_udp,
                "node{}: the TC program started no IPv4 TCP or UDP flow ({before:?} -> {now:?})",
                i + 1
            );
        }
    }
    // Many connections, into the hosting node and on from another one.
    expect_burst(
        "burst into node1",
        &lab.outside,
        &node_ip(0),
        PORT,
        "c1",
        300,
    )?;
    expect_burst(
        "burst via node3",
        &lab.outside,
        &node_ip(2),
        PORT,
        "c1",
        300,
    )?;
    if choice == BackendChoice::Ebpf {
        // Flows go with their connections: node 1 forgets both sides, node 3 keeps only the
        // translated source ports (of the burst and the few connections before it) until
        // they may be reused.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let tcp_flows = || flocker_routing::ebpf::pinned_flow_counts(Protocol::Tcp);
            let (fwd1, rev1) = lab.nodes[0].run(tcp_flows)??;
            let (fwd3, rev3) = lab.nodes[2].run(tcp_flows)??;
            if fwd1 <= 2 && rev1 <= 2 && fwd3 <= 2 && (300..=320).contains(&rev3) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "flows after the bursts (client side/backend side): node1 {fwd1}/{rev1}, \
                 node3 {fwd3}/{rev3}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The agent's metrics read the same maps: TCP flows gone with their connections
        // (UDP flows stay until idle), and 300 translated connections never ran out of
        // source ports.
        for node in [&lab.nodes[0], &lab.nodes[2]] {
            let stats = node.run(flocker_routing::ebpf::pinned_stats)??;
            let (udp_flows, _) =
                node.run(|| flocker_routing::ebpf::pinned_flow_counts(Protocol::Udp))??;
            ensure!(
                stats.flows <= 2 + udp_flows as u64 && stats.snat_exhausted == 0,
                "data plane figures after the bursts: {stats:?}, {udp_flows} UDP flows"
            );
        }
    }
    // The hosting node's container bridge is deleted and made again, and the node gains an
    // address, with no route change: connections from outside work again within a second
    // (the eBPF backend's TC program must be on the new bridge to turn the replies around,
    // and the new address must be one it knows as the node's).
    recreate_bridge(&lab, 0)?;
    let since = Instant::now();
    expect_within_a_second(
        "through the re-created bridge",
        &lab.outside,
        since,
        &node_ip(0),
        PORT,
        "c1",
    )?;
    lab.nodes[0].ip(&["addr", "add", NEW_ADDRESS, "dev", "eth0"])?;
    let since = Instant::now();
    let new_ip = NEW_ADDRESS.trim_end_matches("/24");
    expect_within_a_second("to a new address", &lab.outside, since, new_ip, PORT, "c1")?;
    expect_udp_reaches(
        "UDP to a new address",
        &lab.outside,
        None,
        SocketAddrV4::new(new_ip.parse()?, PORT),
        "c1",
        UdpMode::SendTo,
    )?;
    check_reachable(&lab, 0, "c1")?;
    expect_reaches(
        "unrouted port",
        &lab.outside,
        None,
        &node_ip(0),
        UNROUTED_PORT,
        "n1",
    )?;
    expect_closed(
        "unrouted port elsewhere",
        &lab.outside,
        &node_ip(1),
        UNROUTED_PORT,
    )?;
    ensure!(
        nft(&lab.nodes[0], &["list", "table", "ip", "foreign"])? == foreign_before,
        "the foreign table changed"
    );

    // Restart: new backend instances rebuild exactly the same ruleset. The eBPF backend's
    // TC program carries all outside traffic, so it has no table.
    let listed: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| nft(n, &["-s", "list", "ruleset"]))
        .collect::<anyhow::Result<_>>()?;
    for (node, ruleset) in lab.nodes.iter().zip(&listed) {
        // The TC program's translated source ports are kept from the node's own sockets.
        let reserved =
            node.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports"))??;
        ensure!(
            (choice == BackendChoice::Ebpf) == reserved.contains("61000-65535"),
            "ip_local_reserved_ports in {} is {reserved:?}",
            node.name()
        );
        let pinned = pin_dir(node)?;
        ensure!(
            (choice == BackendChoice::Ebpf) == pinned.exists(),
            "{} exists: {}",
            pinned.display(),
            pinned.exists()
        );
        ensure!(
            ruleset.contains("table inet flocker") == (choice != BackendChoice::Ebpf),
            "flocker table in {} (the eBPF backend's TC program carries TCP and UDP itself):\n{ruleset}",
            node.name()
        );
        if choice != BackendChoice::Ebpf {
            let map = nft(node, &["list", "map", "inet", "flocker", "routes"])?;
            for protocol in ["tcp", "udp"] {
                ensure!(
                    map.contains(&format!("{protocol} . {PORT}")),
                    "no {protocol} route in {}:\n{map}",
                    node.name()
                );
            }
        }
    }
    // Connections open across the restart, into the hosting node and on from another one,
    // carry on: the routes outlive the backend instances (for eBPF, pinned programs and maps,
    // whose programs the new instances replace in place).
    // An interface that goes away while the backend is down: its pinned TC link must not
    // outlive the next backend's first apply.
    let node3 = &lab.nodes[2];
    node3.ip(&[
        "link", "add", "gone0", "type", "veth", "peer", "name", "gone1",
    ])?;
    node3.ip(&["addr", "add", "198.18.9.3/32", "dev", "gone0"])?;
    node3.ip(&["link", "set", "gone0", "up"])?;
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    let gone_pinned = || -> anyhow::Result<bool> {
        let Ok(builds) = std::fs::read_dir(pin_dir(node3)?) else {
            return Ok(false);
        };
        Ok(builds
            .flatten()
            .any(|build| build.path().join("link-tc-gone0").exists()))
    };
    ensure!(
        gone_pinned()? == (choice == BackendChoice::Ebpf),
        "pinned TC link of gone0: {}",
        gone_pinned()?
    );
    // A UDP client that keeps its socket across the restart, through the forwarding node.
    let udp_via_node3 = SocketAddrV4::new(node_ip(2).parse()?, PORT);
    let kept_udp = lab.outside.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    let first = udp_exchange(&kept_udp, udp_via_node3, b"before")?;
    ensure!(
        first.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c1:before".as_slice()),
        "UDP via node3 before the restart answered {first:?}"
    );
    let mut open_streams = Vec::new();
    for i in [0, 2] {
        let addr = std::net::SocketAddrV4::new(node_ip(i).parse()?, PORT);
        let mut stream = lab
            .outside
            .run(|| std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"before restart,")?;
        open_streams.push((i, stream));
    }
    drop(backends);
    node3.ip(&["link", "del", "gone0"])?;
    let mut backends = open_all(&lab.nodes, &lab.cgroups, lab.state.path(), choice)?;
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    ensure!(
        !gone_pinned()?,
        "the TC link of an interface that went away is still pinned"
    );
    for (i, mut stream) in open_streams {
        let what = format!("connection through node{} across the restart", i + 1);
        let mut reply = Vec::new();
        stream
            .write_all(b"after restart")
            .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
            .and_then(|()| stream.read_to_end(&mut reply))
            .with_context(|| what.clone())?;
        ensure!(
            reply == b"c1:before restart,after restart",
            "connection through node{} across the restart answered {:?}",
            i + 1,
            String::from_utf8_lossy(&reply)
        );
    }
    for (node, before) in lab.nodes.iter().zip(&listed) {
        let after = nft(node, &["-s", "list", "ruleset"])?;
        ensure!(
            &after == before,
            "restart changed the ruleset:\n{before}\n---\n{after}"
        );
    }
    expect_reaches("after restart", &lab.outside, None, &node_ip(2), PORT, "c1")?;
    let again = udp_exchange(&kept_udp, udp_via_node3, b"after")?;
    ensure!(
        again.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c1:after".as_slice()),
        "UDP via node3 on the same socket after the restart answered {again:?}"
    );

    // dockerd restarts on nodes 1 and 3 (it rewrites its chains on start), and DOCKER-USER is
    // flushed on node 2 (as firewalld reloads or other Docker versions do): our rule comes
    // back by itself, and everything still routes.
    let mut lab = lab;
    for i in [0, 2] {
        lab.dockerds[i].restart()?;
    }
    // Rewritten as its owner would: flushed, then its own rule put back.
    run_in(&lab.nodes[1], "iptables", &["-F", "DOCKER-USER"])?;
    run_in(
        &lab.nodes[1],
        "iptables",
        &["-A", "DOCKER-USER", "-j", "RETURN"],
    )?;
    for node in &lab.nodes {
        let forward = nft(node, &["list", "chain", "ip", "filter", "FORWARD"])?;
        ensure!(
            forward.contains("policy drop"),
            "FORWARD policy after the restart:\n{forward}"
        );
        expect_docker_user_rule(node, "iptables", choice != BackendChoice::Ebpf)?;
    }
    check_reachable(&lab, 0, "c1")?;
    expect_burst(
        "burst via node3 after dockerd restarted",
        &lab.outside,
        &node_ip(2),
        PORT,
        "c1",
        50,
    )?;

    // Move the application to node 2: new connections follow.
    // Conntrack entries of TCP connections to `port` on a node, narrowed by `filter`.
    let count = |node: &Netns, port: u16, filter: &[&str]| -> anyhow::Result<usize> {
        let out = node
            .command("conntrack")
            .args(["-L", "-p", "tcp", "--orig-port-dst", &port.to_string()])
            .args(filter)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    };
    let tracked = |node: &Netns, port: u16| count(node, port, &["--dst-nat"]);
    // The eBPF backend's TC program carries outside connections past netfilter, whether to a
    // local container or on to the hosting node: no node tracks any of them (node 1 runs
    // conntrack for the foreign table's nat chain, so there it is the bypass that shows).
    // With nftables every node DNATs and tracks them.
    // `entries` counted on node `i`: none with eBPF, some (`missing` says what their absence
    // means) with nftables.
    let expect_tracking = |i: usize, entries: usize, missing: &str| -> anyhow::Result<()> {
        let name = lab.nodes[i].name();
        if choice == BackendChoice::Ebpf {
            ensure!(
                entries == 0,
                "{entries} conntrack entries in {name}: the TC fast path was not taken"
            );
        } else {
            ensure!(entries > 0, "{missing} in {name}");
        }
        Ok(())
    };
    for (i, node) in lab.nodes.iter().enumerate() {
        expect_tracking(i, tracked(node, PORT)?, "no conntrack entries to forget")?;
    }
    let all_tracked = |node: &Netns, port: u16| count(node, port, &[]);
    let unrelated = all_tracked(&lab.nodes[0], UNROUTED_PORT)?;
    ensure!(unrelated > 0, "no conntrack entry for the unrouted port");
    let (before, after) = (tables(0)?, tables(1)?);
    let backend = |tables: &[RouteTable], i: usize| -> anyhow::Result<String> {
        let entry = tables[i]
            .entries
            .get(&RouteKey::tcp(PORT))
            .context("no route for PORT")?;
        Ok(entry.backend().ip().to_string())
    };
    // DNAT'd entries of PORT on a node whose connection went to `target`.
    let tracked_to =
        |node: &Netns, target: &str| count(node, PORT, &["--dst-nat", "--reply-src", target]);
    apply_all(&lab.nodes, &mut backends, &after)?;
    // New connections right after the move, while the janitor has yet to run.
    check_reachable(&lab, 1, "c2")?;
    // The UDP client that kept its socket follows too: with nftables once the janitor forgot
    // the conntrack entry that pinned its flow to the old backend (UDP has no end: without
    // the janitor a client that keeps sending would stay with c1 for good), with eBPF at its
    // next datagram (the TC program follows the route at every one).
    let deadline = Instant::now() + conntrack::SETTLE * 20;
    loop {
        let answer = udp_exchange(&kept_udp, udp_via_node3, b"moved")?;
        if answer.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c2:moved".as_slice()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "UDP client that kept its socket still answered by {answer:?} after the move"
        );
        std::thread::sleep(conntrack::SETTLE / 2);
    }
    // The janitor forgets the stale entries once the routes have settled, off the apply
    // path, and leaves those of connections made after the move alone.
    let deadline = Instant::now() + conntrack::SETTLE * 20;
    for (i, node) in lab.nodes.iter().enumerate() {
        while tracked_to(node, &backend(&before, i)?)? > 0 {
            ensure!(
                Instant::now() < deadline,
                "conntrack entries of the moved port survive in {}",
                node.name()
            );
            std::thread::sleep(conntrack::SETTLE / 4);
        }
    }
    std::thread::sleep(conntrack::SETTLE * 3);
    for (i, node) in lab.nodes.iter().enumerate() {
        expect_tracking(
            i,
            tracked_to(node, &backend(&after, i)?)?,
            "entries of connections made after the move were forgotten",
        )?;
    }

    // Remove the route: the port closes everywhere, rulesets are as found.
    apply_all(
        &lab.nodes,
        &mut backends,
        &[
            RouteTable::default(),
            RouteTable::default(),
            RouteTable::default(),
        ],
    )?;
    for i in 0..3 {
        expect_docker_user_rule(&lab.nodes[i], "iptables", false)?;
        expect_closed("removed route", &lab.outside, &node_ip(i), PORT)?;
        expect_udp_closed(
            "removed UDP route",
            &lab.outside,
            SocketAddrV4::new(node_ip(i).parse()?, PORT),
        )?;
        ensure!(
            dial(
                &lab.nodes[i],
                Some(lab.cgroups[i].path()),
                &node_ip(i),
                PORT,
                b"x"
            )
            .is_none(),
            "removed route still answers from node{} itself",
            i + 1
        );
        // Nothing of the eBPF backend's stays pinned either.
        let pins = pin_dir(&lab.nodes[i])?;
        ensure!(
            !pins.exists(),
            "{} still exists after the routes were removed",
            pins.display()
        );
    }
    expect_reaches(
        "unrouted port after removal",
        &lab.outside,
        None,
        &node_ip(0),
        UNROUTED_PORT,
        "n1",
    )?;
    for (node, before) in lab.nodes.iter().zip(&ruleset_before) {
        ensure!(
            chains_of(&nft(node, &["-s", "list", "ruleset"])?) == chains_of(before),
            "ruleset of {} not as found:\n{before}\n---\n{}",
            node.name(),
            nft(node, &["-s", "list", "ruleset"])?
        );
    }
    // Every kernel setting the backends changed is back as it was.
    for (node, before) in lab.nodes.iter().zip(&settings_before) {
        ensure!(
            &kernel_settings(node)? == before,
            "kernel settings of {} not restored: {before:?} before, {:?} now",
            node.name(),
            kernel_settings(node)?
        );
    }
    for (node, backend) in lab.nodes.iter().zip(backends.iter_mut()) {
        node.run(|| backend.clear())??;
    }
    Ok(())
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn nftables_backend_conforms() -> anyhow::Result<()> {
    conformance(BackendChoice::Nftables, "nf", "nftables")
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn ebpf_backend_conforms() -> anyhow::Result<()> {
    conformance(BackendChoice::Ebpf, "bp", "ebpf")
}

/// Service addresses of the services suite: "one" hosted by container c1 or c2, "two" always
/// by c1 (node 1).
const VIP_ONE: Ipv4Addr = Ipv4Addr::new(198, 19, 130, 1);
const VIP_TWO: Ipv4Addr = Ipv4Addr::new(198, 19, 130, 2);
/// Relay ports of the two services on their hosting nodes.
const RELAY_ONE: u16 = 30001;
const RELAY_TWO: u16 = 30002;

/// Every node's table for services "one" on node `host_one` and "two" on node 1, the way
/// the agent derives it from the route map (`ServiceTable::from_wire`).
fn service_tables(host_one: usize) -> anyhow::Result<Vec<RouteTable>> {
    use flocker_routing::ServiceTable;
    use flocker_wire::ServiceRoute;
    let peers: Vec<String> = (0..3).map(node_ip).collect();
    (0..3)
        .map(|i| {
            let mut containers = std::collections::BTreeMap::new();
            let mut routes = Vec::new();
            for (app, vip, relay, host) in [
                ("one", VIP_ONE, RELAY_ONE, host_one),
                ("two", VIP_TWO, RELAY_TWO, 0),
            ] {
                let target = if i == host {
                    containers.insert(app.to_owned(), format!("198.19.{}.2", host + 1).parse()?);
                    RouteTarget::Local {
                        internal_port: PORT,
                    }
                } else {
                    RouteTarget::Node {
                        address: node_ip(host),
                    }
                };
                routes.push(ServiceRoute {
                    application: app.to_owned(),
                    address: vip,
                    port: PORT,
                    protocol: Protocol::Tcp,
                    relay: Some(relay),
                    target,
                });
            }
            let resolver = StaticResolver {
                containers,
                ..StaticResolver::default()
            };
            Ok(RouteTable {
                services: ServiceTable::from_wire(&routes, &peers, &resolver)?,
                ..Default::default()
            })
        })
        .collect()
}

/// Clients on every node reach service "one" by its address on node `host_one`, and "two"
/// on node 1, whatever the path: a container outside the connect4 cgroup (nftables), the node
/// itself and a container inside the cgroup (eBPF's connect4 where it is attached).
fn check_services(lab: &Lab, host_one: usize) -> anyhow::Result<()> {
    let one = format!("c{}", host_one + 1);
    for (vip, server) in [(VIP_ONE, one.as_str()), (VIP_TWO, "c1")] {
        let vip = vip.to_string();
        for c in 0..2 {
            expect_reaches(
                &format!("container on node{} -> {vip}, outside the cgroup", c + 1),
                &lab.containers[c],
                None,
                &vip,
                PORT,
                server,
            )?;
            expect_reaches(
                &format!("container on node{} -> {vip}, inside the cgroup", c + 1),
                &lab.containers[c],
                Some(lab.cgroups[c].path()),
                &vip,
                PORT,
                server,
            )?;
        }
        for i in 0..3 {
            expect_reaches(
                &format!("node{} itself -> {vip}", i + 1),
                &lab.nodes[i],
                Some(lab.cgroups[i].path()),
                &vip,
                PORT,
                server,
            )?;
        }
    }
    // A relay port answers cluster nodes only, never the outside.
    let relay_host = node_ip(host_one);
    expect_closed(
        "outside -> relay port",
        &lab.outside,
        &relay_host,
        RELAY_ONE,
    )?;
    let peer = (host_one + 2) % 3;
    expect_reaches(
        &format!("node{} -> relay port of node{}", peer + 1, host_one + 1),
        &lab.nodes[peer],
        None,
        &relay_host,
        RELAY_ONE,
        &one,
    )?;
    Ok(())
}

fn services_by_name(choice: BackendChoice, tag: &str) -> anyhow::Result<()> {
    let lab = Lab::build(tag)?;
    // As on a real host, the nodes have a default route (here to the outside namespace,
    // which drops what it is sent): a local process's connect to a service address needs a
    // route before the output chain's DNAT can run (eBPF's connect4 rewrites before that).
    for node in &lab.nodes {
        node.ip(&["route", "add", "default", "via", "198.18.0.100"])?;
    }
    let mut backends = open_all(&lab.nodes, &lab.cgroups, lab.state.path(), choice)?;
    apply_all(&lab.nodes, &mut backends, &service_tables(1)?)?;
    check_services(&lab, 1).context("service one on node 2")?;
    // The move: service one now runs on node 1, next to two (and to the client c1).
    apply_all(&lab.nodes, &mut backends, &service_tables(0)?)?;
    check_services(&lab, 0).context("service one moved to node 1")?;
    // Services alone keep the table; without them it goes.
    for (node, backend) in lab.nodes.iter().zip(backends.iter_mut()) {
        node.run(|| backend.apply(&RouteTable::default()))??;
        let ruleset = nft(node, &["list", "ruleset"])?;
        ensure!(
            !ruleset.contains("table ip flocker"),
            "{}: table left after the services went:\n{ruleset}",
            node.name()
        );
    }
    expect_closed(
        "a service address after removal",
        &lab.containers[1],
        &VIP_TWO.to_string(),
        PORT,
    )?;
    Ok(())
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn nftables_backend_routes_services_by_address() -> anyhow::Result<()> {
    services_by_name(BackendChoice::Nftables, "sn")
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn ebpf_backend_routes_services_by_address() -> anyhow::Result<()> {
    services_by_name(BackendChoice::Ebpf, "sb")
}
