//! `cargo xtask bench streamer`: not written yet.

/// Runs the benchmark and prints its table.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the streamer benchmark is not written yet")
}
