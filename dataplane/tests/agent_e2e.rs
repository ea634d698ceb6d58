//! Two real agents, each in its own network namespace with its own `dockerd` and zfs-fuse
//! pool, driven over mutual TLS the way `flockerctl deploy` drives them: a new application
//! with a volume, a move of it (pre-copy, stop, final push, handoff, start), an agent crash
//! mid-way, a changed image and a removal, all planned by `flocker_ctl::planner`. Along the
//! way it checks ownership and epochs, data checksums, state after restarts, every mTLS
//! refusal and that bad converge requests get a 4xx and change nothing.
//!
//! Needs root, `dockerd`, `zfs-fuse`, `busybox-static` (installed by `cargo xtask deps`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use hyper::{Method, StatusCode};

use flocker_client::{AgentClient, ClientError, Dialer, Timeouts, full, paths};
use flocker_ctl::ca;
use flocker_dataplane::tls::{TlsFiles, client_config};
use flocker_e2e::docker::Dockerd;
use flocker_e2e::images::BUSYBOX_IMAGE;
use flocker_e2e::netns::{Netns, Switch};
use flocker_e2e::zfs::TestPool;
use flocker_wire::{
    Action, Application, ClusterState, ContainerSettings, ConvergeEvent, ConvergeRequest,
    DesiredState, Image, NodeState, PortMap, RestartPolicy, VolumeSpec,
};

const A: &str = "198.18.30.1";
const B: &str = "198.18.30.2";
const CLIENT: &str = "198.18.30.100";
const PORT: u16 = 4523;

/// A `flocker-agent` process inside a namespace, killed on drop.
struct AgentProc {
    ns_path: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
}

impl AgentProc {
    fn spawn(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .arg(env!("CARGO_BIN_EXE_flocker-agent"))
            .args(&self.args)
            .env("RUST_LOG", "info,flocker_dataplane=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start flocker-agent")?;
        *self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash would.
    fn kill(&self) {
        let taken = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = taken {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn state_dir(&self) -> PathBuf {
        let at = self.args.iter().position(|a| a == "--state-dir");
        PathBuf::from(
            at.and_then(|i| self.args.get(i + 1))
                .cloned()
                .unwrap_or_default(),
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        // The tmpfs the agent mounted for secrets outlives it, by design; not the test.
        let state_dir = self.state_dir();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for mount in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if Path::new(mount).starts_with(&state_dir) {
                let _ = Command::new("umount").args(["-l", mount]).status();
            }
        }
    }
}

/// One node: namespace, dockerd, pool, agent. Field order is drop order: agent first.
struct Node {
    address: &'static str,
    agent: AgentProc,
    docker: Dockerd,
    pool: TestPool,
    _ns: Netns,
}

impl Node {
    fn dataset(&self, volume: &str) -> String {
        format!("{}/flocker/{volume}", self.pool.name())
    }

    /// Whether the host can create a file in the volume's mountpoint. (zfs-fuse reports
    /// `readonly` as `off temporary` even on a copy that refuses writes, so the property is
    /// not what the test checks.)
    fn writable(&self, volume: &str) -> Result<bool> {
        let mp = self.pool.mountpoint(&self.dataset(volume))?;
        let probe = mp.join(".flocker-write-probe");
        let ok = std::fs::write(&probe, b"x").is_ok();
        let _ = std::fs::remove_file(&probe);
        Ok(ok)
    }

    fn zfs_get(&self, volume: &str, property: &str) -> Result<String> {
        Ok(self
            .pool
            .zfs(&["get", "-H", "-o", "value", property, &self.dataset(volume)])?
            .trim()
            .to_string())
    }
}

/// The whole test cluster. Field order is drop order.
struct Cluster {
    a: Node,
    b: Node,
    client: Arc<Netns>,
    _switch: Switch,
    ca: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

fn start_node(
    switch: &mut Switch,
    tag: &str,
    address: &'static str,
    bip: &str,
    ca: &Path,
    work: &Path,
) -> Result<Node> {
    let ns = Netns::create(&format!("agent-{tag}"))?;
    switch.plug(&ns, "eth0", &format!("{address}/24"))?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let pool = TestPool::create(&format!("flk{tag}"), 256)?;
    let docker = Dockerd::start(&ns, &format!("agent-{tag}"), bip)?;
    docker.ensure_images()?;
    let state_dir = work.join(format!("state-{tag}"));
    let args = vec![
        "--node-address".to_string(),
        address.to_string(),
        "--listen".into(),
        format!("{address}:{PORT}"),
        "--docker-host".into(),
        docker.host(),
        "--volumes".into(),
        format!("zfs:{}", pool.name()),
        "--routing".into(),
        "nftables".into(),
        // Off by default for now; this test covers them (settings, moves, restarts, removal).
        "--netns-holders".into(),
        "true".into(),
        "--ca-cert".into(),
        ca.join("cluster.crt").display().to_string(),
        "--cert".into(),
        ca.join(format!("nodes/{address}.crt"))
            .display()
            .to_string(),
        "--key".into(),
        ca.join(format!("nodes/{address}.key"))
            .display()
            .to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--crl".into(),
        ca.join("cluster.crl").display().to_string(),
    ];
    let agent = AgentProc {
        ns_path: ns.path(),
        args,
        log: work.join(format!("agent-{tag}.log")),
        child: std::sync::Mutex::new(None),
    };
    agent.spawn()?;
    Ok(Node {
        address,
        agent,
        docker,
        pool,
        _ns: ns,
    })
}

impl Cluster {
    fn up() -> Result<Cluster> {
        let ca = tempfile::tempdir()?;
        ca::init(ca.path(), "e2e")?;
        ca::issue_node(ca.path(), A)?;
        ca::issue_node(ca.path(), B)?;
        ca::issue_user(ca.path(), "admin")?;
        let mut switch = Switch::create("agent-sw")?;
        let client = Netns::create("agent-cl")?;
        switch.plug(&client, "eth0", &format!("{CLIENT}/24"))?;
        client.ip(&["link", "set", "eth0", "up"])?;
        let a = start_node(&mut switch, "a", A, "198.19.30.1/24", ca.path(), ca.path())?;
        let b = start_node(&mut switch, "b", B, "198.19.31.1/24", ca.path(), ca.path())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let cluster = Cluster {
            a,
            b,
            client: Arc::new(client),
            _switch: switch,
            ca,
            rt,
        };
        cluster.wait_healthy(&cluster.a)?;
        cluster.wait_healthy(&cluster.b)?;
        Ok(cluster)
    }

    fn user(&self, dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca_cert: self.ca.path().join("cluster.crt"),
            cert: dir.join(format!("users/{name}.crt")),
            key: dir.join(format!("users/{name}.key")),
        }
    }

    fn admin(&self) -> TlsFiles {
        self.user(self.ca.path(), "admin")
    }

    fn wait_healthy(&self, node: &Node) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = self
                .api(client_config(&self.admin())?)
                .and_then(|api| Ok(self.rt.block_on(api.health(node.address))?));
            match health {
                Ok(_) => return Ok(()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
                other => bail!(
                    "agent {} not healthy: {other:?}\n{}",
                    node.address,
                    node.agent.log_tail()
                ),
            }
        }
    }

    /// The agent client, connecting from the client namespace and presenting `config`.
    fn api(&self, config: Arc<rustls::ClientConfig>) -> Result<AgentClient> {
        let ns = self.client.clone();
        let dialer: Dialer = Arc::new(move |node: String, port: u16| {
            let ns = ns.clone();
            Box::pin(async move {
                let connect = move || ns.run(move || std::net::TcpStream::connect((node, port)));
                let stream = tokio::task::spawn_blocking(connect)
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)??;
                stream.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(stream)
            })
        });
        Ok(AgentClient::new(config, PORT)
            .with_dialer(dialer)
            .with_timeouts(Timeouts {
                connect: Duration::from_secs(30),
                handshake: Duration::from_secs(30),
                idle: Duration::from_secs(240),
                answer: None,
                events: Duration::from_secs(240),
            }))
    }

    /// One HTTP request from the client namespace with the given credentials: the status and
    /// body whatever the status, for the checks of refusals.
    fn call(
        &self,
        creds: &TlsFiles,
        node: &str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let config = client_config(creds)?;
        self.call_with(config, node, method, path, body)
    }

    fn call_with(
        &self,
        config: Arc<rustls::ClientConfig>,
        node: &str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let api = self.api(config)?;
        Ok(self
            .rt
            .block_on(api.request(node, method, path, full(body)))?)
    }

    fn state(&self, node: &Node) -> Result<NodeState> {
        let api = self.api(client_config(&self.admin())?)?;
        Ok(self.rt.block_on(api.state(node.address))?)
    }

    /// A's and B's states once each copy of `volume` holds at most one snapshot (older push
    /// snapshots are destroyed in the background right after a push answers), or after 10 s.
    fn pruned_states(&self, volume: &str) -> Result<(NodeState, NodeState)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (a, b) = (self.state(&self.a)?, self.state(&self.b)?);
            let pruned = |s: &NodeState| s.volume(volume).is_none_or(|v| v.snapshots.len() <= 1);
            if (pruned(&a) && pruned(&b)) || Instant::now() >= deadline {
                return Ok((a, b));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster state with `used_bytes` cleared: ZFS accounting moves on its own (atime
    /// updates), everything else must be exactly reproducible.
    fn stable_state(&self) -> Result<ClusterState> {
        let mut s = self.cluster_state()?;
        for n in s.nodes.values_mut() {
            for v in &mut n.volumes {
                v.used_bytes = 0;
            }
        }
        Ok(s)
    }

    fn cluster_state(&self) -> Result<ClusterState> {
        let mut nodes = BTreeMap::new();
        nodes.insert(A.to_string(), self.state(&self.a)?);
        nodes.insert(B.to_string(), self.state(&self.b)?);
        Ok(ClusterState { nodes })
    }

    fn node(&self, address: &str) -> &Node {
        if address == A { &self.a } else { &self.b }
    }

    /// Sends a converge request; returns status and the events as NDJSON text, or the
    /// status and the agent's error message.
    fn converge_raw(
        &self,
        node: &Node,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Vec<ConvergeEvent>, String)> {
        let api = self.api(client_config(&self.admin())?)?;
        match self
            .rt
            .block_on(api.converge_body(node.address, body, |_| {}))
        {
            Ok(events) => {
                let lines = events
                    .iter()
                    .map(serde_json::to_string)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((StatusCode::OK, events, lines.join("\n")))
            }
            Err(ClientError::Refused {
                status, message, ..
            }) => Ok((status, vec![], message)),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a converge request and requires every action to be done.
    fn converge(
        &self,
        node: &Node,
        desired: &DesiredState,
        actions: Vec<Action>,
    ) -> Result<Vec<ConvergeEvent>> {
        let n = actions.len();
        // A node told to follow the route map gets the map, as flockerctl sends it.
        let follows = actions
            .iter()
            .any(|a| matches!(a, Action::FollowRoutes { .. }));
        let req = ConvergeRequest {
            desired: desired.clone(),
            routes: follows.then(|| desired.route_map()),
            actions,
            nodes_version: None,
        };
        let (status, events, text) = self.converge_raw(node, serde_json::to_vec(&req)?)?;
        ensure!(
            status == StatusCode::OK,
            "converge on {}: {status}: {text}\n{}",
            node.address,
            node.agent.log_tail()
        );
        let done = events
            .iter()
            .filter(|e| matches!(e, ConvergeEvent::Done { .. }))
            .count();
        ensure!(
            done == n
                && !events
                    .iter()
                    .any(|e| matches!(e, ConvergeEvent::Failed { .. })),
            "converge on {}: {text}\n{}",
            node.address,
            node.agent.log_tail()
        );
        Ok(events)
    }

    /// Plans with the real planner and drives it phase by phase; `between` runs after each
    /// phase with its name.
    fn deploy(
        &self,
        desired: &DesiredState,
        mut between: impl FnMut(&str, &Cluster) -> Result<()>,
    ) -> Result<Vec<String>> {
        let plan = flocker_ctl::planner::plan(desired, &self.cluster_state()?);
        let mut names = vec![];
        for phase in &plan.phases {
            let mut per_node: BTreeMap<&str, Vec<Action>> = BTreeMap::new();
            for a in &phase.actions {
                per_node
                    .entry(a.node.as_str())
                    .or_default()
                    .push(a.action.clone());
            }
            for (node, actions) in per_node {
                self.converge(self.node(node), desired, actions)
                    .with_context(|| format!("phase {}", phase.name))?;
            }
            names.push(phase.name.clone());
            between(&phase.name, self)?;
        }
        Ok(names)
    }

    /// The body of `GET http://NODE:PORT/PATH`, fetched from the client namespace.
    fn http_get(&self, node: &str, port: u16, path: &str) -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let addr = format!("{node}:{port}");
        let mut stream = self
            .client
            .run(move || std::net::TcpStream::connect(addr))??;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {node}\r\n\r\n")?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no HTTP header end")?;
        ensure!(
            response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200"),
            "GET {path} via {node}: {}",
            String::from_utf8_lossy(&response[..split])
        );
        Ok(response[split + 4..].to_vec())
    }

    /// Kills an agent (SIGKILL, as a crash) and starts it again.
    fn restart_agent(&self, which: &str) -> Result<()> {
        let node = self.node(which);
        node.agent.kill();
        node.agent.spawn()?;
        self.wait_healthy(node)
    }
}

fn busybox_app() -> Application {
    let (repository, tag) = BUSYBOX_IMAGE
        .split_once(':')
        .unwrap_or((BUSYBOX_IMAGE, "latest"));
    Application {
        name: "web".into(),
        image: Image {
            repository: repository.into(),
            tag: tag.into(),
        },
        ports: vec![PortMap {
            internal: 80,
            external: 8080,
            protocol: flocker_wire::Protocol::Tcp,
        }],
        volumes: Default::default(),
        volume: Some(VolumeSpec {
            mountpoint: "/www".into(),
            maximum_size: Some(64 << 20),
        }),
        environment: BTreeMap::from([("GREETING".into(), "hello".into())]),
        links: vec![],
        mem_limit: Some(128 << 20),
        cpu_shares: Some(256),
        restart_policy: RestartPolicy::Never,
        // Settings compose files carry, each checked on the created container below.
        container: ContainerSettings {
            labels: BTreeMap::from([("com.example.team".into(), "web".into())]),
            working_dir: Some("/www".into()),
            hostname: Some("web-1".into()),
            stop_signal: Some("SIGTERM".into()),
            stop_grace_ms: Some(2_500),
            cap_drop: vec!["NET_RAW".into()],
            extra_hosts: vec!["db.local:198.18.0.5".into()],
            tmpfs: BTreeMap::from([("/scratch".into(), "size=1m".into())]),
            ..ContainerSettings::default()
        },
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check: None,
    }
}

fn desired_on(node: &str, app: Option<Application>) -> DesiredState {
    let mut d = DesiredState::default();
    d.nodes.insert(A.into(), BTreeSet::new());
    d.nodes.insert(B.into(), BTreeSet::new());
    if let Some(app) = app {
        d.nodes.get_mut(node).map(|s| s.insert(app.name.clone()));
        d.applications.insert(app.name.clone(), app);
    }
    d
}

/// Waits (at most 10 s) until no container on `node` has a name containing `part`.
fn wait_until_none_named(node: &Node, part: &str) -> Result<()> {
    let filter = format!("name={part}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out =
            node.docker
                .docker(&["ps", "-a", "--format", "{{.Names}}", "--filter", &filter])?;
        if out.trim().is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "still there: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sha256sum` of files inside the application's container on `node`.
fn checksums(node: &Node, files: &[&str]) -> Result<String> {
    let mut args = vec!["exec", "flocker-web", "/bin/busybox", "sha256sum"];
    args.extend(files);
    node.docker.docker(&args)
}

fn write_random(node: &Node, file: &str, kib: u32) -> Result<()> {
    let of = format!("of={file}");
    let count = format!("count={kib}");
    node.docker.docker(&[
        "exec",
        "flocker-web",
        "/bin/busybox",
        "dd",
        "if=/dev/urandom",
        &of,
        "bs=1024",
        &count,
    ])?;
    Ok(())
}

fn record(state: &NodeState, volume: &str) -> Option<(String, u64, Vec<String>)> {
    state
        .volume(volume)
        .map(|v| (v.owner.clone(), v.epoch, v.snapshots.clone()))
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_secret_is_readable_in_the_container_and_nowhere_else() -> Result<()> {
    let cluster = Cluster::up()?;
    let secret = "e2e-secret-4f1c9a";
    let mut app = busybox_app();
    app.volume = None;
    app.files = vec![flocker_wire::FileMount {
        name: "token".into(),
        kind: flocker_wire::FileKind::Secret,
        target: "/run/secrets/token".into(),
        mode: Some(0o400),
        uid: None,
        gid: None,
        digest: flocker_wire::files::to_hex(blake3::hash(secret.as_bytes()).as_bytes()),
    }];
    let mut desired = desired_on(A, Some(app));
    desired.files.insert(
        "web".into(),
        BTreeMap::from([(
            "token".to_string(),
            flocker_wire::FileContent(secret.as_bytes().to_vec()),
        )]),
    );
    cluster.deploy(&desired, |_, _| Ok(()))?;

    let docker = &cluster.a.docker;
    let read = docker.docker(&[
        "exec",
        "flocker-web",
        "/bin/busybox",
        "cat",
        "/run/secrets/token",
    ])?;
    assert_eq!(read, secret);
    let write = docker.docker(&[
        "exec",
        "flocker-web",
        "/bin/busybox",
        "sh",
        "-c",
        "echo x > /run/secrets/token",
    ]);
    assert!(
        write.is_err(),
        "the secret must be read-only in the container"
    );
    // On the node it lives on the agent's tmpfs only.
    let host = cluster
        .a
        .agent
        .state_dir()
        .join(format!("files-{A}/web/token"));
    let fstype = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "-T"])
        .arg(&host)
        .output()?;
    assert_eq!(String::from_utf8_lossy(&fstype.stdout).trim(), "tmpfs");
    // Nowhere else: not in Docker's view of the container, the agent's state or its log.
    let inspect = docker.docker(&["inspect", "flocker-web"])?;
    let state = serde_json::to_string(&cluster.state(&cluster.a)?)?;
    let log = std::fs::read_to_string(&cluster.a.agent.log)?;
    for (what, text) in [("inspect", &inspect), ("state", &state), ("log", &log)] {
        assert!(!text.contains(secret), "the secret is in the {what}");
    }

    // Removed with its application.
    cluster.deploy(&desired_on(A, None), |_, _| Ok(()))?;
    assert!(!host.exists(), "{} left behind", host.display());
    Ok(())
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn two_agents_deploy_move_and_remove_an_application_with_its_volume() -> Result<()> {
    let cluster = Cluster::up()?;
    let app = busybox_app();
    // A container the agent does not manage: it must stay invisible and untouched.
    cluster
        .a
        .docker
        .docker(&["run", "-d", "--name", "bystander", BUSYBOX_IMAGE])?;

    // 1. New application: create the volume on A and start it there.
    let d1 = desired_on(A, Some(app.clone()));
    let phases = cluster.deploy(&d1, |_, _| Ok(()))?;
    assert_eq!(phases, vec!["create-volumes", "start", "routes"]);
    let sa = cluster.state(&cluster.a)?;
    let c = sa.container("web").context("web on A")?;
    assert!(c.running && c.ip.is_some(), "{c:?}");
    assert_eq!(c.application, app);
    assert_eq!(record(&sa, "web"), Some((A.into(), 1, vec![])));
    assert_eq!(cluster.a.zfs_get("web", "quota")?, "64M");
    assert!(cluster.a.writable("web")?);
    let env = cluster.a.docker.docker(&[
        "inspect",
        "-f",
        "{{.Config.Env}} {{.HostConfig.Memory}} {{.HostConfig.CpuShares}}",
        "flocker-web",
    ])?;
    assert!(
        env.contains("GREETING=hello") && env.contains("134217728") && env.contains("256"),
        "{env}"
    );
    let settings = cluster.a.docker.docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"com.example.team\"}}|{{.Config.WorkingDir}}|{{.Config.Hostname}}|\
         {{.Config.StopSignal}}|{{.Config.StopTimeout}}|{{.HostConfig.CapDrop}}|{{.HostConfig.NetworkMode}}|\
         {{.HostConfig.Tmpfs}}",
        "flocker-web",
    ])?;
    // The network settings are on its network holder, whose namespace it joins (Docker
    // records the holder's ID, and gives the joining container the holder's hostname).
    let holder_id = cluster
        .a
        .docker
        .docker(&["inspect", "-f", "{{.Id}}", "flocker-web.netns"])?;
    assert_eq!(
        settings.trim(),
        format!(
            "web|/www|web-1|SIGTERM|3|[NET_RAW]|container:{}|map[/scratch:size=1m]",
            holder_id.trim()
        )
    );
    let holder = cluster.a.docker.docker(&[
        "inspect",
        "-f",
        "{{.State.Running}}|{{.Config.Hostname}}|{{.HostConfig.ExtraHosts}}|{{.NetworkSettings.IPAddress}}",
        "flocker-web.netns",
    ])?;
    let ip = c.ip.as_deref().unwrap_or_default();
    assert_eq!(
        holder.trim(),
        format!("true|web-1|[db.local:198.18.0.5]|{ip}"),
        "the holder carries the network settings and the address the agent reports"
    );
    let seen = cluster
        .a
        .docker
        .docker(&["exec", "flocker-web", "/bin/busybox", "hostname"])?;
    assert_eq!(seen.trim(), "web-1");
    // Running it twice changes nothing: the planner has nothing left to do, and re-sending
    // the same actions is harmless.
    assert!(flocker_ctl::planner::plan(&d1, &cluster.cluster_state()?).is_empty());
    let id_before = cluster
        .a
        .docker
        .docker(&["inspect", "-f", "{{.Id}}", "flocker-web"])?;
    cluster.converge(
        &cluster.a,
        &d1,
        vec![
            Action::CreateVolume {
                volume: "web".into(),
                maximum_size: Some(64 << 20),
            },
            Action::StartApplication {
                application: app.clone(),
            },
        ],
    )?;
    assert_eq!(
        cluster
            .a
            .docker
            .docker(&["inspect", "-f", "{{.Id}}", "flocker-web"])?,
        id_before
    );

    write_random(&cluster.a, "/www/first", 3072)?;

    // 2. Bad requests are refused with a 4xx naming the problem, and change nothing.
    check_bad_requests(&cluster, &d1)?;
    // 3. mTLS: no certificate, another CA, an expired certificate are all refused.
    check_mtls_refusals(&cluster)?;

    // 4. Move to B, checking ownership after every phase and crashing A after the final push.
    write_random(&cluster.a, "/www/second", 1024)?;
    let sums_on_a = checksums(&cluster.a, &["/www/first", "/www/second"])?;
    // What an agent killed between a full receive's commit and its record leaves on B: a
    // dataset with no record and the stream's push snapshot, which no listing shows. The
    // move's full pre-copy replaces it once verified (every push to B was refused as
    // "already exists" before). A dataset made by hand (no push snapshot) is never replaced.
    let leftover = cluster.b.dataset("web");
    cluster.b.pool.zfs(&["create", &leftover])?;
    let pushed = flocker_wire::snapshots::push_snapshot_name(1, 1_796_425_771_444);
    cluster
        .b
        .pool
        .zfs(&["snapshot", &format!("{leftover}@{pushed}")])?;
    assert!(record(&cluster.state(&cluster.b)?, "web").is_none());
    let d2 = desired_on(B, Some(app.clone()));
    let mut crash_after_final_push = false;
    let mut pre_copied = String::new();
    let phases = cluster.deploy(&d2, |phase, cl| {
        // Older push snapshots are pruned just after a push answers: wait for that.
        let (sa, sb) = cl.pruned_states("web")?;
        match phase {
            "pre-copy" => {
                let (owner, epoch, snaps_a) = record(&sa, "web").context("A copy")?;
                assert_eq!((owner.as_str(), epoch), (A, 1));
                assert_eq!(record(&sb, "web"), Some((A.into(), 1, snaps_a.clone())));
                assert_eq!(snaps_a.len(), 1, "{snaps_a:?}");
                pre_copied = snaps_a[0].clone();
                assert!(!cl.b.writable("web")?, "B's copy must be read-only");
                assert!(sa.container("web").is_some_and(|c| c.running));
            }
            "stop" => {
                assert!(sa.container("web").is_none());
                // Its network holder goes with it (in the background).
                wait_until_none_named(&cl.a, "flocker-web")?;
            }
            "final-push" => {
                let (_, _, snaps_a) = record(&sa, "web").context("A copy")?;
                let (owner_b, epoch_b, snaps_b) = record(&sb, "web").context("B copy")?;
                // Older push snapshots are pruned down to the newest common one.
                assert_eq!(snaps_a.len(), 1, "{snaps_a:?}");
                assert_eq!(snaps_b, snaps_a);
                // A newer snapshot than the pre-copy's (a loaded machine may have made the
                // pre-copy take catch-up passes, so its number is not fixed).
                assert!(snaps_a[0] > pre_copied, "{snaps_a:?} after {pre_copied}");
                // The final push carried the handoff: B owns the volume at the next epoch.
                assert_eq!((owner_b.as_str(), epoch_b), (B, 2));
                assert_eq!(record(&sa, "web").map(|r| (r.0, r.1)), Some((B.into(), 2)));
                assert_eq!(record(&sb, "web").map(|r| (r.0, r.1)), Some((B.into(), 2)));
                assert!(
                    !cl.a.writable("web")?,
                    "A's copy must be read-only after the handoff"
                );
                assert!(
                    cl.b.writable("web")?,
                    "B's copy must be writable after the handoff"
                );
                assert_eq!(cl.b.zfs_get("web", "quota")?, "64M");
                let cs = ClusterState {
                    nodes: BTreeMap::from([(A.into(), sa.clone()), (B.into(), sb.clone())]),
                };
                assert_eq!(cs.volume_owner("web"), Some(B));
                assert!(cs.ownership_settled("web"));
                // Crash A after the final push: it must come back reporting exactly the
                // same state, and the plan goes on from there.
                let before = cl.stable_state()?;
                cl.restart_agent(A)?;
                assert_eq!(cl.stable_state()?, before);
                crash_after_final_push = true;
            }
            "prepare" => {
                // Created on B's replica, never started: B does not own the volume yet.
                assert!(sb.container("web").is_some_and(|c| !c.running));
                assert_eq!(record(&sb, "web").map(|r| (r.0, r.1)), Some((A.into(), 1)));
            }
            "start" => assert!(sb.container("web").is_some_and(|c| c.running)),
            _ => {}
        }
        Ok(())
    })?;
    assert_eq!(
        phases,
        vec![
            "pre-copy",
            "prepare",
            "hold",
            "switch-routes",
            "stop",
            "final-push",
            "start",
            "routes"
        ]
    );
    assert!(crash_after_final_push);
    assert_eq!(
        checksums(&cluster.b, &["/www/first", "/www/second"])?,
        sums_on_a
    );

    // Routes: the external port answers on both nodes with the moved container's data.
    let mp = cluster.b.pool.mountpoint(&cluster.b.dataset("web"))?;
    let first = std::fs::read(mp.join("first"))?;
    for node in [A, B] {
        let got = cluster.http_get(node, 8080, "/first")?;
        assert!(
            got == first,
            "GET /first via {node}: {} bytes, expected {}",
            got.len(),
            first.len()
        );
    }

    // A still refuses to start the application on its read-only copy.
    let req = ConvergeRequest {
        desired: d1.clone(),
        routes: None,
        actions: vec![Action::StartApplication {
            application: app.clone(),
        }],
        nodes_version: None,
    };
    let (status, _, text) = cluster.converge_raw(&cluster.a, serde_json::to_vec(&req)?)?;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("owned by 198.18.30.2"), "{text}");
    // Re-sending the handoff is harmless (the source only re-tells the target).
    cluster.converge(
        &cluster.a,
        &d2,
        vec![Action::Handoff {
            volume: "web".into(),
            to: B.into(),
        }],
    )?;

    // 5. Restarts: every agent reports exactly what it did before.
    let before = cluster.stable_state()?;
    cluster.restart_agent(A)?;
    cluster.restart_agent(B)?;
    assert_eq!(cluster.stable_state()?, before);
    assert!(flocker_ctl::planner::plan(&d2, &before).is_empty());

    // 6. Changed image: restart in place on B with the new image, data kept.
    for node in [&cluster.a, &cluster.b] {
        node.docker
            .docker(&["tag", BUSYBOX_IMAGE, "busybox-flocker:v2"])?;
    }
    let mut app2 = app.clone();
    app2.image.tag = "v2".into();
    let d3 = desired_on(B, Some(app2.clone()));
    cluster.deploy(&d3, |_, _| Ok(()))?;
    let sb = cluster.state(&cluster.b)?;
    assert_eq!(
        sb.container("web")
            .map(|c| c.application.image.tag.as_str()),
        Some("v2")
    );
    assert_eq!(
        checksums(&cluster.b, &["/www/first", "/www/second"])?,
        sums_on_a
    );

    // 7. Move back to A: A's old read-only copy shares a snapshot with B, so only the
    // changes travel (incremental), and ownership goes to A at epoch 3.
    write_random(&cluster.b, "/www/third", 512)?;
    let sums_on_b = checksums(&cluster.b, &["/www/first", "/www/second", "/www/third"])?;
    let d5 = desired_on(A, Some(app2.clone()));
    let phases = cluster.deploy(&d5, |_, _| Ok(()))?;
    assert_eq!(
        phases,
        vec![
            "pre-copy",
            "prepare",
            "hold",
            "switch-routes",
            "stop",
            "final-push",
            "start",
            "routes"
        ]
    );
    assert_eq!(
        checksums(&cluster.a, &["/www/first", "/www/second", "/www/third"])?,
        sums_on_b
    );
    let cs = cluster.cluster_state()?;
    assert_eq!(cs.volume_owner("web"), Some(A));
    assert_eq!(
        record(&cs.nodes[A], "web").map(|r| (r.0, r.1)),
        Some((A.into(), 3))
    );
    assert_eq!(
        record(&cs.nodes[B], "web").map(|r| (r.0, r.1)),
        Some((A.into(), 3))
    );
    assert!(cluster.a.writable("web")? && !cluster.b.writable("web")?);

    // 8. Removed application: the container goes, the volume (the only writable copy) stays.
    let d4 = desired_on(A, None);
    cluster.deploy(&d4, |_, _| Ok(()))?;
    let sa = cluster.state(&cluster.a)?;
    assert!(sa.containers.is_empty());
    wait_until_none_named(&cluster.a, "flocker-web")?;
    assert_eq!(record(&sa, "web").map(|r| (r.0, r.1)), Some((A.into(), 3)));
    assert!(flocker_ctl::planner::plan(&d4, &cluster.cluster_state()?).is_empty());
    let bystander =
        cluster
            .a
            .docker
            .docker(&["inspect", "-f", "{{.State.Running}}", "bystander"])?;
    assert_eq!(bystander.trim(), "true");
    Ok(())
}

/// Requests with bad input get a 4xx that names the problem, and leave the state as it was.
fn check_bad_requests(cluster: &Cluster, desired: &DesiredState) -> Result<()> {
    let before = cluster.stable_state()?;
    let mut unknown = busybox_app();
    unknown.name = "ghost".into();
    let mut no_image = busybox_app();
    no_image.image.repository = "no-such-image".into();
    no_image.volume = None;
    let mut d_no_image = desired.clone();
    d_no_image
        .applications
        .insert("web".into(), no_image.clone());
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, "invalid converge request"),
        (
            br#"{"desired":{"applications":{},"nodes":{}},"actions":[{"action":"launch-rockets"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "launch-rockets",
        ),
        (
            serde_json::to_vec(&ConvergeRequest {
                desired: desired.clone(),
                routes: None,
                actions: vec![
                    Action::CreateVolume { volume: "other".into(), maximum_size: None },
                    Action::StartApplication { application: unknown },
                ],
                nodes_version: None,
            })?,
            StatusCode::BAD_REQUEST,
            "unknown application \"ghost\"",
        ),
        (
            // B does not own web: it must not start it (nor create anything first).
            serde_json::to_vec(&ConvergeRequest {
                desired: desired.clone(),
                routes: None,
                actions: vec![
                    Action::CreateVolume { volume: "other".into(), maximum_size: None },
                    Action::StartApplication { application: busybox_app() },
                ],
                nodes_version: None,
            })?,
            StatusCode::CONFLICT,
            "needs volume \"web\", which does not exist on this node",
        ),
        (
            serde_json::to_vec(&ConvergeRequest {
                desired: d_no_image,
                routes: None,
                actions: vec![Action::StartApplication { application: no_image }],
                nodes_version: None,
            })?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "no-such-image:latest",
        ),
        (
            serde_json::to_vec(&ConvergeRequest {
                desired: desired.clone(),
                routes: None,
                actions: vec![Action::CreateVolume { volume: "../etc".into(), maximum_size: None }],
                nodes_version: None,
            })?,
            StatusCode::BAD_REQUEST,
            "invalid volume or snapshot name",
        ),
        (
            serde_json::to_vec(&ConvergeRequest {
                desired: desired.clone(),
                routes: None,
                actions: vec![Action::Handoff { volume: "web".into(), to: A.into() }],
                nodes_version: None,
            })?,
            StatusCode::NOT_FOUND,
            "volume \"web\" does not exist on this node",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, _, text) = cluster.converge_raw(&cluster.b, body)?;
        assert_eq!(got, status, "{text}");
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    // Handing off to a node that lacks the newest snapshot is refused by the protocol and
    // leaves A the owner.
    let req = ConvergeRequest {
        desired: desired.clone(),
        routes: None,
        actions: vec![
            Action::StopApplication {
                application: "nothing-here".into(),
            },
            Action::Handoff {
                volume: "web".into(),
                to: B.into(),
            },
        ],
        nodes_version: None,
    };
    let (status, events, text) = cluster.converge_raw(&cluster.a, serde_json::to_vec(&req)?)?;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        events.iter().any(|e| matches!(e, ConvergeEvent::Failed { error, .. } if error.contains("still runs here"))),
        "{text}"
    );
    assert_eq!(cluster.stable_state()?, before);
    Ok(())
}

/// The agent refuses peers without a certificate, with another CA's, or with an expired one;
/// a certificate from the cluster CA is accepted.
fn check_mtls_refusals(cluster: &Cluster) -> Result<()> {
    // Another CA, with a user of the same name.
    let other = tempfile::tempdir()?;
    ca::init(other.path(), "other")?;
    ca::issue_user(other.path(), "admin")?;
    let foreign = TlsFiles {
        ca_cert: cluster.ca.path().join("cluster.crt"),
        cert: other.path().join("users/admin.crt"),
        key: other.path().join("users/admin.key"),
    };
    let refused = cluster.call(&foreign, A, Method::GET, paths::STATE, vec![]);
    assert!(
        refused.is_err(),
        "another CA's certificate was accepted: {refused:?}"
    );

    // Expired, from the right CA.
    let now = SystemTime::now();
    ca::issue_user_with(
        cluster.ca.path(),
        "expired",
        ca::Validity {
            not_before: now - Duration::from_secs(10 * 86400),
            not_after: now - Duration::from_secs(86400),
        },
    )?;
    let expired = cluster.user(cluster.ca.path(), "expired");
    let refused = cluster.call(&expired, A, Method::GET, paths::STATE, vec![]);
    assert!(
        refused.is_err(),
        "an expired certificate was accepted: {refused:?}"
    );

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::pem::PemObject::pem_file_iter(cluster.ca.path().join("cluster.crt"))?
    {
        roots.add(cert?)?;
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let refused = cluster.call_with(Arc::new(anonymous), A, Method::GET, paths::STATE, vec![]);
    assert!(
        refused.is_err(),
        "a peer without certificate was accepted: {refused:?}"
    );

    // The right CA works, and an agent's own node certificate works too.
    let node_creds = TlsFiles {
        ca_cert: cluster.ca.path().join("cluster.crt"),
        cert: cluster.ca.path().join(format!("nodes/{B}.crt")),
        key: cluster.ca.path().join(format!("nodes/{B}.key")),
    };
    let (status, _) = cluster.call(&node_creds, A, Method::GET, paths::HEALTH, vec![])?;
    assert_eq!(status, StatusCode::OK);
    // ... but a node certificate may not read state (it holds the applications' secrets).
    let (status, body) = cluster.call(&node_creds, A, Method::GET, paths::STATE, vec![])?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");

    // A revoked user is refused from the next connection on, without restarting the agent.
    ca::issue_user(cluster.ca.path(), "carol")?;
    let carol = cluster.user(cluster.ca.path(), "carol");
    let (status, _) = cluster.call(&carol, A, Method::GET, paths::STATE, vec![])?;
    assert_eq!(status, StatusCode::OK);
    ca::revoke(cluster.ca.path(), ca::Role::User, "carol")?;
    let refused = cluster.call(&carol, A, Method::GET, paths::STATE, vec![]);
    assert!(
        refused.is_err(),
        "a revoked certificate was accepted: {refused:?}"
    );
    Ok(())
}
