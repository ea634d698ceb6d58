//! `cargo xtask bench scale [NODESxAPPS ...]`: what planning and deploying cost as the cluster
//! grows (issue 19). Default sizes: 10x100, 100x1000, 1000x10000 (nodes x applications, each
//! application one port and one volume, applications spread evenly).
//!
//! - `plan`: the release `flockerctl plan --output json` of a first deploy (empty cluster):
//!   wall time, peak RSS (GNU time), JSON size.
//! - deploys against a simulated cluster (`flocker_dataplane::sim`: every agent in this
//!   process, each on its own loopback address over real mutual TLS, containers in memory,
//!   directory volumes on /dev/shm, routes recorded only): a first deploy, a no-op deploy, and
//!   one that moves one application (and its volume) to another node. For each: wall time and
//!   peak RSS of the `flockerctl deploy` process, the converge requests it sent and their
//!   bytes (its JSON summary), and for the move the route map's size and the largest request
//!   beyond the route map.
//!
//! After the first deploy and after the move, a sample of agents is checked: each one's
//! recorded table equals the full table the desired state implies.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use flocker_dataplane::sim::{SimCluster, loopback_address};
use flocker_wire::DesiredState;

/// The port every simulated agent serves on, tried upward until one is free everywhere.
const FIRST_PORT: u16 = 45230;
/// Applications' external ports start here (away from the agents' port).
const FIRST_APP_PORT: u16 = 20000;
/// `--parallel` of every deploy.
const PARALLEL: usize = 64;

struct Size {
    nodes: usize,
    apps: usize,
}

fn parse_sizes(args: &[String]) -> Result<Vec<Size>> {
    if args.is_empty() {
        return Ok(vec![
            Size {
                nodes: 10,
                apps: 100,
            },
            Size {
                nodes: 100,
                apps: 1000,
            },
            Size {
                nodes: 1000,
                apps: 10000,
            },
        ]);
    }
    args.iter()
        .map(|a| {
            let (n, m) = a
                .split_once('x')
                .with_context(|| format!("size {a:?}: expected NODESxAPPS, e.g. 100x1000"))?;
            let size = Size {
                nodes: n.parse().with_context(|| format!("size {a:?}: nodes"))?,
                apps: m
                    .parse()
                    .with_context(|| format!("size {a:?}: applications"))?,
            };
            ensure!(
                size.nodes >= 2 && size.apps >= 1 && size.apps <= 40000,
                "size {a:?}: at least 2 nodes, 1 to 40000 applications"
            );
            Ok(size)
        })
        .collect()
}

/// One measured `flockerctl` run.
struct Run {
    seconds: f64,
    peak_kib: u64,
    stdout: Vec<u8>,
}

/// Runs `flockerctl ARGS` under GNU time; fails with its stderr when it fails.
fn flockerctl(bin: &Path, dir: &Path, args: &[&str]) -> Result<Run> {
    let times = dir.join("time.txt");
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%e %M")
        .arg("-o")
        .arg(&times)
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running flockerctl under /usr/bin/time (apt-get install time)")?;
    if !out.status.success() {
        bail!(
            "flockerctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&times)?;
    let mut fields = text.split_whitespace();
    let seconds = fields.next().context("time: no wall time")?.parse()?;
    let peak_kib = fields.next().context("time: no RSS")?.parse()?;
    Ok(Run {
        seconds,
        peak_kib,
        stdout: out.stdout,
    })
}

fn app_name(i: usize) -> String {
    format!("app{i:05}")
}

fn write_application(path: &Path, apps: usize) -> Result<()> {
    let mut out = String::from("version: 1\napplications:\n");
    for i in 0..apps {
        let port = FIRST_APP_PORT as usize + i;
        let _ = write!(
            out,
            "  {}:\n    image: busybox:latest\n    ports:\n      - internal: 80\n        external: {port}\n    volume:\n      mountpoint: /data\n",
            app_name(i)
        );
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Applications spread evenly, `app0` on node `first_on` (0 normally, 1 after the move).
fn write_deployment(path: &Path, nodes: &[String], apps: usize, first_on: usize) -> Result<()> {
    let mut placed: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
    for i in 0..apps {
        let node = if i == 0 { first_on } else { i % nodes.len() };
        placed[node].push(app_name(i));
    }
    let mut out = String::from("version: 1\nnodes:\n");
    for (node, apps) in nodes.iter().zip(placed) {
        let _ = writeln!(out, "  {node}: [{}]", apps.join(", "));
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// A port free on every node address.
fn free_port(nodes: &[String]) -> Result<u16> {
    'port: for port in FIRST_PORT..FIRST_PORT + 200 {
        for n in nodes {
            if std::net::TcpListener::bind((n.as_str(), port)).is_err() {
                continue 'port;
            }
        }
        return Ok(port);
    }
    bail!("no port free on every simulated node address")
}

/// The summary fields of `flockerctl deploy --output json`.
#[derive(Default)]
struct Sent {
    requests: u64,
    request_bytes: u64,
    route_map_bytes: u64,
    largest_beyond_map: u64,
    phases: u64,
    /// `timings` of the answer: config load, state of every node, plan (ms).
    load_ms: u64,
    gather_ms: u64,
    plan_ms: u64,
}

fn sent(stdout: &[u8]) -> Result<Sent> {
    let v: serde_json::Value = serde_json::from_slice(stdout).context("deploy JSON")?;
    ensure!(v["ok"] == true, "deploy did not succeed: {v}");
    let t = |k: &str| v["timings"][k].as_u64().unwrap_or(0);
    let timed = Sent {
        load_ms: t("load_ms"),
        gather_ms: t("gather_ms"),
        plan_ms: t("plan_ms"),
        ..Sent::default()
    };
    let s = &v["summary"];
    if s.is_null() {
        return Ok(timed);
    }
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    Ok(Sent {
        requests: n("requests"),
        request_bytes: n("request_bytes"),
        route_map_bytes: n("route_map_bytes"),
        largest_beyond_map: n("largest_request_beyond_route_map"),
        phases: n("phases"),
        ..timed
    })
}

/// Agents 0, the middle one and the last record the full table of `desired`.
fn check_tables(cluster: &SimCluster, desired: &DesiredState) -> Result<()> {
    let count = cluster.nodes.len();
    for index in [0, 1, count / 2, count - 1] {
        let node = &cluster.nodes[index];
        let mut have = node.agent.route_table();
        have.sort();
        ensure!(
            have == desired.routes_for(&node.address),
            "node {}: its route table is not the one the desired state implies",
            node.address
        );
    }
    Ok(())
}

fn load_desired(deployment: &Path, application: &Path) -> Result<DesiredState> {
    flocker_ctl::config::load_files(deployment, application)
        .map_err(|e| anyhow::anyhow!("config: {e:?}"))
}

fn kib_mb(kib: u64) -> String {
    format!("{:.0} MB", kib as f64 * 1024.0 / 1e6)
}

fn bytes(b: u64) -> String {
    if b >= 10_000_000 {
        format!("{:.0} MB", b as f64 / 1e6)
    } else if b >= 10_000 {
        format!("{:.0} KB", b as f64 / 1e3)
    } else {
        format!("{b} B")
    }
}

fn measure(flockerctl_bin: &Path, size: &Size, table: &mut String) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("flocker-scale-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())?;
    let d = dir.path();
    let nodes: Vec<String> = (0..size.nodes).map(loopback_address).collect();
    let (app_file, dep_file, moved_file) = (
        d.join("application.yml"),
        d.join("deployment.yml"),
        d.join("deployment-moved.yml"),
    );
    write_application(&app_file, size.apps)?;
    write_deployment(&dep_file, &nodes, size.apps, 0)?;
    write_deployment(&moved_file, &nodes, size.apps, 1)?;
    let s = |p: &Path| p.display().to_string();

    eprintln!("scale {}x{}: plan", size.nodes, size.apps);
    let plan = flockerctl(
        flockerctl_bin,
        d,
        &["plan", &s(&dep_file), &s(&app_file), "--output", "json"],
    )?;

    eprintln!("scale {}x{}: certificates", size.nodes, size.apps);
    let ca = d.join("ca");
    flocker_ctl::ca::init(&ca, "scale")?;
    for n in &nodes {
        flocker_ctl::ca::issue_node(&ca, n)?;
    }
    flocker_ctl::ca::issue_user(&ca, "admin")?;

    eprintln!("scale {}x{}: starting the agents", size.nodes, size.apps);
    let port = free_port(&nodes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = runtime.block_on(SimCluster::start(&d.join("nodes"), &ca, &nodes, port))?;

    let port_s = port.to_string();
    let parallel = PARALLEL.to_string();
    let deploy = |deployment: &Path| -> Result<(Run, Sent)> {
        let run = flockerctl(
            flockerctl_bin,
            d,
            &[
                "deploy",
                "--ca-dir",
                &s(&ca),
                "--port",
                &port_s,
                "--timeout",
                "60",
                "--parallel",
                &parallel,
                "--output",
                "json",
                &s(deployment),
                &s(&app_file),
            ],
        )?;
        let sent = sent(&run.stdout)?;
        Ok((run, sent))
    };
    eprintln!("scale {}x{}: first deploy", size.nodes, size.apps);
    let first = deploy(&dep_file)?;
    check_tables(&cluster, &load_desired(&dep_file, &app_file)?)?;
    eprintln!("scale {}x{}: no-op deploy", size.nodes, size.apps);
    let noop = deploy(&dep_file)?;
    ensure!(noop.1.requests == 0, "the no-op deploy sent requests");
    eprintln!("scale {}x{}: moving one application", size.nodes, size.apps);
    let moved = deploy(&moved_file)?;
    check_tables(&cluster, &load_desired(&moved_file, &app_file)?)?;
    drop(cluster);
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));

    let label = format!("{} x {}", size.nodes, size.apps);
    let _ = writeln!(
        table,
        "| {label} | plan (first deploy, JSON {}) | {:.2} s | {} | - | - | - |",
        bytes(plan.stdout.len() as u64),
        plan.seconds,
        kib_mb(plan.peak_kib)
    );
    for (what, (run, sent)) in [
        ("first deploy", &first),
        ("no-op deploy", &noop),
        ("move one application", &moved),
    ] {
        let per_request = sent
            .request_bytes
            .checked_div(sent.requests)
            .map_or_else(|| "-".into(), bytes);
        let _ = writeln!(
            table,
            "| {label} | {what} ({} phases) | {:.2} s | {} | {} | {} | {per_request} |",
            sent.phases,
            run.seconds,
            kib_mb(run.peak_kib),
            sent.requests,
            bytes(sent.request_bytes),
        );
    }
    let _ = writeln!(
        table,
        "| {label} | no-op: config load / state of every node / plan | {:.2} / {:.2} / {:.2} s | | | | |",
        noop.1.load_ms as f64 / 1000.0,
        noop.1.gather_ms as f64 / 1000.0,
        noop.1.plan_ms as f64 / 1000.0,
    );
    let _ = writeln!(
        table,
        "| {label} | move: route map in each routes request / largest request beyond it | | | | {} / {} | |",
        bytes(moved.1.route_map_bytes),
        bytes(moved.1.largest_beyond_map)
    );
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let sizes = parse_sizes(args)?;
    let release = crate::build_release_flockerctl()?;
    let flockerctl_bin = release.join("flockerctl");
    let mut table = String::from(
        "| nodes x apps | what | wall time | flockerctl peak RSS | requests | bytes sent | per request |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for size in &sizes {
        measure(&flockerctl_bin, size, &mut table)?;
    }
    let report = format!(
        "Scale (issue 19): release flockerctl against a simulated cluster in one process \
         (agents on 127.1.x.y over mutual TLS, containers in memory, directory volumes on \
         /dev/shm, routes recorded only), --parallel {PARALLEL}.\n\n{table}"
    );
    println!("{report}");
    let results = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/scale.md");
    std::fs::write(&results, &report)?;
    eprintln!("written to {}", results.display());
    Ok(())
}
