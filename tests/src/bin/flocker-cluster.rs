//! `flocker-cluster up|down`: a local cluster of network-namespace nodes, run by
//! `cargo xtask cluster up|down`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use flocker_e2e::cluster::{Cluster, ClusterSpec};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut spec = ClusterSpec {
        nodes: 3,
        dir: PathBuf::from(".cluster"),
        pool_size: "4G",
        agent_binary: PathBuf::from("target/debug/flocker-agent"),
        ctl_binary: PathBuf::from("target/debug/flockerctl"),
        routing: "nftables".to_string(),
        agent_args: Vec::new(),
    };
    let Some((command, mut rest)) = args.split_first().map(|(c, r)| (c.clone(), r.iter())) else {
        bail!(
            "usage: flocker-cluster up|down [--nodes N] [--dir DIR] [--routing nftables|ebpf] [--ipv6]"
        );
    };
    let mut dual_stack = false;
    while let Some(flag) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--nodes" => spec.nodes = value()?.parse()?,
            "--dir" => spec.dir = PathBuf::from(value()?),
            "--routing" => spec.routing = value()?,
            "--agent" => spec.agent_binary = PathBuf::from(value()?),
            "--ctl" => spec.ctl_binary = PathBuf::from(value()?),
            "--ipv6" => dual_stack = true,
            other => bail!("unknown flag {other}"),
        }
    }
    match command.as_str() {
        "up" => {
            let cluster = if dual_stack {
                Cluster::up_dual_stack(spec)?
            } else {
                Cluster::up(spec)?
            };
            for node in &cluster.nodes {
                let address6 = node
                    .address6
                    .as_ref()
                    .map(|a| format!("  {a}"))
                    .unwrap_or_default();
                println!(
                    "{}  {}{address6}  docker {}  pool {}",
                    node.name, node.address, node.docker_host, node.pool
                );
            }
            println!(
                "CA: {} (export FLOCKER_CA_DIR={})",
                cluster.ca_dir().display(),
                cluster.ca_dir().display()
            );
            Ok(())
        }
        "down" => {
            Cluster::down(&spec)?;
            println!("cluster removed");
            Ok(())
        }
        other => bail!("unknown command {other}: expected up or down"),
    }
}
