//! `cargo xtask <command>`: the one entry point for work around the code: installing the
//! system packages the tests need, running the whole test suite as CI does, the README's
//! demo, and the benchmarks. It depends on no crate of the workspace, so it builds before
//! any system library is installed.
#![forbid(unsafe_code)]

mod deps;
mod fuzz;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: deps, ci, demo, cluster, bench, chaos, fuzz")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages the tests and benchmarks need (apt-get).
    Deps,
    /// Everything CI runs: deps, cargo fmt --check, clippy -D warnings, the whole test suite,
    /// the fault matrix's fixed subset (`chaos --ci`), then a minute of coverage-guided fuzzing.
    Ci,
    /// The README's main job: a local cluster, deploy Redis, move it with its data, tear down.
    Demo,
    /// A local cluster of network-namespace nodes (dockerd, zfs-fuse pool, agent on each).
    Cluster {
        /// up or down
        action: String,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The agents' routing backend: nftables or ebpf (each node's connect4 programs then
        /// attach to an empty cgroup of its own, so its TC and nftables paths carry the traffic)
        #[arg(long, default_value = "nftables")]
        routing: String,
        /// Dual stack: every node gets an IPv6 address from fd00:18::/64 too (inside the
        /// namespaces and on the cluster's own bridge only) and is named by it
        #[arg(long)]
        ipv6: bool,
    },
    /// Run a benchmark and print its table: streamer, routing, migrate, failover or scale.
    Bench {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The fault matrix: faults injected at each phase of a move on a local cluster, then
    /// deploys until converged and the invariants checked. With no arguments every cell runs
    /// and the table is written to bench/CHAOS.md; `--ci` runs the fixed subset CI runs,
    /// `--cells PHASE:FAULT,...` chosen cells (`--help` of flocker-chaos for the rest).
    Chaos {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets (streamer/fuzz) with libFuzzer and run them for a bounded time.
    Fuzz {
        /// Total seconds, split evenly between the targets run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run only this target (stream_receiver, agent_requests).
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Deps => deps::install(),
        Task::Ci => ci(),
        Task::Demo => demo(),
        Task::Cluster {
            action,
            nodes,
            routing,
            ipv6,
        } => cluster(&action, nodes, &routing, ipv6),
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Task::Chaos { args } => chaos(&args),
        Task::Bench { name, args } => {
            deps::install()?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "--quiet", "-p", "flocker-bench", "--"])
                .arg(name)
                .args(args);
            run(&mut cmd)
        }
    }
}

fn ci() -> Result<()> {
    deps::install()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The privileged tests (root, daemons, namespaces) are `#[ignore]`d with their reason so
    // that a plain `cargo test` as any user runs the rest; CI is root and runs them all.
    run(cargo().args([
        "test",
        "--workspace",
        "--",
        "--test-threads=1",
        "--include-ignored",
    ]))?;
    chaos(&["--ci".to_string()])?;
    fuzz::run(CI_FUZZ_SECONDS, None)
}

/// The fault matrix (`flocker-chaos` of the e2e crate) on the debug binaries; the whole
/// matrix, run with no arguments, is recorded in bench/CHAOS.md.
fn chaos(args: &[String]) -> Result<()> {
    deps::install()?;
    build_binaries()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "flocker-e2e",
        "--bin",
        "flocker-chaos",
        "--",
    ])
    .args(args);
    if args.is_empty() {
        cmd.args(["--out", "bench/CHAOS.md"]);
    }
    run(&mut cmd)
}

/// The agent and flockerctl, which the cluster commands run from target/debug.
fn build_binaries() -> Result<()> {
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "flocker-dataplane",
        "-p",
        "flocker-ctl",
    ]))
}

/// Fuzzing time in CI, shared by all targets (the first run also builds them).
const CI_FUZZ_SECONDS: u64 = 60;

fn demo() -> Result<()> {
    deps::install()?;
    build_binaries()?;
    run(cargo().args([
        "run",
        "--quiet",
        "-p",
        "flocker-e2e",
        "--bin",
        "flocker-demo",
    ]))
}

fn cluster(action: &str, nodes: usize, routing: &str, ipv6: bool) -> Result<()> {
    if action == "up" {
        deps::install()?;
        build_binaries()?;
    }
    run(cargo()
        .args([
            "run",
            "--quiet",
            "-p",
            "flocker-e2e",
            "--bin",
            "flocker-cluster",
            "--",
        ])
        .arg(action)
        .args(["--nodes", &nodes.to_string(), "--routing", routing])
        .args(ipv6.then_some("--ipv6")))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs a command to completion, failing with its name when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
