//! The workspace binaries the end-to-end tests drive (`flocker-agent`, `flockerctl`), built
//! once by the test itself so `cargo test` alone is enough.

use std::path::PathBuf;
use std::process::Command;

/// A binary of the workspace, next to the running test (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; the binaries one level up.
    let mut path = std::env::current_exe().expect("test binary path");
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.join(name)
}

/// Builds the agent and flockerctl in the test's profile.
pub fn build_binaries() {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "flocker-dataplane",
            "-p",
            "flocker-ctl",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the agent and flockerctl failed");
}
