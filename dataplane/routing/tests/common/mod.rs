//! What the routing conformance suites share (`conformance.rs`, IPv4 under Docker's rules, and
//! `conformance_ipv6.rs`, dual stack): backends opened and applied on every node as the agent
//! does it, echo servers, UDP exchanges, reading rulesets and chains, and the eBPF backend's
//! pins and counters.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use flocker_e2e::netns::{Cgroup, Netns};
use flocker_routing::{BackendChoice, BackendConfig, RouteTable, RoutingBackend, open_backend};

/// TCP echo server: reads until EOF, answers `NAME:` followed by what it read.
pub fn serve(ns: &Netns, addr: SocketAddr, name: &'static str) -> anyhow::Result<()> {
    let listener = ns.run(move || TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if stream.read_to_end(&mut data).is_ok() {
                    let _ = stream.write_all(name.as_bytes());
                    let _ = stream.write_all(b":");
                    let _ = stream.write_all(&data);
                }
            });
        }
    });
    Ok(())
}

/// UDP echo server: answers each datagram with `NAME:` and the datagram, to its sender.
pub fn serve_udp(ns: &Netns, addr: SocketAddr, name: &'static str) -> anyhow::Result<()> {
    let socket = ns.run(move || UdpSocket::bind(addr))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let reply = [name.as_bytes(), b":", &buf[..n]].concat();
            let _ = socket.send_to(&reply, from);
        }
    });
    Ok(())
}

/// How long a UDP client waits for an answer to one datagram, and how often it sends it: a
/// bound, not a speed requirement (answers take well under a millisecond here).
pub const UDP_WAIT: Duration = Duration::from_millis(700);
pub const UDP_TRIES: u32 = 3;

/// One datagram from `socket` to `to` and the answer, with where it came from; `None` when no
/// answer came after `UDP_TRIES` sends.
pub fn udp_exchange(
    socket: &UdpSocket,
    to: impl Into<SocketAddr>,
    payload: &[u8],
) -> anyhow::Result<Option<(Vec<u8>, SocketAddr)>> {
    let to = to.into();
    socket.set_read_timeout(Some(UDP_WAIT))?;
    let mut buf = [0u8; 2048];
    for _ in 0..UDP_TRIES {
        socket.send_to(payload, to)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Ok(Some((buf[..n].to_vec(), from))),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// A backend of `choice` for every node, as the agent opens it: a restarted backend learns
/// from the journal in `state` which settings the one before it changed, and what they were.
pub fn open_all(
    nodes: &[Netns],
    cgroups: &[Cgroup],
    state: &Path,
    choice: BackendChoice,
) -> anyhow::Result<Vec<Box<dyn RoutingBackend>>> {
    nodes
        .iter()
        .zip(cgroups)
        .map(|(node, cg)| {
            let config = BackendConfig {
                choice,
                cgroup_path: Some(cg.path().to_owned()),
                settings_journal: Some(flocker_routing::settings::journal_path(state, node.name())),
                ..BackendConfig::default()
            };
            Ok(node.run(|| open_backend(&config))??)
        })
        .collect()
}

/// Applies each node's table with its backend, in its namespace.
pub fn apply_all(
    nodes: &[Netns],
    backends: &mut [Box<dyn RoutingBackend>],
    tables: &[RouteTable],
) -> anyhow::Result<()> {
    for ((node, backend), table) in nodes.iter().zip(backends.iter_mut()).zip(tables) {
        node.run(|| backend.apply(table))?
            .with_context(|| format!("applying routes in {}", node.name()))?;
    }
    Ok(())
}

/// Flows the eBPF backend's TC program started on every node so far (none for nftables).
pub fn tc_flows_started(
    nodes: &[Netns],
    choice: BackendChoice,
) -> anyhow::Result<Vec<flocker_routing::ebpf::FlowsStarted>> {
    nodes
        .iter()
        .map(|node| {
            if choice != BackendChoice::Ebpf {
                return Ok(Default::default());
            }
            Ok(node.run(flocker_routing::ebpf::pinned_stats)??.started)
        })
        .collect()
}

/// Where the eBPF backend pins its maps and links for the namespace `ns`.
pub fn pin_dir(ns: &Netns) -> anyhow::Result<PathBuf> {
    let inode = std::fs::metadata(ns.path())?.ino();
    Ok(flocker_routing::pins::namespace_dir(inode))
}

pub fn nft(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    run_in(ns, "nft", args)
}

/// Loads an nft script into `ns` (tables of another program).
pub fn load_nft(ns: &Netns, script: &str) -> anyhow::Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    ensure!(child.wait()?.success(), "loading an nft script");
    Ok(())
}

pub fn run_in(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = ns
        .command(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Within 3 s, `DOCKER-USER` of `iptables` (or `ip6tables`) holds our accept rule exactly
/// once and first (`present`) or not at all; read through iptables, which proves Docker's own
/// iptables calls still parse the chain.
pub fn expect_docker_user_rule(node: &Netns, iptables: &str, present: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let chain = run_in(node, iptables, &["-S", "DOCKER-USER"])?;
        let ours = chain
            .lines()
            .filter(|l| l.contains(flocker_routing::nft::docker_user::RULE_COMMENT))
            .collect::<Vec<_>>();
        let ok = if present {
            ours.len() == 1
                && ours[0].contains("-m connmark --mark 0x800000/0x800000")
                && ours[0].ends_with("-j ACCEPT")
                && chain.lines().nth(1).is_some_and(|first| first == ours[0])
        } else {
            ours.is_empty()
        };
        if ok {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{iptables} DOCKER-USER in {} (our rule expected: {present}):\n{chain}",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
