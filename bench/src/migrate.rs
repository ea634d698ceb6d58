//! `cargo xtask bench migrate`: not written yet.

/// Runs the benchmark and prints its table.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the migrate benchmark is not written yet")
}
