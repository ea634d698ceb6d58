//! `flocker-bench NAME [ARGS...]`: runs one benchmark and prints its table.
#![forbid(unsafe_code)]

use anyhow::bail;

const USAGE: &str = "usage: flocker-bench streamer|routing|migrate|failover|scale [ARGS...]
(or `cargo xtask bench NAME [ARGS...]`); `flocker-bench NAME --help` lists NAME's options.
Privileged (root, network namespaces, daemons): run one benchmark at a time.";

/// What each benchmark measures and the options it takes.
fn usage_of(name: &str) -> Option<&'static str> {
    Some(match name {
        "streamer" => {
            "flocker-bench streamer [--size BYTES] [--rss-size BYTES] [--repeat N] [--nets loopback,1g,10g] [--skip-netns] [--out PATH] [--bin PATH]

flocker-stream beside raw socat, a zstd pipe, mbuffer and an ssh pipe, per network (loopback, a
1 Gbit/s and a 10 Gbit/s tc-shaped veth pair) and corpus (random, a tar of /usr), to /dev/null
and to a file.
  --size BYTES       bytes per corpus (default 1G; suffixes K, M, G)
  --rss-size BYTES   the stream whose peak memory is measured (default 4G)
  --repeat N         runs per CPU-bound cell, median reported (default 3)
  --nets LIST        which networks (default loopback,1g,10g); --skip-netns: loopback only
  --out PATH         where the table is written (default bench/results/streamer.md)
  --bin PATH         the flocker-stream binary (default: built in release)"
        }
        "routing" => {
            "flocker-bench routing [--seconds S] [--rounds N] [--routes N,N,...] [--protocols tcp,udp,tcp6] [--docker]

Connections and requests per second through the eBPF and nftables backends beside direct
connections, iptables DNAT rules and a userspace proxy, with N routes installed.
  --seconds S        length of one sample (default 1)
  --rounds N         interleaved rounds, best reported (default 3)
  --routes N,N       route counts (default 1,1000,10000)
  --protocols LIST   tcp, udp and/or tcp6 (default tcp,udp)
  --docker           containers behind Docker's bridge instead of plain namespaces (IPv4 only)"
        }
        "migrate" => {
            "flocker-bench migrate [--size MiB] [--delta MiB] [--apps N] [--link RATE|none] [--routing nftables|ebpf] [--client-moves N] [--netns-holders true|false] [--answer-check true|false]

Moves of a Redis with its volume on a local cluster: downtime, phase times, a client's view
(new connections every 10 ms through a third node), beside Flocker 0.1's stop-copy-start.
  --size MiB         the volume's size (default 1024)
  --delta MiB        data changed before each move (default 1)
  --apps N           other applications on the nodes (default 20)
  --link RATE|none   shape the links (default 1gbit)
  --routing BACKEND  nftables or ebpf (default nftables)
  --client-moves N   moves measured from the client's view (default 5)
  --netns-holders B  run the agents with or without network holders (default: the agent's)
  --answer-check B   Redis is ready when it answers PING with PONG (default false: when its port listens)"
        }
        "failover" => {
            "flocker-bench failover

A dead owner's application brought back on its standby (`deploy --failover`): the time from
the failure to the application answering, and what replication lost."
        }
        "scale" => {
            "flocker-bench scale [NODESxAPPS ...]

Release flockerctl against a simulated cluster in one process: wall time, peak memory and
requests of a deploy (default sizes 10x100 100x1000 1000x10000)."
        }
        _ => return None,
    })
}

fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    if name == "--help" || name == "-h" {
        println!("{USAGE}");
        return Ok(());
    }
    if wants_help(rest)
        && let Some(usage) = usage_of(name)
    {
        println!("{usage}");
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_benchmark_has_its_usage() {
        for name in ["streamer", "routing", "migrate", "failover", "scale"] {
            let usage = usage_of(name).unwrap_or_default();
            assert!(
                usage.starts_with(&format!("flocker-bench {name}")),
                "{name}: {usage:?}"
            );
            assert!(USAGE.contains(name));
        }
        assert_eq!(usage_of("nope"), None);
        assert!(wants_help(&["--size".into(), "1G".into(), "-h".into()]));
        assert!(!wants_help(&["--size".into(), "1G".into()]));
    }
}
