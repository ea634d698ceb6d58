//! `flocker-bench NAME [ARGS...]`: runs one benchmark and prints its table.
#![forbid(unsafe_code)]

use anyhow::bail;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        bail!("usage: flocker-bench streamer|routing|migrate|failover|scale [ARGS...]");
    };
    match name.as_str() {
        "streamer" => flocker_bench::streamer::run(rest),
        "routing" => flocker_bench::routing::run(rest),
        "migrate" => flocker_bench::migrate::run(rest),
        "failover" => flocker_bench::failover::run(rest),
        "scale" => flocker_bench::scale::run(rest),
        other => {
            bail!(
                "unknown benchmark {other:?}: expected streamer, routing, migrate, failover or scale"
            )
        }
    }
}
