//! End to end: an application never runs on a volume that is not there.
//!
//! The reproduction of the lost-writes bug on a two-node cluster: Redis holds a key, its
//! container crashes and its ZFS dataset is unmounted (as after the storage daemon restarts).
//! The next deploy must not start Redis on the bare directory left behind: it mounts the
//! dataset (the directory is empty) and Redis comes back with its key; where the bare
//! directory holds files of its own, it refuses, names them, and nothing starts. The agent's
//! supervisor (Docker's own restart policy is `no`) follows the same rule, and a running Redis
//! whose volume is no longer what its path shows is reported by `flockerctl status`.
//!
//! The datasets are unmounted only after their container stopped: zfs-fuse wedged (a FUSE
//! request never answered, the pool busy for good) once when a dataset was force-unmounted
//! under a running container and mounted again. A mount that vanishes under a running Redis
//! is played by another filesystem mounted over the volume's path, which the same check sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::redis::Redis;
use flocker_e2e::zfs::run;

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
      name: never
";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn docker(node: &ClusterNode, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(["-H", &node.docker_host])
        .args(args)
        .output()?;
    ensure!(out.status.success(), "docker {args:?}: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn redis_running(node: &ClusterNode) -> Result<bool> {
    Ok(docker(
        node,
        &["inspect", "-f", "{{.State.Running}}", "flocker-redis"],
    )? == "true")
}

fn redis(node: &ClusterNode) -> Result<Redis> {
    let addr = format!("{}:6379", node.address);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Redis::connect(&addr, Duration::from_secs(2)).and_then(|mut r| {
            r.command(&["PING"])?;
            Ok(r)
        }) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e.context(addr)),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits up to `limit` for `what` to hold.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("not within {limit:?}: {what}")
}

/// Kills Redis (a crash: exit 137), waits until it stopped, unmounts its dataset (as a
/// storage daemon restart does) and optionally leaves a file in the bare directory.
fn crash_then_unmount(node: &ClusterNode, dataset: &str, bare: &Path, stray: bool) -> Result<()> {
    docker(node, &["kill", "flocker-redis"])?;
    eventually(Duration::from_secs(10), "redis stopped", || {
        Ok(!redis_running(node)?)
    })?;
    run("zfs", &["unmount", dataset]).context("unmount after the crash")?;
    ensure!(mounted(dataset)? == "no", "{dataset} still mounted");
    if stray {
        std::fs::write(bare.join("stray.rdb"), "written while unmounted")?;
    }
    Ok(())
}

/// The status text and JSON's `volume_problem` of the first container on `node`.
fn status_problem(
    cluster: &Cluster,
    d: &str,
    a: &str,
    node: &ClusterNode,
) -> Result<(String, serde_json::Value)> {
    let out = cluster.flockerctl(&["status", d, a])?;
    let said = text(&out);
    let out = cluster.flockerctl(&["status", d, a, "--output", "json"])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        said,
        json["nodes"][&node.address]["containers"][0]["volume_problem"].clone(),
    ))
}

fn mounted(dataset: &str) -> Result<String> {
    Ok(
        run("zfs", &["get", "-H", "-o", "value", "mounted", dataset])?
            .trim()
            .to_string(),
    )
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn nothing_runs_on_a_volume_that_is_not_mounted() -> Result<()> {
    build_binaries();
    let mut cluster = Cluster::up(ClusterSpec {
        pool_size: "512M",
        ..ClusterSpec::for_test("e2e-proof", 2, "nftables")
    })?;
    cluster.teardown_on_drop = true;
    let n1 = cluster.nodes[0].clone();
    let files = tempfile::tempdir()?;
    let apps = files.path().join("application.yml");
    std::fs::write(&apps, APPLICATIONS)?;
    let deployment = files.path().join("deployment.yml");
    std::fs::write(
        &deployment,
        format!(
            "version: 1\nnodes:\n  {}: [redis]\n  {}: []\n",
            n1.address, cluster.nodes[1].address
        ),
    )?;
    let (d, a) = (deployment.display().to_string(), apps.display().to_string());
    let deploy = |apps: &Path| cluster.flockerctl(&["deploy", &d, &apps.display().to_string()]);
    let out = deploy(&apps)?;
    ensure!(out.status.success(), "first deploy: {}", text(&out));
    redis(&n1)?.command(&["SET", "kept", "yes"])?;
    redis(&n1)?.command(&["SAVE"])?;
    let restart_policy = || {
        docker(
            &n1,
            &[
                "inspect",
                "-f",
                "{{.HostConfig.RestartPolicy.Name}}",
                "flocker-redis",
            ],
        )
    };
    ensure!(
        restart_policy()? == "no",
        "Docker must not restart a managed container by itself"
    );
    let dataset = format!("{}/flocker/redis", n1.pool);
    let bare =
        PathBuf::from(run("zfs", &["get", "-H", "-o", "value", "mountpoint", &dataset])?.trim());
    let (said, problem) = status_problem(&cluster, &d, &a, &n1)?;
    ensure!(
        problem.is_null() && !said.contains("volume problem"),
        "healthy: {said}"
    );

    // 1. The reproduction: Redis crashed, its dataset unmounted, the bare directory empty.
    //    The redeploy mounts the dataset and Redis comes back with its key.
    crash_then_unmount(&n1, &dataset, &bare, false)?;
    let out = deploy(&apps)?;
    ensure!(out.status.success(), "redeploy: {}", text(&out));
    ensure!(mounted(&dataset)? == "yes", "the agent mounted the dataset");
    let got = redis(&n1)?.command(&["GET", "kept"])?;
    ensure!(got.as_deref() == Some("yes"), "the key survived: {got:?}");
    let (said, problem) = status_problem(&cluster, &d, &a, &n1)?;
    ensure!(problem.is_null(), "healthy again: {said}");

    // 2. The bare directory holds a file of its own (written while unmounted): the deploy
    //    refuses, naming the volume, the path and the file; nothing starts or mounts.
    crash_then_unmount(&n1, &dataset, &bare, true)?;
    let out = deploy(&apps)?;
    let said = text(&out);
    ensure!(!out.status.success(), "deploy must fail: {said}");
    ensure!(
        said.contains("volume \"redis\" is not at")
            && said.contains(&bare.display().to_string())
            && said.contains("stray.rdb"),
        "the error names the volume, the path and what is there: {said}"
    );
    ensure!(
        !redis_running(&n1)?,
        "nothing started redis on the bare directory"
    );
    ensure!(
        mounted(&dataset)? == "no",
        "nothing mounted over the stray file"
    );
    std::fs::remove_file(bare.join("stray.rdb"))?;

    // 3. With policy `always`, the agent's supervisor restarts Redis, never unproven. The
    //    crash happens while the agent is down (so the supervisor cannot restart Redis
    //    before the dataset is unmounted); the agent that starts next adopts the container,
    //    leaves it down while the stray file is there, and restarts it once it is gone.
    let always = files.path().join("always.yml");
    std::fs::write(&always, APPLICATIONS.replace("name: never", "name: always"))?;
    let out = deploy(&always)?;
    ensure!(
        out.status.success(),
        "deploy with restart always: {}",
        text(&out)
    );
    ensure!(
        restart_policy()? == "no",
        "Docker's policy stays `no` with `always`"
    );
    cluster.kill_agent(&n1)?;
    crash_then_unmount(&n1, &dataset, &bare, true)?;
    cluster.restart_agent(&n1)?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        !redis_running(&n1)?,
        "the supervisor left redis down on the bare directory"
    );
    ensure!(
        mounted(&dataset)? == "no",
        "nothing mounted over the stray file"
    );
    std::fs::remove_file(bare.join("stray.rdb"))?;
    eventually(
        Duration::from_secs(90),
        "the supervisor restarts redis",
        || redis_running(&n1),
    )?;
    ensure!(
        mounted(&dataset)? == "yes",
        "restarted on the mounted dataset"
    );
    let got = redis(&n1)?.command(&["GET", "kept"])?;
    ensure!(got.as_deref() == Some("yes"), "the key survived: {got:?}");

    // 4. Another filesystem over the volume's path under the running Redis: the path no
    //    longer shows the volume, and status says so, in text and JSON, until it is gone.
    run(
        "mount",
        &["-t", "tmpfs", "shadow", &bare.display().to_string()],
    )?;
    let shadowed = status_problem(&cluster, &d, &a, &n1);
    run("umount", &[&bare.display().to_string()])?;
    let (said, problem) = shadowed?;
    ensure!(
        said.contains("volume problem")
            && said.contains("instead of dataset")
            && problem.is_string(),
        "status reports the volume's path showing another filesystem: {said}"
    );
    let (said, problem) = status_problem(&cluster, &d, &a, &n1)?;
    ensure!(problem.is_null(), "healthy once the shadow is gone: {said}");
    Ok(())
}
