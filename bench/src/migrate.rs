//! `cargo xtask bench migrate`: how long an application is unreachable while it moves.
//!
//! On a local three-node cluster, a Redis application with a volume of `--size` MiB (default
//! 1024) is moved between two nodes while a client polls its port through the third node
//! every 10 ms; the downtime is the longest interval in which no poll succeeded. Rows:
//!
//! - the first move (the whole volume is pre-copied while Redis runs),
//! - a move back after `--delta` MiB (default 1) changed since the last push,
//! - Flocker 0.1's way on the same data: stop, full `zfs send | ssh | zfs recv`, start,
//! - the same move and Flocker 0.1's way again with every node's link shaped to `--link`
//!   (default `1gbit`, `none` to skip), as on a real cluster network: the local bridge moves
//!   data at memory speed, which makes the baseline's full copy unrealistically short,
//! - the client's view (`client_view.rs`): `--client-moves` (default 5) moves with `--delta`
//!   MiB changed before each, while a client opens a new connection every 10 ms through the
//!   third node: failed attempts, worst connect-to-reply time, median downtime and median
//!   time of each phase, unshaped and on the shaped links,
//! - the wall time of a no-op `flockerctl deploy` with `--apps` (default 20) applications
//!   (`--apps 0` leaves out this row and the next),
//! - the overhead of the agents' metrics endpoint: the no-op deploy and a deploy that moves
//!   one of those applications (route changes on every node), median of 5 each, with and
//!   without a client scraping every agent's `/metrics` every 50 ms.
//!
//! Each flocker move reports two downtimes: until the application answers `PING` through
//! the third node again (the headline figure), and until `flockerctl deploy` returned (its
//! routes switched). Since starts wait for readiness, the routes switch only to an
//! application that answers.

mod client_view;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::probe::measure;

struct Args {
    size_mib: u64,
    delta_mib: u64,
    apps: usize,
    link: String,
    routing: String,
    client_moves: usize,
    /// `--netns-holders` for every agent; the agent's default when `None`.
    netns_holders: Option<bool>,
    /// Redis is ready when it answers PING (an answer check), not when its port listens.
    answer_check: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut parsed = Args {
        size_mib: 1024,
        delta_mib: 1,
        apps: 20,
        link: "1gbit".into(),
        routing: "nftables".into(),
        client_moves: 5,
        netns_holders: None,
        answer_check: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => parsed.size_mib = value.parse()?,
            "--delta" => parsed.delta_mib = value.parse()?,
            "--apps" => parsed.apps = value.parse()?,
            "--link" => parsed.link = value.clone(),
            "--routing" => parsed.routing = value.clone(),
            "--client-moves" => parsed.client_moves = value.parse()?,
            "--netns-holders" => parsed.netns_holders = Some(value.parse()?),
            "--answer-check" => parsed.answer_check = value.parse()?,
            other => bail!(
                "unknown flag {other}: expected --size MiB, --delta MiB, --apps N, --link RATE|none, --routing nftables|ebpf, --client-moves N, --netns-holders true|false, --answer-check true|false"
            ),
        }
    }
    Ok(parsed)
}

/// Runs the benchmark and prints its table.
pub fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    let target = crate::build_release_agents()?;
    let pool_size = format!("{}M", (args.size_mib * 3).max(1024) + 512);
    let mut cluster = Cluster::up(ClusterSpec {
        nodes: 3,
        dir: PathBuf::from("/tmp/flocker-bench-migrate"),
        pool_size: Box::leak(pool_size.into_boxed_str()),
        agent_binary: target.join("flocker-agent"),
        ctl_binary: target.join("flockerctl"),
        routing: args.routing.clone(),
        agent_args: args
            .netns_holders
            .map(|on| vec!["--netns-holders".to_string(), on.to_string()])
            .unwrap_or_default(),
    })?;
    cluster.teardown_on_drop = true;
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let files = tempfile::tempdir()?;
    let apps = files.path().join("application.yml");
    std::fs::write(
        &apps,
        format!(
            "version: 1\napplications:\n  db:\n    image: redis-flocker:latest\n    ports:\n      - internal: 6379\n        external: 6379\n    volume:\n      mountpoint: /data\n{}",
            if args.answer_check {
                "    health_check:\n      send: \"PING\\r\\n\"\n      expect: \"+PONG\"\n"
            } else {
                ""
            }
        ),
    )?;
    let on = |node: &ClusterNode, name: &str| -> Result<PathBuf> {
        let path = files.path().join(name);
        let mut text = String::from("version: 1\nnodes:\n");
        for n in [&n1, &n2, &n3] {
            let list = if n.address == node.address {
                "[db]"
            } else {
                "[]"
            };
            text.push_str(&format!("  {}: {list}\n", n.address));
        }
        std::fs::write(&path, text)?;
        Ok(path)
    };
    eprintln!(
        "migrate: deploying db on n1 and writing {} MiB",
        args.size_mib
    );
    deploy(&cluster, &on(&n1, "d1.yml")?, &apps)?;
    write_data(&n1, "blob", args.size_mib)?;

    let probe: SocketAddr = format!("{}:6379", n3.address).parse()?;
    eprintln!("migrate: first move n1 -> n2 (whole volume pre-copied)");
    let first = measure(probe, || {
        deploy(&cluster, &on(&n2, "d2.yml")?, &apps)?;
        Ok(())
    })?;
    write_data(&n2, "delta", args.delta_mib)?;
    eprintln!(
        "migrate: move n2 -> n1 after {} MiB changed",
        args.delta_mib
    );
    let second = measure(probe, || {
        deploy(&cluster, &on(&n1, "d3.yml")?, &apps)?;
        Ok(())
    })?;
    let mut client_views = Vec::new();
    if args.client_moves > 0 {
        client_views.push(client_view::run(
            &client_view::Moves {
                cluster: &cluster,
                between: (&n1, &n2),
                deployment_on: &on,
                applications: &apps,
                through: probe,
                delta_mib: args.delta_mib,
                count: args.client_moves,
            },
            "unshaped",
        )?);
    }
    eprintln!("migrate: Flocker 0.1's stop, full copy over ssh, start (n1 -> n3)");
    let baseline = stop_copy_start(&cluster, &n1, &n3)?;

    let shaped = if args.link == "none" {
        None
    } else {
        eprintln!("migrate: shaping every node's link to {}", args.link);
        for node in [&n1, &n2, &n3] {
            shape_link(node, &args.link)?;
        }
        write_data(&n1, "delta-shaped", args.delta_mib)?;
        eprintln!(
            "migrate: move n1 -> n2 after {} MiB changed, {} links",
            args.delta_mib, args.link
        );
        let moved = measure(probe, || {
            deploy(&cluster, &on(&n2, "d4.yml")?, &apps)?;
            Ok(())
        })?;
        eprintln!("migrate: Flocker 0.1's way n2 -> n3, {} links", args.link);
        let baseline = stop_copy_start(&cluster, &n2, &n3)?;
        if args.client_moves > 0 {
            client_views.push(client_view::run(
                &client_view::Moves {
                    cluster: &cluster,
                    between: (&n2, &n1),
                    deployment_on: &on,
                    applications: &apps,
                    through: probe,
                    delta_mib: args.delta_mib,
                    count: args.client_moves,
                },
                &format!("{} links", args.link),
            )?);
        }
        Some((moved, baseline))
    };

    // `--apps 0` leaves out the no-op and metrics rows (minutes of busybox stop timeouts).
    let overhead = if args.apps > 0 {
        eprintln!("migrate: no-op deploy with {} applications", args.apps);
        let nodes = [&n1, &n2, &n3];
        let many = many_applications(&nodes, args.apps, files.path())?;
        let noop = noop_deploy(&cluster, &many, false)?;
        eprintln!("migrate: metrics overhead (no-op and route-changing deploys, scraped or not)");
        let noop_scraped = noop_deploy(&cluster, &many, true)?;
        let moves = route_change_deploys(&cluster, &nodes, &many, false)?;
        let moves_scraped = route_change_deploys(&cluster, &nodes, &many, true)?;
        Some((noop, noop_scraped, moves, moves_scraped))
    } else {
        None
    };

    let mut table = String::new();
    table.push_str(&format!(
        "| move ({} MiB volume) | downtime (until it answers) | downtime (until deploy done) | move wall time |\n| --- | ---: | ---: | ---: |\n",
        args.size_mib
    ));
    table.push_str(&format!(
        "| flocker, first move (full pre-copy while running) | {} | {} | {} |\n",
        ms(first.downtime),
        ms(first.until_action_done),
        ms(first.wall)
    ));
    table.push_str(&format!(
        "| flocker, {} MiB changed since the last push | {} | {} | {} |\n",
        args.delta_mib,
        ms(second.downtime),
        ms(second.until_action_done),
        ms(second.wall)
    ));
    table.push_str(&format!(
        "| Flocker 0.1: stop, full zfs send over ssh, start | {} | - | {} |\n",
        ms(baseline),
        ms(baseline)
    ));
    if let Some((moved, baseline)) = &shaped {
        table.push_str(&format!(
            "| {} links: flocker, {} MiB changed since the last push | {} | {} | {} |\n",
            args.link,
            args.delta_mib,
            ms(moved.downtime),
            ms(moved.until_action_done),
            ms(moved.wall)
        ));
        table.push_str(&format!(
            "| {} links: Flocker 0.1, stop, full zfs send over ssh, start | {} | - | {} |\n",
            args.link,
            ms(*baseline),
            ms(*baseline)
        ));
    }
    if let Some((noop, noop_scraped, moves, moves_scraped)) = &overhead {
        table.push_str(&format!(
            "\n| no-op `flockerctl deploy`, {} applications on 3 nodes | median of 5 |\n| --- | ---: |\n| wall time | {} |\n",
            args.apps,
            ms(*noop)
        ));
        table.push_str(&format!(
        "\n| metrics endpoint overhead (median of 5) | not scraped | scraped every 50 ms |\n| --- | ---: | ---: |\n\
         | no-op deploy, {} applications | {} | {} |\n\
         | deploy moving one application: wall time | {} | {} |\n\
         | deploy moving one application: routes phase | {} | {} |\n",
            args.apps,
            ms(*noop),
            ms(*noop_scraped),
            ms(moves.wall),
            ms(moves_scraped.wall),
            ms(moves.routes_phase),
            ms(moves_scraped.routes_phase),
        ));
    }
    table.push_str(&client_view::table(
        &client_views,
        args.delta_mib,
        args.size_mib,
    ));
    let ratio = second.downtime.as_secs_f64() / baseline.as_secs_f64().max(1e-9);
    table.push_str(&format!(
        "\nDowntime with {} MiB changed is {:.1}% of stop-copy-start.\n",
        args.delta_mib,
        ratio * 100.0
    ));
    if let Some((moved, baseline)) = &shaped {
        let ratio = moved.downtime.as_secs_f64() / baseline.as_secs_f64().max(1e-9);
        table.push_str(&format!(
            "On {} links, downtime with {} MiB changed is {:.1}% of stop-copy-start.\n",
            args.link,
            args.delta_mib,
            ratio * 100.0
        ));
    }
    println!("{table}");
    let results = crate::workspace_target()
        .parent()
        .map(|root| root.join("bench/results"))
        .unwrap_or_else(|| PathBuf::from("bench/results"));
    std::fs::create_dir_all(&results)?;
    let mut out = std::fs::File::create(results.join("migrate.md"))?;
    writeln!(
        out,
        "## Migration downtime (`cargo xtask bench migrate`)\n\n{table}"
    )?;
    Ok(())
}

/// Shapes both directions of a node's link: egress of its `eth0` and of the bridge side of
/// its veth pair.
fn shape_link(node: &ClusterNode, rate: &str) -> Result<()> {
    let tbf = [
        "root", "tbf", "rate", rate, "burst", "256kb", "latency", "20ms",
    ];
    sh(Command::new("tc")
        .args(["-n", &node.netns, "qdisc", "replace", "dev", "eth0"])
        .args(tbf))?;
    sh(Command::new("tc")
        .args(["qdisc", "replace", "dev", &format!("{}-h", node.netns)])
        .args(tbf))?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the deploy; returns how long each of its phases took.
fn deploy(
    cluster: &Cluster,
    deployment: &Path,
    application: &Path,
) -> Result<BTreeMap<String, Duration>> {
    let out = cluster.flockerctl(&[
        "deploy",
        &deployment.display().to_string(),
        &application.display().to_string(),
    ])?;
    ensure!(
        out.status.success(),
        "deploy failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Where a move spends its time, phase by phase.
    let mut phases = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if let Some((phase, rest)) = line.trim().split_once(" done in ") {
            eprintln!("migrate: {}", line.trim());
            if let Ok(took) = rest.trim_end_matches(" ms").parse::<u64>() {
                phases.insert(phase.to_string(), Duration::from_millis(took));
            }
        }
    }
    Ok(phases)
}

fn docker(node: &ClusterNode, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(["-H", &node.docker_host])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes `mib` MiB of random bytes into the running container's volume.
fn write_data(node: &ClusterNode, file: &str, mib: u64) -> Result<()> {
    docker(
        node,
        &[
            "exec",
            "flocker-db",
            "/bin/busybox",
            "dd",
            "if=/dev/urandom",
            &format!("of=/data/{file}"),
            "bs=1M",
            &format!("count={mib}"),
        ],
    )?;
    Ok(())
}

/// Flocker 0.1's move: stop the container, snapshot, send the whole dataset over ssh to
/// the target, start a container there; timed from stop until Redis answers again.
fn stop_copy_start(cluster: &Cluster, from: &ClusterNode, to: &ClusterNode) -> Result<Duration> {
    let keys = cluster.spec.dir.join("ssh");
    let sshd = start_sshd(&keys, to)?;
    let source = format!("{}/flocker/db", from.pool);
    let target = format!("{}/baseline", to.pool);
    let _ = docker(to, &["rm", "-f", "baseline-db"]);
    let started = Instant::now();
    docker(from, &["stop", "flocker-db"])?;
    let snap = format!("{source}@baseline");
    sh(Command::new("zfs").args(["snapshot", &snap]))?;
    let pipeline = format!(
        "zfs send {snap} | ssh -i {key} -p 2222 -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@{addr} zfs recv -F {target}",
        key = keys.join("client").display(),
        addr = to.address,
    );
    sh(Command::new("sh").args(["-c", &pipeline]))?;
    let mountpoint =
        sh(Command::new("zfs").args(["get", "-H", "-o", "value", "mountpoint", &target]))?;
    docker(
        to,
        &[
            "run",
            "-d",
            "--name",
            "baseline-db",
            "-v",
            &format!("{}:/data", mountpoint.trim()),
            "redis-flocker:latest",
        ],
    )?;
    // Ready when Redis answers PING inside the new container (docker exec adds tens of ms).
    let answered = || {
        docker(
            to,
            &[
                "exec",
                "baseline-db",
                "/bin/sh",
                "-c",
                "echo PING | /bin/busybox nc -w 1 127.0.0.1 6379",
            ],
        )
        .is_ok_and(|out| out.contains("PONG"))
    };
    while !answered() {
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "baseline redis never answered"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    let _ = docker(to, &["rm", "-f", "baseline-db"]);
    let _ = docker(from, &["start", "flocker-db"]);
    let _ = sh(Command::new("zfs").args(["destroy", "-r", &target]));
    let _ = sh(Command::new("zfs").args(["destroy", &snap]));
    drop(sshd);
    Ok(elapsed)
}

/// An sshd in the target node's namespace on port 2222, with throwaway keys.
struct Sshd(std::process::Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sshd(dir: &Path, node: &ClusterNode) -> Result<Sshd> {
    std::fs::create_dir_all(dir)?;
    for (name, _) in [("host", ()), ("client", ())] {
        let key = dir.join(name);
        if !key.exists() {
            sh(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key))?;
        }
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port 2222\nHostKey {host}\nAuthorizedKeysFile {auth}\nPermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nPidFile {pid}\nStrictModes no\n",
            host = dir.join("host").display(),
            auth = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let child = node
        .command("/usr/sbin/sshd")
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .context("start sshd")?;
    flocker_e2e::cluster::wait_for_port(
        &format!("{}:2222", node.address),
        Duration::from_secs(10),
    )?;
    Ok(Sshd(child))
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deploys `count` small web applications round-robin, then times `deploy` when nothing
/// changed (median of five).
/// The `--apps` stateless applications of the no-op and route-change deploys.
struct ManyApplications {
    applications: PathBuf,
    deployment: PathBuf,
    /// Per node, the applications placed there.
    placement: Vec<Vec<String>>,
    nodes: Vec<String>,
    dir: PathBuf,
}

impl ManyApplications {
    /// The deployment with `web0` on node `index` instead of where it starts.
    fn with_web0_on(&self, index: usize) -> Result<PathBuf> {
        let mut deployment = String::from("version: 1\nnodes:\n");
        for (i, (node, names)) in self.nodes.iter().zip(&self.placement).enumerate() {
            let mut names: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| *n != "web0")
                .collect();
            if i == index {
                names.push("web0");
            }
            deployment.push_str(&format!("  {node}: [{}]\n", names.join(", ")));
        }
        let path = self.dir.join(format!("many-web0-on-{index}.yml"));
        std::fs::write(&path, deployment)?;
        Ok(path)
    }
}

fn many_applications(nodes: &[&ClusterNode], count: usize, dir: &Path) -> Result<ManyApplications> {
    let mut apps = String::from("version: 1\napplications:\n");
    let mut placement: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
    for i in 0..count {
        apps.push_str(&format!(
            "  web{i}:\n    image: busybox-flocker:latest\n    ports:\n      - internal: 80\n        external: {}\n",
            9000 + i
        ));
        placement[i % nodes.len()].push(format!("web{i}"));
    }
    let mut deployment = String::from("version: 1\nnodes:\n");
    for (node, names) in nodes.iter().zip(&placement) {
        deployment.push_str(&format!("  {}: [{}]\n", node.address, names.join(", ")));
    }
    let applications = dir.join("many.yml");
    let d = dir.join("many-deployment.yml");
    std::fs::write(&applications, apps)?;
    std::fs::write(&d, deployment)?;
    Ok(ManyApplications {
        applications,
        deployment: d,
        placement,
        nodes: nodes.iter().map(|n| n.address.clone()).collect(),
        dir: dir.to_path_buf(),
    })
}

/// A client that scrapes every agent's `/metrics` every 50 ms until dropped.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Scraper {
    fn start(nodes: &[String]) -> Scraper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("{n}:{}", flocker_e2e::cluster::METRICS_PORT))
            .collect();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut scrapes = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for addr in &addrs {
                    if flocker_e2e::prometheus::scrape(addr).is_ok() {
                        scrapes += 1;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
            scrapes
        });
        Scraper {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns how many scrapes succeeded.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median wall time of five no-op deploys of the many applications (deployed first).
fn noop_deploy(cluster: &Cluster, many: &ManyApplications, scraped: bool) -> Result<Duration> {
    deploy(cluster, &many.deployment, &many.applications)?;
    let scraper = scraped.then(|| Scraper::start(&many.nodes));
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        deploy(cluster, &many.deployment, &many.applications)?;
        times.push(started.elapsed());
    }
    if let Some(s) = scraper {
        let scrapes = s.finish();
        ensure!(scrapes > 0, "the scraper never got an answer");
    }
    Ok(median(times))
}

struct RouteChanges {
    wall: Duration,
    routes_phase: Duration,
}

/// Five deploys that each move `web0` to the next node (a stop, a start and new routes on
/// every node): median wall time and median `routes` phase.
fn route_change_deploys(
    cluster: &Cluster,
    nodes: &[&ClusterNode],
    many: &ManyApplications,
    scraped: bool,
) -> Result<RouteChanges> {
    let scraper = scraped.then(|| Scraper::start(&many.nodes));
    let (mut walls, mut routes) = (Vec::new(), Vec::new());
    for round in 1..=5 {
        let target = many.with_web0_on(round % nodes.len())?;
        let started = Instant::now();
        let out = cluster.flockerctl(&[
            "deploy",
            &target.display().to_string(),
            &many.applications.display().to_string(),
        ])?;
        walls.push(started.elapsed());
        ensure!(
            out.status.success(),
            "deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let phase = stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix("routes done in "))
            .and_then(|rest| rest.trim_end_matches(" ms").parse::<u64>().ok())
            .context("no routes phase time in the deploy output")?;
        routes.push(Duration::from_millis(phase));
    }
    if let Some(s) = scraper {
        ensure!(s.finish() > 0, "the scraper never got an answer");
    }
    Ok(RouteChanges {
        wall: median(walls),
        routes_phase: median(routes),
    })
}
