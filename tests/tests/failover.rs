//! End to end, issue 13: a node dies with Redis on it; its standby replica takes over with
//! `deploy --failover`, losing at most what the reported window says; the dead node comes
//! back, fences itself (no stale Redis, its copy kept aside) and routes to the new owner.
//! Also: a deploy with an unrelated node down goes on for the rest, and a failover that
//! would need a replica nobody has refuses and changes nothing.

use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{AGENT_PORT, Cluster, ClusterNode, ClusterSpec, wait_for_port};
use flocker_e2e::scenario::{Files, redis_at, redis_at_port, text};

/// `redis` is replicated; `cache` (the same image on another port) is not.
const APPLICATIONS: &str = "\
version: 1
applications:
  redis:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6379
    volume:
      mountpoint: /data
    restart_policy:
      name: always
  cache:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6380
    volume:
      mountpoint: /data
    restart_policy:
      name: always
";

const KEYS: usize = 200;

fn deployment(placement: &[(&ClusterNode, &[&str])], standby: Option<&ClusterNode>) -> String {
    let mut out = String::from("version: 1\nnodes:\n");
    for (node, apps) in placement {
        out.push_str(&format!("  {}: [{}]\n", node.address, apps.join(", ")));
    }
    if let Some(node) = standby {
        out.push_str(&format!(
            "standby:\n  redis: {{nodes: [{}], every: 2s}}\n",
            node.address
        ));
    }
    out
}

/// When a push snapshot was taken, from its name (`push-SEQ-UNIXMS`).
fn snapshot_time_ms(name: &str) -> Option<u64> {
    name.strip_prefix("push-")?.split_once('-')?.1.parse().ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(cluster: &Cluster, args: &[&str]) -> Result<Output> {
    let out = cluster.flockerctl(args)?;
    eprintln!(
        "flockerctl {}: exit {:?}\n{}{}",
        args.first().copied().unwrap_or(""),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(out)
}

fn status(cluster: &Cluster, files: &[&str; 2]) -> Result<serde_json::Value> {
    let out = cluster.flockerctl(&["status", files[0], files[1], "--output", "json"])?;
    ensure!(out.status.success(), "status failed: {}", text(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The `status` entry of a volume.
fn volume<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

fn zfs_names(pool: &str) -> Result<Vec<String>> {
    let out = Command::new("zfs")
        .args(["list", "-H", "-o", "name", "-r", pool])
        .output()
        .context("zfs list")?;
    ensure!(out.status.success(), "zfs list: {}", text(&out.stderr));
    Ok(text(&out.stdout).lines().map(str::to_string).collect())
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_dead_owner_fails_over_to_its_standby_and_is_fenced_on_return() -> Result<()> {
    build_binaries();
    let mut cluster = Cluster::up(ClusterSpec::for_test("failover", 3, "nftables"))?;
    cluster.teardown_on_drop = true;
    let result = scenario(&cluster);
    if result.is_err() {
        // The cluster's directory goes with it: show what the agents said first.
        for node in &cluster.nodes {
            let log = std::fs::read_to_string(node.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("=== agent log of {} (last 60 lines)", node.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    result
}

fn scenario(cluster: &Cluster) -> Result<()> {
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", APPLICATIONS);
    let apps = apps.display().to_string();
    let d1 = files.write(
        "d1.yml",
        &deployment(
            &[(&n1, &["redis", "cache"]), (&n2, &[]), (&n3, &[])],
            Some(&n2),
        ),
    );
    let d1 = d1.display().to_string();

    // 1. Redis on n1 with a standby on n2 every 2 s.
    ensure!(
        run(cluster, &["deploy", &d1, &apps])?.status.success(),
        "first deploy"
    );

    // 2. A deploy with an unrelated node down goes on, naming it.
    cluster.kill_agent(&n3)?;
    let out = run(cluster, &["deploy", &d1, &apps])?;
    ensure!(out.status.success(), "deploy with n3 down");
    ensure!(
        text(&out.stderr).contains(&format!("node {} does not answer", n3.address)),
        "n3 named as unreachable"
    );
    cluster.ensure_agent(&n3)?;
    wait_for_port(
        &format!("{}:{AGENT_PORT}", n3.address),
        Duration::from_secs(30),
    )?;

    // 3. Keys written through n1, then replicated: the replica's lag goes under the interval
    //    with a snapshot taken after the last write.
    let mut r = redis_at(&n1)?;
    for i in 0..KEYS {
        r.command(&["SET", &format!("key{i}"), &format!("value{i}")])?;
    }
    let written = now_ms();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(cluster, &[&d1, &apps])?;
        let replica = volume(&s, "redis").and_then(|v| {
            v["replicas"]
                .as_array()?
                .iter()
                .find(|r| r["node"] == n2.address.as_str())
                .cloned()
        });
        let lag = replica.as_ref().and_then(|r| r["lag_ms"].as_u64());
        let taken = replica
            .as_ref()
            .and_then(|r| r["snapshot"].as_str())
            .and_then(snapshot_time_ms);
        if lag.is_some_and(|l| l < 2_000) && taken.is_some_and(|t| t > written) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "replica never caught up: {replica:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Written after that snapshot: may be lost, never half-applied.
    r.command(&["SET", "late", "maybe"])?;
    drop(r);

    // 4. n1 dies hard: agent, dockerd, containerd and containers, and its link.
    for problem in flocker_e2e::reap::reap(&n1.dir) {
        eprintln!("reap n1: {problem}");
    }
    let down = Command::new("ip")
        .args(["-n", &n1.netns, "link", "set", "eth0", "down"])
        .status()?;
    ensure!(down.success(), "link down");

    // 5. Moving both off n1 needs a replica of `cache`, which nobody has: refused, nothing
    //    changed (n2's replica still records n1).
    let both = files.write(
        "both.yml",
        &deployment(&[(&n1, &[]), (&n2, &["redis", "cache"]), (&n3, &[])], None),
    );
    let both = both.display().to_string();
    let out = run(cluster, &["deploy", "--failover", &both, &apps])?;
    ensure!(
        !out.status.success(),
        "failover without a replica must fail"
    );
    ensure!(
        text(&out.stderr).contains("no reachable node holds a replica"),
        "names the missing replica"
    );
    let s = status(cluster, &[&both, &apps])?;
    let record = volume(&s, "redis").context("redis volume")?;
    ensure!(
        record["owner"] == n1.address.as_str(),
        "nothing changed: {record}"
    );

    // 6. Without --failover, moving redis is refused too, naming the way out.
    let d2 = files.write(
        "d2.yml",
        &deployment(&[(&n1, &["cache"]), (&n2, &["redis"]), (&n3, &[])], None),
    );
    let d2 = d2.display().to_string();
    let out = run(cluster, &["deploy", &d2, &apps])?;
    ensure!(
        !out.status.success(),
        "moving off a dead owner needs --failover"
    );
    ensure!(text(&out.stderr).contains("--failover"), "says how");

    // 7. The failover: redis moves to n2 from its replica, with the window stated.
    let started = now_ms();
    let out = run(
        cluster,
        &["deploy", "--failover", "--output", "json", &d2, &apps],
    )?;
    ensure!(out.status.success(), "failover deploy");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let promotion = &answer["around"]["promotions"][0];
    ensure!(promotion["node"] == n2.address.as_str(), "{answer}");
    let finished = now_ms();
    let window = promotion["data_loss_window_ms"]
        .as_u64()
        .context("a data-loss window")?;
    let taken = promotion["snapshot_time_ms"]
        .as_u64()
        .context("the promoted snapshot's time")?;
    ensure!(
        taken > written,
        "the promoted snapshot holds every key: {promotion}"
    );
    ensure!(
        (started.saturating_sub(taken)..=finished.saturating_sub(taken)).contains(&window),
        "the reported window ({window} ms) is the promoted snapshot's age at the deploy"
    );
    for node in [&n2, &n3] {
        let mut r = redis_at(node)?;
        for i in (0..KEYS).step_by(17) {
            let got = r.command(&["GET", &format!("key{i}")])?;
            ensure!(
                got.as_deref() == Some(format!("value{i}").as_str()),
                "key{i} through {}: {got:?}",
                node.name
            );
        }
    }

    // 8. n1 comes back (dockerd first, then its agent): it fences itself.
    let up = Command::new("ip")
        .args(["-n", &n1.netns, "link", "set", "eth0", "up"])
        .status()?;
    ensure!(up.success(), "link up");
    let again = Cluster::up(cluster.spec.clone())?;
    drop(again);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let aside = zfs_names(&n1.pool)?
            .into_iter()
            .any(|n| n.contains("redis.fenced-e1-"));
        let stale = Command::new("docker")
            .args(["-H", &n1.docker_host, "ps", "-q", "--filter", "name=redis"])
            .output()?;
        if aside && text(&stale.stdout).trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "n1 did not fence itself: datasets {:?}",
                zfs_names(&n1.pool)?
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A write through n1's address lands on n2's Redis.
    redis_at(&n1)?.command(&["SET", "after", "fenced"])?;
    let got = redis_at(&n2)?.command(&["GET", "after"])?;
    ensure!(
        got.as_deref() == Some("fenced"),
        "write through n1 reached n2: {got:?}"
    );
    // `cache` is n1's own and comes back there.
    redis_at_port(&n1, 6380)?;

    // 9. One owner, and the next deploy (everyone back) converges.
    let out = run(cluster, &["deploy", &d2, &apps])?;
    ensure!(out.status.success(), "deploy after the return");
    let s = status(cluster, &[&d2, &apps])?;
    let record = volume(&s, "redis").context("redis")?;
    ensure!(record["owner"] == n2.address.as_str(), "{record}");
    let writable: Vec<&String> = s["nodes"]
        .as_object()
        .context("nodes")?
        .iter()
        .filter(|(address, n)| {
            n["volumes"].as_array().is_some_and(|vs| {
                vs.iter()
                    .any(|v| v["name"] == "redis" && v["owner"] == address.as_str())
            })
        })
        .map(|(a, _)| a)
        .collect();
    ensure!(writable == vec![&n2.address], "one owner: {writable:?}");
    Ok(())
}
