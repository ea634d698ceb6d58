//! `cargo xtask demo`, the README's main job: bring up a three-node cluster, deploy the
//! Redis example, write keys, move Redis to another node while measuring how long it is
//! unreachable, read the keys back through a third node's address, and tear down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flocker_e2e::cluster::{Cluster, ClusterSpec};
use flocker_e2e::probe::measure;
use flocker_e2e::redis::Redis;

const KEYS: usize = 1000;

fn main() -> Result<()> {
    let target = PathBuf::from(std::env::var("FLOCKER_TARGET").unwrap_or("target/debug".into()));
    let mut cluster = Cluster::up(ClusterSpec {
        nodes: 3,
        dir: PathBuf::from("/tmp/flocker-demo"),
        pool_size: "1G",
        agent_binary: target.join("flocker-agent"),
        ctl_binary: target.join("flockerctl"),
        routing: "nftables".into(),
        agent_args: Vec::new(),
    })?;
    cluster.teardown_on_drop = true;
    let app = "examples/redis/application.yml";
    let deploy = |deployment: &str| -> Result<()> {
        println!("$ flockerctl deploy {deployment} {app}");
        let out = cluster.flockerctl(&["deploy", deployment, app])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "deploy failed");
        Ok(())
    };
    deploy("examples/redis/deployment.yml")?;

    let first = &cluster.nodes[0];
    let third = &cluster.nodes[2];
    let mut redis = connect(&format!("{}:6379", first.address))?;
    for i in 0..KEYS {
        redis.command(&["SET", &format!("key:{i}"), &format!("value {i}")])?;
    }
    println!("wrote {KEYS} keys through {}", first.address);

    let probe: SocketAddr = format!("{}:6379", third.address).parse()?;
    let moved = measure(probe, || deploy("examples/redis/deployment-moved.yml"))?;

    let mut redis = connect(&format!("{}:6379", third.address))?;
    let mut intact = 0;
    for i in 0..KEYS {
        if redis.command(&["GET", &format!("key:{i}")])?.as_deref() == Some(&format!("value {i}")) {
            intact += 1;
        }
    }
    println!(
        "read {intact}/{KEYS} keys back through {} after the move",
        third.address
    );
    println!(
        "redis was unreachable for {:.0} ms during a move that took {:.2} s",
        moved.downtime.as_secs_f64() * 1000.0,
        moved.wall.as_secs_f64()
    );
    ensure!(intact == KEYS, "keys were lost in the move");
    println!("tearing the cluster down");
    Ok(())
}

fn connect(addr: &str) -> Result<Redis> {
    for _ in 0..50 {
        if let Ok(mut r) = Redis::connect(addr, Duration::from_secs(2))
            && r.command(&["PING"]).is_ok()
        {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Redis::connect(addr, Duration::from_secs(2)).with_context(|| format!("redis at {addr}"))
}
