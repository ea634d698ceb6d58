//! A Flocker cluster on one machine: each node a network namespace on a bridge, with its own
//! address from 198.18.0.0/15, its own `dockerd`, its own zfs-fuse pool and its own
//! `flocker-agent` holding a certificate from the cluster CA. The host itself sits on the
//! bridge at 198.18.0.1 and plays the outside client.
//!
//! A dual-stack cluster ([`Cluster::up_dual_stack`]) gives every node an IPv6 address from
//! `fd00:18::/64` beside its IPv4 one (and the host `fd00:18::1` on the same host-local
//! bridge), and every dockerd an IPv6 container network `fd00:19:N::/64`. Its nodes are named
//! by their IPv6 address (in deployments, certificates and the agents' `--node-address`), so
//! an application is reachable over IPv6 through every node; over IPv4 only through the node
//! that runs it, since a node named by an IPv6 literal has no IPv4 address for the others to
//! forward to (naming nodes by a DNS name with both records gives both).
//!
//! [`Cluster::up_with_zfs_per_node`] gives every node a zfs-fuse daemon of its own in a mount
//! namespace of its own, where the node's agent runs too ([`crate::node_zfs`]), so that one
//! node's daemon can be killed alone; its harness-side `zfs`/`zpool` calls go through
//! [`ClusterNode::zfs`] and [`ClusterNode::zpool`], which reach the right daemon in either
//! layout. Every other cluster shares the host's one daemon.
//!
//! Everything the cluster creates is recorded under its directory, so `down` removes every
//! trace even from another process (`cargo xtask cluster down`), and `up` on a running
//! cluster only starts what is missing.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::images;
use crate::node_zfs::NodeZfs;

/// The bridge all nodes hang off, and the host's address on it.
pub const BRIDGE: &str = "flk-br0";
pub const HOST_ADDRESS: &str = "198.18.0.1";
/// The host's IPv6 address on the bridge in a dual-stack cluster (a /64 of `fd00::/8`).
pub const HOST_ADDRESS6: &str = "fd00:18::1";
/// The agents' API port.
pub const AGENT_PORT: u16 = 4523;
/// The port of each agent's Prometheus metrics (plain HTTP on the node's address).
pub const METRICS_PORT: u16 = 9523;

/// One node of the local cluster.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// `n1`, `n2`, ...
    pub name: String,
    /// The node's address on the bridge, e.g. `198.18.0.11`.
    pub address: String,
    /// Its IPv6 address in a dual-stack cluster, e.g. `fd00:18::11`.
    pub address6: Option<String>,
    /// The network namespace, e.g. `flk-n1`.
    pub netns: String,
    /// Where this node's daemons keep their files.
    pub dir: PathBuf,
    /// `unix://.../docker.sock` of the node's dockerd.
    pub docker_host: String,
    /// The node's ZFS pool.
    pub pool: String,
    /// The node's own zfs-fuse and mount namespace, in a cluster whose nodes each have one
    /// ([`Cluster::up_with_zfs_per_node`]); `None`: the host's one daemon serves the pool.
    pub own_zfs: Option<NodeZfs>,
}

impl ClusterNode {
    fn new(root: &Path, index: usize, dual_stack: bool, zfs_per_node: bool) -> ClusterNode {
        let name = format!("n{index}");
        let dir = root.join(&name);
        let (netns, pool) = (format!("flk-{name}"), format!("flk-{name}"));
        ClusterNode {
            address: format!("198.18.0.{}", 10 + index),
            address6: dual_stack.then(|| format!("fd00:18::{}", 10 + index)),
            docker_host: format!("unix://{}", dir.join("docker.sock").display()),
            own_zfs: zfs_per_node.then(|| NodeZfs::new(&netns, &pool)),
            netns,
            pool,
            dir,
            name,
        }
    }

    /// A command run where the node's `zfs` and `zpool` reach its pool: in the node's mount
    /// namespace when it has its own zfs-fuse, else on the host.
    pub fn zfs_command(&self, program: &str) -> Command {
        match &self.own_zfs {
            Some(own) => own.command(program),
            None => Command::new(program),
        }
    }

    /// `zfs ARGS` against the node's pool; stdout, or an error with stderr.
    pub fn zfs(&self, args: &[&str]) -> Result<String> {
        self.run_zfs("zfs", args)
    }

    /// `zpool ARGS` against the node's pool; stdout, or an error with stderr.
    pub fn zpool(&self, args: &[&str]) -> Result<String> {
        self.run_zfs("zpool", args)
    }

    fn run_zfs(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = quiet(self.zfs_command(program).args(args))?;
        if !out.status.success() {
            bail!(
                "{program} {} on {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's agent's command: in the node's network namespace, and in its mount
    /// namespace when it has its own zfs-fuse.
    fn agent_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()));
        if let Some(own) = &self.own_zfs {
            cmd.arg(format!("--mount={}", own.namespace().display()));
        }
        cmd.arg(program);
        cmd
    }

    /// What the cluster names the node by (deployments, certificates, the agent's
    /// `--node-address`): its IPv6 address in a dual-stack cluster, else its IPv4 one.
    pub fn identity(&self) -> &str {
        self.address6.as_deref().unwrap_or(&self.address)
    }

    /// `ADDR:port` (IPv4) or `[ADDR]:port` (IPv6) of the node's identity address.
    pub fn socket(&self, port: u16) -> String {
        match &self.address6 {
            Some(v6) => format!("[{v6}]:{port}"),
            None => format!("{}:{port}", self.address),
        }
    }

    /// The namespace's file, for `setns` and `nsenter --net`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }

    /// A command that runs inside this node's network namespace (nsenter, not
    /// `ip netns exec`, which remounts /sys and hides the cgroup mounts from dockerd).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg(program);
        cmd
    }

    fn agent_pidfile(&self) -> PathBuf {
        self.dir.join("agent.pid")
    }

    /// The agent's log (started anew with each agent).
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The directory of the agent's test hooks (`FLOCKER_TEST_HOOKS`,
    /// `flocker_dataplane::test_hooks`): a file there named after a hook arms it once.
    pub fn test_hooks_dir(&self) -> PathBuf {
        self.dir.join("test-hooks")
    }

    /// The node's own cgroup for the eBPF connect4 programs: the nodes share one host, so
    /// attaching at the root would redirect every process's connects to this node's
    /// container addresses. Empty: processes are redirected by the node they enter.
    fn bpf_cgroup(&self) -> Result<PathBuf> {
        Ok(crate::netns::cgroup2_root()?.join(format!("flocker-cluster-{}", self.netns)))
    }
}

/// Sizes and paths of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Where every file of the cluster lives.
    pub dir: PathBuf,
    /// Size of each node's pool file (sparse).
    pub pool_size: &'static str,
    /// The `flocker-agent` binary.
    pub agent_binary: PathBuf,
    /// The `flockerctl` binary (CA tooling).
    pub ctl_binary: PathBuf,
    /// Routing backend passed to every agent.
    pub routing: String,
    /// More flags for every agent (a benchmark comparing an agent setting).
    pub agent_args: Vec<String>,
}

impl ClusterSpec {
    /// An end-to-end test's cluster: `nodes` nodes with 1 GiB pools, the binaries the test
    /// built (`build_binaries`) and `routing`, under `TMP/flocker-NAME-PID-ROUTING` (one
    /// directory per test, process and backend).
    pub fn for_test(name: &str, nodes: usize, routing: &str) -> ClusterSpec {
        ClusterSpec {
            nodes,
            dir: std::env::temp_dir()
                .join(format!("flocker-{name}-{}-{routing}", std::process::id())),
            pool_size: "1G",
            agent_binary: crate::binaries::binary("flocker-agent"),
            ctl_binary: crate::binaries::binary("flockerctl"),
            routing: routing.into(),
            agent_args: Vec::new(),
        }
    }
}

/// A running local cluster.
#[derive(Debug)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: Vec<ClusterNode>,
    /// Tear down on drop (tests); `cargo xtask cluster up` keeps it.
    pub teardown_on_drop: bool,
    /// Whether the nodes have IPv6 addresses too (and are named by them).
    pub dual_stack: bool,
}

/// How the nodes are laid out beside their network namespaces.
#[derive(Debug, Clone, Copy, Default)]
struct Layout {
    dual_stack: bool,
    zfs_per_node: bool,
}

impl Cluster {
    /// Brings the cluster up, creating only what is not there yet.
    pub fn up(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::start(spec, Layout::default())
    }

    /// [`Cluster::up`] with IPv6 addresses as well (see the module docs).
    pub fn up_dual_stack(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::start(
            spec,
            Layout {
                dual_stack: true,
                ..Layout::default()
            },
        )
    }

    /// [`Cluster::up`] with a zfs-fuse daemon per node, each in a mount namespace of the
    /// node's own where its agent runs too ([`crate::node_zfs`]), so that one node's daemon
    /// can be killed alone. The other tests keep the host's one daemon.
    pub fn up_with_zfs_per_node(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::start(
            spec,
            Layout {
                zfs_per_node: true,
                ..Layout::default()
            },
        )
    }

    fn start(mut spec: ClusterSpec, layout: Layout) -> Result<Cluster> {
        let Layout {
            dual_stack,
            zfs_per_node,
        } = layout;
        fs::create_dir_all(&spec.dir).context("cluster dir")?;
        // The agents run under nsenter, which resolves relative paths from wherever it is.
        spec.dir = absolute(&spec.dir)?;
        spec.agent_binary = absolute(&spec.agent_binary)?;
        spec.ctl_binary = absolute(&spec.ctl_binary)?;
        let nodes: Vec<ClusterNode> = (1..=spec.nodes)
            .map(|i| ClusterNode::new(&spec.dir, i, dual_stack, zfs_per_node))
            .collect();
        let cluster = Cluster {
            spec,
            nodes,
            teardown_on_drop: false,
            dual_stack,
        };
        cluster.say("bridge");
        ensure_bridge(dual_stack)?;
        if !zfs_per_node {
            crate::zfs::ensure_daemon()?;
        }
        cluster.ensure_ca()?;
        for node in &cluster.nodes {
            cluster.ensure_node(node)?;
        }
        for node in &cluster.nodes {
            wait_for_agent(node)?;
        }
        Ok(cluster)
    }

    /// Starts what is missing of one node (namespace, pool, dockerd, images, agent) and waits
    /// for its agent: `up` for a node whose daemons died, leaving the others alone.
    pub fn up_node(&self, node: &ClusterNode) -> Result<()> {
        self.ensure_node(node)?;
        wait_for_agent(node)
    }

    fn ensure_node(&self, node: &ClusterNode) -> Result<()> {
        self.say(&format!("node {} at {}", node.name, node.identity()));
        fs::create_dir_all(&node.dir)?;
        ensure_netns(node)?;
        if let Some(v6) = &node.address6 {
            ensure_address6(&["-n", &node.netns], &format!("{v6}/64"), "eth0")?;
        }
        if !pid_alive(&node.dir.join("docker.pid")) {
            // A dockerd that died hard left orphans and pid files that would stop the
            // next one: clear them first.
            for problem in crate::reap::reap(&node.dir) {
                eprintln!("cluster: {}: {problem}", node.name);
            }
        }
        if let Some(own) = &node.own_zfs {
            own.ensure()
                .with_context(|| format!("the zfs-fuse of {}", node.name))?;
        }
        ensure_pool(node, self.spec.pool_size)?;
        ensure_dockerd(node)?;
        images::ensure_images(&node.docker_host)?;
        self.ensure_agent(node)
    }

    fn say(&self, what: &str) {
        eprintln!("cluster: {what}");
    }

    /// The cluster CA directory (`cluster.crt`, `nodes/`, `users/admin.*`).
    pub fn ca_dir(&self) -> PathBuf {
        self.spec.dir.join("ca")
    }

    fn ensure_ca(&self) -> Result<()> {
        let ca = self.ca_dir();
        let ctl = |args: &[&str]| -> Result<()> {
            let out = Command::new(&self.spec.ctl_binary)
                .args(args)
                .arg("--dir")
                .arg(&ca)
                .output()
                .context("run flockerctl ca")?;
            if !out.status.success() {
                bail!(
                    "flockerctl {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        // A CA from before certificates carried roles has no revocation list; its
        // certificates are refused by today's agents, so they are renewed (with a role).
        let legacy = ca.join("cluster.crt").exists() && !ca.join("cluster.crl").exists();
        if !ca.join("cluster.crt").exists() {
            ctl(&["ca", "init"])?;
        }
        let issue = |role: &str, name: &str| -> Result<()> {
            let sub = if role == "node" { "nodes" } else { "users" };
            if !ca.join(format!("{sub}/{name}.crt")).exists() {
                ctl(&["ca", role, name])
            } else if legacy {
                ctl(&["ca", "renew", role, name])
            } else {
                Ok(())
            }
        };
        issue("user", "admin")?;
        for node in &self.nodes {
            issue("node", node.identity())?;
        }
        Ok(())
    }

    /// Starts the node's agent unless it runs.
    pub fn ensure_agent(&self, node: &ClusterNode) -> Result<()> {
        if pid_alive(&node.agent_pidfile()) {
            return Ok(());
        }
        let ca = self.ca_dir();
        let log = fs::File::create(node.agent_log()).context("agent log")?;
        fs::create_dir_all(node.test_hooks_dir()).context("the agent's test hooks directory")?;
        let mut agent = node.agent_command(&self.spec.agent_binary);
        if self.spec.routing == "ebpf" {
            let cgroup = node.bpf_cgroup()?;
            fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
            agent.arg("--bpf-cgroup").arg(cgroup);
        }
        crate::keep_descriptors_from_daemons();
        let child = agent
            .args(["--node-address", node.identity()])
            .arg("--listen")
            .arg(node.socket(AGENT_PORT))
            .arg("--metrics-listen")
            .arg(node.socket(METRICS_PORT))
            .arg("--docker-host")
            .arg(&node.docker_host)
            .arg("--volumes")
            .arg(format!("zfs:{}", node.pool))
            .arg("--routing")
            .arg(&self.spec.routing)
            .arg("--state-dir")
            .arg(node.dir.join("agent"))
            .arg("--ca-cert")
            .arg(ca.join("cluster.crt"))
            .arg("--cert")
            .arg(ca.join(format!("nodes/{}.crt", node.identity())))
            .arg("--key")
            .arg(ca.join(format!("nodes/{}.key", node.identity())))
            .args(
                Some(ca.join("cluster.crl"))
                    .filter(|crl| crl.exists())
                    .map(|crl| ["--crl".into(), crl.into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.spec.agent_args)
            .env("RUST_LOG", "info")
            .env("FLOCKER_TEST_HOOKS", node.test_hooks_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start flocker-agent")?;
        fs::write(node.agent_pidfile(), child.id().to_string())?;
        Ok(())
    }

    /// Kills a node's agent abruptly (SIGKILL), as a crash would.
    pub fn kill_agent(&self, node: &ClusterNode) -> Result<()> {
        kill_pidfile(&node.agent_pidfile(), "KILL");
        Ok(())
    }

    /// Kills a node's `dockerd` abruptly (SIGKILL), as a crash would: its containerd, shims
    /// and containers live on until the next [`Cluster::up`] reaps them and starts it again.
    pub fn kill_dockerd(&self, node: &ClusterNode) {
        kill_pidfile(&node.dir.join("docker.pid"), "KILL");
    }

    /// Restarts a node's agent and waits for its port.
    pub fn restart_agent(&self, node: &ClusterNode) -> Result<()> {
        kill_pidfile(&node.agent_pidfile(), "TERM");
        sleep(Duration::from_millis(300));
        self.ensure_agent(node)?;
        wait_for_port(&node.socket(AGENT_PORT), Duration::from_secs(30))
    }

    /// Restarts a node's dockerd as a service manager would (SIGTERM, wait, start): Docker
    /// rewrites its iptables chains on start. Its containers are not removed (those without
    /// a restart policy stay stopped, as on a host).
    pub fn restart_dockerd(&self, node: &ClusterNode) -> Result<()> {
        let pidfile = node.dir.join("docker.pid");
        kill_pidfile(&pidfile, "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while pid_alive(&pidfile) {
            if Instant::now() > deadline {
                bail!("dockerd of {} did not stop within 20 s", node.name);
            }
            sleep(Duration::from_millis(200));
        }
        ensure_dockerd(node)
    }

    /// Runs `flockerctl` against this cluster (its CA and user certificate).
    pub fn flockerctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.spec.ctl_binary)
            .args(args)
            .env("FLOCKER_CA_DIR", self.ca_dir())
            .env("FLOCKER_USER", "admin")
            .output()
            .context("run flockerctl")
    }

    /// Removes every trace of the cluster described by `spec`: agents, dockerds (and their
    /// containers), pools, namespaces, the bridge, the directory.
    pub fn down(spec: &ClusterSpec) -> Result<()> {
        for i in 1..=spec.nodes.max(discover_nodes(&spec.dir)) {
            let mut node = ClusterNode::new(&spec.dir, i, false, true);
            // The layout `up` chose shows in what it left: a node's own zfs-fuse directory.
            node.own_zfs = node.own_zfs.filter(NodeZfs::exists);
            kill_pidfile(&node.agent_pidfile(), "TERM");
            stop_dockerd(&node);
            // What a dockerd killed hard leaves (containerd, shims, containers holding the
            // pool's datasets, mounts, pid files) would keep the pool busy.
            for problem in crate::reap::reap(&node.dir) {
                eprintln!("cluster: {}: {problem}", node.name);
            }
            if let Some(own) = &node.own_zfs {
                for problem in own.remove(&node.pool) {
                    eprintln!("cluster: {}: {problem}", node.name);
                }
            } else {
                destroy_pool(&node);
            }
            remove_pool_mountpoint(&node);
            remove_bpf_pins(&node.netns);
            let _ = quiet(Command::new("ip").args(["netns", "del", &node.netns]));
            let _ = quiet(Command::new("ip").args(["link", "del", &format!("{}-h", node.netns)]));
            if let Ok(cgroup) = node.bpf_cgroup() {
                let _ = fs::remove_dir(cgroup);
            }
        }
        let _ = quiet(Command::new("ip").args(["link", "del", BRIDGE]));
        if spec.dir.exists() {
            // Mount points dockerd left inside the directory must be gone before removal.
            let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
            let mut inside: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| Path::new(m).starts_with(&spec.dir))
                .collect();
            inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for mount in inside {
                let _ = quiet(Command::new("umount").args(["-l", mount]));
            }
            fs::remove_dir_all(&spec.dir)
                .with_context(|| format!("remove {}", spec.dir.display()))?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.teardown_on_drop
            && let Err(e) = Cluster::down(&self.spec)
        {
            eprintln!("cluster: teardown failed: {e:#}");
        }
    }
}

/// Removes what an eBPF-routing agent of the namespace `netns` pinned, which outlives the
/// agent on purpose: `/sys/fs/bpf/flocker/net-INODE`, as `flocker_routing::pins` lays it out.
fn remove_bpf_pins(netns: &str) {
    use std::os::unix::fs::MetadataExt as _;
    if let Ok(meta) = fs::metadata(Path::new("/var/run/netns").join(netns)) {
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/flocker/net-{}", meta.ino()));
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).with_context(|| format!("{} not found", path.display()))
}

/// How many node directories an earlier `up` left behind.
fn discover_nodes(dir: &Path) -> usize {
    (1..=64)
        .take_while(|i| dir.join(format!("n{i}")).exists())
        .count()
}

fn quiet(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = quiet(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    quiet(Command::new("ip").args(["link", "show", name]))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Adds the IPv6 address `cidr` to `dev` (in the namespace `ip_args` name, if any) unless it
/// is there, without duplicate address detection, so it works at once.
fn ensure_address6(ip_args: &[&str], cidr: &str, dev: &str) -> Result<()> {
    let shown = quiet(
        Command::new("ip")
            .args(ip_args)
            .args(["-6", "addr", "show", "dev", dev]),
    )?;
    let address = cidr.split('/').next().unwrap_or(cidr);
    if text_has_address(&String::from_utf8_lossy(&shown.stdout), address) {
        return Ok(());
    }
    run(Command::new("ip")
        .args(ip_args)
        .args(["addr", "add", cidr, "dev", dev, "nodad"]))
}

/// Whether `ip addr show` output lists `address` (followed by its prefix length).
fn text_has_address(shown: &str, address: &str) -> bool {
    shown
        .split_whitespace()
        .any(|word| word.split('/').next() == Some(address))
}

fn ensure_bridge(dual_stack: bool) -> Result<()> {
    if !link_exists(BRIDGE) {
        run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/24"),
            "dev",
            BRIDGE,
        ]))?;
    }
    run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    if dual_stack {
        ensure_address6(&[], &format!("{HOST_ADDRESS6}/64"), BRIDGE)?;
    }
    // Bridged frames must not be filtered by the host's own iptables (Docker's FORWARD DROP).
    let _ = fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "0");
    Ok(())
}

fn ensure_netns(node: &ClusterNode) -> Result<()> {
    if node.netns_path().exists() {
        return Ok(());
    }
    let host_side = format!("{}-h", node.netns);
    run(Command::new("ip").args(["netns", "add", &node.netns]))?;
    run(Command::new("ip").args([
        "link",
        "add",
        &host_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &node.netns,
    ]))?;
    run(Command::new("ip").args(["link", "set", &host_side, "master", BRIDGE, "up"]))?;
    let ns = |args: &[&str]| run(Command::new("ip").args(["-n", &node.netns]).args(args));
    ns(&["link", "set", "lo", "up"])?;
    ns(&[
        "addr",
        "add",
        &format!("{}/24", node.address),
        "dev",
        "eth0",
    ])?;
    ns(&["link", "set", "eth0", "up"])?;
    ns(&["route", "add", "default", "via", HOST_ADDRESS])?;
    Ok(())
}

fn pool_exists(node: &ClusterNode) -> bool {
    node.zpool(&["list", &node.pool]).is_ok()
}

fn ensure_pool(node: &ClusterNode, size: &str) -> Result<()> {
    let exists = pool_exists(node);
    let file = node.dir.join("pool.img");
    if exists && file.exists() {
        // This cluster's own pool (`cargo xtask cluster up` run again): keep its data.
        return Ok(());
    }
    if exists {
        // Left by an earlier run whose teardown did not finish: its datasets would pose as
        // this cluster's (a volume "already" on a node), so it goes.
        eprintln!(
            "cluster: destroying pool {} left by an earlier run",
            node.pool
        );
        destroy_pool(node);
    }
    run(Command::new("truncate").args(["-s", size]).arg(&file))?;
    node.zpool(&[
        "create",
        "-f",
        "-m",
        &format!("/{}", node.pool),
        &node.pool,
        &file.to_string_lossy(),
    ])?;
    Ok(())
}

/// Removes the directory `zpool create -m /POOL` made, once the pool is gone and nothing is
/// mounted there any more (never while a dataset could still be below it).
fn remove_pool_mountpoint(node: &ClusterNode) {
    let dir = Path::new("/").join(&node.pool);
    if pool_exists(node) || !crate::reap::mounts_below(&dir).is_empty() || !dir.exists() {
        return;
    }
    if let Err(e) = fs::remove_dir_all(&dir) {
        eprintln!("cluster: could not remove {}: {e}", dir.display());
    }
}

/// Destroys the node's pool, retrying while a just-stopped daemon still holds its mounts.
fn destroy_pool(node: &ClusterNode) {
    for _ in 0..20 {
        if !pool_exists(node) {
            return;
        }
        let _ = node.zpool(&["destroy", "-f", &node.pool]);
        sleep(Duration::from_millis(500));
    }
    eprintln!("cluster: could not destroy pool {}", node.pool);
}

fn ensure_dockerd(node: &ClusterNode) -> Result<()> {
    let pidfile = node.dir.join("docker.pid");
    if !pid_alive(&pidfile) {
        // As on a real host, forwarding is left to dockerd: it turns it on, then sets the
        // iptables FORWARD policy to DROP and creates DOCKER-USER, where the agent's
        // nftables backend accepts what it routes.
        crate::keep_descriptors_from_daemons();
        let log = fs::File::create(node.dir.join("dockerd.log"))?;
        let index: usize = node.name.trim_start_matches('n').parse().unwrap_or(1);
        node.command("dockerd")
            .arg("--data-root")
            .arg(node.dir.join("docker"))
            .arg("--exec-root")
            .arg(node.dir.join("exec"))
            .arg("-H")
            .arg(&node.docker_host)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--bip")
            .arg(format!("198.19.{index}.1/24"))
            .args(
                node.address6
                    .as_ref()
                    .map(|_| {
                        // Containers get an IPv6 address too, the agent's IPv6 route backend.
                        [
                            "--ipv6".to_owned(),
                            "--fixed-cidr-v6".to_owned(),
                            format!("fd00:19:{index}::/64"),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start dockerd")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ok = quiet(Command::new("docker").args(["-H", &node.docker_host, "info"]))
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        sleep(Duration::from_millis(300));
    }
    bail!(
        "dockerd of {} did not answer within 60 s (see {})",
        node.name,
        node.dir.join("dockerd.log").display()
    )
}

fn stop_dockerd(node: &ClusterNode) {
    let host = &node.docker_host;
    if let Ok(out) = quiet(Command::new("docker").args(["-H", host, "ps", "-aq"])) {
        let ids = String::from_utf8_lossy(&out.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = quiet(
                Command::new("docker")
                    .args(["-H", host, "rm", "-f"])
                    .args(&ids),
            );
        }
    }
    kill_pidfile(&node.dir.join("docker.pid"), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while pid_alive(&node.dir.join("docker.pid")) && Instant::now() < deadline {
        sleep(Duration::from_millis(200));
    }
}

/// The pid a pid file holds, if it holds one.
pub(crate) fn read_pid(pidfile: &Path) -> Option<String> {
    fs::read_to_string(pidfile)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
}

/// Whether the process runs; a killed child nobody reaped yet (a zombie) does not count.
pub(crate) fn pid_alive(pidfile: &Path) -> bool {
    read_pid(pidfile).is_some_and(|pid| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_string();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    })
}

fn kill_pidfile(pidfile: &Path, signal: &str) {
    if let Some(pid) = read_pid(pidfile) {
        let _ = quiet(Command::new("kill").args([&format!("-{signal}"), &pid]));
    }
}

/// Waits until something accepts TCP connections at `addr`.
fn wait_for_agent(node: &ClusterNode) -> Result<()> {
    wait_for_port(&node.socket(AGENT_PORT), Duration::from_secs(30))
        .with_context(|| format!("agent on {} did not come up", node.name))
}

pub fn wait_for_port(addr: &str, timeout: Duration) -> Result<()> {
    let target: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    bail!("nothing listens on {addr} after {timeout:?}")
}
