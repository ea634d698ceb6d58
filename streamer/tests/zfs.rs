//! ZFS round trips and failures against real zfs-fuse pools.

mod common;

use std::path::Path;

use flocker_e2e::zfs::TestPool;
use flocker_stream::backend::{ZfsSink, ZfsSource};
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError};

fn psk() -> (SendOptions, ReceiveOptions) {
    let key = [0x5a; 32];
    (
        SendOptions {
            auth: Auth::PresharedKey(key),
            chunk_size: 256 * 1024,
            ..Default::default()
        },
        ReceiveOptions {
            auth: Auth::PresharedKey(key),
            ..Default::default()
        },
    )
}

fn write(pool: &TestPool, fs: &str, name: &str, data: &[u8]) {
    let path = pool.mountpoint(fs).expect("mountpoint").join(name);
    std::fs::write(&path, data).expect("write into dataset");
}

fn read(pool: &TestPool, fs: &str, name: &str) -> Vec<u8> {
    let dir = pool.mountpoint(fs).expect("mountpoint");
    std::fs::read(Path::new(&dir).join(name)).expect("read from dataset")
}

#[test]
#[ignore = "privileged: needs root and zfs-fuse; `cargo xtask ci` runs it"]
fn zfs_full_then_incremental_round_trip_over_tcp() {
    let src = TestPool::create("fsrc", 128).expect("source pool");
    let dst = TestPool::create("fdst", 128).expect("target pool");
    let vol = format!("{}/vol", src.name());
    let target = format!("{}/vol", dst.name());
    src.zfs(&["create", &vol]).expect("create");
    let a = common::random_bytes(3 << 20, 1);
    let b = common::text_bytes(2 << 20);
    write(&src, &vol, "a.bin", &a);
    write(&src, &vol, "b.txt", &b);
    src.zfs(&["snapshot", &format!("{vol}@s1")])
        .expect("snapshot s1");

    let (so, ro) = psk();
    let (sent, got) = common::over_tcp(
        &mut ZfsSource::full(format!("{vol}@s1")),
        &mut ZfsSink::new(&target),
        &so,
        &ro,
    );
    let sent = sent.expect("send full");
    let got = got.expect("receive full");
    assert_eq!(sent.stream_hash, got.stream_hash);
    assert!(dst.exists(&format!("{target}@s1")));
    assert_eq!(read(&dst, &target, "a.bin"), a);
    assert_eq!(read(&dst, &target, "b.txt"), b);

    let c = common::random_bytes(1 << 20, 2);
    write(&src, &vol, "c.bin", &c);
    std::fs::remove_file(src.mountpoint(&vol).expect("mp").join("b.txt")).expect("rm");
    src.zfs(&["snapshot", &format!("{vol}@s2")])
        .expect("snapshot s2");
    let (sent, got) = common::over_tcp(
        &mut ZfsSource::incremental(format!("{vol}@s2"), "@s1"),
        // Reading the files above updated atimes on the mounted target: roll back first.
        &mut ZfsSink::new(&target).rollback(true),
        &so,
        &ro,
    );
    sent.expect("send incremental");
    let got = got.expect("receive incremental");
    assert!(
        got.bytes_in < 3 << 20,
        "incremental stream should carry only the delta, got {}",
        got.bytes_in
    );
    assert!(dst.exists(&format!("{target}@s2")));
    assert_eq!(read(&dst, &target, "c.bin"), c);
    assert_eq!(read(&dst, &target, "a.bin"), a);
    assert!(!dst.mountpoint(&target).expect("mp").join("b.txt").exists());
}

/// Cuts the stream at `cut` bytes or flips the byte at `flip`, then receives it.
fn receive_damaged(
    wire: &[u8],
    cut: Option<usize>,
    flip: Option<usize>,
    target: &str,
) -> StreamError {
    let mut w = wire.to_vec();
    if let Some(i) = flip {
        w[i] ^= 0x40;
    }
    if let Some(c) = cut {
        w.truncate(c);
    }
    let (_, ro) = psk();
    flocker_stream::receive_into(&w[..], &mut ZfsSink::new(target), &ro)
        .expect_err("damaged stream must fail")
}

#[test]
#[ignore = "privileged: needs root and zfs-fuse; `cargo xtask ci` runs it"]
fn zfs_damaged_streams_leave_no_dataset_or_snapshot() {
    let src = TestPool::create("dsrc", 128).expect("source pool");
    let dst = TestPool::create("ddst", 128).expect("target pool");
    let vol = format!("{}/vol", src.name());
    src.zfs(&["create", &vol]).expect("create");
    write(&src, &vol, "a.bin", &common::random_bytes(4 << 20, 3));
    src.zfs(&["snapshot", &format!("{vol}@s1")]).expect("snap");
    let (so, ro) = psk();
    let full = common::to_wire(&mut ZfsSource::full(format!("{vol}@s1")), &so);
    let target = format!("{}/vol", dst.name());

    // Truncated half-way (a killed sender or cut connection looks like this).
    let e = receive_damaged(&full, Some(full.len() / 2), None, &target);
    assert!(matches!(e, StreamError::Truncated { .. }), "{e}");
    assert!(
        !dst.exists(&target),
        "partial dataset left behind after truncation"
    );

    // Everything but the end frame arrived: zfs recv may already have committed; the sink
    // must still undo it.
    let e = receive_damaged(&full, Some(full.len() - 1), None, &target);
    assert!(matches!(e, StreamError::Truncated { .. }), "{e}");
    assert!(
        !dst.exists(&target),
        "dataset left behind when only the end frame was missing"
    );

    // A flipped byte in the middle of the data.
    let e = receive_damaged(&full, None, Some(full.len() / 2), &target);
    assert!(
        matches!(
            e,
            StreamError::DataTag { .. }
                | StreamError::Decompress { .. }
                | StreamError::Frame { .. }
        ),
        "{e}"
    );
    assert!(
        !dst.exists(&target),
        "partial dataset left behind after corruption"
    );

    // The source is untouched and the clean stream still goes through.
    assert!(src.exists(&format!("{vol}@s1")));
    flocker_stream::receive_into(&full[..], &mut ZfsSink::new(&target), &ro).expect("clean stream");
    assert!(dst.exists(&format!("{target}@s1")));

    // A damaged incremental leaves the target at s1, without s2.
    write(&src, &vol, "b.bin", &common::random_bytes(2 << 20, 4));
    src.zfs(&["snapshot", &format!("{vol}@s2")])
        .expect("snap s2");
    let inc = common::to_wire(&mut ZfsSource::incremental(format!("{vol}@s2"), "s1"), &so);
    let e = receive_damaged(&inc, Some(inc.len() - 40), None, &target);
    assert!(
        matches!(e, StreamError::Truncated { .. } | StreamError::EndTag),
        "{e}"
    );
    assert!(
        !dst.exists(&format!("{target}@s2")),
        "snapshot s2 left behind"
    );
    assert!(
        dst.exists(&format!("{target}@s1")),
        "the base snapshot must survive"
    );
}

#[test]
#[ignore = "privileged: needs root and zfs-fuse; `cargo xtask ci` runs it"]
fn zfs_full_target_pool_fails_cleanly() {
    let src = TestPool::create("bsrc", 256).expect("source pool");
    let dst = TestPool::create("bdst", 64).expect("tiny target pool");
    let vol = format!("{}/vol", src.name());
    src.zfs(&["create", &vol]).expect("create");
    // More than the tiny pool can hold, in several files.
    for i in 0..4 {
        write(
            &src,
            &vol,
            &format!("f{i}.bin"),
            &common::random_bytes(24 << 20, 10 + i),
        );
    }
    src.zfs(&["snapshot", &format!("{vol}@s1")]).expect("snap");
    let (so, ro) = psk();
    let target = format!("{}/vol", dst.name());
    let (sent, got) = common::over_tcp(
        &mut ZfsSource::full(format!("{vol}@s1")),
        &mut ZfsSink::new(&target),
        &so,
        &ro,
    );
    let got = got.expect_err("a full pool must fail the receive");
    let msg = got.to_string();
    assert!(
        msg.contains("space") || msg.contains("sink"),
        "error should name the sink/space: {msg}"
    );
    assert!(
        sent.is_err(),
        "the sender must learn that the receiver failed"
    );
    assert!(
        !dst.exists(&target),
        "partial dataset left behind on the full pool"
    );
    assert!(
        src.exists(&format!("{vol}@s1")),
        "source snapshot must be untouched"
    );
}

/// Starts `flocker-stream recv` into `target`; returns the child and its address.
fn start_cli_receiver(
    target: &str,
    key: &Path,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flocker-stream"))
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--progress",
            "json",
            "--sink",
            &format!("zfs:{target}"),
        ])
        .arg("--key-file")
        .arg(key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("receiver");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("listening line");
    let v: serde_json::Value = serde_json::from_str(&first).expect("json");
    (child, v["addr"].as_str().expect("addr").to_owned(), rx)
}

fn wait_progress(rx: &std::sync::mpsc::Receiver<String>) {
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("no progress");
        if line.contains("\"progress\"") {
            return;
        }
    }
}

/// Waits until `name` disappears (zfs-fuse finishes unwinding an interrupted receive).
fn gone_eventually(pool: &TestPool, name: &str) -> bool {
    for _ in 0..50 {
        if !pool.exists(name) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

#[test]
#[ignore = "privileged: needs root and zfs-fuse; `cargo xtask ci` runs it"]
fn zfs_killing_either_cli_end_mid_stream_leaves_no_dataset() {
    let src = TestPool::create("ksrc", 128).expect("source pool");
    let dst = TestPool::create("kdst", 128).expect("target pool");
    let vol = format!("{}/vol", src.name());
    src.zfs(&["create", &vol]).expect("create");
    write(&src, &vol, "a.bin", &common::random_bytes(24 << 20, 31));
    src.zfs(&["snapshot", &format!("{vol}@s1")]).expect("snap");
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("key");
    std::fs::write(&key, [3u8; 32]).expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let target = format!("{}/vol", dst.name());
    let sender = |addr: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flocker-stream"))
            .args([
                "send",
                "--progress",
                "none",
                "--limit-rate",
                "4M",
                "--to",
                addr,
            ])
            .args(["--source", &format!("zfs:{vol}@s1")])
            .arg("--key-file")
            .arg(&key)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sender")
    };

    // Kill the sender: the receiver reports truncation, aborts zfs recv, nothing remains.
    let (receiver, addr, rx) = start_cli_receiver(&target, &key);
    let mut s = sender(&addr);
    wait_progress(&rx);
    s.kill().expect("kill sender");
    let _ = s.wait();
    let out = receiver.wait_with_output().expect("receiver");
    let text: Vec<String> = rx.try_iter().collect();
    assert!(!out.status.success(), "receiver must fail");
    assert!(text.join("\n").contains("truncated"), "{text:?}");
    assert!(
        gone_eventually(&dst, &target),
        "dataset left after a killed sender"
    );

    // Kill the receiver: the sender fails; zfs recv, orphaned, sees EOF and unwinds.
    let (mut receiver, addr, rx) = start_cli_receiver(&target, &key);
    let s = sender(&addr);
    wait_progress(&rx);
    receiver.kill().expect("kill receiver");
    let _ = receiver.wait();
    let out = s.wait_with_output().expect("sender");
    assert!(
        !out.status.success(),
        "sender must fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("sender said: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        gone_eventually(&dst, &target),
        "dataset left after a killed receiver"
    );
    assert!(
        src.exists(&format!("{vol}@s1")),
        "source snapshot untouched"
    );
}
