//! The invariants checked after each cell converged (numbers as in issue 17):
//!
//! 1. every acknowledged write is readable, with its content (the ledger, through each node);
//! 2. exactly one owner of the volume, at the newest epoch, never below an epoch seen before,
//!    on the node the deployment places it, and one running container, there;
//! 3. the application answers through every node, and takes a write (an application that
//!    still serves reads from memory but can no longer persist, e.g. on a dead mount, fails);
//! 4. nothing left over: no staged or partially received dataset, no snapshot but the push
//!    snapshots the protocol keeps, no `zfs send`/`recv` still running, no filler;
//! 5. (judged by the runner from the deploys: none hung, every failure said what failed).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::faults::filler_of;
use super::workload::Ledger;
use crate::cluster::{Cluster, ClusterNode};
use crate::images::REDIS_IMAGE;

/// The volume (and application) the suite moves.
pub const VOLUME: &str = "redis";
/// Push snapshots a copy may keep once a move is done: the newest one both sides share, and
/// on a copy that received a later pass, that pass's snapshot (pruning keeps every snapshot
/// from the newest common one on).
const KEPT_PUSH_SNAPSHOTS: usize = 2;

/// What the checks found.
#[derive(Debug, Default)]
pub struct Findings {
    pub broken: BTreeSet<u8>,
    pub notes: Vec<String>,
    /// The owner's epoch, when there is exactly one owner.
    pub owner_epoch: Option<u64>,
}

impl Findings {
    fn fail(&mut self, invariant: u8, note: String) {
        self.broken.insert(invariant);
        self.notes.push(format!("invariant {invariant}: {note}"));
    }
}

/// One copy of the volume as `flockerctl status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub node: String,
    pub owner: String,
    pub epoch: u64,
}

/// Checks invariants 1-4 with the volume expected on `owner` at an epoch of at least
/// `min_epoch`.
pub fn check(
    cluster: &Cluster,
    deployment: &Path,
    application: &Path,
    ledger: &Ledger,
    owner: &ClusterNode,
    min_epoch: u64,
) -> Findings {
    let mut found = Findings::default();
    for node in &cluster.nodes {
        let addr = format!("{}:6379", node.address);
        match ledger.check(&addr) {
            Ok(problems) => {
                for p in problems {
                    found.fail(1, p);
                }
            }
            Err(e) => found.fail(3, format!("no answer through {}: {e:#}", node.name)),
        }
        if let Err(e) = probe_write(&addr) {
            found.fail(3, format!("no write through {}: {e:#}", node.name));
        }
    }
    match copies(cluster, deployment, application) {
        Ok(copies) => {
            for problem in ownership_problems(&copies, &owner.address, min_epoch) {
                found.fail(2, problem);
            }
            found.owner_epoch = copies.iter().find(|c| c.node == c.owner).map(|c| c.epoch);
        }
        Err(e) => found.fail(2, format!("no status: {e:#}")),
    }
    for node in &cluster.nodes {
        match running_containers(node) {
            Ok(running) => {
                let expected = usize::from(node.address == owner.address);
                if running != expected {
                    found.fail(
                        2,
                        format!(
                            "{} runs {running} redis containers, expected {expected}",
                            node.name
                        ),
                    );
                }
            }
            Err(e) => found.fail(2, format!("no container list of {}: {e:#}", node.name)),
        }
        match datasets(node) {
            Ok(names) => {
                for problem in leftovers(&node.pool, &names) {
                    found.fail(4, format!("{}: {problem}", node.name));
                }
            }
            Err(e) => found.fail(4, format!("no dataset list of {}: {e:#}", node.pool)),
        }
    }
    for p in stray_transfers() {
        found.fail(4, format!("still running: {p}"));
    }
    found
}

/// One `SET` of a probe key through `addr` (Redis appends it to its AOF with `fsync always`
/// before it answers, so an OK means the volume takes writes). Not in the ledger: nothing
/// later reads it.
fn probe_write(addr: &str) -> Result<()> {
    let mut redis = super::workload::connect(addr)?;
    let key = format!("probe:{addr}");
    let reply = redis.command(&["SET", &key, "1"])?;
    anyhow::ensure!(
        reply.as_deref() == Some("OK"),
        "SET answered {reply:?}, not OK"
    );
    Ok(())
}

/// The volume's copies from `flockerctl status --output json`.
pub fn copies(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<Vec<Copy>> {
    let out = cluster.flockerctl(&[
        "status",
        &deployment.display().to_string(),
        &application.display().to_string(),
        "--output",
        "json",
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("status json")?;
    if let Some(unreachable) = json["unreachable"].as_array()
        && !unreachable.is_empty()
    {
        anyhow::bail!("unreachable nodes: {unreachable:?}");
    }
    let nodes = json["nodes"].as_object().context("status without nodes")?;
    let mut found = Vec::new();
    for (address, node) in nodes {
        for v in node["volumes"].as_array().into_iter().flatten() {
            if v["name"] == VOLUME {
                found.push(Copy {
                    node: address.clone(),
                    owner: v["owner"].as_str().unwrap_or_default().to_string(),
                    epoch: v["epoch"].as_u64().unwrap_or_default(),
                });
            }
        }
    }
    Ok(found)
}

/// Invariant 2 on the copies: one owner, which is `expected`, at the newest epoch, not below
/// `min_epoch`; every copy names that owner or an older one at a lower epoch.
pub fn ownership_problems(copies: &[Copy], expected: &str, min_epoch: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let owners: Vec<&Copy> = copies.iter().filter(|c| c.node == c.owner).collect();
    let newest = copies.iter().map(|c| c.epoch).max().unwrap_or(0);
    match owners.as_slice() {
        [] => problems.push(format!("no copy owns the volume: {copies:?}")),
        [owner] => {
            if owner.node != expected {
                problems.push(format!("owned by {}, deployed on {expected}", owner.node));
            }
            if owner.epoch < newest {
                problems.push(format!(
                    "the owner is at epoch {}, a copy at {newest}",
                    owner.epoch
                ));
            }
            if owner.epoch < min_epoch {
                problems.push(format!(
                    "epoch went down: {} after {min_epoch}",
                    owner.epoch
                ));
            }
        }
        many => problems.push(format!("{} copies own the volume: {many:?}", many.len())),
    }
    problems
}

fn running_containers(node: &ClusterNode) -> Result<usize> {
    let out = Command::new("docker")
        .args(["-H", &node.docker_host, "ps", "-q", "--filter"])
        .arg(format!("ancestor={REDIS_IMAGE}"))
        .output()
        .context("docker ps")?;
    anyhow::ensure!(
        out.status.success(),
        "docker ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// Every dataset and snapshot of the node's pool.
fn datasets(node: &ClusterNode) -> Result<Vec<String>> {
    Ok(node
        .zfs(&["list", "-H", "-t", "all", "-o", "name", "-r", &node.pool])?
        .lines()
        .map(str::to_string)
        .collect())
}

/// Invariant 4 on a pool's dataset and snapshot names: beside the pool, `POOL/flocker`, the
/// volume and the empty staging parent, only push snapshots (at most
/// [`KEPT_PUSH_SNAPSHOTS`]) and copies set aside by fencing (`.fenced-`, kept for a person, as
/// ARCHITECTURE.md says) may exist.
pub fn leftovers(pool: &str, names: &[String]) -> Vec<String> {
    let root = format!("{pool}/flocker");
    let volume = format!("{root}/{VOLUME}");
    let staging = format!("{root}/flocker:staging");
    let mut problems = Vec::new();
    let mut push_snapshots = 0;
    for name in names {
        if let Some((dataset, snapshot)) = name.split_once('@') {
            if dataset == volume && snapshot.starts_with("push-") {
                push_snapshots += 1;
            } else if !dataset.contains(".fenced-") {
                problems.push(format!("stray snapshot {name}"));
            }
            continue;
        }
        let expected = [pool, root.as_str(), volume.as_str(), staging.as_str()];
        if expected.contains(&name.as_str())
            || name.starts_with(&format!("{root}/{VOLUME}.fenced-"))
        {
            continue;
        }
        if name == &filler_of(pool) {
            problems.push(format!("the chaos filler {name} was not removed"));
        } else if name.starts_with(&format!("{staging}/")) {
            problems.push(format!("staged receive left: {name}"));
        } else if name.contains('%') {
            problems.push(format!("partial receive left: {name}"));
        } else {
            problems.push(format!("unexpected dataset {name}"));
        }
    }
    if push_snapshots > KEPT_PUSH_SNAPSHOTS {
        problems.push(format!(
            "{push_snapshots} push snapshots on {volume}, at most {KEPT_PUSH_SNAPSHOTS} are kept"
        ));
    }
    problems
}

/// `zfs send` and `zfs recv` processes still running.
fn stray_transfers() -> Vec<String> {
    crate::reap::processes()
        .into_iter()
        .filter(|p| {
            let mut words = p.command_line.split_whitespace();
            let program = words.next().unwrap_or_default();
            (program == "zfs" || program.ends_with("/zfs"))
                && words
                    .next()
                    .is_some_and(|w| matches!(w, "send" | "recv" | "receive"))
        })
        .map(|p| format!("pid {}: {}", p.pid, p.command_line.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(node: &str, owner: &str, epoch: u64) -> Copy {
        Copy {
            node: node.into(),
            owner: owner.into(),
            epoch,
        }
    }

    #[test]
    fn one_owner_at_the_newest_epoch_where_deployed() {
        let moved = [copy("a", "b", 3), copy("b", "b", 4)];
        assert!(ownership_problems(&moved, "b", 4).is_empty());
        assert_eq!(ownership_problems(&moved, "a", 4).len(), 1, "wrong node");
        assert_eq!(
            ownership_problems(&moved, "b", 5).len(),
            1,
            "epoch went down"
        );
        let two = [copy("a", "a", 3), copy("b", "b", 4)];
        assert!(ownership_problems(&two, "b", 4)[0].contains("2 copies own"));
        let stale_owner = [copy("a", "a", 3), copy("b", "a", 4)];
        assert!(
            ownership_problems(&stale_owner, "a", 0)
                .iter()
                .any(|p| p.contains("a copy at 4"))
        );
        assert!(ownership_problems(&[copy("a", "b", 3)], "a", 0)[0].contains("no copy owns"));
    }

    #[test]
    fn leftovers_name_what_should_not_be_there() {
        let names: Vec<String> = [
            "p",
            "p/flocker",
            "p/flocker/redis",
            "p/flocker/redis@push-0000000007-1",
            "p/flocker/redis@push-0000000008-2",
            "p/flocker/flocker:staging",
            "p/flocker/redis.fenced-e3-99",
            "p/flocker/redis.fenced-e3-99@push-0000000001-1",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert!(
            leftovers("p", &names).is_empty(),
            "{:?}",
            leftovers("p", &names)
        );
        let mut bad = names.clone();
        bad.extend(
            [
                "p/flocker/flocker:staging/redis",
                "p/flocker/redis/%recv",
                "p/flocker/redis@manual",
                "p/flocker/redis@push-0000000009-3",
                "p/chaos-fill",
            ]
            .map(String::from),
        );
        let found = leftovers("p", &bad);
        assert_eq!(found.len(), 5, "{found:?}");
        assert!(found[0].contains("staged receive left"));
        assert!(found[1].contains("partial receive left"));
        assert!(found[2].contains("stray snapshot p/flocker/redis@manual"));
        assert!(found[3].contains("not removed"));
        assert!(found[4].contains("3 push snapshots"));
    }
}
