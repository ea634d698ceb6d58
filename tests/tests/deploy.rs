//! End to end: a three-node cluster (network namespaces, each with its own dockerd, zfs-fuse
//! pool and agent), driven only through `flockerctl deploy` and checked from the outside
//! (the host on the bridge) and through Docker.
//!
//! One test walks the whole life of a deployment, because bringing a cluster up costs far
//! more than each step: deploy, read through every node, a no-op second deploy, a move with
//! its data, a restart in place, a swap, a removal, and an agent killed during a move. A UDP
//! echo application rides along: reachable through every node, answering from the address
//! the client sent to, before and after it moves, and gone once removed. Redis keeps data in
//! two volumes (`redis` and `redis.logs`), which move together.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::scenario::{Files, docker, for_each_backend, http_get, redis_at, text};

const APPLICATIONS: &str = "\
version: 1
applications:
  redis:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6379
    volume:
      mountpoint: /data
    volumes:
      logs:
        mountpoint: /logs
  web:
    image: busybox-flocker:latest
    ports:
      - internal: 80
        external: 8080
    environment:
      MODE: first
    links:
      - local_port: 6379
        remote_port: 6379
        alias: db
  echo:
    image: udp-echo-flocker:latest
    ports:
      - internal: 5353
        external: 5353
        protocol: udp
";

/// The UDP echo application's external port.
const ECHO_PORT: u16 = 5353;

fn deployment(placement: &[(&ClusterNode, &[&str])]) -> String {
    let mut out = String::from("version: 1\nnodes:\n");
    for (node, apps) in placement {
        out.push_str(&format!("  {}: [{}]\n", node.address, apps.join(", ")));
    }
    out
}

fn deploy(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<Output> {
    let d = deployment.display().to_string();
    let a = application.display().to_string();
    cluster.flockerctl(&["deploy", &d, &a])
}

fn deploy_ok(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<String> {
    let out = deploy(cluster, deployment, application)?;
    ensure!(
        out.status.success(),
        "deploy failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// Conntrack entries in `node` of TCP connections to `port` that were DNAT'd.
fn dnat_entries(node: &ClusterNode, port: u16) -> Result<usize> {
    let out = node
        .command("conntrack")
        .args([
            "-L",
            "-p",
            "tcp",
            "--orig-port-dst",
            &port.to_string(),
            "--dst-nat",
        ])
        .output()
        .context("run conntrack")?;
    ensure!(
        out.status.success(),
        "conntrack -L failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// One datagram to `node`'s echo port and its answer, which must come back from where it
/// was sent; a few tries, since the first datagram may meet a container still starting.
fn udp_echo(node: &ClusterNode) -> Result<()> {
    let to: SocketAddr = format!("{}:{ECHO_PORT}", node.address).parse()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(700)))?;
    let payload = format!("hello {}", node.name);
    let mut buf = [0u8; 512];
    for _ in 0..10 {
        socket.send_to(payload.as_bytes(), to)?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            ensure!(
                &buf[..n] == payload.as_bytes(),
                "UDP echo through {} answered {:?}",
                node.name,
                String::from_utf8_lossy(&buf[..n])
            );
            ensure!(
                from == to,
                "UDP echo through {} answered from {from}",
                node.name
            );
            return Ok(());
        }
    }
    bail!("no UDP echo through {} ({to})", node.name)
}

/// No answer from `node`'s echo port.
fn udp_closed(node: &ClusterNode) -> Result<bool> {
    let to: SocketAddr = format!("{}:{ECHO_PORT}", node.address).parse()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        socket.send_to(b"anyone?", to)?;
        if socket.recv_from(&mut buf).is_ok() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The id of the running container made from `image` on a node, if any.
fn container_of(node: &ClusterNode, image: &str) -> Result<Option<String>> {
    let ids = docker(
        node,
        &["ps", "-q", "--filter", &format!("ancestor={image}")],
    )?;
    Ok(ids.lines().next().map(str::to_string))
}

/// SHA-256 of the random blobs the test wrote into redis's two volumes (`redis` at /data,
/// `redis.logs` at /logs), as the container sees them. (Redis's own files are left out: it
/// rewrites them when it stops and starts.)
fn volume_checksum(node: &ClusterNode) -> Result<String> {
    let id = container_of(node, "redis-flocker:latest")?
        .with_context(|| format!("no redis container on {}", node.name))?;
    docker(
        node,
        &[
            "exec",
            &id,
            "/bin/busybox",
            "sha256sum",
            "/data/blob",
            "/logs/blob",
        ],
    )
}

/// The copies of `volume` across the cluster as `(node, owner, epoch)`, from
/// `flockerctl status`.
fn copies_of(
    cluster: &Cluster,
    deployment: &Path,
    application: &Path,
    volume: &str,
) -> Result<Vec<(String, String, u64)>> {
    let out = cluster.flockerctl(&[
        "status",
        &deployment.display().to_string(),
        &application.display().to_string(),
        "--output",
        "json",
    ])?;
    ensure!(out.status.success(), "status failed: {}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut copies = Vec::new();
    let Some(nodes) = json["nodes"].as_object() else {
        bail!("status without nodes: {json}");
    };
    for (address, node) in nodes {
        for v in node["volumes"].as_array().into_iter().flatten() {
            if v["name"] == volume {
                copies.push((
                    address.clone(),
                    v["owner"].as_str().unwrap_or_default().to_string(),
                    v["epoch"].as_u64().unwrap_or_default(),
                ));
            }
        }
    }
    Ok(copies)
}

/// The copies of redis's main volume; [`assert_single_owner`] checks its further volume too.
fn volume_copies(
    cluster: &Cluster,
    deployment: &Path,
    application: &Path,
) -> Result<Vec<(String, String, u64)>> {
    let main = copies_of(cluster, deployment, application, "redis")?;
    let logs = copies_of(cluster, deployment, application, "redis.logs")?;
    // Both volumes move together: the same nodes, owners and epochs.
    assert_eq!(main, logs, "redis and redis.logs moved together");
    Ok(main)
}

/// Exactly one copy records itself as owner, at the newest epoch, and it is `node`.
fn assert_single_owner(copies: &[(String, String, u64)], node: &ClusterNode) {
    let newest = copies.iter().map(|c| c.2).max().unwrap_or(0);
    let writable: Vec<_> = copies.iter().filter(|(a, o, _)| a == o).collect();
    assert_eq!(writable.len(), 1, "one writable copy: {copies:?}");
    assert_eq!(writable[0].0, node.address, "owner: {copies:?}");
    assert_eq!(
        writable[0].2, newest,
        "owner holds the newest epoch: {copies:?}"
    );
}

/// The whole scenario once per routing backend, one after the other (the cluster's
/// namespace names are fixed, so two clusters cannot run at once).
#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_deployment_lives_moves_and_survives_a_crash() -> Result<()> {
    build_binaries();
    for_each_backend(scenario)
}

fn scenario(routing: &str) -> Result<()> {
    let mut cluster = Cluster::up(ClusterSpec::for_test("e2e", 3, routing))?;
    cluster.teardown_on_drop = true;
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", APPLICATIONS);

    // 1. Deploy: redis on n1, echo on n2, web on n3.
    let first = files.write(
        "d1.yml",
        &deployment(&[(&n1, &["redis"]), (&n2, &["echo"]), (&n3, &["web"])]),
    );
    deploy_ok(&cluster, &first, &apps)?;
    let mut r = redis_at(&n1)?;
    for i in 0..100 {
        r.command(&["SET", &format!("key{i}"), &format!("value{i}")])?;
    }
    for node in [&n1, &n2, &n3] {
        let got = redis_at(node)?.command(&["GET", "key42"])?;
        assert_eq!(
            got.as_deref(),
            Some("value42"),
            "read through {}",
            node.name
        );
    }
    assert!(http_get(&n1, 8080)?.contains("flocker"), "web through n1");
    for node in [&n1, &n2, &n3] {
        udp_echo(node)?;
    }
    assert_single_owner(&volume_copies(&cluster, &first, &apps)?, &n1);
    // Which path carried those connections: the eBPF backend's TC program leaves no DNAT'd
    // conntrack entry on any node (into the node hosting Redis, and on from the others), the
    // nftables DNAT one per connection.
    for node in [&n1, &n2, &n3] {
        let tracked = dnat_entries(node, 6379)?;
        if routing == "ebpf" {
            ensure!(
                tracked == 0,
                "{tracked} DNAT'd conntrack entries for 6379 on {}: the TC path was not taken",
                node.name
            );
        } else {
            ensure!(
                tracked > 0,
                "no DNAT'd conntrack entry for 6379 on {}",
                node.name
            );
        }
    }

    // 2. The same deploy again changes nothing.
    let again = deploy_ok(&cluster, &first, &apps)?;
    assert!(again.contains("nothing to do"), "second deploy: {again}");

    // 3. Move redis to n2 with its data, and echo to n1.
    let id = container_of(&n1, "redis-flocker:latest")?.context("redis on n1")?;
    for (blob, size_mb) in [("/data/blob", "8"), ("/logs/blob", "2")] {
        docker(
            &n1,
            &[
                "exec",
                &id,
                "/bin/busybox",
                "dd",
                "if=/dev/urandom",
                &format!("of={blob}"),
                "bs=1M",
                &format!("count={size_mb}"),
            ],
        )?;
    }
    let before = volume_checksum(&n1)?;
    let moved = files.write(
        "d2.yml",
        &deployment(&[(&n1, &["echo"]), (&n2, &["redis"]), (&n3, &["web"])]),
    );
    let plan = deploy_ok(&cluster, &moved, &apps)?;
    assert!(plan.contains("pre-copy"), "a move pre-copies: {plan}");
    assert_eq!(
        container_of(&n1, "redis-flocker:latest")?,
        None,
        "redis left n1"
    );
    assert_eq!(
        volume_checksum(&n2)?,
        before,
        "every byte of the volume moved"
    );
    let got = redis_at(&n3)?.command(&["GET", "key7"])?;
    assert_eq!(got.as_deref(), Some("value7"), "keys read back through n3");
    assert_eq!(
        container_of(&n2, "udp-echo-flocker:latest")?,
        None,
        "echo left n2"
    );
    for node in [&n1, &n2, &n3] {
        udp_echo(node)?;
    }
    let copies = volume_copies(&cluster, &moved, &apps)?;
    assert_single_owner(&copies, &n2);
    assert!(
        copies.iter().all(|c| c.2 <= 2),
        "one handoff, epoch 2: {copies:?}"
    );

    // 3b. dockerd restarts on n1, which now hosts nothing: Docker rewrites its chains (FORWARD
    // policy DROP) and connections through n1 still reach redis on n2 and web on n3.
    cluster.restart_dockerd(&n1)?;
    let got = redis_at(&n1)?.command(&["GET", "key8"])?;
    assert_eq!(
        got.as_deref(),
        Some("value8"),
        "redis through n1 after dockerd restarted there"
    );
    assert!(
        http_get(&n1, 8080)?.contains("flocker"),
        "web through n1 after dockerd restarted there"
    );

    // 4. A changed environment restarts web in place.
    let web_before = container_of(&n3, "busybox-flocker:latest")?.context("web on n3")?;
    let changed = files.write(
        "application2.yml",
        &APPLICATIONS.replace("MODE: first", "MODE: second"),
    );
    deploy_ok(&cluster, &moved, &changed)?;
    let web_after = container_of(&n3, "busybox-flocker:latest")?.context("web on n3 after")?;
    assert_ne!(web_before, web_after, "a new container");
    let env = docker(&n3, &["inspect", "-f", "{{json .Config.Env}}", &web_after])?;
    assert!(env.contains("MODE=second"), "{env}");
    assert!(env.contains("DB_PORT_6379_TCP="), "link variables: {env}");

    // 5. Swap: redis to n3, web to n2.
    let swapped = files.write(
        "d3.yml",
        &deployment(&[(&n1, &["echo"]), (&n2, &["web"]), (&n3, &["redis"])]),
    );
    deploy_ok(&cluster, &swapped, &changed)?;
    assert_eq!(volume_checksum(&n3)?, before, "data intact after the swap");
    assert!(
        http_get(&n1, 8080)?.contains("flocker"),
        "web through n1 after swap"
    );
    assert_single_owner(&volume_copies(&cluster, &swapped, &changed)?, &n3);

    // 6. Remove web and echo: they stop and their ports close everywhere.
    let only_redis = "version: 1\napplications:\n".to_string()
        + APPLICATIONS
            .split("  web:")
            .next()
            .unwrap_or_default()
            .trim_start_matches("version: 1\napplications:\n");
    let removed_apps = files.write("application3.yml", &only_redis);
    let removed = files.write(
        "d4.yml",
        &deployment(&[(&n1, &[]), (&n2, &[]), (&n3, &["redis"])]),
    );
    deploy_ok(&cluster, &removed, &removed_apps)?;
    assert_eq!(
        container_of(&n2, "busybox-flocker:latest")?,
        None,
        "web stopped"
    );
    for node in [&n1, &n2, &n3] {
        assert!(
            http_get(node, 8080).is_err(),
            "8080 closed on {}",
            node.name
        );
        assert!(udp_closed(node)?, "UDP 5353 closed on {}", node.name);
    }

    // 7. Kill the source agent while redis moves to n1, restart it, deploy again.
    let back = files.write(
        "d5.yml",
        &deployment(&[(&n1, &["redis"]), (&n2, &[]), (&n3, &[])]),
    );
    let mut running = Command::new(&cluster.spec.ctl_binary)
        .args([
            "deploy",
            &back.display().to_string(),
            &removed_apps.display().to_string(),
        ])
        .env("FLOCKER_CA_DIR", cluster.ca_dir())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    cluster.kill_agent(&n3)?;
    let _ = running.wait();
    cluster.restart_agent(&n3)?;
    deploy_ok(&cluster, &back, &removed_apps)?;
    assert_eq!(volume_checksum(&n1)?, before, "data intact after the crash");
    assert_single_owner(&volume_copies(&cluster, &back, &removed_apps)?, &n1);
    let got = redis_at(&n2)?.command(&["GET", "key99"])?;
    assert_eq!(got.as_deref(), Some("value99"));
    let last = deploy_ok(&cluster, &back, &removed_apps)?;
    assert!(last.contains("nothing to do"), "converged: {last}");
    Ok(())
}
