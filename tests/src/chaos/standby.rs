//! The replication and failover rows of the matrix (issue 13's failure model under issue
//! 17's faults).
//!
//! - `replication`: Redis runs on n1; the cell's deploy gives it a standby on n2 (every
//!   [`EVERY`]). The fault is injected when that deploy announces its `standby` phase and
//!   held for [`HOLD`] (a partition for its whole time) while the owner replicates and a
//!   writer sets keys through n3. Beside invariants 1-5, the standby's replica must then
//!   hold a snapshot taken after the last acknowledged write within [`CATCH_UP`] (counted
//!   under invariant 1: an acknowledged write that never reaches the replica is lost in the
//!   next failover).
//! - `failover`: Redis on n1 is replicated to n2 until the replica holds every acknowledged
//!   write; n1 dies hard (its daemons and containers killed, its link down); then
//!   `flockerctl deploy --failover` places Redis on n2, the fault injected when it
//!   announces its `failover` phase (n2 is the target; a partition or slow link cuts it
//!   from the host, where `flockerctl` runs, and from n3, whose routes must change).
//!   Recovery deploys (with `--failover`) run while n1 is dead; then n1 returns, must fence
//!   itself (its Redis gone, its copy set aside), and deploys run until nothing is to do. A
//!   killed daemon's node alone is started again (`Cluster::up_node`): n1 stays dead until
//!   it returns.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use super::deploy::{self, PhaseHook};
use super::faults::Injector;
use super::invariants::VOLUME;
use super::matrix::{Cell, Verdict};
use super::workload::Writer;
use super::{Recovery, Suite, judge_faulted};
use crate::cluster::{Cluster, ClusterNode, HOST_ADDRESS};

/// The standby's replication interval.
pub const EVERY: Duration = Duration::from_secs(2);
/// How long a replication cell's fault is held after its deploy (a few rounds).
pub const HOLD: Duration = Duration::from_secs(10);
/// How long the replica may take to hold a snapshot newer than a moment (several rounds,
/// and a full push of the small volume).
const CATCH_UP: Duration = Duration::from_secs(60);
/// How long the failover's writes before n1 dies run.
const WRITES_BEFORE: Duration = Duration::from_secs(2);
/// How long a returning node may take to fence itself (it asks its peers every 5 s).
const FENCE_WITHIN: Duration = Duration::from_secs(30);

impl Suite {
    pub(super) fn replication_cell(
        &mut self,
        cell: Cell,
        notes: &mut Vec<String>,
    ) -> Result<Verdict> {
        let mut broken = BTreeSet::new();
        let nodes = &self.cluster.nodes;
        let (owner, standby, bystander) = (&nodes[0], &nodes[1], &nodes[2]);
        let writer = Writer::start(format!("{}:6379", bystander.address), cell.label());
        let injector = RefCell::new(Injector::new(
            &self.cluster,
            owner,
            standby,
            cell.fault,
            self.options.partition_for,
        ));
        let failures_before = replication_failures(owner);
        let hook = PhaseHook {
            phase: "standby",
            run: Box::new(|ctl| injector.borrow_mut().inject(ctl)),
            tick: Box::new(|| injector.borrow_mut().tick()),
        };
        let faulted = deploy::deploy(
            &self.cluster,
            &[],
            &self.replicated,
            &self.application,
            self.options.deploy_deadline,
            Some(hook),
        );
        // Held while the owner replicates.
        let held = Instant::now() + HOLD;
        let mut removed = Ok(());
        while Instant::now() < held {
            if let Err(e) = injector.borrow_mut().tick() {
                removed = Err(e);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let failed_rounds = replication_failures(owner).saturating_sub(failures_before);
        let removed = removed.and_then(|()| injector.borrow_mut().remove());
        let acked = writer.stop();
        let last_ack = now_ms();
        notes.push(format!(
            "{} writes acknowledged while replicating",
            acked.len()
        ));
        self.ledger.extend(acked);
        let faulted = faulted?;
        removed.context("removing the fault")?;
        notes.extend(injector.into_inner().log);
        if !judge_faulted(cell, &faulted, notes, &mut broken) {
            return Ok(Verdict::PhaseNotReached);
        }
        notes.push(format!(
            "{failed_rounds} replication rounds failed while the fault was in place ({}'s agent log)",
            owner.name
        ));
        let replicated = self.replicated.clone();
        let recovered = self.recover(&[], &replicated, notes, &mut broken)?;
        match wait_for_replica(self, &replicated, standby, last_ack) {
            Ok(waited) => notes.push(format!(
                "the replica on {} holds a snapshot taken after the last acknowledged write \
                 ({:.1} s after the recovery)",
                standby.name,
                waited.as_secs_f64()
            )),
            Err(e) => {
                broken.insert(1);
                notes.push(format!("invariant 1: {e:#}"));
            }
        }
        let verdict = self.judge(&replicated, 0, recovered, broken, notes);
        if cell.fault.fails_replication() && failed_rounds == 0 {
            return Ok(Verdict::NotRun {
                why: "the fault hit nothing: no replication round failed while it was in place"
                    .into(),
            });
        }
        Ok(verdict)
    }

    pub(super) fn failover_cell(&mut self, cell: Cell, notes: &mut Vec<String>) -> Result<Verdict> {
        let nodes = self.cluster.nodes.clone();
        let (dead, target, bystander) = (&nodes[0], &nodes[1], &nodes[2]);

        // Redis on n1 replicated to n2, which holds every write acknowledged so far.
        let replicated = self.replicated.clone();
        self.converge(&replicated)
            .context("giving Redis its standby")?;
        let writer = Writer::start(
            format!("{}:6379", bystander.address),
            format!("{}:before", cell.label()),
        );
        std::thread::sleep(WRITES_BEFORE);
        let acked = writer.stop();
        let last_ack = now_ms();
        notes.push(format!(
            "{} writes acknowledged before {} died",
            acked.len(),
            dead.name
        ));
        self.ledger.extend(acked);
        wait_for_replica(self, &replicated, target, last_ack)
            .context("the replica before the failover")?;

        let fenced_before = fenced_copies(dead)?;
        kill_node(dead)?;
        notes.push(format!("{} killed (daemons, containers, link)", dead.name));
        let result = self.fail_over(cell, fenced_before, notes);
        if result.is_err() {
            // Whatever failed, the next cell needs n1 back.
            if let Err(e) = revive_node(&self.cluster, dead) {
                notes.push(format!("{} could not be brought back: {e:#}", dead.name));
            }
        }
        result
    }

    /// The failover itself once n1 is dead: the faulted deploy, recovery while n1 is dead,
    /// n1's return and fencing, recovery with every node.
    fn fail_over(
        &mut self,
        cell: Cell,
        fenced_before: usize,
        notes: &mut Vec<String>,
    ) -> Result<Verdict> {
        let mut broken = BTreeSet::new();
        let nodes = self.cluster.nodes.clone();
        let (dead, target, bystander) = (&nodes[0], &nodes[1], &nodes[2]);
        let writer = Writer::start(format!("{}:6379", bystander.address), cell.label());
        // No data crosses between nodes in a failover (the promotion is the standby's own):
        // a partition or a slow link cuts the target from flockerctl (on the host) and from
        // the bystander, whose routes must change and through which the writer writes.
        let injector = RefCell::new(Injector::at_target(
            &self.cluster,
            target,
            vec![HOST_ADDRESS.to_string(), bystander.address.clone()],
            cell.fault,
            self.options.partition_for,
        ));
        let hook = PhaseHook {
            phase: cell.phase,
            run: Box::new(|ctl| injector.borrow_mut().inject(ctl)),
            tick: Box::new(|| injector.borrow_mut().tick()),
        };
        let faulted = deploy::deploy(
            &self.cluster,
            &["--failover"],
            &self.on_target,
            &self.application,
            self.options.deploy_deadline,
            Some(hook),
        );
        let removed = injector.borrow_mut().remove();
        let faulted = match (faulted, removed) {
            (Ok(faulted), Ok(())) => faulted,
            (Err(e), _) | (_, Err(e)) => {
                self.ledger.extend(writer.stop());
                return Err(e.context("the faulted failover"));
            }
        };
        notes.extend(injector.into_inner().log);
        let phase_seen = judge_faulted(cell, &faulted, notes, &mut broken);
        let on_target = self.on_target.clone();
        // The writer goes on until the failover is done: writes the promoted owner
        // acknowledged must outlive n1's return.
        let while_dead = if phase_seen {
            self.recover(&["--failover"], &on_target, notes, &mut broken)
        } else {
            Ok(Recovery::NotConverged)
        };
        let acked = writer.stop();
        notes.push(format!(
            "{} writes acknowledged during the failover and its recovery",
            acked.len()
        ));
        self.ledger.extend(acked);
        let while_dead = while_dead?;

        revive_node(&self.cluster, dead)?;
        match wait_fenced(dead, fenced_before) {
            Ok(waited) => notes.push(format!(
                "{} returned and fenced itself (its copy set aside) within {:.1} s",
                dead.name,
                waited.as_secs_f64()
            )),
            Err(e) => {
                broken.insert(2);
                notes.push(format!("invariant 2: {e:#}"));
            }
        }
        if !phase_seen {
            return Ok(Verdict::PhaseNotReached);
        }
        let returned = self.recover(&[], &on_target, notes, &mut broken)?;
        Ok(self.judge(&on_target, 1, while_dead.then(returned), broken, notes))
    }
}

/// How many replication rounds the agent of `node` logged as failed so far (its log is
/// rewritten only when the agent is started again).
fn replication_failures(node: &ClusterNode) -> usize {
    std::fs::read_to_string(node.agent_log())
        .map(|log| count_replication_failures(&log))
        .unwrap_or(0)
}

fn count_replication_failures(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("replication failed"))
        .count()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When a push snapshot was taken, from its name (`push-SEQ-UNIXMS`).
pub fn snapshot_time_ms(name: &str) -> Option<u64> {
    name.strip_prefix("push-")?.split_once('-')?.1.parse().ok()
}

/// The newest snapshot `flockerctl status` reports for the replica on `node`, by the time it
/// was taken.
fn replica_snapshot_ms(suite: &Suite, deployment: &Path, node: &ClusterNode) -> Result<u64> {
    let out = suite.cluster.flockerctl(&[
        "status",
        &deployment.display().to_string(),
        &suite.application.display().to_string(),
        "--output",
        "json",
    ])?;
    ensure!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).context("status json")?;
    replica_time_in(&status, &node.address).with_context(|| {
        format!(
            "no replica of {VOLUME} with a dated snapshot on {}",
            node.name
        )
    })
}

/// The time of the snapshot the status reports for `VOLUME`'s replica on `address`.
fn replica_time_in(status: &serde_json::Value, address: &str) -> Option<u64> {
    let volume = status["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == VOLUME)?;
    let replica = volume["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["node"] == address)?;
    snapshot_time_ms(replica["snapshot"].as_str()?)
}

/// Waits (at most [`CATCH_UP`]) until the replica on `node` holds a snapshot taken after
/// `after_ms`; returns how long that took.
fn wait_for_replica(
    suite: &Suite,
    deployment: &Path,
    node: &ClusterNode,
    after_ms: u64,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = String::from("no status yet");
    while started.elapsed() < CATCH_UP {
        match replica_snapshot_ms(suite, deployment, node) {
            Ok(taken) if taken > after_ms => return Ok(started.elapsed()),
            Ok(taken) => {
                last = format!(
                    "its newest snapshot was taken {} ms before the last acknowledged write",
                    after_ms - taken
                )
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!(
        "the replica on {} did not catch up with the last acknowledged write within {CATCH_UP:?}: {last}",
        node.name
    )
}

/// The node dies hard: every process of its directory (agent, dockerd, containerd,
/// containers) killed, then its link taken down.
fn kill_node(node: &ClusterNode) -> Result<()> {
    for problem in crate::reap::reap(&node.dir) {
        eprintln!("chaos: reap {}: {problem}", node.name);
    }
    link(node, "down")
}

/// The node comes back: its link up, its daemons started (if a fault's restart has not
/// already started them).
fn revive_node(cluster: &Cluster, node: &ClusterNode) -> Result<()> {
    link(node, "up")?;
    // Taking the link down dropped the default route through it.
    let route = Command::new("ip")
        .args(["-n", &node.netns, "route", "replace", "default", "via"])
        .arg(crate::cluster::HOST_ADDRESS)
        .status()
        .context("ip route replace")?;
    ensure!(route.success(), "default route in {}", node.netns);
    cluster
        .up_node(node)
        .context("start the returning node's daemons")
}

fn link(node: &ClusterNode, state: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["-n", &node.netns, "link", "set", "eth0", state])
        .status()
        .context("ip link set")?;
    ensure!(
        status.success(),
        "ip link set eth0 {state} in {}",
        node.netns
    );
    Ok(())
}

/// The copies of the volume fencing set aside on `node` (`NAME.fenced-eEPOCH-UNIXMS`).
fn fenced_copies(node: &ClusterNode) -> Result<usize> {
    let root = format!("{}/flocker", node.pool);
    let names = node.zfs(&["list", "-H", "-o", "name", "-r", &root])?;
    Ok(count_fenced(&root, &names))
}

fn count_fenced(root: &str, names: &str) -> usize {
    let prefix = format!("{root}/{VOLUME}.fenced-");
    names.lines().filter(|n| n.starts_with(&prefix)).count()
}

/// Waits (at most [`FENCE_WITHIN`]) until `node` runs no Redis and its copy of the volume is
/// set aside: no dataset by the volume's name, one more fenced copy than `fenced_before`
/// (the copy is kept, not destroyed).
fn wait_fenced(node: &ClusterNode, fenced_before: usize) -> Result<Duration> {
    let started = Instant::now();
    let dataset = format!("{}/flocker/{VOLUME}", node.pool);
    loop {
        let running = Command::new("docker")
            .args(["-H", &node.docker_host, "ps", "-q", "--filter"])
            .arg(format!("ancestor={}", crate::images::REDIS_IMAGE))
            .output()
            .context("docker ps")?;
        let serving = !running.status.success() || !running.stdout.is_empty();
        let kept = node.zfs(&["list", "-H", "-o", "name", &dataset]).is_ok();
        let set_aside = fenced_copies(node)? > fenced_before;
        if !serving && !kept && set_aside {
            return Ok(started.elapsed());
        }
        if started.elapsed() > FENCE_WITHIN {
            bail!(
                "{} did not fence itself within {FENCE_WITHIN:?} (Redis running: {serving}, \
                 {dataset} still there: {kept}, a new fenced copy: {set_aside})",
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_s_time_comes_from_its_snapshot_name() {
        let status = serde_json::json!({
            "volumes": [
                {"name": "other", "replicas": [{"node": "b", "snapshot": "push-0000000009-9000"}]},
                {"name": VOLUME, "replicas": [
                    {"node": "a", "snapshot": "push-0000000003-1700000000123"},
                    {"node": "b", "snapshot": "manual"},
                ]},
            ]
        });
        assert_eq!(replica_time_in(&status, "a"), Some(1_700_000_000_123));
        assert_eq!(replica_time_in(&status, "b"), None, "an undated snapshot");
        assert_eq!(replica_time_in(&status, "c"), None, "no replica there");
        assert_eq!(snapshot_time_ms("push-12-34"), Some(34));
        assert_eq!(snapshot_time_ms("push-12"), None);
    }

    #[test]
    fn failed_replication_rounds_are_counted_from_the_log() {
        let log = "2026 INFO replicated volume=redis\n\
                   2026 WARN replication failed volume=redis standby=198.18.0.12 error=refused\n\
                   2026 WARN replication failed volume=redis standby=198.18.0.12 error=refused\n";
        assert_eq!(count_replication_failures(log), 2);
        assert_eq!(count_replication_failures(""), 0);
    }

    #[test]
    fn only_the_volume_s_fenced_copies_count() {
        let names = "p/flocker\np/flocker/redis\np/flocker/redis.fenced-e3-1\n\
                     p/flocker/redis.fenced-e5-2\np/flocker/redisx.fenced-e1-1\n\
                     p/flocker/other.fenced-e1-1";
        assert_eq!(count_fenced("p/flocker", names), 2);
    }
}
