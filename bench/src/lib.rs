//! Benchmarks that put this project beside its peers in one run; `cargo xtask bench NAME`
//! builds and runs the `flocker-bench` binary. Each module measures one area and prints a
//! table.
#![forbid(unsafe_code)]

pub mod failover;
pub mod migrate;
pub mod routing;
pub mod scale;
pub mod streamer;

use std::path::{Path, PathBuf};

/// The workspace's `target` directory (`CARGO_TARGET_DIR` when set).
pub fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|p| p.join("target"))
                .unwrap_or_else(|| PathBuf::from("target"))
        })
}

/// Builds the release agent and `flockerctl` for a cluster benchmark; returns where they are.
pub fn build_release_agents() -> anyhow::Result<PathBuf> {
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "flocker-dataplane",
                "-p",
                "flocker-ctl",
            ])
            .status()?;
    anyhow::ensure!(status.success(), "building the agent failed");
    Ok(workspace_target().join("release"))
}

/// Builds the release `flockerctl` alone (the scale benchmark's agents run in its own
/// process); returns where it is.
pub fn build_release_flockerctl() -> anyhow::Result<PathBuf> {
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "-p", "flocker-ctl"])
            .status()?;
    anyhow::ensure!(status.success(), "building flockerctl failed");
    Ok(workspace_target().join("release"))
}
