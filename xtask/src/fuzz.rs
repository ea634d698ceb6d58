//! `cargo xtask fuzz`: builds the fuzz targets of `streamer/fuzz/` with libFuzzer's coverage
//! instrumentation (SanitizerCoverage: 8-bit edge counters, PC table, comparison tracing, as
//! `cargo fuzz` does) and runs each for a bounded time.
//!
//! This is coverage-guided fuzzing with libFuzzer (through `libfuzzer-sys`), not a random
//! driver. It builds on the stable toolchain: the SanitizerCoverage flags are stable codegen
//! options; only AddressSanitizer would need nightly, and the fuzzed crates forbid `unsafe`,
//! so it is left out (C code linked in, such as zstd's, is not instrumented either). Panics,
//! overflow and debug assertions are on, so any of them is a crash; crashing inputs land in
//! `streamer/fuzz/artifacts/TARGET/`, the growing corpus in `streamer/fuzz/corpus/TARGET/`
//! (both ignored by git), seeded from `streamer/fuzz/seeds/TARGET/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The fuzz targets, in the order they run.
pub const TARGETS: &[&str] = &["stream_receiver", "agent_requests"];

const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../streamer/fuzz")
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host triple")
}

/// Builds every target, then runs `only` (or all) for `seconds` in total, split evenly.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?}; known: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let dir = fuzz_dir();
    let triple = host_triple()?;
    // An explicit --target keeps the instrumentation off build scripts and proc macros.
    crate::run(
        crate::cargo()
            .env("RUSTFLAGS", RUSTFLAGS.join(" "))
            .args(["build", "--release", "--bins", "--target", &triple])
            .arg("--manifest-path")
            .arg(dir.join("Cargo.toml")),
    )?;
    let each = (seconds / targets.len() as u64).max(1);
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        let artifacts = dir.join("artifacts").join(target);
        let seeds = dir.join("seeds").join(target);
        std::fs::create_dir_all(&corpus).context("creating the corpus directory")?;
        std::fs::create_dir_all(&artifacts).context("creating the artifacts directory")?;
        let bin = dir
            .join("target")
            .join(&triple)
            .join("release")
            .join(target);
        let mut cmd = Command::new(bin);
        cmd.arg(format!("-max_total_time={each}"))
            .arg("-timeout=20")
            .arg("-rss_limit_mb=2048")
            .arg("-max_len=262144")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        println!("fuzzing {target} for {each} s");
        crate::run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} found a failing input; see {}",
                artifacts.display()
            )
        })?;
    }
    Ok(())
}
