//! The fault injectors: each fault is injected when the deploy announces the cell's phase,
//! and removed (daemons started again the way `cluster up` starts them) before the recovery
//! deploys.
//!
//! A partition or a slow link acts on [`Link`]s: for a move or replication both sides of the
//! link between source and target, for a failover the target's links to the host and the
//! bystander.
//!
//! The target's zfs-fuse can be killed alone only in a cluster whose nodes each have their
//! own ([`crate::node_zfs`], `Cluster::up_with_zfs_per_node`); the suite brings its cluster up
//! that way when a cell of that fault runs. Removing the fault starts the daemon again as a
//! service manager would (dead FUSE mounts unmounted, the pool imported from its cache file,
//! `zfs mount -a`); what runs on the dead mounts (the target's containers) is left to the
//! agents.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::delay::Delayer;
use super::matrix::Fault;
use crate::cluster::{Cluster, ClusterNode};

/// The nftables table the partition adds in each link's namespace.
const PARTITION_TABLE: &str = "flocker-chaos";
/// The dataset whose reservation fills the target's pool.
const FILL_DATASET: &str = "chaos-fill";
/// The nftables table of the lossy link's random drops.
const LOSS_TABLE: &str = "flocker-chaos-loss";
/// The slow link: a token bucket on both nodes' `eth0` (this kernel has no netem: the delay
/// comes from [`DELAY`], the loss from [`LOSS_PERCENT`]).
const SLOW: [&str; 8] = [
    "root", "tbf", "rate", "4mbit", "burst", "32kb", "latency", "400ms",
];
/// How long the target pauses before answering the final push (`lose-push-answer`): time
/// for the suite to see the pause in its log and partition the link.
pub const ANSWER_PAUSE: Duration = Duration::from_secs(4);
/// How long the suite waits for that pause once the final push is announced.
const PAUSE_WAIT: Duration = Duration::from_secs(60);
/// What the agent logs as a test hook fires (`flocker_dataplane::test_hooks`).
const PAUSE_LOGGED: &str = "test hook: pausing";
/// Percent of the packets on a link dropped at random, each way.
const LOSS_PERCENT: u32 = 5;
/// The delay added to every packet arriving over a link (NFQUEUE, [`super::delay`]): each
/// way where both sides are links.
const DELAY: Duration = Duration::from_millis(50);
/// The NFQUEUE number of the delay of a link's first peer (the next peers take the next
/// numbers; queues are per namespace).
const DELAY_QUEUE: u16 = 17;

/// What is in place once injected, to be removed.
#[derive(Debug, Clone, Copy)]
enum Active<'a> {
    Nothing,
    /// Healed at `until` (by `tick` or `remove`).
    Partition {
        until: Instant,
    },
    SlowLink,
    PoolFull,
    /// A daemon of this node was killed: the cluster starts what is missing of it again.
    Killed(&'a ClusterNode),
    /// This node's zfs-fuse was killed: started again, its pool imported and mounted.
    ZfsKilled(&'a ClusterNode),
    /// The target's pause before answering the final push is armed; the partition starts
    /// when its agent logs the pause (read from `offset` of its log), if before `until`.
    AwaitingPause {
        offset: u64,
        until: Instant,
    },
}

/// Where a partition or a slow link acts: in `node`'s namespace, on its packets to and from
/// `peers` (addresses).
#[derive(Debug, Clone)]
pub struct Link<'a> {
    pub node: &'a ClusterNode,
    pub peers: Vec<String>,
}

/// One fault between a move's source and target.
pub struct Injector<'a> {
    cluster: &'a Cluster,
    /// `None` where there is none (a failover's source is dead).
    source: Option<&'a ClusterNode>,
    target: &'a ClusterNode,
    /// Where a partition or a slow link acts.
    links: Vec<Link<'a>>,
    fault: Fault,
    partition_for: Duration,
    active: Active<'a>,
    /// The slow link's delayers (node name, peer), one per link and peer.
    delayers: Vec<(String, String, Delayer)>,
    /// What was done, for the report.
    pub log: Vec<String>,
    /// The fault hit nothing (the target never paused before its answer).
    pub missed: bool,
}

impl<'a> Injector<'a> {
    /// A fault between `source` and `target`: a partition or a slow link acts on both sides
    /// of the link between them.
    pub fn new(
        cluster: &'a Cluster,
        source: &'a ClusterNode,
        target: &'a ClusterNode,
        fault: Fault,
        partition_for: Duration,
    ) -> Injector<'a> {
        let links = vec![
            Link {
                node: source,
                peers: vec![target.address.clone()],
            },
            Link {
                node: target,
                peers: vec![source.address.clone()],
            },
        ];
        Injector::with_links(cluster, Some(source), target, links, fault, partition_for)
    }

    /// A fault at `target` with no source: a partition or a slow link acts in `target`'s
    /// namespace on its packets to and from each of `peers`.
    pub fn at_target(
        cluster: &'a Cluster,
        target: &'a ClusterNode,
        peers: Vec<String>,
        fault: Fault,
        partition_for: Duration,
    ) -> Injector<'a> {
        let links = vec![Link {
            node: target,
            peers,
        }];
        Injector::with_links(cluster, None, target, links, fault, partition_for)
    }

    fn with_links(
        cluster: &'a Cluster,
        source: Option<&'a ClusterNode>,
        target: &'a ClusterNode,
        links: Vec<Link<'a>>,
        fault: Fault,
        partition_for: Duration,
    ) -> Injector<'a> {
        Injector {
            cluster,
            source,
            target,
            links,
            fault,
            partition_for,
            active: Active::Nothing,
            delayers: vec![],
            log: vec![],
            missed: false,
        }
    }

    /// Injects the fault; `ctl` is the running `flockerctl deploy`.
    pub fn inject(&mut self, ctl: &mut Child) -> Result<()> {
        let target = self.target;
        self.active = match self.fault {
            Fault::KillCtl => {
                ctl.kill().context("kill flockerctl")?;
                Active::Nothing
            }
            Fault::KillSourceAgent => {
                let source = self.source.context("no source agent to kill")?;
                self.cluster.kill_agent(source)?;
                Active::Killed(source)
            }
            Fault::KillTargetAgent => {
                self.cluster.kill_agent(target)?;
                Active::Killed(target)
            }
            Fault::KillTargetDockerd => {
                self.cluster.kill_dockerd(target);
                Active::Killed(target)
            }
            Fault::Partition => {
                for link in &self.links {
                    partition(link)?;
                }
                Active::Partition {
                    until: Instant::now() + self.partition_for,
                }
            }
            Fault::SlowLink => {
                for link in &self.links {
                    let mut tc = link.node.command("tc");
                    tc.args(["qdisc", "replace", "dev", "eth0"]).args(SLOW);
                    run(&mut tc)?;
                    lose(link)?;
                    for (queue, peer) in (DELAY_QUEUE..).zip(&link.peers) {
                        let delayer =
                            Delayer::start(&link.node.netns_path(), peer, queue, DELAY)
                                .with_context(|| format!("delay the link on {}", link.node.name))?;
                        self.delayers
                            .push((link.node.name.clone(), peer.clone(), delayer));
                    }
                }
                Active::SlowLink
            }
            Fault::TargetPoolFull => {
                fill_pool(target)?;
                self.log.push(prove_full(target)?);
                Active::PoolFull
            }
            Fault::LosePushAnswer => {
                let offset = std::fs::metadata(target.agent_log()).map_or(0, |m| m.len());
                let hook = target.test_hooks_dir().join(HOLD_PUSH_ANSWER);
                std::fs::write(&hook, ANSWER_PAUSE.as_millis().to_string())
                    .with_context(|| format!("arm {}", hook.display()))?;
                Active::AwaitingPause {
                    offset,
                    until: Instant::now() + PAUSE_WAIT,
                }
            }
            Fault::KillTargetZfs => {
                let own = target.own_zfs.as_ref().with_context(|| {
                    format!(
                        "{} has no zfs-fuse of its own (Cluster::up_with_zfs_per_node)",
                        target.name
                    )
                })?;
                own.kill().context("kill the target's zfs-fuse")?;
                Active::ZfsKilled(target)
            }
        };
        self.log.push(format!("{} injected", self.fault.name()));
        Ok(())
    }

    /// Heals a partition whose time is up, or starts the one that waited for the target's
    /// pause (called while the deploy runs).
    pub fn tick(&mut self) -> Result<()> {
        match self.active {
            Active::Partition { until } if Instant::now() >= until => self.heal_partition()?,
            Active::AwaitingPause { offset, until }
                if Instant::now() < until
                    && logged_since(&self.target.agent_log(), offset, PAUSE_LOGGED) =>
            {
                for link in &self.links {
                    partition(link)?;
                }
                self.active = Active::Partition {
                    until: Instant::now() + self.partition_for,
                };
                self.log.push(
                    "the target recorded itself owner and paused before answering: partition injected"
                        .into(),
                );
            }
            _ => {}
        }
        Ok(())
    }

    fn heal_partition(&mut self) -> Result<()> {
        for link in &self.links {
            run(link
                .node
                .command("nft")
                .args(["delete", "table", "inet", PARTITION_TABLE]))?;
        }
        self.active = Active::Nothing;
        self.log
            .push(format!("partition healed after {:?}", self.partition_for));
        Ok(())
    }

    /// Removes what is still in place: waits out the partition and heals it, removes the
    /// slow lossy link, the pool's filler and an unfired test hook, starts killed daemons
    /// again.
    pub fn remove(&mut self) -> Result<()> {
        match self.active {
            Active::Nothing => {}
            Active::AwaitingPause { .. } => {
                let hook = self.target.test_hooks_dir().join(HOLD_PUSH_ANSWER);
                let _ = std::fs::remove_file(hook);
                self.missed = true;
                self.log
                    .push("the target never paused before answering a final push".into());
            }
            Active::Partition { until } => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                self.heal_partition()?;
            }
            Active::SlowLink => {
                for link in &self.links {
                    run(link
                        .node
                        .command("tc")
                        .args(["qdisc", "del", "dev", "eth0", "root"]))?;
                    run(link
                        .node
                        .command("nft")
                        .args(["delete", "table", "inet", LOSS_TABLE]))?;
                }
                for (node, peer, delayer) in self.delayers.drain(..) {
                    let delayed = delayer.stop().context("stop the link's delay")?;
                    self.log
                        .push(format!("{delayed} packets from {peer} delayed on {node}"));
                }
                self.log.push("slow lossy link removed".into());
            }
            Active::PoolFull => {
                self.target
                    .zfs(&["destroy", &filler_of(&self.target.pool)])?;
                self.log.push("pool filler destroyed".into());
            }
            Active::ZfsKilled(node) => {
                if let Some(own) = &node.own_zfs {
                    own.restart().context("restart the killed zfs-fuse")?;
                }
                self.log.push(format!(
                    "zfs-fuse of {} restarted (dead mounts unmounted, pool imported, zfs mount -a)",
                    node.name
                ));
            }
            Active::Killed(node) => {
                self.cluster
                    .up_node(node)
                    .context("restart the killed daemon")?;
                self.log.push(format!(
                    "daemons of {} restarted (as cluster up does, after reaping)",
                    node.name
                ));
            }
        }
        self.active = Active::Nothing;
        Ok(())
    }
}

/// The test hook's file that makes the target pause before answering a final push
/// (`flocker_dataplane::test_hooks::Hook::HoldPushAnswer`).
const HOLD_PUSH_ANSWER: &str = "hold-push-answer";

/// Whether `log` has `needle` after its first `offset` bytes (only those are read: this runs
/// every tick).
fn logged_since(log: &std::path::Path, offset: u64, needle: &str) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut tail = Vec::new();
    std::fs::File::open(log)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut tail)
        })
        .is_ok_and(|_| String::from_utf8_lossy(&tail).contains(needle))
}

/// The set of a link's peers in nftables syntax.
fn peer_set(link: &Link) -> String {
    format!("{{ {} }}", link.peers.join(", "))
}

/// Drops every packet between the link's node and its peers in the node's namespace (in,
/// out, forwarded).
fn partition(link: &Link) -> Result<()> {
    let (node, peer) = (link.node, peer_set(link));
    let rules = format!(
        "table inet {PARTITION_TABLE} {{\n\
         chain input {{ type filter hook input priority -300; ip saddr {peer} drop; }}\n\
         chain output {{ type filter hook output priority -300; ip daddr {peer} drop; }}\n\
         chain forward {{ type filter hook forward priority -300; ip saddr {peer} drop; ip daddr {peer} drop; }}\n\
         }}\n"
    );
    let file = node.dir.join("chaos-partition.nft");
    std::fs::write(&file, rules).context("write the partition's rules")?;
    run(node.command("nft").arg("-f").arg(&file))
}

/// Drops [`LOSS_PERCENT`] of the packets between the link's node and its peers, at random,
/// in the node's namespace.
fn lose(link: &Link) -> Result<()> {
    let (node, peer) = (link.node, peer_set(link));
    let drop = format!("numgen random mod 100 < {LOSS_PERCENT} drop");
    let rules = format!(
        "table inet {LOSS_TABLE} {{\n\
         chain input {{ type filter hook input priority -300; ip saddr {peer} {drop}; }}\n\
         chain output {{ type filter hook output priority -300; ip daddr {peer} {drop}; }}\n\
         }}\n"
    );
    let file = node.dir.join("chaos-loss.nft");
    std::fs::write(&file, rules).context("write the lossy link's rules")?;
    run(node.command("nft").arg("-f").arg(&file))
}

/// Reserves all the free space of the node's pool for an unmounted dataset of its own.
fn fill_pool(node: &ClusterNode) -> Result<()> {
    let pool = &node.pool;
    let filler = filler_of(pool);
    node.zfs(&["create", "-o", "mountpoint=none", &filler])?;
    let available: u64 = node
        .zfs(&["get", "-Hp", "-o", "value", "available", pool])?
        .trim()
        .parse()
        .context("the pool's available bytes")?;
    // ZFS may refuse the last few blocks; a reservation just below is as full.
    for spare in [0u64, 1 << 20, 8 << 20] {
        let size = available.saturating_sub(spare).to_string();
        if node
            .zfs(&["set", &format!("reservation={size}"), &filler])
            .is_ok()
        {
            return Ok(());
        }
    }
    let _ = node.zfs(&["destroy", &filler]);
    bail!("could not reserve the free space of {pool}")
}

/// Shows that the filled pool refuses a write: 4 MiB written and synced into a file at the
/// pool's root must fail. Returns what happened, for the report.
fn prove_full(node: &ClusterNode) -> Result<String> {
    use std::io::Write as _;
    let mountpoint = node.zfs(&["get", "-H", "-o", "value", "mountpoint", &node.pool])?;
    let probe = std::path::Path::new(mountpoint.trim()).join(".chaos-full-probe");
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        let block = vec![0x5a_u8; 1 << 20];
        for _ in 0..4 {
            f.write_all(&block)?;
        }
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => bail!(
            "{} is not full: 4 MiB were written and synced into {}",
            node.pool,
            probe.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::StorageFull => Ok(format!(
            "pool {} full: a 4 MiB write at its root failed ({e})",
            node.pool
        )),
        Err(e) => Err(e).with_context(|| {
            format!(
                "probe whether {} is full: writing {} failed otherwise than for space",
                node.pool,
                probe.display()
            )
        }),
    }
}

/// The dataset that fills `pool` while the fault is in place.
pub fn filler_of(pool: &str) -> String {
    format!("{pool}/{FILL_DATASET}")
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_logged_after_the_offset_counts() {
        let log = std::env::temp_dir().join(format!("chaos-log-{}", std::process::id()));
        std::fs::write(&log, "old: test hook: pausing\nnew: something else\n").expect("write");
        let old_part = "old: test hook: pausing\n".len() as u64;
        assert!(logged_since(&log, 0, PAUSE_LOGGED));
        assert!(!logged_since(&log, old_part, PAUSE_LOGGED));
        assert!(!logged_since(
            &log.with_extension("missing"),
            0,
            PAUSE_LOGGED
        ));
        let _ = std::fs::remove_file(&log);
    }

    #[test]
    fn a_link_s_peers_are_one_nftables_set() {
        let dir = std::path::PathBuf::from("/tmp/unused");
        let node = ClusterNode {
            name: "n2".into(),
            address: "198.18.0.12".into(),
            address6: None,
            netns: "flk-n2".into(),
            dir,
            docker_host: String::new(),
            pool: "flk-n2".into(),
            own_zfs: None,
        };
        let link = Link {
            node: &node,
            peers: vec!["198.18.0.1".into(), "198.18.0.13".into()],
        };
        assert_eq!(peer_set(&link), "{ 198.18.0.1, 198.18.0.13 }");
    }
}
