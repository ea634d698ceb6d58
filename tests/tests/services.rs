//! End to end: services by name (issue 18, item 4) on a two-node cluster driven through
//! `flockerctl deploy` with a compose file. `cache` (Redis, its port only exposed, never
//! published) runs on one node and `client` (busybox) on the other; inside `client`,
//! `cache:6379` answers, through the node-to-node relay. Then `cache` moves next to
//! `client` (the local path, client and server on one bridge) and answers again, and moves
//! back; the client is never restarted by these moves. Once with each routing backend.
//! (`cache` has no volume: moving data is the deploy test's subject; this one is names.)

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::scenario::{Files, docker, for_each_backend, text};

const COMPOSE: &str = "\
services:
  cache:
    image: redis-flocker:latest
    expose: [\"6379\"]
  client:
    image: busybox-flocker:latest
";

/// How long a name may take to answer after a deploy returned (the routes phase is the
/// deploy's last; this bounds a slow container start, it is not a speed target).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

fn deployment(placement: &[(&ClusterNode, &[&str])]) -> String {
    let mut out = String::from("version: 1\nnodes:\n");
    for (node, apps) in placement {
        out.push_str(&format!("  {}: [{}]\n", node.address, apps.join(", ")));
    }
    out
}

fn deploy_ok(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<()> {
    let d = deployment.display().to_string();
    let a = application.display().to_string();
    let out = cluster.flockerctl(&["deploy", &d, &a])?;
    ensure!(
        out.status.success(),
        "deploy failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}

/// Sends one inline Redis command from inside the client container to `cache:6379` (the
/// name resolved by the container's own /etc/hosts) and returns the answer.
fn ask_cache(client: &ClusterNode, command: &str) -> Result<String> {
    let script = format!("printf '{command}\\r\\n' | /bin/busybox nc -w 2 cache 6379");
    docker(
        client,
        &[
            "exec",
            "flocker-client",
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ],
    )
}

/// [`ask_cache`] until the answer starts with `want`, for at most [`ANSWER_WITHIN`].
fn expect_answer(client: &ClusterNode, command: &str, want: &str) -> Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < ANSWER_WITHIN {
        match ask_cache(client, command) {
            Ok(answer) if answer.starts_with(want) => return Ok(()),
            Ok(answer) => last = answer,
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "`{command}` to cache:6379 from {}: last answer {last:?}, wanted {want:?}",
        client.name
    )
}

fn container_id(node: &ClusterNode, name: &str) -> Result<String> {
    docker(node, &["inspect", "--format", "{{.Id}}", name])
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn services_reach_each_other_by_name_across_nodes_and_moves() -> Result<()> {
    build_binaries();
    for_each_backend(scenario)
}

fn scenario(routing: &str) -> Result<()> {
    let mut cluster = Cluster::up(ClusterSpec::for_test("e2e-svc", 2, routing))?;
    cluster.teardown_on_drop = true;
    let [n1, n2] = [0, 1].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let compose = files.write("compose.yml", COMPOSE);

    // 1. cache on n2, client on n1: the name leads across nodes, on a port never published.
    let apart = files.write(
        "apart.yml",
        &deployment(&[(&n1, &["client"]), (&n2, &["cache"])]),
    );
    deploy_ok(&cluster, &apart, &compose)?;
    expect_answer(&n1, "PING", "+PONG")?;
    expect_answer(&n1, "SET greeting across-nodes", "+OK")?;
    let hosts = docker(
        &n1,
        &[
            "exec",
            "flocker-client",
            "/bin/busybox",
            "cat",
            "/etc/hosts",
        ],
    )?;
    ensure!(
        hosts
            .lines()
            .any(|l| l.starts_with("198.19.") && l.ends_with("\tcache")),
        "the client's hosts file names cache by a service address:\n{hosts}"
    );
    // Not published: no node answers on 6379 from outside.
    for node in [&n1, &n2] {
        let addr = format!("{}:6379", node.address).parse()?;
        ensure!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "{} answers 6379 from outside, but the port is only exposed",
            node.name
        );
    }
    let client_before = container_id(&n1, "flocker-client")?;

    // 2. cache moves to n1, next to the client: the name follows (a new, empty Redis).
    let together = files.write(
        "together.yml",
        &deployment(&[(&n1, &["client", "cache"]), (&n2, &[])]),
    );
    deploy_ok(&cluster, &together, &compose)?;
    expect_answer(&n1, "PING", "+PONG")?;
    expect_answer(&n1, "SET greeting same-node", "+OK")?;
    ensure!(
        container_id(&n1, "flocker-client")? == client_before,
        "the client was restarted by a move of another application"
    );

    // 3. And back across: cache on n2 again.
    deploy_ok(&cluster, &apart, &compose)?;
    expect_answer(&n1, "PING", "+PONG")?;
    ensure!(
        container_id(&n1, "flocker-client")? == client_before,
        "the client was restarted by a move of another application"
    );
    Ok(())
}
