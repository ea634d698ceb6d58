//! End to end: `cluster down` and the next `cluster up` succeed after a node's `dockerd` was
//! killed with SIGKILL in the middle of a move, and leave nothing behind: no process naming
//! the cluster's directory (containerd, shims, the orphaned containers), no mount below it or
//! below a pool's mountpoint, no pool, no pool mountpoint directory, no pid file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flocker_e2e::binaries::{binary, build_binaries};
use flocker_e2e::cluster::{Cluster, ClusterSpec};
use flocker_e2e::reap::{mounts_below, processes, processes_of};

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
";

fn spec(dir: &Path) -> ClusterSpec {
    ClusterSpec {
        nodes: 2,
        dir: dir.to_path_buf(),
        pool_size: "512M",
        agent_binary: binary("flocker-agent"),
        ctl_binary: binary("flockerctl"),
        routing: "nftables".into(),
        agent_args: Vec::new(),
    }
}

/// Everything `down` must have removed.
fn traces(cluster_dir: &Path, pools: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for pid in processes_of(&processes(), cluster_dir) {
        found.push(format!("process {pid} names {}", cluster_dir.display()));
    }
    for mount in mounts_below(cluster_dir) {
        found.push(format!("mount {}", mount.display()));
    }
    for pool in pools {
        let listed = Command::new("zpool")
            .args(["list", pool])
            .output()
            .is_ok_and(|o| o.status.success());
        if listed {
            found.push(format!("pool {pool}"));
        }
        let mountpoint = Path::new("/").join(pool);
        for mount in mounts_below(&mountpoint) {
            found.push(format!("mount {}", mount.display()));
        }
        if mountpoint.exists() {
            found.push(format!("directory {}", mountpoint.display()));
        }
    }
    if cluster_dir.exists() {
        found.push(format!("directory {}", cluster_dir.display()));
    }
    found
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn down_and_up_recover_from_a_dockerd_killed_during_a_move() -> Result<()> {
    build_binaries();
    let dir = std::env::temp_dir().join(format!("flocker-e2e-recovery-{}", std::process::id()));
    let cluster = Cluster::up(spec(&dir))?;
    let (n1, n2) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let pools = vec![n1.pool.clone(), n2.pool.clone()];
    let files = tempfile::tempdir()?;
    let apps = files.path().join("application.yml");
    std::fs::write(&apps, APPLICATIONS)?;
    let placed = |on: &str| {
        let path = files.path().join(format!("deployment-{on}.yml"));
        let (a, b) = if on == "n1" {
            ("[redis]", "[]")
        } else {
            ("[]", "[redis]")
        };
        std::fs::write(
            &path,
            format!(
                "version: 1\nnodes:\n  {}: {a}\n  {}: {b}\n",
                n1.address, n2.address
            ),
        )
        .map(|()| path.display().to_string())
    };
    let (on_n1, on_n2) = (placed("n1")?, placed("n2")?);
    let apps = apps.display().to_string();
    let out = cluster.flockerctl(&["deploy", &on_n1, &apps])?;
    ensure!(
        out.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Move redis to n2 and kill n1's dockerd (the source, whose container holds a mount of
    // its dataset) with SIGKILL mid-move.
    let mut moving = Command::new(&cluster.spec.ctl_binary)
        .args(["deploy", &on_n2, &apps])
        .env("FLOCKER_CA_DIR", cluster.ca_dir())
        .spawn()
        .context("start the move")?;
    std::thread::sleep(Duration::from_millis(300));
    let pid = std::fs::read_to_string(n1.dir.join("docker.pid"))?;
    let killed = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
    ensure!(killed.success(), "kill -9 dockerd {pid}");
    let _ = moving.wait();
    ensure!(
        !processes_of(&processes(), &n1.dir).is_empty(),
        "the orphans this test is about: a killed dockerd leaves its shims running"
    );

    Cluster::down(&spec(&dir))?;
    let left = traces(&dir, &pools);
    ensure!(left.is_empty(), "down left behind: {left:#?}");

    // A new cluster in the same place comes up and deploys.
    let mut again = Cluster::up(spec(&dir))?;
    again.teardown_on_drop = true;
    let out = again.flockerctl(&["deploy", &on_n1, &apps])?;
    ensure!(
        out.status.success(),
        "deploy after recovery: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(again);
    let left = traces(&dir, &pools);
    ensure!(left.is_empty(), "the second down left behind: {left:#?}");
    Ok(())
}
