//! End to end: operating a deployment on a two-node cluster (real dockerd, zfs-fuse and
//! nftables in network namespaces), driven through `flockerctl` and each agent's metrics.
//!
//! 1. An application whose health check fails for its first seconds is routed only once it
//!    passed: while the deploy runs, every look at the node's state that shows the route
//!    also shows the application healthy, and at least one look saw it still starting.
//! 2. A move of a volume of known size, with `--output json`: the progress events give the
//!    push's estimated total from the start and its final byte count at the end; the two
//!    agents' metrics, scraped before and after and read with a strict exposition parser,
//!    moved by what the move did.
//! 3. A move to a placement whose health check never passes fails the deploy with what the
//!    check printed, the routes are not switched to it, and the old copy (no volume, so it
//!    retires only once the new one serves) still answers through every node.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec, METRICS_PORT};
use flocker_e2e::prometheus::{Exposition, scrape};
use flocker_e2e::scenario::{Files, docker, http_get, redis_at, text};

/// The health check of `slow`: fails its first three runs, then passes (about 4 s).
const SLOW_CHECK: &str = r#"
    health_check:
      test: ["CMD", "/bin/sh", "-c", "n=$(cat /tmp/tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/tries; echo try $n; [ $n -gt 3 ]"]
      interval: 1s
      timeout: 2s
      retries: 3
      start_period: 60s
"#;

/// A health check that never passes.
const NEVER_CHECK: &str = r#"
    health_check:
      test: ["CMD-SHELL", "echo not ready yet; exit 1"]
      interval: 1s
      timeout: 2s
      retries: 2
"#;

fn applications(slow_check: &str) -> String {
    format!(
        "version: 1
applications:
  db:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6379
    volume:
      mountpoint: /data
  slow:
    image: busybox-flocker:latest
    ports:
      - internal: 80
        external: 8081
{slow_check}"
    )
}

fn deployment(placement: &[(&ClusterNode, &[&str])]) -> String {
    let mut out = String::from("version: 1\nnodes:\n");
    for (node, apps) in placement {
        out.push_str(&format!("  {}: [{}]\n", node.address, apps.join(", ")));
    }
    out
}

fn ctl(cluster: &Cluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(&cluster.spec.ctl_binary);
    cmd.args(args)
        .env("FLOCKER_CA_DIR", cluster.ca_dir())
        .env("FLOCKER_USER", "admin");
    cmd
}

fn status(cluster: &Cluster, d: &Path, a: &Path) -> Result<serde_json::Value> {
    let (d, a) = (d.display().to_string(), a.display().to_string());
    let out = cluster.flockerctl(&["status", &d, &a, "--output", "json"])?;
    ensure!(out.status.success(), "status failed: {}", text(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `(routed, health)` of `app` on `node` from one status answer.
fn routed_and_health(state: &serde_json::Value, node: &ClusterNode, app: &str) -> (bool, String) {
    let n = &state["nodes"][&node.address];
    let routed = n["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["application"] == app);
    let health = n["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["application"]["name"] == app)
        .map(|c| c["health"].as_str().unwrap_or("none").to_string())
        .unwrap_or_else(|| "absent".into());
    (routed, health)
}

fn metrics(node: &ClusterNode) -> Result<Exposition> {
    scrape(&format!("{}:{METRICS_PORT}", node.address))
        .with_context(|| format!("metrics of {}", node.name))
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn health_gates_routes_metrics_count_and_progress_is_watchable() -> Result<()> {
    build_binaries();
    let mut cluster = Cluster::up(ClusterSpec::for_test("e2e-operate", 2, "nftables"))?;
    cluster.teardown_on_drop = true;
    let [n1, n2] = [0, 1].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", &applications(SLOW_CHECK));
    let first = files.write("d1.yml", &deployment(&[(&n1, &["db", "slow"]), (&n2, &[])]));

    // 1. Not routed until healthy.
    let mut child = ctl(
        &cluster,
        &[
            "deploy",
            &first.display().to_string(),
            &apps.display().to_string(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen_starting = false;
    while child.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "the first deploy did not finish");
        let state = status(&cluster, &first, &apps)?;
        let (routed, health) = routed_and_health(&state, &n1, "slow");
        ensure!(
            !routed || health == "healthy",
            "slow is routed while its health is {health}"
        );
        seen_starting |= health == "starting";
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "first deploy failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    ensure!(
        seen_starting,
        "never saw slow starting: the deploy did not wait for it"
    );
    let (routed, health) = routed_and_health(&status(&cluster, &first, &apps)?, &n1, "slow");
    ensure!(
        routed && health == "healthy",
        "after the deploy: routed {routed}, {health}"
    );
    let tries = docker(
        &n1,
        &["exec", "flocker-slow", "/bin/busybox", "cat", "/tmp/tries"],
    )?;
    ensure!(
        tries.parse::<u32>().unwrap_or(0) >= 4,
        "the check ran {tries} times; it passes at the fourth"
    );

    // 2. A move of a volume of known size, watched through events and metrics.
    const BLOB: u64 = 8 << 20;
    docker(
        &n1,
        &[
            "exec",
            "flocker-db",
            "/bin/busybox",
            "dd",
            "if=/dev/urandom",
            "of=/data/blob",
            "bs=1048576",
            "count=8",
        ],
    )?;
    let (src_before, dst_before) = (metrics(&n1)?, metrics(&n2)?);
    let second = files.write("d2.yml", &deployment(&[(&n1, &["slow"]), (&n2, &["db"])]));
    let out = ctl(
        &cluster,
        &[
            "deploy",
            &second.display().to_string(),
            &apps.display().to_string(),
            "--output",
            "json",
        ],
    )
    .output()?;
    check_ok(&out, "the move")?;
    let (src_after, dst_after) = (metrics(&n1)?, metrics(&n2)?);
    redis_at(&n2)?.command(&["PING"])?;

    let events: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("progress events are JSON lines")?;
    let pre_copy = format!("push-volume db to {}", n2.address);
    let progress: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["step"] == pre_copy.as_str())
        .collect();
    let first_event = progress.first().context("no progress of the pre-copy")?;
    let estimate = first_event["bytes_total"]
        .as_u64()
        .context("the first progress event of a full push has its estimated total")?;
    let end = progress
        .iter()
        .find(|e| {
            e["bytes_done"].as_u64().is_some_and(|d| d > 0) && e["bytes_total"] == e["bytes_done"]
        })
        .context("no final progress event of the first pass")?;
    let sent = end["bytes_done"].as_u64().unwrap_or(0);
    ensure!(
        sent >= BLOB,
        "the first push carried {sent} bytes, less than the {BLOB}-byte blob"
    );
    ensure!(
        estimate as f64 >= sent as f64 * 0.8 && estimate as f64 <= sent as f64 * 1.25,
        "estimate {estimate} is not within 20% of the {sent} bytes sent"
    );
    ensure!(
        events
            .iter()
            .filter(|e| e["event"] != "phase")
            .all(|e| e["node"].is_string()),
        "every agent event names its node"
    );

    let delta = |before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let actions = "flocker_converge_actions_total";
    let phases = "flocker_move_phase_duration_seconds_count";
    ensure!(
        delta(
            &src_before,
            &src_after,
            actions,
            &[("kind", "push-volume"), ("result", "ok")]
        ) == 2.0
    );
    ensure!(
        delta(
            &src_before,
            &src_after,
            actions,
            &[("kind", "handoff"), ("result", "ok")]
        ) == 0.0,
        "the final push carries the handoff: no separate handoff step"
    );
    ensure!(
        delta(
            &dst_before,
            &dst_after,
            actions,
            &[("kind", "prepare-application"), ("result", "ok")]
        ) == 1.0
    );
    ensure!(
        delta(
            &src_before,
            &src_after,
            actions,
            &[("kind", "stop-application"), ("result", "ok")]
        ) == 1.0
    );
    ensure!(
        delta(
            &dst_before,
            &dst_after,
            actions,
            &[("kind", "start-application"), ("result", "ok")]
        ) == 1.0
    );
    ensure!(delta(&src_before, &src_after, phases, &[("phase", "final-push")]) == 1.0);
    ensure!(delta(&src_before, &src_after, phases, &[("phase", "pre-copy")]) >= 1.0);
    ensure!(delta(&dst_before, &dst_after, phases, &[("phase", "start")]) == 1.0);
    ensure!(
        delta(
            &dst_before,
            &dst_after,
            "flocker_ready_wait_duration_seconds_count",
            &[("result", "ready")]
        ) == 1.0
    );
    let pushed = delta(
        &src_before,
        &src_after,
        "flocker_volume_sent_bytes_total",
        &[],
    );
    let received = delta(
        &dst_before,
        &dst_after,
        "flocker_volume_received_bytes_total",
        &[],
    );
    ensure!(
        pushed >= sent as f64,
        "sent bytes grew by {pushed}, the first push alone was {sent}"
    );
    ensure!(
        pushed == received,
        "n1 sent {pushed} bytes, n2 received {received}"
    );
    ensure!(
        dst_after.value("flocker_routes_programmed", &[]) == 2.0,
        "n2 routes both ports"
    );
    ensure!(
        delta(
            &dst_before,
            &dst_after,
            "flocker_route_apply_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    ensure!(
        dst_after.value(
            "flocker_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ) == 1.0
    );

    // 3. Never healthy: the deploy fails with the check's words, routes stay.
    let never = files.write("never.yml", &applications(NEVER_CHECK));
    let third = files.write("d3.yml", &deployment(&[(&n1, &[]), (&n2, &["db", "slow"])]));
    let before = metrics(&n2)?;
    let out = ctl(
        &cluster,
        &[
            "deploy",
            &third.display().to_string(),
            &never.display().to_string(),
        ],
    )
    .output()?;
    ensure!(
        out.status.code() == Some(1),
        "a never healthy start must fail the deploy:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    ensure!(
        stderr.contains("not ready yet") && stderr.contains("unhealthy"),
        "the failure says what the check printed: {stderr}"
    );
    let state = status(&cluster, &third, &never)?;
    // A node that follows the route map lists only its local routes, so the forwarded route
    // to the old placement is not in its report; what matters is that none leads here.
    let (_, health) = routed_and_health(&state, &n2, "slow");
    ensure!(health == "unhealthy", "slow on n2 is {health}");
    let route_to_n2 = state["nodes"][&n2.address]["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["application"] == "slow" && r["target"]["kind"] == "local");
    ensure!(
        !route_to_n2,
        "n2 must not route slow to its own unhealthy container"
    );
    let after = metrics(&n2)?;
    ensure!(
        delta(
            &before,
            &after,
            actions,
            &[("kind", "start-application"), ("result", "failed")]
        ) == 1.0
    );
    // The old placement still serves: slow has no volume, so its copy on n1 retires only
    // after the new one is ready and routed to, which never happened.
    for node in [&n1, &n2] {
        let page = http_get(node, 8081).with_context(|| format!("slow through {}", node.name))?;
        ensure!(
            page.contains("flocker"),
            "slow through {} after the failed move: {page}",
            node.name
        );
    }
    // The other application is not disturbed.
    redis_at(&n2)?.command(&["PING"])?;
    Ok(())
}

fn check_ok(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    Ok(())
}
