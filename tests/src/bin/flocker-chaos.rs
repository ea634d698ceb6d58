//! `flocker-chaos [--ci] [--cells PHASE:FAULT,...] [--out FILE] ...`: the fault matrix, run
//! by `cargo xtask chaos` (every cell, written to `bench/CHAOS.md`) and by `cargo xtask ci`
//! (the fixed subset `--ci`). Exits 1 when a cell broke an invariant, did not reach its
//! phase, or was not run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flocker_e2e::chaos::matrix::{self, Cell, Verdict};
use flocker_e2e::chaos::{self, Options};

const USAGE: &str = "usage: flocker-chaos [--ci] [--cells PHASE:FAULT,...] [--out FILE] \
[--partition-seconds N] [--deploy-timeout N] [--recovery-deploys N] [--budget-minutes N] [--keep]";

/// What `--help` prints: the usage, what each flag does, and the cells there are.
fn help() -> String {
    const FLAGS: &str = "
Runs the fault matrix on a local three-node cluster (root: network namespaces, dockerd,
zfs-fuse, nftables) and prints it as a Markdown table; exits 1 if a cell broke an
invariant, did not reach its phase or was not run. Binaries come from $FLOCKER_TARGET
(default target/debug).

  --ci                    the fixed subset `cargo xtask ci` runs
  --cells PHASE:FAULT,... these cells only (default: every cell)
  --out FILE              also write the table to FILE
  --partition-seconds N   how long a partition lasts (default 130)
  --deploy-timeout N      the bound on each recovery deploy (default 300)
  --recovery-deploys N    deploys allowed to converge (default 3)
  --budget-minutes N      start no cell after this long (default 90)
  --keep                  leave the cluster up afterwards, to inspect it
";
    format!(
        "{USAGE}\n{FLAGS}\nphases: {}\nfaults: {}",
        matrix::PHASES.join(", "),
        matrix::Fault::ALL.map(matrix::Fault::name).join(", ")
    )
}

/// When and on which commit the matrix ran, e.g. `2026-12-03 11:50 UTC on 1a2b3c4`
/// (`+ changes` when the tree differed from it).
fn provenance() -> String {
    let output = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or("an unknown date".into());
    let commit =
        output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or("an unknown commit".into());
    let changed = output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    format!(
        "run {date} on {commit}{}",
        if changed { " + changes" } else { "" }
    )
}

fn main() -> Result<()> {
    let target = PathBuf::from(std::env::var("FLOCKER_TARGET").unwrap_or("target/debug".into()));
    let mut options = Options {
        cells: matrix::all_cells(),
        binaries: target,
        dir: PathBuf::from("/tmp/flocker-chaos"),
        // Above the 120 s the client waits between two events of a converge, the longest
        // timeout of a move.
        partition_for: Duration::from_secs(130),
        deploy_deadline: Duration::from_secs(300),
        recovery_deploys: 3,
        budget: Duration::from_secs(90 * 60),
        keep: false,
    };
    let mut out: Option<PathBuf> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--help" | "-h" => {
                println!("{}", help());
                return Ok(());
            }
            "--ci" => options.cells = matrix::ci_cells(),
            "--keep" => options.keep = true,
            "--cells" => {
                options.cells = value()?
                    .split(',')
                    .map(|c| {
                        Cell::parse(c).with_context(|| {
                            format!(
                                "no cell {c:?}: PHASE:FAULT, phases {:?}, faults {:?}",
                                matrix::PHASES,
                                matrix::Fault::ALL.map(matrix::Fault::name)
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            "--partition-seconds" => options.partition_for = Duration::from_secs(value()?.parse()?),
            "--deploy-timeout" => options.deploy_deadline = Duration::from_secs(value()?.parse()?),
            "--recovery-deploys" => options.recovery_deploys = value()?.parse()?,
            "--budget-minutes" => {
                options.budget = Duration::from_secs(60 * value()?.parse::<u64>()?)
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    let started = Instant::now();
    // Taken before the run: the tree may change while it goes on.
    let provenance = provenance();
    let reports = chaos::run(options.clone())?;
    let text = chaos::report(&reports, &options, started.elapsed(), &provenance);
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
        println!("written to {}", path.display());
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !matches!(r.verdict, Verdict::Converged { .. }))
        .map(|r| r.cell.label())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} cells did not converge with every invariant holding: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
