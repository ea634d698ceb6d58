//! The matrix itself: the phases of a move, replication and failover, the faults, what a
//! cell ended as, and the Markdown table `cargo xtask chaos` prints and writes to
//! `bench/CHAOS.md`.

use std::fmt::Write as _;

/// The standby's replication: the fault is injected when the deploy that gives Redis a
/// standby announces its `standby` phase and held while the owner replicates.
pub const REPLICATION: &str = "replication";
/// A failover: the owner's node is dead, and the fault is injected when
/// `flockerctl deploy --failover` announces its `failover` phase (the standby's promotion).
pub const FAILOVER: &str = "failover";

/// The rows of the matrix: the phases of a move, in the order `flockerctl deploy` runs them
/// (the planner's names, as its `--output json` phase events carry them), then replication
/// and failover.
pub const PHASES: [&str; 10] = [
    "pre-copy",
    "prepare",
    "hold",
    "switch-routes",
    "stop",
    "final-push",
    "start",
    "routes",
    REPLICATION,
    FAILOVER,
];

/// One fault, injected the moment the deploy announces the cell's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL to the `flockerctl deploy` carrying out the move.
    KillCtl,
    /// SIGKILL to the agent of the node the volume moves from.
    KillSourceAgent,
    /// SIGKILL to the agent of the node the volume moves to.
    KillTargetAgent,
    /// SIGKILL to the target node's `dockerd` (its containerd, shims and containers are
    /// reaped before it is started again, as `cluster up` does after a crash).
    KillTargetDockerd,
    /// Every packet between source and target dropped in both namespaces (nftables), held
    /// for longer than every timeout, then healed.
    Partition,
    /// A slow, lossy link while the deploy runs: a 4 Mbit/s token bucket on both nodes' links,
    /// 5 % of the packets between them dropped at random and 50 ms added each way (no netem
    /// in this kernel: nftables drops and an NFQUEUE delay, `delay.rs`).
    SlowLink,
    /// The target's pool full (a reservation of all its free space) while the deploy runs.
    TargetPoolFull,
    /// SIGKILL to the target node's own zfs-fuse (a cluster with a daemon per node,
    /// `crate::node_zfs`); started again, its pool imported and its datasets mounted, once the
    /// deploy ends.
    KillTargetZfs,
    /// The final push's answer lost: the target, having verified the stream and recorded
    /// itself owner, pauses before answering (a test hook of the agent,
    /// `flocker_dataplane::test_hooks`), and source and target are partitioned meanwhile, as in
    /// [`Fault::Partition`]. The window is too short to hit from outside; only the
    /// `final-push` row has it.
    LosePushAnswer,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::KillCtl,
        Fault::KillSourceAgent,
        Fault::KillTargetAgent,
        Fault::KillTargetDockerd,
        Fault::Partition,
        Fault::SlowLink,
        Fault::TargetPoolFull,
        Fault::KillTargetZfs,
        Fault::LosePushAnswer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCtl => "kill-ctl",
            Fault::KillSourceAgent => "kill-source-agent",
            Fault::KillTargetAgent => "kill-target-agent",
            Fault::KillTargetDockerd => "kill-target-dockerd",
            Fault::Partition => "partition",
            Fault::SlowLink => "slow-link",
            Fault::TargetPoolFull => "target-pool-full",
            Fault::KillTargetZfs => "kill-target-zfs-fuse",
            Fault::LosePushAnswer => "lose-push-answer",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether a replication round to the standby must fail while the fault is in place:
    /// the standby's agent or its zfs-fuse dead, no packet crossing, or no space for the
    /// receive. A replication cell of such a fault that saw no failed round hit nothing, and
    /// says so (not run).
    pub fn fails_replication(self) -> bool {
        matches!(
            self,
            Fault::KillTargetAgent
                | Fault::Partition
                | Fault::KillTargetZfs
                | Fault::TargetPoolFull
        )
    }

    /// Whether the fault means something in the row. In a failover the source (the old
    /// owner's node) is already dead, so there is no source agent to kill; the target's
    /// peer there is the bystander whose routes must change. Only a final push has an
    /// answer to lose.
    pub fn applies_to(self, phase: &str) -> bool {
        match self {
            Fault::KillSourceAgent => phase != FAILOVER,
            Fault::LosePushAnswer => phase == "final-push",
            _ => true,
        }
    }
}

/// One cell: a fault at a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub phase: &'static str,
    pub fault: Fault,
}

impl Cell {
    /// `PHASE:FAULT`, e.g. `final-push:kill-target-agent`.
    pub fn parse(text: &str) -> Option<Cell> {
        let (phase, fault) = text.split_once(':')?;
        let phase = PHASES.into_iter().find(|p| *p == phase)?;
        let fault = Fault::parse(fault)?;
        fault.applies_to(phase).then_some(Cell { phase, fault })
    }

    pub fn label(&self) -> String {
        format!("{}:{}", self.phase, self.fault.name())
    }
}

/// Every cell, phase by phase.
pub fn all_cells() -> Vec<Cell> {
    PHASES
        .into_iter()
        .flat_map(|phase| {
            Fault::ALL
                .into_iter()
                .filter(move |fault| fault.applies_to(phase))
                .map(move |fault| Cell { phase, fault })
        })
        .collect()
}

/// The fixed subset `cargo xtask ci` runs: one fault per row, the quick ones (no partition,
/// which must outlast every timeout), each daemon killed at least once: the target's zfs-fuse
/// too, so the subset runs on a cluster with a zfs-fuse per node.
pub fn ci_cells() -> Vec<Cell> {
    [
        ("pre-copy", Fault::KillTargetAgent),
        ("prepare", Fault::KillTargetDockerd),
        ("hold", Fault::KillTargetAgent),
        ("switch-routes", Fault::KillSourceAgent),
        ("stop", Fault::KillCtl),
        ("final-push", Fault::KillSourceAgent),
        ("start", Fault::KillTargetDockerd),
        ("routes", Fault::TargetPoolFull),
        (REPLICATION, Fault::KillSourceAgent),
        (FAILOVER, Fault::KillTargetAgent),
        // Runs the whole subset on a cluster with a zfs-fuse per node.
        ("final-push", Fault::KillTargetZfs),
    ]
    .into_iter()
    .map(|(phase, fault)| Cell { phase, fault })
    .collect()
}

/// How a cell ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The recovery deploys reached "nothing to do" after `deploys` of them, every invariant
    /// held.
    Converged { deploys: usize },
    /// The named invariants (1-5) failed; details in the cell's notes.
    Broken { invariants: Vec<u8> },
    /// The deploy never announced the phase, so the fault was not injected.
    PhaseNotReached,
    /// Not run: the suite's time budget ran out, or the cluster was unusable.
    NotRun { why: String },
}

/// One cell's outcome with what the suite saw on the way.
#[derive(Debug, Clone)]
pub struct CellReport {
    pub cell: Cell,
    pub verdict: Verdict,
    /// What the faulted deploy ended with (exit, message), the recovery deploys, the checks.
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl Verdict {
    fn short(&self) -> String {
        match self {
            Verdict::Converged { deploys } => format!("ok, {deploys} deploy{}", plural(*deploys)),
            Verdict::Broken { invariants } => {
                let list: Vec<String> = invariants.iter().map(u8::to_string).collect();
                format!("**BROKEN {}**", list.join(","))
            }
            Verdict::PhaseNotReached => "phase not reached".into(),
            Verdict::NotRun { .. } => "not run".into(),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The table (phases down, faults across; cells not run are blank) and each cell's notes.
pub fn render(reports: &[CellReport]) -> String {
    let faults: Vec<Fault> = Fault::ALL
        .into_iter()
        .filter(|f| reports.iter().any(|r| r.cell.fault == *f))
        .collect();
    let mut out = String::new();
    let _ = write!(out, "| phase |");
    for f in &faults {
        let _ = write!(out, " {} |", f.name());
    }
    let _ = write!(out, "\n|---|");
    for _ in &faults {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    for phase in PHASES {
        if !reports.iter().any(|r| r.cell.phase == phase) {
            continue;
        }
        let _ = write!(out, "| {phase} |");
        for f in &faults {
            let cell = match reports
                .iter()
                .find(|r| r.cell.phase == phase && r.cell.fault == *f)
            {
                Some(r) => r.verdict.short(),
                None if !f.applies_to(phase) => "n/a".into(),
                None => String::new(),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push_str("\nPer cell (seconds, then what happened):\n\n");
    for r in reports {
        let _ = writeln!(
            out,
            "- `{}` {:.0} s: {}",
            r.cell.label(),
            r.seconds,
            r.verdict.short()
        );
        if let Verdict::NotRun { why } = &r.verdict {
            let _ = writeln!(out, "  - {why}");
        }
        for note in &r.notes {
            let _ = writeln!(out, "  - {}", note.replace('\n', " "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_parse_by_phase_and_fault_names() {
        assert_eq!(
            Cell::parse("final-push:kill-target-agent"),
            Some(Cell {
                phase: "final-push",
                fault: Fault::KillTargetAgent
            })
        );
        assert_eq!(Cell::parse("final-push"), None);
        assert_eq!(Cell::parse("nowhere:kill-ctl"), None);
        assert_eq!(Cell::parse("stop:nothing"), None);
        assert_eq!(
            Cell::parse("failover:kill-source-agent"),
            None,
            "the source is dead in a failover"
        );
        assert_eq!(
            Cell::parse("stop:lose-push-answer"),
            None,
            "only a final push has an answer to lose"
        );
        assert_eq!(
            all_cells().len(),
            PHASES.len() * (Fault::ALL.len() - 1) - 1 + 1,
            "every phase and fault but the failover's source agent, and the lost answer of the final push"
        );
    }

    #[test]
    fn the_ci_subset_covers_every_phase() {
        let ci = ci_cells();
        for phase in PHASES {
            assert!(
                ci.iter().any(|c| c.phase == phase),
                "{phase} in the ci subset"
            );
        }
    }

    #[test]
    fn the_table_shows_each_verdict_in_its_cell() {
        let reports = vec![
            CellReport {
                cell: Cell {
                    phase: "stop",
                    fault: Fault::KillCtl,
                },
                verdict: Verdict::Converged { deploys: 2 },
                notes: vec!["faulted deploy: killed".into()],
                seconds: 12.0,
            },
            CellReport {
                cell: Cell {
                    phase: "start",
                    fault: Fault::Partition,
                },
                verdict: Verdict::Broken {
                    invariants: vec![1, 4],
                },
                notes: vec![],
                seconds: 140.0,
            },
        ];
        let table = render(&reports);
        assert!(table.starts_with("| phase | kill-ctl | partition |\n|---|---|---|\n"));
        assert!(table.contains("| stop | ok, 2 deploys |  |\n"), "{table}");
        assert!(table.contains("| start |  | **BROKEN 1,4** |\n"), "{table}");
        assert!(
            !table.contains("| pre-copy |"),
            "phases without cells are left out"
        );
        assert!(
            table.contains("- `stop:kill-ctl` 12 s: ok, 2 deploys\n  - faulted deploy: killed")
        );
    }

    #[test]
    fn a_fault_that_means_nothing_in_its_row_reads_n_a() {
        let failover = CellReport {
            cell: Cell {
                phase: FAILOVER,
                fault: Fault::KillCtl,
            },
            verdict: Verdict::Converged { deploys: 3 },
            notes: vec![],
            seconds: 40.0,
        };
        let source = CellReport {
            cell: Cell {
                phase: "stop",
                fault: Fault::KillSourceAgent,
            },
            ..failover.clone()
        };
        let table = render(&[failover, source]);
        assert!(
            table.contains("| failover | ok, 3 deploys | n/a |\n"),
            "{table}"
        );
    }
}
