//! Adaptive compression against a real link whose speed changes mid-stream: two network
//! namespaces joined by a veth pair, the sender's end shaped with `tc`. The link starts fast
//! (10 Gbit/s, so the CPU is the limit and raw wins) and drops to 100 Mbit/s after a fixed
//! number of chunks; the controller must start compressing within a few chunks, and every byte
//! must still arrive verified.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flocker_e2e::netns::{Netns, veth};
use flocker_stream::backend::{ReaderSource, WriterSink};
use flocker_stream::{Auth, ChunkMode, Progress, ReceiveOptions, SendOptions};

const CHUNK: usize = 1 << 20;
/// Chunks sent on the fast link before it slows down.
const FAST_CHUNKS: usize = 48;
/// Chunks sent after.
const SLOW_CHUNKS: usize = 64;
/// The controller must have switched this many chunks after the change: the send queue and
/// the shaper's queue (a few MiB) must fill before writes block, then up to `2 * threads + 2`
/// chunks are in flight and one window of 4 chunks is measured.
const SWITCH_WITHIN: usize = 24;

/// About 2:1 compressible: every 8 KiB, 4 KiB of pseudo-random bytes and 4 KiB of text.
fn half_compressible(len: usize) -> Vec<u8> {
    let random = common::random_bytes(len / 2 + 4096, 7);
    let text = common::text_bytes(4096);
    let mut out = Vec::with_capacity(len + 8192);
    for block in random.chunks(4096) {
        out.extend_from_slice(block);
        out.extend_from_slice(&text);
    }
    out.truncate(len);
    out
}

/// Shapes `eth0` in namespace `ns` (its `ip netns` name).
fn tc(ns: &str, rate: &str, burst: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc", "qdisc", "replace", "dev"])
        .args(["eth0", "root", "tbf", "rate", rate, "burst", burst])
        .args(["latency", "50ms"])
        .output()
        .expect("run tc");
    assert!(
        out.status.success(),
        "tc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "privileged: needs root, network namespaces and tc; `cargo xtask ci` runs it"]
fn switches_to_compression_within_a_few_chunks_when_the_link_slows() {
    let a = Netns::create("adapt-a").expect("netns a");
    let b = Netns::create("adapt-b").expect("netns b");
    veth(&a, "eth0", &b, "eth0").expect("veth");
    a.ip(&["addr", "add", "198.18.252.1/24", "dev", "eth0"])
        .expect("addr a");
    b.ip(&["addr", "add", "198.18.252.2/24", "dev", "eth0"])
        .expect("addr b");
    a.ip(&["link", "set", "eth0", "up"]).expect("up a");
    b.ip(&["link", "set", "eth0", "up"]).expect("up b");
    tc(a.name(), "10gbit", "2560kb");

    let data = half_compressible((FAST_CHUNKS + SLOW_CHUNKS) * CHUNK);
    let key = [9u8; 32];
    let listener = b
        .run(|| TcpListener::bind("198.18.252.2:0"))
        .expect("enter b")
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiver = b
        .spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut sink = WriterSink(Vec::new());
            let got = flocker_stream::receive_over(
                &mut conn,
                &mut sink,
                &ReceiveOptions {
                    auth: Auth::PresharedKey(key),
                    ..Default::default()
                },
            );
            (got, sink.0)
        })
        .expect("spawn receiver");

    // The controller's level after every chunk written, and when the link changed.
    let modes: Arc<Mutex<Vec<ChunkMode>>> = Arc::default();
    let seen = Arc::clone(&modes);
    let shaper = a.name().to_owned();
    let progress = Arc::new(move |p: &Progress| {
        let mut m = seen.lock().expect("modes");
        m.push(p.mode.unwrap_or(ChunkMode::Raw));
        if m.len() == FAST_CHUNKS {
            tc(&shaper, "100mbit", "64kb");
        }
    });
    let opts = SendOptions {
        auth: Auth::PresharedKey(key),
        chunk_size: CHUNK as u32,
        progress: Some(progress),
        ..Default::default()
    };
    let input = data.clone();
    let sent = a
        .run(move || {
            let mut conn = TcpStream::connect(addr).expect("connect");
            conn.set_write_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut source = ReaderSource(Some(&input[..]));
            flocker_stream::send_over(&mut source, &mut conn, &opts)
        })
        .expect("enter a")
        .expect("send");
    let (got, out) = receiver.join().expect("receiver thread").expect("enter b");
    let got = got.expect("receive");

    assert_eq!(out.len(), data.len());
    assert!(out == data, "the received bytes differ");
    assert_eq!(got.stream_hash, sent.stream_hash);
    assert_eq!(got.chunks as usize, FAST_CHUNKS + SLOW_CHUNKS);

    let modes = modes.lock().expect("modes").clone();
    let fast = &modes[FAST_CHUNKS / 2..FAST_CHUNKS];
    let raw_fast = fast.iter().filter(|m| **m == ChunkMode::Raw).count();
    let switched = modes[FAST_CHUNKS..]
        .iter()
        .position(|m| *m != ChunkMode::Raw)
        .map(|i| i + 1);
    let compressed_slow = modes[FAST_CHUNKS + SWITCH_WITHIN..]
        .iter()
        .filter(|m| **m != ChunkMode::Raw)
        .count();
    eprintln!(
        "modes: {:?}",
        modes.iter().map(|m| m.name()).collect::<Vec<_>>()
    );
    eprintln!(
        "sent {:?} ({} compressed chunks), switched {switched:?} chunks after the change",
        sent.modes, sent.compressed_chunks
    );
    // On the fast link the CPU is the limit: mostly raw (a failed trial step up may show).
    assert!(
        raw_fast * 2 >= fast.len(),
        "raw in only {raw_fast} of the last {} fast chunks",
        fast.len()
    );
    let after = switched.expect("never compressed after the link slowed");
    assert!(after <= SWITCH_WITHIN, "switched only {after} chunks after");
    // And it stays compressing on the slow link.
    let rest = SLOW_CHUNKS - SWITCH_WITHIN;
    assert!(
        compressed_slow * 10 >= rest * 9,
        "compressed only {compressed_slow} of the last {rest} chunks on the slow link"
    );
    // What was compressed was worth it (the corpus compresses about 2x)...
    let (compressed_in, compressed_out) = sent
        .modes
        .iter()
        .filter(|m| m.mode != ChunkMode::Raw)
        .fold((0u64, 0u64), |(i, o), m| {
            (i + m.bytes_in, o + m.payload_bytes)
        });
    assert!(
        compressed_in as f64 > 1.5 * compressed_out as f64,
        "compressed chunks: {compressed_in} bytes in, {compressed_out} on the wire"
    );
    // ...and the wire carried less than the data by what the counts above allow: at their
    // limits (every fast chunk raw, the switch after SWITCH_WITHIN slow ones, 90% of the rest
    // compressed about 2x) 112 MiB in, 94 on the wire, 1.19. (A bound of 1.3 failed once, at
    // 1.299, in a CI run that met every count.)
    assert!(sent.ratio() > 1.15, "ratio {}", sent.ratio());
}
