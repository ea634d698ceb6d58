//! The IPv6 dimension of the routing conformance suite, run against both backends in a
//! dual-stack lab: three nodes and an outside client on one bridge, each node with an address
//! from 198.18.0.0/24 and one from 2001:db8::/64, and a "container" namespace on the `docker0`
//! bridge of nodes 1 and 2 with addresses from 198.19.N.0/24 and fd00:19:N::/64, each running
//! TCP and UDP echo servers on both families that prefix their reply with their name.
//!
//! Every case runs over IPv6 for TCP and UDP (UDP answers must come from the address the
//! client sent to), with an IPv4 check beside it so that the one `inet` table is seen to carry
//! both families at once: from outside to the hosting node (local backend) and to the other
//! nodes (remote backend), from each node itself, a container reaching its own node (hairpin),
//! a move (with a UDP client that keeps its socket), a restart of the backends with
//! connections open across it, removal, and a foreign table of each family left untouched.
//!
//! With the eBPF backend, the nodes' own IPv6 connections are redirected at the socket by
//! `connect6`/`sendmsg6`/`recvmsg6` (checked: none of them is DNAT'd), and IPv6 TCP and UDP
//! from outside (local and remote backends, hairpin) by the TC program (checked: it started
//! flows of both protocols on every node, and no nftables table exists).
//!
//! There is no dockerd here (the IPv4 suite in `conformance.rs` runs under Docker's rules):
//! Docker 20.10 leaves ip6tables alone, and the containers are plain namespaces on a bridge
//! made by hand. Each node gets the ip6tables rules Docker 27 and later make (`ip6tables`
//! on by default): `ip6 filter FORWARD` dropping by policy after a jump to `DOCKER-USER`, so
//! the nftables backend's IPv6 routes must put their accept rule there (checked), and the
//! eBPF backend's TC program goes past it. Needs root, `ip`, `nft`, `ip6tables`, `conntrack`
//! and `socat`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use flocker_e2e::netns::{Cgroup, Netns, Switch};
use flocker_routing::{BackendChoice, RouteKey, RouteTable, StaticResolver, conntrack};
use flocker_wire::{Protocol, Route, RouteTarget};

mod common;
use common::{
    UDP_TRIES, apply_all, expect_docker_user_rule, load_nft, nft, open_all, pin_dir, run_in, serve,
    serve_udp, tc_flows_started, udp_exchange,
};

const PORT: u16 = 7000;

fn node_ip(i: usize) -> String {
    format!("198.18.0.{}", i + 1)
}

fn node_ip6(i: usize) -> String {
    format!("2001:db8::{}", i + 1)
}

const OUTSIDE_IP6: &str = "2001:db8::100";

struct Lab {
    state: tempfile::TempDir,
    nodes: Vec<Netns>,
    cgroups: Vec<Cgroup>,
    outside: Netns,
    containers: Vec<Netns>,
    // Dropped last: the bridge the others are plugged into.
    _switch: Switch,
}

/// `ip addr add` without duplicate address detection, so an IPv6 address works at once.
fn add_address(ns: &Netns, cidr: &str, dev: &str) -> anyhow::Result<()> {
    if cidr.contains(':') {
        ns.ip(&["addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ns.ip(&["addr", "add", cidr, "dev", dev])
    }
}

impl Lab {
    fn build(tag: &str) -> anyhow::Result<Lab> {
        let mut switch = Switch::create(&format!("{tag}sw"))?;
        let mut nodes = Vec::new();
        let mut cgroups = Vec::new();
        for i in 0..3 {
            let node = Netns::create(&format!("{tag}n{}", i + 1))?;
            switch.plug(&node, "eth0", &format!("{}/24", node_ip(i)))?;
            add_address(&node, &format!("{}/64", node_ip6(i)), "eth0")?;
            node.ip(&["link", "add", "docker0", "type", "bridge"])?;
            add_address(&node, &format!("198.19.{}.1/24", i + 1), "docker0")?;
            add_address(&node, &format!("fd00:19:{}::1/64", i + 1), "docker0")?;
            node.ip(&["link", "set", "docker0", "up"])?;
            // Docker's ip6tables rules, as Docker 27 and later make them.
            for rule in [
                &["-N", "DOCKER-USER"][..],
                &["-A", "DOCKER-USER", "-j", "RETURN"],
                &["-A", "FORWARD", "-j", "DOCKER-USER"],
                &["-P", "FORWARD", "DROP"],
            ] {
                run_in(&node, "ip6tables", rule)?;
            }
            nodes.push(node);
            cgroups.push(Cgroup::create(&format!("{tag}n{}", i + 1))?);
        }
        let outside = Netns::create(&format!("{tag}out"))?;
        switch.plug(&outside, "eth0", "198.18.0.100/24")?;
        add_address(&outside, &format!("{OUTSIDE_IP6}/64"), "eth0")?;
        let mut containers = Vec::new();
        for (i, node) in nodes.iter().take(2).enumerate() {
            let c = Netns::create(&format!("{tag}c{}", i + 1))?;
            flocker_e2e::netns::veth(node, "ctr0", &c, "eth0")?;
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
            add_address(&c, &format!("198.19.{}.2/24", i + 1), "eth0")?;
            add_address(&c, &format!("fd00:19:{}::2/64", i + 1), "eth0")?;
            c.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{}.1", i + 1),
            ])?;
            c.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:19:{}::1", i + 1),
            ])?;
            containers.push(c);
        }
        // Container networks are reachable through their node.
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
                    node.ip(&[
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:19:{}::/64", c + 1),
                        "via",
                        &node_ip6(c),
                    ])?;
                }
            }
        }
        for (i, name) in ["c1", "c2"].into_iter().enumerate() {
            let v4: SocketAddr = format!("198.19.{}.2:{PORT}", i + 1).parse()?;
            let v6: SocketAddr = format!("[fd00:19:{}::2]:{PORT}", i + 1).parse()?;
            for addr in [v4, v6] {
                serve(&containers[i], addr, name)?;
                serve_udp(&containers[i], addr, name)?;
            }
        }
        Ok(Lab {
            state: tempfile::tempdir()?,
            nodes,
            cgroups,
            outside,
            containers,
            _switch: switch,
        })
    }
}

/// The route tables of every node when `host` (node index) runs the application, TCP and UDP
/// on `PORT`, for both families: nodes are named by their IPv6 address, the container has an
/// address of each family, so IPv4 routes to other nodes come from the resolver's map.
fn tables(host: usize) -> anyhow::Result<Vec<RouteTable>> {
    let resolver = StaticResolver {
        containers: [("echo".to_owned(), format!("198.19.{}.2", host + 1).parse()?)].into(),
        containers6: [(
            "echo".to_owned(),
            format!("fd00:19:{}::2", host + 1).parse()?,
        )]
        .into(),
        nodes: (0..3)
            .map(|i| Ok((node_ip6(i), node_ip(i).parse()?)))
            .collect::<anyhow::Result<_>>()?,
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
                    address: node_ip6(host),
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

/// One TCP exchange from `ns`, in this process: the reply, or why there was none.
fn tcp_exchange(ns: &Netns, to: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    ns.run(|| -> anyhow::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(payload)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        Ok(reply)
    })?
}

/// One TCP exchange through socat from inside `cgroup` in `ns` (a process is needed to be in
/// a cgroup): the node's own connections, where the eBPF backend's cgroup hooks apply.
fn tcp_exchange_in_cgroup(
    ns: &Netns,
    cgroup: &Path,
    to: SocketAddr,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let target = match to {
        SocketAddr::V4(a) => format!("TCP4:{a},connect-timeout=3"),
        SocketAddr::V6(a) => format!("TCP6:{a},connect-timeout=3"),
    };
    let mut child = ns
        .command_in_cgroup(cgroup, "socat")
        .args(["-t", "3", "-", &target])
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
    ensure!(
        out.status.success(),
        "socat to {to}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// A TCP connection to `to` from `ns` (inside `cgroup` if given) is echoed by `expected`.
fn expect_tcp(
    what: &str,
    ns: &Netns,
    cgroup: Option<&Path>,
    to: SocketAddr,
    expected: &str,
) -> anyhow::Result<()> {
    let payload = format!("{what} over TCP").into_bytes();
    let reply = match cgroup {
        Some(cgroup) => tcp_exchange_in_cgroup(ns, cgroup, to, &payload),
        None => tcp_exchange(ns, to, &payload),
    }
    .with_context(|| format!("{what}: TCP to {to}, expected {expected}"))?;
    let want = [expected.as_bytes(), b":", &payload].concat();
    ensure!(
        reply == want,
        "{what}: TCP {to} answered {:?}, expected {expected}",
        String::from_utf8_lossy(&reply)
    );
    Ok(())
}

fn unbound(to: SocketAddr) -> &'static str {
    if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
}

/// A UDP request/response from a fresh socket in `ns` reaches `expected`, and the answer
/// comes from `to`, where the client sent it.
fn expect_udp(what: &str, ns: &Netns, to: SocketAddr, expected: &str) -> anyhow::Result<()> {
    let payload = format!("{what} over UDP").into_bytes();
    let answer = ns.run(|| -> anyhow::Result<_> {
        let socket = UdpSocket::bind(unbound(to))?;
        udp_exchange(&socket, to, &payload)
    })??;
    let Some((reply, from)) = answer else {
        bail!("{what}: no UDP answer from {to}, expected {expected}");
    };
    let want = [expected.as_bytes(), b":", &payload].concat();
    ensure!(
        reply == want,
        "{what}: UDP {to} answered {:?}, expected {expected}",
        String::from_utf8_lossy(&reply)
    );
    ensure!(
        from == to,
        "{what}: the UDP answer came from {from}, not from {to}, where the client sent"
    );
    Ok(())
}

/// As [`expect_udp`], from an unconnected socket of a socat inside `cgroup` (where the eBPF
/// backend's sendmsg6 and recvmsg6 apply): the answer must still come from `to`.
fn expect_udp_in_cgroup(
    what: &str,
    ns: &Netns,
    cgroup: &Path,
    to: SocketAddr,
    expected: &str,
) -> anyhow::Result<()> {
    let payload = format!("{what} over UDP in the cgroup").into_bytes();
    let want = [expected.as_bytes(), b":", &payload].concat();
    let family = if to.is_ipv6() { "UDP6" } else { "UDP4" };
    for _ in 0..UDP_TRIES {
        let mut child = ns
            .command_in_cgroup(cgroup, "socat")
            .args([
                "-d",
                "-d",
                "-t",
                "0.7",
                "-",
                &format!("{family}-SENDTO:{to}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("socat stdin")?
            .write_all(&payload)?;
        let out = child.wait_with_output()?;
        if out.stdout.is_empty() {
            continue;
        }
        ensure!(
            out.stdout == want,
            "{what}: UDP {to} answered {:?}, expected {expected}",
            String::from_utf8_lossy(&out.stdout)
        );
        // socat -d -d logs "received packet with N bytes from AF=10 [ADDR]:PORT".
        let stderr = String::from_utf8_lossy(&out.stderr);
        let source = stderr
            .lines()
            .find_map(|l| l.split_once(" bytes from AF=").map(|(_, a)| a.to_owned()))
            .and_then(|a| a.split_once(' ').map(|(_, a)| a.trim().to_owned()))
            .and_then(|a| a.parse::<SocketAddr>().ok());
        ensure!(
            source == Some(to),
            "{what}: the UDP answer came from {source:?}, not from {to}, where the client sent"
        );
        return Ok(());
    }
    bail!("{what}: no UDP answer from {to} in the cgroup, expected {expected}")
}

/// Connections from node `i`'s own address that were DNAT'd: the nftables path. With the
/// eBPF backend the node's own connections are redirected at the socket instead.
fn own_dnat_entries(node: &Netns, own: &str) -> anyhow::Result<usize> {
    let out = node
        .command("conntrack")
        .args(["-L", "-f", "ipv6", "-s", own, "--dst-nat"])
        .output()
        .context("running conntrack")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn expect_closed(what: &str, ns: &Netns, to: SocketAddr) -> anyhow::Result<()> {
    ensure!(
        tcp_exchange(ns, to, b"x").is_err(),
        "{what}: TCP {to} still answers"
    );
    let answer = ns.run(|| -> anyhow::Result<_> {
        let socket = UdpSocket::bind(unbound(to))?;
        udp_exchange(&socket, to, b"x")
    })??;
    ensure!(answer.is_none(), "{what}: UDP {to} still answers");
    Ok(())
}

fn v6(i: usize) -> anyhow::Result<SocketAddr> {
    Ok(format!("[{}]:{PORT}", node_ip6(i)).parse()?)
}

fn v4(i: usize) -> anyhow::Result<SocketAddr> {
    Ok(format!("{}:{PORT}", node_ip(i)).parse()?)
}

/// Every way in to the port, over IPv6 (TCP and UDP) and IPv4 (TCP), reaches `server`, which
/// runs on node `host`.
fn check_reachable(lab: &Lab, host: usize, server: &str) -> anyhow::Result<()> {
    for i in 0..3 {
        let kind = if i == host { "local" } else { "remote" };
        let what = format!("outside -> node{} ({kind} backend)", i + 1);
        expect_tcp(&what, &lab.outside, None, v6(i)?, server)?;
        expect_udp(&what, &lab.outside, v6(i)?, server)?;
        expect_tcp(&format!("{what}, IPv4"), &lab.outside, None, v4(i)?, server)?;
        let what = format!("node{} itself", i + 1);
        let cgroup = Some(lab.cgroups[i].path());
        expect_tcp(&what, &lab.nodes[i], cgroup, v6(i)?, server)?;
        expect_udp_in_cgroup(&what, &lab.nodes[i], lab.cgroups[i].path(), v6(i)?, server)?;
        expect_tcp(
            &format!("{what}, IPv4"),
            &lab.nodes[i],
            cgroup,
            v4(i)?,
            server,
        )?;
    }
    // The hosting node's container dials its own node's published port (hairpin); the other
    // container dials its node, which forwards on to the host.
    for c in 0..2 {
        let what = format!("container on node{} -> node{0}", c + 1);
        expect_tcp(&what, &lab.containers[c], None, v6(c)?, server)?;
        expect_udp(&what, &lab.containers[c], v6(c)?, server)?;
        expect_tcp(
            &format!("{what}, IPv4"),
            &lab.containers[c],
            None,
            v4(c)?,
            server,
        )?;
    }
    Ok(())
}

/// Tables of both families another program owns, with IPv6 sets and NAT chains of their own.
const FOREIGN: &str = "table ip6 foreign6 {
    set blocked { type ipv6_addr; elements = { 2001:db8::5:5 } }
    chain input { type filter hook input priority 0; policy accept; ct state established accept; tcp dport 9999 counter accept; }
    chain pre { type nat hook prerouting priority -150; policy accept; udp dport 9998 counter; }
}
table inet foreign {
    chain out { type nat hook output priority -150; policy accept; meta nfproto ipv6 tcp dport 9997 counter; }
}
";

/// The settings the backends change in a node's namespace.
fn kernel_settings(node: &Netns) -> anyhow::Result<Vec<String>> {
    use flocker_routing::settings::{IP_FORWARD, IPV6_FORWARD, RESERVED_PORTS};
    node.run(|| {
        [IP_FORWARD, IPV6_FORWARD, RESERVED_PORTS]
            .iter()
            .map(|p| Ok(format!("{p}={}", std::fs::read_to_string(p)?.trim())))
            .collect::<anyhow::Result<Vec<String>>>()
    })?
}

fn conformance(choice: BackendChoice, tag: &str) -> anyhow::Result<()> {
    let lab = Lab::build(tag)?;
    let foreign_node = &lab.nodes[0];
    load_nft(foreign_node, FOREIGN).context("loading the foreign tables")?;
    let foreign = || -> anyhow::Result<String> {
        Ok(nft(foreign_node, &["list", "table", "ip6", "foreign6"])?
            + &nft(foreign_node, &["list", "table", "inet", "foreign"])?)
    };
    let foreign_before = foreign()?;
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

    let mut backends = open_all(&lab.nodes, &lab.cgroups, lab.state.path(), choice)?;
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    let started_before = tc_flows_started(&lab.nodes, choice)?;
    check_reachable(&lab, 0, "c1")?;
    if choice == BackendChoice::Ebpf {
        // The TC program, not a fallback, carried the IPv6 clients from outside: into the
        // hosting node (local backend, and its own container's hairpin), and on from the
        // others (remote backend, source-translated).
        let started = tc_flows_started(&lab.nodes, choice)?;
        for (i, (before, now)) in started_before.iter().zip(&started).enumerate() {
            ensure!(
                now.ipv6_tcp > before.ipv6_tcp && now.ipv6_udp > before.ipv6_udp,
                "node{}: the TC program started no IPv6 TCP or UDP flow ({before:?} -> {now:?})",
                i + 1
            );
        }
    }
    // The nodes' own IPv6 connections: through the table's output chain with nftables, at
    // the socket (connect6, sendmsg6) with eBPF, which leaves nothing to DNAT.
    for (i, node) in lab.nodes.iter().enumerate() {
        let entries = own_dnat_entries(node, &node_ip6(i))?;
        if choice == BackendChoice::Ebpf {
            ensure!(
                entries == 0,
                "{entries} DNAT'd connections from {} itself: connect6/sendmsg6 did not redirect them",
                node.name()
            );
        } else {
            ensure!(
                entries > 0,
                "no DNAT'd connection from {} itself: the output chain did not route them",
                node.name()
            );
        }
    }
    for node in &lab.nodes {
        // The nftables backend's accept rule for what it routes, in ip6tables' DOCKER-USER;
        // the eBPF backend has no table and no rule (its TC program skips netfilter).
        expect_docker_user_rule(node, "ip6tables", choice != BackendChoice::Ebpf)?;
        let ruleset = nft(node, &["list", "ruleset"])?;
        ensure!(
            ruleset.contains("table inet flocker") == (choice != BackendChoice::Ebpf),
            "flocker table in {} (the eBPF backend's TC program carries both families):\n{ruleset}",
            node.name()
        );
        if choice != BackendChoice::Ebpf {
            let map = nft(node, &["list", "map", "inet", "flocker", "routes6"])?;
            for protocol in ["tcp", "udp"] {
                ensure!(
                    map.contains(&format!("{protocol} . {PORT} : ")),
                    "no IPv6 {protocol} route in {}:\n{map}",
                    node.name()
                );
            }
        }
        let forwarding =
            node.run(|| std::fs::read_to_string(flocker_routing::settings::IPV6_FORWARD))??;
        ensure!(
            forwarding.trim() == "1",
            "IPv6 forwarding is off in {} with IPv6 routes installed",
            node.name()
        );
    }

    // Restart: new backend instances rebuild the same ruleset, and connections open across
    // the restart (into the hosting node, and on from another one) carry on.
    let listed: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| nft(n, &["-s", "list", "ruleset"]))
        .collect::<anyhow::Result<_>>()?;
    let mut open_streams = Vec::new();
    for i in [0, 2] {
        let to = v6(i)?;
        let mut stream = lab
            .outside
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"before restart,")?;
        open_streams.push((i, stream));
    }
    // A UDP client that keeps its socket, through the forwarding node, across the restart
    // and then the move.
    let via_node3 = v6(2)?;
    let kept_udp = lab.outside.run(|| UdpSocket::bind("[::]:0"))??;
    let first = udp_exchange(&kept_udp, via_node3, b"before")?;
    ensure!(
        first.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c1:before".as_slice()),
        "IPv6 UDP via node3 before the restart answered {first:?}"
    );
    drop(backends);
    let mut backends = open_all(&lab.nodes, &lab.cgroups, lab.state.path(), choice)?;
    apply_all(&lab.nodes, &mut backends, &tables(0)?)?;
    for (i, mut stream) in open_streams {
        let what = format!("IPv6 connection through node{} across the restart", i + 1);
        let mut reply = Vec::new();
        stream
            .write_all(b"after restart")
            .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
            .and_then(|()| stream.read_to_end(&mut reply))
            .with_context(|| what.clone())?;
        ensure!(
            reply == b"c1:before restart,after restart",
            "{what} answered {:?}",
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
    let again = udp_exchange(&kept_udp, via_node3, b"after")?;
    ensure!(
        again.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c1:after".as_slice()),
        "IPv6 UDP via node3 on the same socket after the restart answered {again:?}"
    );

    // Move the application to node 2: new connections follow at once; the UDP client that
    // kept its socket follows once the janitor forgot its IPv6 conntrack entries (nftables)
    // or at its next datagram (the TC program follows the route at every one).
    let after = tables(1)?;
    ensure!(
        after[2].entries6.contains_key(&RouteKey::udp(PORT)),
        "no IPv6 UDP route on node3 after the move"
    );
    apply_all(&lab.nodes, &mut backends, &after)?;
    check_reachable(&lab, 1, "c2")?;
    let deadline = Instant::now() + conntrack::SETTLE * 20;
    loop {
        let answer = udp_exchange(&kept_udp, via_node3, b"moved")?;
        if answer.as_ref().map(|(r, _)| r.as_slice()) == Some(b"c2:moved".as_slice()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "IPv6 UDP client that kept its socket still answered by {answer:?} after the move"
        );
        std::thread::sleep(conntrack::SETTLE / 2);
    }

    // Remove the routes: the port closes everywhere, for both families; rulesets and
    // settings are as found, the foreign tables untouched.
    apply_all(
        &lab.nodes,
        &mut backends,
        &[
            RouteTable::default(),
            RouteTable::default(),
            RouteTable::default(),
        ],
    )?;
    for (i, node) in lab.nodes.iter().enumerate() {
        expect_closed("removed route", &lab.outside, v6(i)?)?;
        expect_closed("removed route, IPv4", &lab.outside, v4(i)?)?;
        expect_docker_user_rule(node, "ip6tables", false)?;
        ensure!(
            !pin_dir(node)?.exists(),
            "eBPF pins of {} left after the routes were removed",
            node.name()
        );
    }
    ensure!(foreign()? == foreign_before, "the foreign tables changed");
    for (node, before) in lab.nodes.iter().zip(&ruleset_before) {
        let now = nft(node, &["-s", "list", "ruleset"])?;
        ensure!(
            &now == before,
            "ruleset of {} not as found:\n{before}\n---\n{now}",
            node.name()
        );
    }
    for (node, before) in lab.nodes.iter().zip(&settings_before) {
        let now = kernel_settings(node)?;
        ensure!(
            &now == before,
            "kernel settings of {} not restored: {before:?} before, {now:?} now",
            node.name()
        );
    }
    for (node, backend) in lab.nodes.iter().zip(backends.iter_mut()) {
        node.run(|| backend.clear())??;
    }
    Ok(())
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn nftables_backend_conforms_over_ipv6() -> anyhow::Result<()> {
    conformance(BackendChoice::Nftables, "n6")
}

#[test]
#[ignore = "privileged: needs root, nftables, eBPF and network namespaces; `cargo xtask ci` runs it"]
fn ebpf_backend_conforms_over_ipv6() -> anyhow::Result<()> {
    conformance(BackendChoice::Ebpf, "b6")
}
