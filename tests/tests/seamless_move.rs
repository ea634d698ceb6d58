//! End to end, issue 16 ("hold, don't refuse"): while Redis moves with its volume between
//! two nodes, a client opening a new connection every 10 ms through the third node sees no
//! refused or reset connection, only a pause, and every key it wrote reads back afterwards;
//! the new node started Redis itself as soon as the final push made it the owner.
//! Then the target agent is killed while connections are held: they are reset (not left
//! hanging), nothing acknowledged is lost, and a redeploy converges. Once per routing
//! backend. Then an answer check that never matches fails its deploy once the agents' ready
//! timeout passes. Then the same move on a dual-stack cluster, whose nodes are known by their
//! IPv6 addresses, with the client over IPv6.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use flocker_e2e::binaries::build_binaries;
use flocker_e2e::chaos::deploy::{PhaseHook, deploy as deploy_watched};
use flocker_e2e::client_view::{ClientReport, ClientView};
use flocker_e2e::cluster::{Cluster, ClusterNode, ClusterSpec};
use flocker_e2e::redis::Redis;
use flocker_e2e::scenario::{Files, docker, for_each_backend, redis_at, text};

/// Redis is ready when it answers PING with PONG (an answer check): it listens before it has
/// loaded its data, and answers `-LOADING` meanwhile, which the held clients would get.
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
    health_check:
      send: \"PING\\r\\n\"
      expect: \"+PONG\"
";

/// [`APPLICATIONS`] with Redis listening on IPv6 as well (the image binds only 0.0.0.0).
const APPLICATIONS_V6: &str = "\
version: 1
applications:
  redis:
    image: redis-flocker:latest
    command: [\"/usr/bin/redis-server\", \"--dir\", \"/data\", \"--appendonly\", \"yes\", \"--appendfsync\", \"always\", \"--protected-mode\", \"no\", \"--bind\", \"0.0.0.0\", \"::\"]
    ports:
      - internal: 6379
        external: 6379
    volume:
      mountpoint: /data
    health_check:
      send: \"PING\\r\\n\"
      expect: \"+PONG\"
";

/// A second Redis, `mute`, beside [`APPLICATIONS`]' one: its answer check never matches (it
/// answers `+PONG`, the check expects `+NEVER`).
const MUTE: &str = "  mute:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6390
    health_check:
      send: \"PING\\r\\n\"
      expect: \"+NEVER\"
";

/// The agents' `--ready-timeout` in these clusters: a start waits this long for its answer
/// check (Redis answers in well under a second).
const READY_TIMEOUT_S: u64 = 15;

/// The agents' default hold timeout (`--hold-timeout`).
const HOLD_TIMEOUT: Duration = Duration::from_secs(5);

/// Each attempt's bound: above the hold timeout, so a held connection shows as held (slow)
/// or reset, never as a client timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

fn only_on(cluster: &Cluster, node: &ClusterNode, files: &Files, name: &str) -> std::path::PathBuf {
    let mut text = String::from("version: 1\nnodes:\n");
    for n in &cluster.nodes {
        let apps = if n.name == node.name { "[redis]" } else { "[]" };
        text.push_str(&format!("  \"{}\": {apps}\n", n.identity()));
    }
    files.write(name, &text)
}

fn deploy_ok(cluster: &Cluster, deployment: &Path, application: &Path) -> Result<String> {
    let out = cluster.flockerctl(&[
        "deploy",
        &deployment.display().to_string(),
        &application.display().to_string(),
    ])?;
    ensure!(
        out.status.success(),
        "deploy failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for line in text(&out.stderr)
        .lines()
        .filter(|l| l.contains(" done in "))
    {
        eprintln!("  {}", line.trim());
    }
    Ok(text(&out.stdout))
}

/// Every key in `keys` reads back (each key's value is its name) through `node`.
fn all_keys_read_back(node: &ClusterNode, keys: &[&str]) -> Result<()> {
    keys_read_back(redis_at(node)?, &node.name, keys)
}

/// Every key in `keys` reads back through `redis`, connected through `via`.
fn keys_read_back(mut redis: Redis, via: &str, keys: &[&str]) -> Result<()> {
    for chunk in keys.chunks(200) {
        let values = redis.mget(chunk)?;
        for (key, value) in chunk.iter().zip(values) {
            ensure!(
                value.as_deref() == Some(*key),
                "key {key} reads {value:?} through {via}"
            );
        }
    }
    Ok(())
}

fn describe_failures(report: &ClientReport) -> String {
    report
        .failed()
        .iter()
        .take(10)
        .map(|a| format!("{} at {:?}: {:?}", a.key, a.at, a.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Redis moved from `from` to `to`, and the client (`what`) ran through the move without a
/// failed attempt.
fn moved_without_a_failed_attempt(
    from: &ClusterNode,
    to: &ClusterNode,
    what: &str,
    moved: &ClientReport,
) -> Result<()> {
    ensure!(
        running_redis(to)? && !running_redis(from)?,
        "redis moved to {}",
        to.name
    );
    eprintln!(
        "{what}: {} attempts during the move, worst connect-to-reply {:?}",
        moved.attempts.len(),
        moved.worst_latency()
    );
    ensure!(
        moved.attempts.len() >= 30,
        "{what}: the client ran through the move ({} attempts)",
        moved.attempts.len()
    );
    ensure!(
        moved.failed().is_empty(),
        "{what}: {} of {} attempts failed during the move: {}",
        moved.failed().len(),
        moved.attempts.len(),
        describe_failures(moved)
    );
    Ok(())
}

fn running_redis(node: &ClusterNode) -> Result<bool> {
    let ids = docker(
        node,
        &["ps", "-q", "--filter", "ancestor=redis-flocker:latest"],
    )?;
    Ok(!ids.is_empty())
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_move_holds_new_connections_instead_of_refusing_them() -> Result<()> {
    build_binaries();
    for_each_backend(scenario)
}

fn scenario(routing: &str) -> Result<()> {
    let mut spec = ClusterSpec::for_test("e2e-seamless", 3, routing);
    spec.agent_args = vec!["--ready-timeout".into(), READY_TIMEOUT_S.to_string()];
    let mut cluster = Cluster::up(spec)?;
    cluster.teardown_on_drop = true;
    let result = moves(&cluster, routing);
    if result.is_err() {
        // The agents' logs go with the cluster: keep them for whoever reads the failure.
        for node in &cluster.nodes {
            let kept = std::env::temp_dir().join(format!(
                "flocker-e2e-seamless-{routing}-{}-agent.log",
                node.name
            ));
            if std::fs::copy(node.dir.join("agent.log"), &kept).is_ok() {
                eprintln!("agent log of {} kept at {}", node.name, kept.display());
            }
        }
    }
    result
}

fn moves(cluster: &Cluster, routing: &str) -> Result<()> {
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", APPLICATIONS);
    let on_n1 = only_on(cluster, &n1, &files, "on-n1.yml");
    let on_n2 = only_on(cluster, &n2, &files, "on-n2.yml");
    deploy_ok(cluster, &on_n1, &apps)?;
    let mut redis = redis_at(&n3)?;
    let before: Vec<String> = (0..50).map(|i| format!("before:{i}")).collect();
    for key in &before {
        redis.command(&["SET", key, key])?;
    }
    drop(redis);
    let through_n3: SocketAddr = format!("{}:6379", n3.address).parse()?;

    // 1. Move n1 -> n2 with a client connecting through n3 every 10 ms: no attempt fails.
    let client = ClientView::start(
        through_n3,
        Duration::from_millis(10),
        "move",
        ATTEMPT_TIMEOUT,
    );
    std::thread::sleep(Duration::from_millis(300));
    let plan = deploy_ok(cluster, &on_n2, &apps)?;
    std::thread::sleep(Duration::from_millis(300));
    let moved = client.finish();
    ensure!(
        plan.contains("switch-routes"),
        "the move switches routes first: {plan}"
    );
    moved_without_a_failed_attempt(&n1, &n2, &format!("{routing}: IPv4"), &moved)?;
    // n2 started Redis as soon as the final push made it the owner, not at the start phase.
    let log = std::fs::read_to_string(n2.agent_log())?;
    ensure!(
        log.contains("starting the prepared container after the final push"),
        "{routing}: n2 started Redis after the final push itself (its agent log says not)"
    );
    let mut written: Vec<&str> = before.iter().map(String::as_str).collect();
    written.extend(moved.acknowledged());
    all_keys_read_back(&n1, &written)?;

    // 2. Move back to n1, killing n1's agent (the target) once the routes switched there
    //    (the stop phase begins): held connections are reset, none hangs.
    let client = ClientView::start(
        through_n3,
        Duration::from_millis(10),
        "kill",
        ATTEMPT_TIMEOUT,
    );
    std::thread::sleep(Duration::from_millis(200));
    let killed = deploy_watched(
        cluster,
        &[],
        &on_n1,
        &apps,
        Duration::from_secs(120),
        Some(PhaseHook {
            phase: "stop",
            run: Box::new(|_| cluster.kill_agent(&n1)),
            tick: Box::new(|| Ok(())),
        }),
    )?;
    std::thread::sleep(HOLD_TIMEOUT + Duration::from_secs(1));
    let during_kill = client.finish();
    ensure!(killed.phase_seen, "the deploy reached its stop phase");
    ensure!(
        !killed.succeeded(),
        "a move whose target agent died cannot succeed: {}",
        killed.summary()
    );
    ensure!(
        !during_kill.failed().is_empty(),
        "connections to a dead target fail: {} attempts",
        during_kill.attempts.len()
    );
    for attempt in during_kill.failed() {
        let error = attempt.error.as_deref().unwrap_or_default();
        ensure!(
            attempt.latency < HOLD_TIMEOUT + Duration::from_secs(2)
                && !error.contains("timed out")
                && !error.contains("Resource temporarily unavailable"),
            "attempt {} neither served nor reset in time: {error} after {:?}",
            attempt.key,
            attempt.latency
        );
    }
    eprintln!(
        "{routing}: target agent killed: {} of {} attempts failed (reset or refused), longest {:?}",
        during_kill.failed().len(),
        during_kill.attempts.len(),
        during_kill.longest_attempt()
    );

    // 3. The agent comes back and a redeploy converges with every acknowledged key.
    cluster.restart_agent(&n1)?;
    deploy_ok(cluster, &on_n1, &apps)?;
    let again = deploy_ok(cluster, &on_n1, &apps)?;
    ensure!(again.contains("nothing to do"), "converged: {again}");
    ensure!(
        running_redis(&n1)? && !running_redis(&n2)?,
        "redis back on n1"
    );
    written.extend(during_kill.acknowledged());
    all_keys_read_back(&n3, &written)?;

    // 4. An answer check that never matches fails the deploy once the agent's ready timeout
    //    passes, naming the application and the reply it got; a deploy without it converges.
    never_ready(cluster, &n1, &n2, &files, &apps)
}

/// Step 4 of [`moves`]: `mute` on `n2`, whose answer check never matches, beside Redis on `n1`.
fn never_ready(
    cluster: &Cluster,
    n1: &ClusterNode,
    n2: &ClusterNode,
    files: &Files,
    apps: &Path,
) -> Result<()> {
    let with_mute = files.write("with-mute.yml", &format!("{APPLICATIONS}{MUTE}"));
    let mut nodes = String::from("version: 1\nnodes:\n");
    for n in &cluster.nodes {
        let placed = match n.name.as_str() {
            name if name == n1.name => "[redis]",
            name if name == n2.name => "[mute]",
            _ => "[]",
        };
        nodes.push_str(&format!("  \"{}\": {placed}\n", n.identity()));
    }
    let placement = files.write("with-mute-placement.yml", &nodes);
    let began = std::time::Instant::now();
    let out = cluster.flockerctl(&[
        "deploy",
        &placement.display().to_string(),
        &with_mute.display().to_string(),
    ])?;
    let took = began.elapsed();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(
        !out.status.success(),
        "a check that never matches fails the deploy: {said}"
    );
    ensure!(
        said.contains("mute") && said.contains("not ready after") && said.contains("+PONG"),
        "the failure names the application, the wait and the reply it got: {said}"
    );
    ensure!(
        took >= Duration::from_secs(READY_TIMEOUT_S)
            && took < Duration::from_secs(READY_TIMEOUT_S + 45),
        "failed after the ready timeout ({READY_TIMEOUT_S} s), not before or much later: {took:?}"
    );
    let mute_container = || docker(n2, &["ps", "-aq", "--filter", "name=^/?flocker-mute$"]);
    ensure!(
        !mute_container()?.is_empty(),
        "mute's container stands on {} after the failed deploy",
        n2.name
    );
    // Back to the deployment without it: converged, its container gone, Redis untouched.
    deploy_ok(
        cluster,
        &only_on(cluster, n1, files, "on-n1-again.yml"),
        apps,
    )?;
    let again = deploy_ok(
        cluster,
        &only_on(cluster, n1, files, "on-n1-again.yml"),
        apps,
    )?;
    ensure!(again.contains("nothing to do"), "converged: {again}");
    // (Its network holder, `flocker-mute.netns`, goes a little later.)
    ensure!(
        mute_container()?.is_empty(),
        "mute's container is gone from {}",
        n2.name
    );
    ensure!(running_redis(n1)?, "redis still runs on {}", n1.name);
    Ok(())
}

#[test]
#[ignore = "privileged: needs root, dockerd, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_move_holds_new_ipv6_connections_too() -> Result<()> {
    build_binaries();
    for_each_backend(|routing| {
        let mut cluster =
            Cluster::up_dual_stack(ClusterSpec::for_test("e2e-seamless6", 3, routing))?;
        cluster.teardown_on_drop = true;
        move_over_ipv6(&cluster, routing)
    })
}

/// Redis moves n1 -> n2 while a client opens a new IPv6 connection through n3 every 10 ms: no
/// attempt fails, and every key it wrote reads back over IPv6.
fn move_over_ipv6(cluster: &Cluster, routing: &str) -> Result<()> {
    let [n1, n2, n3] = [0, 1, 2].map(|i| cluster.nodes[i].clone());
    let files = Files::new()?;
    let apps = files.write("application.yml", APPLICATIONS_V6);
    deploy_ok(cluster, &only_on(cluster, &n1, &files, "on-n1.yml"), &apps)?;
    let through_n3: SocketAddr = n3.socket(6379).parse()?;
    ensure!(through_n3.is_ipv6(), "a dual-stack node: {through_n3}");
    // Routes settle: the first answer over IPv6 through n3 (about 10 s at most).
    let settled = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        Redis::connect(&through_n3.to_string(), Duration::from_secs(1))
            .and_then(|mut r| r.command(&["PING"]).map(drop))
            .is_ok()
    });
    ensure!(settled, "redis never answered over IPv6 through n3");

    let client = ClientView::start(
        through_n3,
        Duration::from_millis(10),
        "move6",
        ATTEMPT_TIMEOUT,
    );
    std::thread::sleep(Duration::from_millis(300));
    deploy_ok(cluster, &only_on(cluster, &n2, &files, "on-n2.yml"), &apps)?;
    std::thread::sleep(Duration::from_millis(300));
    let moved = client.finish();
    moved_without_a_failed_attempt(&n1, &n2, &format!("{routing}: IPv6"), &moved)?;
    let redis = Redis::connect(&through_n3.to_string(), Duration::from_secs(2))?;
    keys_read_back(redis, &through_n3.to_string(), &moved.acknowledged())
}
