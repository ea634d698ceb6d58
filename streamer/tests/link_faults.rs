//! The standalone streamer's faults on a real link (issue 17): `flocker-stream send` in one
//! network namespace, `flocker-stream recv` into a zfs-fuse pool in another, joined by a veth
//! pair. A partition longer than the idle timeout must fail both ends with a message that
//! says so, within that timeout, and leave no dataset; a slow, lossy link (a token bucket and
//! random drops: this kernel has no netem) must still deliver the stream intact. A cut (either
//! end killed) and a full sink are in `zfs.rs`.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flocker_e2e::netns::{Netns, veth};
use flocker_e2e::zfs::TestPool;

const BIN: &str = env!("CARGO_BIN_EXE_flocker-stream");
const SENDER: &str = "198.19.250.1";
const RECEIVER: &str = "198.19.250.2";
/// Both ends' idle timeout in these tests.
const IDLE: Duration = Duration::from_secs(5);

/// Two namespaces joined by a veth pair, `eth0` at each end.
fn link() -> (Netns, Netns) {
    let a = Netns::create("lfa").expect("sender namespace");
    let b = Netns::create("lfb").expect("receiver namespace");
    veth(&a, "eth0", &b, "eth0").expect("veth");
    a.ip(&["addr", "add", &format!("{SENDER}/30"), "dev", "eth0"])
        .expect("address");
    b.ip(&["addr", "add", &format!("{RECEIVER}/30"), "dev", "eth0"])
        .expect("address");
    (a, b)
}

fn key_file(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    key
}

/// A source pool with one dataset of `mib` MiB of random data, snapshotted at `@s1`.
fn source(mib: usize, seed: u64) -> (TestPool, String) {
    let pool = TestPool::create("lsrc", 128).expect("source pool");
    let vol = format!("{}/vol", pool.name());
    pool.zfs(&["create", &vol]).expect("create");
    let path = pool.mountpoint(&vol).expect("mountpoint").join("data.bin");
    std::fs::write(&path, common::random_bytes(mib << 20, seed)).expect("write");
    pool.zfs(&["snapshot", &format!("{vol}@s1")])
        .expect("snapshot");
    (pool, vol)
}

/// `flocker-stream recv` in `ns` into `zfs:TARGET`; returns it and its stderr lines.
fn receiver(ns: &Netns, target: &str, key: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = ns
        .command(BIN)
        .args([
            "recv",
            "--listen",
            &format!("{RECEIVER}:7600"),
            "--progress",
            "json",
        ])
        .args(["--sink", &format!("zfs:{target}")])
        .args(["--idle-timeout", &IDLE.as_secs().to_string()])
        .arg("--key-file")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("receiver");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("listening line");
    assert!(first.contains("listening"), "{first}");
    (child, lines)
}

fn sender(ns: &Netns, snapshot: &str, key: &Path, rate: &str) -> Child {
    ns.command(BIN)
        .args([
            "send",
            "--progress",
            "none",
            "--to",
            &format!("{RECEIVER}:7600"),
        ])
        .args(["--source", &format!("zfs:{snapshot}")])
        .args(["--limit-rate", rate])
        .args(["--idle-timeout", &IDLE.as_secs().to_string()])
        .arg("--key-file")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sender")
}

/// Waits up to `bound` for `child`; `None` if it was still running (then it is killed).
fn exit_within(child: &mut Child, bound: Duration) -> Option<(bool, String)> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Some((status.success(), err));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_progress(lines: &mpsc::Receiver<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1))
            && line.contains("\"progress\"")
        {
            return;
        }
    }
    panic!("no progress from the receiver within 30 s");
}

#[test]
#[ignore = "privileged: needs root, zfs-fuse, network namespaces and nftables; `cargo xtask ci` runs it"]
fn a_partition_fails_both_ends_within_the_idle_timeout_and_leaves_no_dataset() {
    let (a, b) = link();
    let (src, vol) = source(24, 41);
    let dst = TestPool::create("ldst", 128).expect("target pool");
    let tmp = tempfile::tempdir().expect("tmp");
    let key = key_file(tmp.path());
    let target = format!("{}/vol", dst.name());
    let (mut recv, lines) = receiver(&b, &target, &key);
    // 24 MiB at 2 MiB/s: still streaming when the partition starts.
    let mut send = sender(&a, &format!("{vol}@s1"), &key, "2M");
    wait_for_progress(&lines);
    let rules = tmp.path().join("partition.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet partition {{\n\
             chain input {{ type filter hook input priority -300; ip saddr {SENDER} drop; }}\n\
             chain output {{ type filter hook output priority -300; ip daddr {SENDER} drop; }}\n\
             }}\n"
        ),
    )
    .expect("rules");
    let status = b
        .command("nft")
        .arg("-f")
        .arg(&rules)
        .status()
        .expect("nft");
    assert!(status.success(), "partition rules");
    let cut = Instant::now();

    // Both ends give up on their own, within the idle timeout and a margin for the
    // receiver's clean-up, and say why.
    let bound = IDLE + Duration::from_secs(15);
    let sent = exit_within(&mut send, bound).expect("the sender hung past its idle timeout");
    let received = exit_within(&mut recv, bound).expect("the receiver hung past its idle timeout");
    let took = cut.elapsed();
    let received_err: Vec<String> = lines.try_iter().collect();
    assert!(!sent.0, "the sender must fail: {}", sent.1);
    assert!(!received.0, "the receiver must fail");
    let named = |text: &str| {
        text.contains("idle") || text.contains("timed out") || text.contains("timeout")
    };
    assert!(
        named(&sent.1),
        "the sender's error names the timeout: {}",
        sent.1
    );
    let received_err = received_err.join("\n");
    assert!(
        named(&received_err),
        "the receiver's error names the timeout: {received_err}"
    );
    assert!(took < bound, "both ended {took:?} after the partition");

    // Healed: the sink holds nothing of the cut stream, the source is untouched.
    let _ = b
        .command("nft")
        .args(["delete", "table", "inet", "partition"])
        .status();
    for _ in 0..50 {
        if !dst.exists(&target) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !dst.exists(&target),
        "a partial dataset was left on the sink"
    );
    let left = dst
        .zfs(&["list", "-H", "-t", "all", "-o", "name", "-r", dst.name()])
        .expect("list");
    assert_eq!(left.lines().count(), 1, "only the pool remains: {left}");
    assert!(
        src.exists(&format!("{vol}@s1")),
        "the source snapshot is untouched"
    );
}

#[test]
#[ignore = "privileged: needs root, zfs-fuse and network namespaces; `cargo xtask ci` runs it"]
fn a_slow_lossy_link_delivers_the_stream_intact() {
    let (a, b) = link();
    let (src, vol) = source(4, 43);
    let dst = TestPool::create("ldst", 128).expect("target pool");
    // This kernel has no netem: a 4 Mbit/s token bucket each way, and 3 % of the packets
    // dropped at random by nftables.
    let tmp = tempfile::tempdir().expect("tmp");
    for (ns, peer) in [(&a, RECEIVER), (&b, SENDER)] {
        let status = ns
            .command("tc")
            .args(["qdisc", "add", "dev", "eth0", "root", "tbf"])
            .args(["rate", "4mbit", "burst", "32kb", "latency", "400ms"])
            .status()
            .expect("tc");
        assert!(status.success(), "token bucket");
        let rules = tmp.path().join(format!("loss-{}.nft", ns.name()));
        let drop = "numgen random mod 100 < 3 drop";
        std::fs::write(
            &rules,
            format!(
                "table inet loss {{\n\
                 chain input {{ type filter hook input priority -300; ip saddr {peer} {drop}; }}\n\
                 chain output {{ type filter hook output priority -300; ip daddr {peer} {drop}; }}\n\
                 }}\n"
            ),
        )
        .expect("rules");
        let status = ns
            .command("nft")
            .arg("-f")
            .arg(&rules)
            .status()
            .expect("nft");
        assert!(status.success(), "random loss");
    }
    let key = key_file(tmp.path());
    let target = format!("{}/vol", dst.name());
    let (mut recv, _lines) = receiver(&b, &target, &key);
    let mut send = sender(&a, &format!("{vol}@s1"), &key, "100M");
    let bound = Duration::from_secs(120);
    let sent = exit_within(&mut send, bound).expect("the sender did not finish in 120 s");
    let received = exit_within(&mut recv, bound).expect("the receiver did not finish in 120 s");
    assert!(
        sent.0,
        "the sender succeeds over a slow lossy link: {}",
        sent.1
    );
    assert!(received.0, "the receiver succeeds: {}", received.1);
    let read = |pool: &TestPool, fs: &str| {
        std::fs::read(pool.mountpoint(fs).expect("mountpoint").join("data.bin")).expect("read")
    };
    assert!(
        read(&dst, &target) == read(&src, &vol),
        "the data arrived intact"
    );
}
