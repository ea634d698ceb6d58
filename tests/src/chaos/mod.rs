//! The fault matrix, `cargo xtask chaos` (issue 17): on a three-node local cluster with real
//! daemons, Redis (with its volume) is moved from n1 to n2 once per cell while a writer sets
//! keys through n3. The cell's fault is injected the moment `flockerctl deploy --output json`
//! announces the cell's phase, removed once that deploy ends, and then `flockerctl deploy` is
//! run until it reports nothing to do (at most [`Options::recovery_deploys`] times, each
//! bounded). The invariants ([`invariants`]) are checked, then Redis moves back to n1 with no
//! fault (a stuck lock or a half-done state would fail it) and the ledger is checked again.

pub mod delay;
pub mod deploy;
pub mod faults;
pub mod invariants;
pub mod matrix;
mod standby;
pub mod workload;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Cluster, ClusterNode, ClusterSpec};
use deploy::{DeployRun, PhaseHook};
use faults::Injector;
use matrix::{Cell, CellReport, Verdict};
use workload::{Ledger, Writer};

const APPLICATION: &str = "\
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

/// How the suite runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub cells: Vec<Cell>,
    /// Where `flocker-agent` and `flockerctl` are.
    pub binaries: PathBuf,
    /// The cluster's directory (removed at the end).
    pub dir: PathBuf,
    /// How long a partition is held: longer than every timeout of the move.
    pub partition_for: Duration,
    /// The bound of each deploy; one still running then counts as hung.
    pub deploy_deadline: Duration,
    /// Deploys after the faulted one, at most, to reach "nothing to do".
    pub recovery_deploys: usize,
    /// No cell starts after this much time; those left are reported as not run.
    pub budget: Duration,
    /// Leave the cluster up at the end, to look at what a cell left.
    pub keep: bool,
}

/// The cluster, its config files and the ledger, shared by the cells.
struct Suite {
    cluster: Cluster,
    application: PathBuf,
    /// Redis placed on n1 (where each cell starts) and on n2 (where it moves).
    on_source: PathBuf,
    on_target: PathBuf,
    /// Redis on n1 replicated to a standby on n2 (replication and failover cells).
    replicated: PathBuf,
    ledger: Ledger,
    /// The highest epoch the owner had: epochs never go down.
    epoch: u64,
    options: Options,
}

/// Runs the cells and returns their reports.
pub fn run(options: Options) -> Result<Vec<CellReport>> {
    let started = Instant::now();
    let spec = ClusterSpec {
        nodes: 3,
        dir: options.dir.clone(),
        pool_size: "1G",
        agent_binary: options.binaries.join("flocker-agent"),
        ctl_binary: options.binaries.join("flockerctl"),
        routing: "nftables".into(),
        agent_args: Vec::new(),
    };
    // A run that was killed leaves its cluster: start from nothing.
    Cluster::down(&spec).context("remove an earlier chaos cluster")?;
    // A zfs-fuse per node only where a cell kills one: the other cells keep the layout every
    // other e2e test has (the host's one daemon).
    let mut cluster = if options
        .cells
        .iter()
        .any(|c| c.fault == matrix::Fault::KillTargetZfs)
    {
        Cluster::up_with_zfs_per_node(spec)?
    } else {
        Cluster::up(spec)?
    };
    cluster.teardown_on_drop = !options.keep;
    let files = options.dir.join("config");
    std::fs::create_dir_all(&files)?;
    let application = files.join("application.yml");
    std::fs::write(&application, APPLICATION)?;
    let placed = |name: &str, on: usize, standby: Option<usize>| -> Result<PathBuf> {
        let mut text = String::from("version: 1\nnodes:\n");
        for (i, node) in cluster.nodes.iter().enumerate() {
            let apps = if i == on { "[redis]" } else { "[]" };
            text.push_str(&format!("  {}: {apps}\n", node.address));
        }
        if let Some(standby) = standby {
            text.push_str(&format!(
                "standby:\n  redis: {{nodes: [{}], every: {}s}}\n",
                cluster.nodes[standby].address,
                standby::EVERY.as_secs()
            ));
        }
        let path = files.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let on_source = placed("on-n1.yml", 0, None)?;
    let on_target = placed("on-n2.yml", 1, None)?;
    let replicated = placed("on-n1-standby-n2.yml", 0, Some(1))?;
    let mut suite = Suite {
        cluster,
        application,
        on_source,
        on_target,
        replicated,
        ledger: Ledger::default(),
        epoch: 0,
        options,
    };
    suite.start()?;
    let mut reports = Vec::new();
    let mut unusable: Option<String> = None;
    for cell in suite.options.cells.clone() {
        let why = match &unusable {
            Some(why) => Some(why.clone()),
            None if started.elapsed() > suite.options.budget => Some(format!(
                "the time budget of {:?} ran out",
                suite.options.budget
            )),
            None => None,
        };
        if let Some(why) = why {
            reports.push(CellReport {
                cell,
                verdict: Verdict::NotRun { why },
                notes: vec![],
                seconds: 0.0,
            });
            continue;
        }
        eprintln!("chaos: cell {}", cell.label());
        let report = suite.cell(cell);
        eprintln!("chaos: {} -> {:?}", cell.label(), report.verdict);
        if let Err(e) = suite.back_to_source() {
            unusable = Some(format!(
                "the cluster could not be brought back after {}: {e:#}",
                cell.label()
            ));
        }
        reports.push(report);
    }
    Ok(reports)
}

impl Suite {
    fn node(&self, i: usize) -> &ClusterNode {
        &self.cluster.nodes[i]
    }

    fn deploy(&self, deployment: &Path) -> Result<DeployRun> {
        deploy::deploy(
            &self.cluster,
            &[],
            deployment,
            &self.application,
            self.options.deploy_deadline,
            None,
        )
    }

    /// First deployment on n1 and a few keys in it.
    fn start(&mut self) -> Result<()> {
        let run = self.deploy(&self.on_source.clone())?;
        if !run.succeeded() {
            bail!("first deploy: {}", run.summary());
        }
        let mut redis = workload::connect(&format!("{}:6379", self.node(2).address))?;
        let keys: Vec<String> = (0..100).map(|i| format!("seed:{i}")).collect();
        for key in &keys {
            redis.command(&["SET", key, &workload::value_for(key)])?;
        }
        self.ledger.extend(keys);
        Ok(())
    }

    /// Moves Redis back to n1 with no fault and checks it there: each cell starts the same.
    fn back_to_source(&mut self) -> Result<()> {
        let on_source = self.on_source.clone();
        self.converge(&on_source)
            .context("the fault-free move back to n1")?;
        let found = invariants::check(
            &self.cluster,
            &on_source,
            &self.application,
            &self.ledger,
            self.node(0),
            self.epoch,
        );
        if !found.broken.is_empty() {
            bail!("after the move back: {}", found.notes.join("; "));
        }
        self.epoch = found.owner_epoch.unwrap_or(self.epoch);
        Ok(())
    }

    /// Deploys until nothing is to do; returns how many deploys that took.
    fn converge(&self, deployment: &Path) -> Result<usize> {
        let mut last = String::new();
        for n in 1..=self.options.recovery_deploys {
            let run = self.deploy(deployment)?;
            if run.nothing_to_do() {
                return Ok(n);
            }
            last = run.summary();
        }
        bail!(
            "no convergence in {} deploys (last: {last})",
            self.options.recovery_deploys
        )
    }

    fn cell(&mut self, cell: Cell) -> CellReport {
        let started = Instant::now();
        let mut notes = Vec::new();
        let verdict = match self.try_cell(cell, &mut notes) {
            Ok(verdict) => verdict,
            Err(e) => {
                notes.push(format!("the suite failed: {e:#}"));
                Verdict::NotRun {
                    why: "the harness failed (see the notes)".into(),
                }
            }
        };
        CellReport {
            cell,
            verdict,
            notes,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    fn try_cell(&mut self, cell: Cell, notes: &mut Vec<String>) -> Result<Verdict> {
        match cell.phase {
            matrix::REPLICATION => self.replication_cell(cell, notes),
            matrix::FAILOVER => self.failover_cell(cell, notes),
            _ => self.move_cell(cell, notes),
        }
    }

    /// Redis moves from n1 to n2, the fault injected at the cell's phase of that move.
    fn move_cell(&mut self, cell: Cell, notes: &mut Vec<String>) -> Result<Verdict> {
        let mut broken = BTreeSet::new();
        let nodes = &self.cluster.nodes;
        let (source, target, bystander) = (&nodes[0], &nodes[1], &nodes[2]);
        let writer = Writer::start(format!("{}:6379", bystander.address), cell.label());
        let injector = RefCell::new(Injector::new(
            &self.cluster,
            source,
            target,
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
            &[],
            &self.on_target,
            &self.application,
            self.options.deploy_deadline,
            Some(hook),
        );
        let removed = injector.borrow_mut().remove();
        let acked = writer.stop();
        notes.push(format!(
            "{} writes acknowledged during the move",
            acked.len()
        ));
        self.ledger.extend(acked);
        let faulted = faulted?;
        removed.context("removing the fault")?;
        let injector = injector.into_inner();
        notes.extend(injector.log);
        if !judge_faulted(cell, &faulted, notes, &mut broken) {
            return Ok(Verdict::PhaseNotReached);
        }
        let on_target = self.on_target.clone();
        if injector.missed {
            // Converge anyway, so the next cell starts from a settled cluster.
            self.recover(&[], &on_target, notes, &mut broken)?;
            return Ok(Verdict::NotRun {
                why: "the fault hit nothing (see the notes)".into(),
            });
        }
        let recovered = self.recover(&[], &on_target, notes, &mut broken)?;
        Ok(self.judge(&on_target, 1, recovered, broken, notes))
    }

    /// Deploys (with `flags`) until one reports nothing to do, at most
    /// [`Options::recovery_deploys`] times, noting each; `None` when none did.
    fn recover(
        &self,
        flags: &[&str],
        deployment: &Path,
        notes: &mut Vec<String>,
        broken: &mut BTreeSet<u8>,
    ) -> Result<Recovery> {
        for n in 1..=self.options.recovery_deploys {
            let run = deploy::deploy(
                &self.cluster,
                flags,
                deployment,
                &self.application,
                self.options.deploy_deadline,
                None,
            )?;
            notes.push(format!(
                "recovery deploy {n}{}: {} (phases: {})",
                if flags.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", flags.join(" "))
                },
                run.summary(),
                run.phases().join(", ")
            ));
            if run.hung {
                broken.insert(5);
            }
            if !run.succeeded() && run.message().trim().is_empty() {
                broken.insert(5);
                notes.push("invariant 5: a recovery deploy failed without a message".into());
            }
            if run.nothing_to_do() {
                return Ok(Recovery::Converged { deploys: n });
            }
        }
        notes.push(format!(
            "no \"nothing to do\" within {} recovery deploys",
            self.options.recovery_deploys
        ));
        Ok(Recovery::NotConverged)
    }

    /// Checks invariants 1-4 with the volume expected on node `owner` of `deployment`, and
    /// turns the cell's findings into its verdict.
    fn judge(
        &mut self,
        deployment: &Path,
        owner: usize,
        recovered: Recovery,
        mut broken: BTreeSet<u8>,
        notes: &mut Vec<String>,
    ) -> Verdict {
        let found = invariants::check(
            &self.cluster,
            deployment,
            &self.application,
            &self.ledger,
            &self.cluster.nodes[owner],
            self.epoch,
        );
        notes.extend(found.notes);
        broken.extend(found.broken);
        if let Some(epoch) = found.owner_epoch {
            self.epoch = self.epoch.max(epoch);
        }
        match recovered {
            Recovery::Converged { deploys } if broken.is_empty() => Verdict::Converged { deploys },
            _ => Verdict::Broken {
                invariants: broken.into_iter().collect(),
            },
        }
    }
}

/// How the recovery deploys ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// The `deploys`-th (counted from the first recovery deploy of the cell) had nothing to
    /// do.
    Converged {
        deploys: usize,
    },
    NotConverged,
}

impl Recovery {
    /// Recovery in two rounds (before and after a node returns) as one count.
    fn then(self, next: Recovery) -> Recovery {
        match (self, next) {
            (Recovery::Converged { deploys: a }, Recovery::Converged { deploys: b }) => {
                Recovery::Converged { deploys: a + b }
            }
            _ => Recovery::NotConverged,
        }
    }
}

/// Notes how the faulted deploy ended and judges invariant 5 on it; false when it never
/// announced the cell's phase (the fault was not injected).
fn judge_faulted(
    cell: Cell,
    faulted: &DeployRun,
    notes: &mut Vec<String>,
    broken: &mut BTreeSet<u8>,
) -> bool {
    notes.push(format!(
        "faulted deploy: {} (phases: {})",
        faulted.summary(),
        faulted.phases().join(", ")
    ));
    if !faulted.phase_seen {
        return false;
    }
    if faulted.hung {
        broken.insert(5);
    }
    let killed_by_us = cell.fault == matrix::Fault::KillCtl;
    if !faulted.succeeded() && !killed_by_us && faulted.message().trim().is_empty() {
        broken.insert(5);
        notes.push("invariant 5: the faulted deploy failed without a message".into());
    }
    true
}

/// The report file's text: the table, how it was made (`provenance`: when, on which
/// commit), and each cell's notes.
pub fn report(
    reports: &[CellReport],
    options: &Options,
    elapsed: Duration,
    provenance: &str,
) -> String {
    format!(
        "# The fault matrix (`cargo xtask chaos`)\n\n\
         **Moves** (rows pre-copy to routes): Redis with its ZFS volume moves from n1 to n2 of a \
         three-node local cluster (real dockerd, zfs-fuse pools, agents, nftables) while a \
         writer sets keys through n3. Each fault is injected when `flockerctl deploy --output \
         json` announces the phase, removed when that deploy ends (a partition is held \
         {partition} s), then `flockerctl deploy` runs until it reports nothing to do (at most \
         {recovery} times, each bounded at {deadline} s).\n\n\
         **Replication**: Redis on n1; the cell's deploy gives it a standby on n2 (every \
         {every} s). The fault is injected when that deploy announces its `standby` phase and \
         held {hold} s while the owner replicates (a partition {partition} s), the writer \
         going on; then deploys until nothing to do, and the replica on n2 must hold a \
         snapshot taken after the last acknowledged write within 60 s (counted as invariant \
         1). A fault that must make replication rounds fail (the standby's agent or zfs-fuse \
         killed, a partition, the standby's pool full) must have made at least one fail in \
         the first {hold} s, counted from the owner's agent log, or the cell hit nothing and \
         reads `not run`.\n\n\
         **Failover**: Redis on n1 replicated to n2 until the replica holds every acknowledged \
         write; n1 dies hard (agent, dockerd, containers killed, link down); `flockerctl \
         deploy --failover` places Redis on n2, the fault injected when it announces its \
         `failover` phase (the target is n2; no data crosses between nodes in a failover, so \
         a partition or slow link cuts n2 from the host, where `flockerctl` runs, and from \
         n3, whose routes must change; there is no source agent to kill). Deploys with `--failover` run \
         until nothing is to do while n1 is dead, then n1 returns and must fence itself \
         within 30 s (counted as invariant 2), then deploys run until nothing is to do again; \
         the count is of both rounds. The writer goes on through the failover's recovery.\n\n\
         A cell reads `ok, N deploys` when the N-th recovery deploy reported nothing to do \
         and every invariant held; `BROKEN i,j` names the invariants that failed (1 \
         acknowledged writes readable with their content, 2 one owner at a never-decreasing \
         epoch and one running container, 3 Redis answers through every node, 4 no \
         staged/partial dataset, stray snapshot, filler or running zfs send/recv, 5 no hung \
         deploy and every failure names what failed). After each cell Redis moves back to n1 \
         (no standby) with no fault and the invariants are checked again (a stuck lock would \
         fail that move).\n\n\
         The slow link is a 4 Mbit/s token bucket on both nodes' links, 5 % of the packets \
         between them dropped at random (nftables) and 50 ms added each way by an NFQUEUE \
         delayer (`tests/src/chaos/delay.rs`; in a failover only on n2's side, so 50 ms on \
         packets into n2): this kernel has no `sch_netem`, and no `sch_fq` \
         either, which a BPF program setting departure times would need.\n\n\
         The target's zfs-fuse killed (`kill-target-zfs-fuse`): one zfs-fuse serves every \
         pool of a host, so a run with cells of this fault brings the cluster up with a daemon \
         per node (`tests/src/node_zfs.rs`): each node's zfs-fuse runs in a mount namespace of \
         its own (private tmpfs over `/var/run/zfs`, `/var/lock/zfs` and `/var/lib/zfs`, where \
         the pool cache every starting daemon imports from lives) where the \
         node's agent runs too, and the pool's mountpoint is a shared mount, so the datasets \
         it mounts appear on the host for the node's dockerd. The fault is SIGKILL to the \
         target's daemon; removing it unmounts the dead FUSE mounts, starts the daemon again \
         (the pool comes back from its cache file) and runs `zfs mount -a`, as a service \
         manager would. Containers still running on a dead mount are the agent's to notice. \
         Runs without such cells keep the host's one daemon, as every other e2e test does.\n\n\
         The final push's answer lost (`lose-push-answer`, the `final-push` row only): the \
         target, having verified the stream and recorded itself owner, pauses {pause} s \
         before answering (a test hook of the agent, `FLOCKER_TEST_HOOKS`, armed for that one \
         push), and the suite partitions source and target as soon as the target's log shows \
         the pause, for {partition} s; the window is too short to hit from outside. The \
         target's pool full (`target-pool-full`) is shown full first: a 4 MiB write at the \
         pool's root must fail with ENOSPC.\n\n\
         {cells} cells in {minutes:.1} min, {provenance}.\n\n{table}",
        partition = options.partition_for.as_secs(),
        recovery = options.recovery_deploys,
        deadline = options.deploy_deadline.as_secs(),
        every = standby::EVERY.as_secs(),
        pause = faults::ANSWER_PAUSE.as_secs(),
        hold = standby::HOLD.as_secs(),
        cells = reports.len(),
        minutes = elapsed.as_secs_f64() / 60.0,
        table = matrix::render(reports),
    )
}

#[cfg(test)]
mod tests {
    use super::Recovery;

    #[test]
    fn two_recovery_rounds_count_as_one_only_when_both_converged() {
        let (two, one) = (
            Recovery::Converged { deploys: 2 },
            Recovery::Converged { deploys: 1 },
        );
        assert_eq!(two.then(one), Recovery::Converged { deploys: 3 });
        assert_eq!(two.then(Recovery::NotConverged), Recovery::NotConverged);
        assert_eq!(Recovery::NotConverged.then(one), Recovery::NotConverged);
    }
}
