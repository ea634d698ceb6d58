//! `cargo xtask bench routing`: not written yet.

/// Runs the benchmark and prints its table.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the routing benchmark is not written yet")
}
