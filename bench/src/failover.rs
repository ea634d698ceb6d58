//! `cargo xtask bench failover`: what a node failure costs (issue 13), on the local cluster.
//!
//! - **RTO**: from `flockerctl deploy --failover` starting to Redis answering through every
//!   surviving node.
//! - **RPO**: writes acknowledged before the owner died but missing after the failover,
//!   as time (the span of their acknowledgements) beside the replication interval and the
//!   window `deploy` reported.
//! - **Cost of replication**: `redis-benchmark` SET throughput through a routed port, with
//!   replication every second against none, alternated to spread the machine's noise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::redis::Redis;

const INTERVAL: &str = "1s";
const ROUNDS: usize = 3;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Bench {
    cluster: Cluster,
    dir: tempfile::TempDir,
    apps: PathBuf,
}

impl Bench {
    /// A deployment with `db` on `owner`, replicated to `standby` when given.
    fn deployment(&self, owner: &ClusterNode, standby: Option<&ClusterNode>) -> Result<PathBuf> {
        let mut out = String::from("version: 1\nnodes:\n");
        for n in &self.cluster.nodes {
            let list = if n.address == owner.address {
                "[db]"
            } else {
                "[]"
            };
            out.push_str(&format!("  {}: {list}\n", n.address));
        }
        if let Some(s) = standby {
            out.push_str(&format!(
                "standby:\n  db: {{nodes: [{}], every: {INTERVAL}}}\n",
                s.address
            ));
        }
        let path = self.dir.path().join(format!(
            "d-{}-{}.yml",
            owner.name,
            standby.map_or("none", |s| s.name.as_str())
        ));
        std::fs::write(&path, out)?;
        Ok(path)
    }

    fn deploy(&self, deployment: &Path, extra: &[&str]) -> Result<String> {
        let d = deployment.display().to_string();
        let a = self.apps.display().to_string();
        let mut args = vec!["deploy"];
        args.extend_from_slice(extra);
        args.extend([d.as_str(), a.as_str()]);
        let out = self.cluster.flockerctl(&args)?;
        ensure!(
            out.status.success(),
            "deploy failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        Ok(text(&out.stdout))
    }
}

/// SET requests per second through `node`'s routed port.
fn set_rate(node: &ClusterNode) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            &node.address,
            "-p",
            "6379",
            "-n",
            "20000",
            "-c",
            "8",
            "-t",
            "set",
            "-q",
        ])
        .output()
        .context("run redis-benchmark")?;
    ensure!(
        out.status.success(),
        "redis-benchmark: {}",
        text(&out.stderr)
    );
    let line = text(&out.stdout);
    // "SET: 12345.67 requests per second, p50=..." (the progress output uses \r).
    let last = line.rsplit('\r').next().unwrap_or(&line);
    last.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read redis-benchmark's output: {last:?}"))
}

fn redis(node: &ClusterNode, timeout: Duration) -> Result<Redis> {
    let deadline = Instant::now() + timeout;
    loop {
        match Redis::connect(
            &format!("{}:6379", node.address),
            Duration::from_millis(500),
        )
        .and_then(|mut r| r.command(&["PING"]).map(|_| r))
        {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(_args: &[String]) -> Result<()> {
    let target = crate::build_release_agents()?;
    let mut cluster = Cluster::up(ClusterSpec {
        nodes: 3,
        dir: PathBuf::from("/tmp/flocker-bench-failover"),
        pool_size: "1536M",
        agent_binary: target.join("flocker-agent"),
        ctl_binary: target.join("flockerctl"),
        routing: "nftables".into(),
        agent_args: Vec::new(),
    })?;
    cluster.teardown_on_drop = true;
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let dir = tempfile::tempdir()?;
    let apps = dir.path().join("application.yml");
    std::fs::write(
        &apps,
        "version: 1\napplications:\n  db:\n    image: redis-flocker:latest\n    ports:\n      - internal: 6379\n        external: 6379\n    volume:\n      mountpoint: /data\n",
    )?;
    let bench = Bench { cluster, dir, apps };
    let plain = bench.deployment(&n1, None)?;
    let replicated = bench.deployment(&n1, Some(&n2))?;

    // Cost: alternate no replication and replication every second.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        bench.deploy(&plain, &[])?;
        redis(&n3, Duration::from_secs(20))?;
        without.push(set_rate(&n3)?);
        bench.deploy(&replicated, &[])?;
        std::thread::sleep(Duration::from_secs(2));
        with.push(set_rate(&n3)?);
        eprintln!(
            "failover: round {}: {:.0} SET/s without, {:.0} with replication",
            round + 1,
            without[round],
            with[round]
        );
    }

    // RPO and RTO: write sequence numbers through n3 until n1 dies.
    let acked: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, n3) = (acked.clone(), stop.clone(), n3.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut r = redis(&n3, Duration::from_secs(10))?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if r.command(&["SET", &format!("seq:{i}"), "x"]).is_err() {
                    break;
                }
                if let Ok(mut a) = acked.lock() {
                    a.push((i, Instant::now()));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    let killed = Instant::now();
    for problem in flocker_e2e::reap::reap(&n1.dir) {
        eprintln!("failover: reap n1: {problem}");
    }
    let down = Command::new("ip")
        .args(["-n", &n1.netns, "link", "set", "eth0", "down"])
        .status()?;
    ensure!(down.success(), "link down");
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let acked: Vec<(u64, Instant)> = acked.into_iter().filter(|(_, t)| *t <= killed).collect();
    let Some(&(last_acked, last_at)) = acked.last() else {
        bail!("no write was acknowledged before the kill");
    };

    let moved = bench.deployment(&n2, None)?;
    let started = Instant::now();
    let answer = bench.deploy(&moved, &["--failover", "--output", "json"])?;
    let mut answering = Vec::new();
    for node in [&n2, &n3] {
        redis(node, Duration::from_secs(30))?;
        answering.push(started.elapsed());
    }
    let rto = answering.iter().max().copied().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&answer)?;
    let reported = json["around"]["promotions"][0]["data_loss_window_ms"].as_u64();

    // The newest sequence number that survived.
    let mut r = redis(&n3, Duration::from_secs(10))?;
    let mut survived = None;
    for &(i, at) in acked.iter().rev() {
        if r.command(&["GET", &format!("seq:{i}")])?.is_some() {
            survived = Some((i, at));
            break;
        }
    }
    let (lost, rpo) = match survived {
        Some((i, at)) => (last_acked - i, last_at.duration_since(at)),
        None => (last_acked + 1, last_at.duration_since(acked[0].1)),
    };
    let addr: SocketAddr = format!("{}:6379", n3.address).parse()?;
    println!();
    println!("## Failover (3 nodes, Redis, replication every {INTERVAL}, nftables routing)");
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| RTO: `deploy --failover` to Redis answering through n2 and n3 ({addr}) | {:.0} ms |",
        rto.as_secs_f64() * 1000.0
    );
    println!(
        "| RPO: acknowledged writes lost | {lost} of {} |",
        acked.len()
    );
    println!(
        "| RPO: time span of the lost writes | {:.0} ms |",
        rpo.as_secs_f64() * 1000.0
    );
    println!(
        "| data-loss window `deploy` reported | {} |",
        reported.map_or("-".into(), |w| format!("{w} ms"))
    );
    println!(
        "| SET/s without replication (median of {ROUNDS}) | {:.0} |",
        median(without.clone())
    );
    println!(
        "| SET/s with replication every {INTERVAL} (median of {ROUNDS}) | {:.0} |",
        median(with.clone())
    );
    println!(
        "| ratio | {:.2}x |",
        median(with) / median(without).max(1.0)
    );
    Ok(())
}
