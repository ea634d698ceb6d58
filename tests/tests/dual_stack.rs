//! End to end, dual stack: a three-node cluster whose nodes have an IPv6 address beside
//! their IPv4 one and are named by it (`Cluster::up_dual_stack`), driven only through
//! `flockerctl deploy` and checked from the host on the cluster's bridge. A web server (TCP)
//! and a UDP echo server, each listening on both families in its container, are reachable
//! over IPv6 through every node, before and after they move, with each routing backend; UDP
//! answers come from the address the client sent to. Over IPv4 they answer on the node that
//! runs them (a node named by an IPv6 literal has no IPv4 address for the others to forward
//! to). With the eBPF backend, the TC program's counters show it carried the IPv6 flows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec, METRICS_PORT};
use flocker_e2e::prometheus::scrape;
use flocker_e2e::scenario::{Files, for_each_backend, text};

const APPLICATIONS: &str = "\
version: 1
applications:
  web:
    image: busybox-flocker:latest
    ports:
      - internal: 80
        external: 8080
  echo:
    image: udp-echo-flocker:latest
    command: [\"/usr/bin/socat\", \"UDP6-RECVFROM:5353,fork,ipv6-v6only=0\", \"EXEC:/bin/cat\"]
    ports:
      - internal: 5353
        external: 5353
        protocol: udp
";

const WEB_PORT: u16 = 8080;
const ECHO_PORT: u16 = 5353;
/// How long routes and containers get to settle after a deploy before a check fails.
const SETTLE: Duration = Duration::from_secs(15);

/// A deployment of every node of the cluster, named by its identity (its IPv6 address here),
/// with both applications on `host` (none anywhere without one).
fn deployment(cluster: &Cluster, host: Option<&ClusterNode>) -> String {
    let mut out = String::from("version: 1\nnodes:\n");
    for node in &cluster.nodes {
        let apps = if host.is_some_and(|h| h.name == node.name) {
            "web, echo"
        } else {
            ""
        };
        out.push_str(&format!("  \"{}\": [{apps}]\n", node.identity()));
    }
    out
}

fn deploy_ok(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<()> {
    let out = cluster.flockerctl(&[
        "deploy",
        &deployment.display().to_string(),
        &application.display().to_string(),
    ])?;
    ensure!(
        out.status.success(),
        "deploy failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}

/// `GET /` through `to`: the body the web server answered.
fn http_get(to: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The web server answers through `to` within [`SETTLE`].
fn expect_web(what: &str, to: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let last = match http_get(to) {
            Ok(response) if response.contains("flocker") => return Ok(()),
            Ok(response) => format!("answered {response:?}"),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "{what}: web through {to}: {last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// One datagram to `to` comes back within [`SETTLE`], from `to`.
fn expect_echo(what: &str, to: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let payload = format!("{what} via {to}");
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        socket.send_to(payload.as_bytes(), to)?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            ensure!(
                &buf[..n] == payload.as_bytes(),
                "{what}: UDP echo through {to} answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            ensure!(
                from == to,
                "{what}: UDP echo through {to} answered from {from}"
            );
            return Ok(());
        }
    }
    bail!("{what}: no UDP echo through {to} within {SETTLE:?}")
}

fn v6(node: &ClusterNode, port: u16) -> Result<SocketAddr> {
    node.socket(port)
        .parse()
        .with_context(|| format!("address of {}", node.name))
}

fn v4(node: &ClusterNode, port: u16) -> Result<SocketAddr> {
    Ok(format!("{}:{port}", node.address).parse()?)
}

/// Both applications answer over IPv6 through every node, and over IPv4 through `host`.
fn check_reachable(cluster: &Cluster, host: &ClusterNode, when: &str) -> Result<()> {
    for node in &cluster.nodes {
        let what = format!("{when}, IPv6 through {}", node.name);
        expect_web(&what, v6(node, WEB_PORT)?)?;
        expect_echo(&what, v6(node, ECHO_PORT)?)?;
    }
    let what = format!("{when}, IPv4 through {}", host.name);
    expect_web(&what, v4(host, WEB_PORT)?)?;
    expect_echo(&what, v4(host, ECHO_PORT)?)
}

/// IPv6 flows the eBPF TC program started on `node` so far, (TCP, UDP), from the agent's
/// metrics (sampled from the program's counters every few seconds).
fn tc_ipv6_flows(node: &ClusterNode) -> Result<(f64, f64)> {
    let metrics = scrape(&node.socket(METRICS_PORT))?;
    let started = |protocol| {
        metrics.value(
            "flocker_ebpf_flows_started_total",
            &[("family", "ipv6"), ("protocol", protocol)],
        )
    };
    Ok((started("tcp"), started("udp")))
}

/// Within [`SETTLE`], `node`'s metrics show IPv6 TCP and UDP flows the TC program started
/// since `before`.
fn expect_tc_flows(node: &ClusterNode, before: (f64, f64)) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = tc_ipv6_flows(node)?;
        if now.0 > before.0 && now.1 > before.1 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the TC program of {} started no IPv6 TCP or UDP flow ({before:?} -> {now:?})",
            node.name
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Run as root, one at a time (see `deploy.rs`).
#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_dual_stack_deployment_is_reachable_over_ipv6_before_and_after_a_move() -> Result<()> {
    build_binaries();
    for_each_backend(scenario)
}

fn scenario(routing: &str) -> Result<()> {
    let mut cluster = Cluster::up_dual_stack(ClusterSpec::for_test("e2e6", 3, routing))?;
    cluster.teardown_on_drop = true;
    let [n1, n3] = [0, 2].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", APPLICATIONS);

    let before: Vec<(f64, f64)> = if routing == "ebpf" {
        cluster
            .nodes
            .iter()
            .map(tc_ipv6_flows)
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let first = files.write("d1.yml", &deployment(&cluster, Some(&n1)));
    deploy_ok(&cluster, &first, &apps)?;
    check_reachable(&cluster, &n1, "deployed on n1")?;
    if routing == "ebpf" {
        // From the host, every node's IPv6 traffic comes from outside: the TC program must
        // have carried TCP and UDP on each (n1 to its containers, n2 and n3 on to n1).
        for (node, before) in cluster.nodes.iter().zip(&before) {
            expect_tc_flows(node, *before)?;
        }
    }

    // Move both applications to n3: IPv6 through every node follows.
    let second = files.write("d2.yml", &deployment(&cluster, Some(&n3)));
    deploy_ok(&cluster, &second, &apps)?;
    check_reachable(&cluster, &n3, "moved to n3")?;

    // Removed: nothing answers through any node any more.
    let third = files.write("d3.yml", &deployment(&cluster, None));
    deploy_ok(&cluster, &third, &apps)?;
    for node in &cluster.nodes {
        ensure!(
            http_get(v6(node, WEB_PORT)?).is_err(),
            "web still answers over IPv6 through {} after removal",
            node.name
        );
    }
    Ok(())
}
