//! In-process tests of the public API: round trips (property-based) and every kind of damage
//! to a stream, each asserting a clean, named error and that no unverified byte reached the sink.

mod common;

use flocker_stream::backend::{FileSink, ReaderSource};
use flocker_stream::format::{FRAME_HEADER_LEN, STREAM_HEADER_LEN};
use flocker_stream::seal::AEAD_TAG_LEN;
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError, receive_stream, send_stream};
use proptest::prelude::*;

fn opts(auth: Auth, chunk: u32, level: i32, threads: usize) -> (SendOptions, ReceiveOptions) {
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: chunk,
            compression: flocker_stream::Compression::Fixed(level),
            threads,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            threads,
            ..Default::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn round_trip(
        len in 0usize..(600 * 1024),
        seed in any::<u64>(),
        text in any::<bool>(),
        chunk_kib in 4u32..128,
        level in -3i32..4,
        threads in 1usize..4,
        keyed in any::<bool>(),
    ) {
        let data = if text { common::text_bytes(len) } else { common::random_bytes(len, seed) };
        let auth = if keyed { Auth::PresharedKey([seed as u8; 32]) } else { Auth::None };
        let (so, ro) = opts(auth, chunk_kib * 1024, level, threads);
        let mut wire = Vec::new();
        let sent = send_stream(&data[..], &mut wire, &so).expect("send");
        let mut out = Vec::new();
        let got = receive_stream(&wire[..], &mut out, &ro).expect("receive");
        prop_assert_eq!(&out, &data);
        prop_assert_eq!(sent.stream_hash, got.stream_hash);
        prop_assert_eq!(sent.bytes_in, data.len() as u64);
        prop_assert_eq!(sent.bytes_on_wire, wire.len() as u64);
        prop_assert_eq!(got.bytes_on_wire, wire.len() as u64);
        prop_assert_eq!(sent.chunks, (data.len() as u64).div_ceil(u64::from(chunk_kib) * 1024));
    }

    #[test]
    fn any_truncation_fails(cut_frac in 0.0f64..1.0) {
        let data = common::text_bytes(300 * 1024);
        let (so, ro) = opts(Auth::PresharedKey([1; 32]), 16 * 1024, 1, 2);
        let mut wire = Vec::new();
        send_stream(&data[..], &mut wire, &so).expect("send");
        let cut = (wire.len() as f64 * cut_frac) as usize;
        let mut out = Vec::new();
        let r = receive_stream(&wire[..cut], &mut out, &ro);
        prop_assert!(r.is_err());
        prop_assert!(data.starts_with(&out), "sink got bytes that are not a prefix of the stream");
    }
}

/// Where the frames of an encoded stream lie.
#[derive(Debug)]
struct FrameAt {
    start: usize,
    payload_len: usize,
    compressed: bool,
    end: bool,
}

/// The frames of a pre-shared-key stream (sealed: 16-byte tags).
fn frames(wire: &[u8]) -> Vec<FrameAt> {
    let mut at = STREAM_HEADER_LEN;
    let mut out = Vec::new();
    while at < wire.len() {
        let h = &wire[at..at + FRAME_HEADER_LEN];
        let payload_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        out.push(FrameAt {
            start: at,
            payload_len,
            compressed: h[1] & 1 == 1,
            end: h[0] == 2,
        });
        at += FRAME_HEADER_LEN + payload_len + AEAD_TAG_LEN;
    }
    out
}

const CHUNK: usize = 64 * 1024;

/// Two compressible chunks, two random ones, a short tail.
fn mixed_data() -> Vec<u8> {
    let mut d = common::text_bytes(2 * CHUNK);
    d.extend(common::random_bytes(2 * CHUNK, 9));
    d.extend(common::text_bytes(1000));
    d
}

fn damaged_receive(flip_at: usize) -> (Result<flocker_stream::Summary, StreamError>, Vec<u8>) {
    let data = mixed_data();
    let (so, ro) = opts(Auth::PresharedKey([3; 32]), CHUNK as u32, 1, 2);
    let mut wire = Vec::new();
    send_stream(&data[..], &mut wire, &so).expect("send");
    wire[flip_at] ^= 0x01;
    let mut out = Vec::new();
    let r = receive_stream(&wire[..], &mut out, &ro);
    (r, out)
}

#[test]
fn flipping_a_byte_in_any_frame_kind_is_caught_before_the_sink() {
    let data = mixed_data();
    let (so, _) = opts(Auth::PresharedKey([3; 32]), CHUNK as u32, 1, 2);
    let mut wire = Vec::new();
    send_stream(&data[..], &mut wire, &so).expect("send");
    let fr = frames(&wire);
    assert_eq!(fr.len(), 6, "5 data frames and the end frame: {fr:?}");
    assert!(
        fr[0].compressed && fr[1].compressed && !fr[2].compressed && !fr[3].compressed && fr[5].end
    );

    // Stream header: magic, version, auth mode, chunk size, nonce, tag.
    for (at, what) in [
        (0, "magic"),
        (8, "version"),
        (10, "auth"),
        (13, "chunk size"),
        (20, "nonce"),
        (60, "tag"),
    ] {
        let (r, out) = damaged_receive(at);
        let e = r.expect_err(what);
        assert!(
            matches!(
                e,
                StreamError::Header(_) | StreamError::HeaderTag | StreamError::AuthMismatch { .. }
            ),
            "{what}: {e}"
        );
        assert!(out.is_empty(), "{what}: nothing may reach the sink");
    }
    // Each data frame (compressed and raw) and the end frame: header, payload, tag.
    for (i, f) in fr.iter().enumerate() {
        let regions = [
            (f.start + 1, "header flags"),
            (f.start + 16, "header seq"),
            (f.start + FRAME_HEADER_LEN + f.payload_len / 2, "payload"),
            (f.start + FRAME_HEADER_LEN + f.payload_len + 5, "tag"),
        ];
        for (at, what) in regions {
            let (r, out) = damaged_receive(at);
            let e = r.expect_err(&format!("frame {i} {what}"));
            let msg = e.to_string();
            assert!(!msg.is_empty());
            // Only the chunks before the damaged one may have reached the sink.
            let limit = if f.end { data.len() } else { i * CHUNK };
            assert!(
                out.len() <= limit,
                "frame {i} {what}: {} bytes reached the sink, at most {limit} verified",
                out.len()
            );
            assert_eq!(
                &data[..out.len()],
                &out[..],
                "frame {i} {what}: sink got altered bytes"
            );
            if f.end {
                assert!(
                    matches!(
                        e,
                        StreamError::EndTag
                            | StreamError::Frame { .. }
                            | StreamError::OutOfOrder { .. }
                    ),
                    "end {what}: {e}"
                );
            } else {
                assert!(
                    matches!(
                        e,
                        StreamError::DataTag { .. }
                            | StreamError::Decompress { .. }
                            | StreamError::Frame { .. }
                            | StreamError::OutOfOrder { .. }
                            | StreamError::Truncated { .. }
                    ),
                    "frame {i} {what}: {e}"
                );
            }
        }
    }
}

#[test]
fn wrong_key_version_and_mode_mismatch_are_named() {
    let data = common::text_bytes(100_000);
    let mut wire = Vec::new();
    send_stream(
        &data[..],
        &mut wire,
        &SendOptions {
            auth: Auth::PresharedKey([1; 32]),
            ..Default::default()
        },
    )
    .expect("send");

    let mut out = Vec::new();
    let e = receive_stream(
        &wire[..],
        &mut out,
        &ReceiveOptions {
            auth: Auth::PresharedKey([2; 32]),
            ..Default::default()
        },
    )
    .expect_err("wrong key");
    assert!(matches!(e, StreamError::HeaderTag), "{e}");
    assert!(e.to_string().contains("wrong key"), "{e}");
    assert!(out.is_empty());

    let e = receive_stream(&wire[..], &mut out, &ReceiveOptions::default())
        .expect_err("keyed stream, keyless receiver");
    assert!(matches!(e, StreamError::AuthMismatch { .. }), "{e}");

    let mut v1 = wire.clone();
    v1[8] = 1;
    let e = receive_stream(
        &v1[..],
        &mut out,
        &ReceiveOptions {
            auth: Auth::PresharedKey([1; 32]),
            ..Default::default()
        },
    )
    .expect_err("version 1");
    assert!(e.to_string().contains("version mismatch"), "{e}");
    assert!(out.is_empty());
}

#[test]
fn frames_cannot_be_spliced_between_streams_with_the_same_key() {
    let key = Auth::PresharedKey([4; 32]);
    let (so, ro) = opts(key, 16 * 1024, 1, 2);
    let a = common::text_bytes(64 * 1024);
    let mut b = common::text_bytes(64 * 1024);
    b[100] = b'!';
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    send_stream(&a[..], &mut wa, &so).expect("a");
    send_stream(&b[..], &mut wb, &so).expect("b");
    // Stream A's header followed by B's frames: each frame is keyed to its own stream's nonce.
    let mut spliced = wa[..STREAM_HEADER_LEN].to_vec();
    spliced.extend_from_slice(&wb[STREAM_HEADER_LEN..]);
    let mut out = Vec::new();
    let e = receive_stream(&spliced[..], &mut out, &ro).expect_err("spliced");
    // Every frame is B's, so every one fails; with two verifiers either may report first.
    assert!(matches!(e, StreamError::DataTag { .. }), "{e}");
    assert!(out.is_empty());
}

#[test]
fn file_sink_leaves_no_file_when_the_stream_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("out.bin");
    let data = common::random_bytes(500_000, 5);
    let (so, ro) = opts(Auth::PresharedKey([6; 32]), 64 * 1024, 1, 2);
    let mut wire = Vec::new();
    send_stream(&data[..], &mut wire, &so).expect("send");
    let cut = &wire[..wire.len() - 10];
    let mut sink = FileSink::new(&target);
    let e = flocker_stream::receive_into(cut, &mut sink, &ro).expect_err("truncated");
    assert!(
        matches!(e, StreamError::Truncated { .. } | StreamError::EndTag),
        "{e}"
    );
    assert!(
        !target.exists(),
        "target must not exist after a failed stream"
    );
    assert!(
        !sink.partial_path().exists(),
        "staging file must be removed"
    );

    flocker_stream::receive_into(&wire[..], &mut FileSink::new(&target), &ro)
        .expect("clean stream");
    assert_eq!(std::fs::read(&target).expect("read"), data);
}

#[test]
fn session_over_tcp_round_trips_and_rejects_a_wrong_key() {
    let data = common::text_bytes(3 << 20);
    let (so, ro) = opts(Auth::PresharedKey([7; 32]), 256 * 1024, 1, 2);
    let mut out = Vec::new();
    let (sent, got) = common::over_tcp(
        &mut ReaderSource(Some(&data[..])),
        &mut flocker_stream::backend::WriterSink(&mut out),
        &so,
        &ro,
    );
    let (sent, got) = (sent.expect("send"), got.expect("receive"));
    assert_eq!(sent.stream_hash, got.stream_hash);
    assert!(sent.ratio() > 2.0, "text should compress: {}", sent.ratio());
    assert_eq!(out, data);

    let ro_wrong = ReceiveOptions {
        auth: Auth::PresharedKey([8; 32]),
        ..Default::default()
    };
    let mut out = Vec::new();
    let (sent, got) = common::over_tcp(
        &mut ReaderSource(Some(&data[..])),
        &mut flocker_stream::backend::WriterSink(&mut out),
        &so,
        &ro_wrong,
    );
    let (se, re) = (
        sent.expect_err("sender, wrong key"),
        got.expect_err("receiver, wrong key"),
    );
    assert!(se.to_string().contains("different pre-shared key"), "{se}");
    assert!(re.to_string().contains("different pre-shared key"), "{re}");
    assert!(out.is_empty());

    let (sent, got) = common::over_tcp(
        &mut ReaderSource(Some(&data[..])),
        &mut flocker_stream::backend::WriterSink(Vec::new()),
        &SendOptions::default(),
        &ro,
    );
    assert!(
        matches!(sent, Err(StreamError::AuthMismatch { .. })),
        "{sent:?}"
    );
    assert!(
        matches!(got, Err(StreamError::AuthMismatch { .. })),
        "{got:?}"
    );
}

#[test]
fn a_failing_source_never_produces_a_complete_stream() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk read error"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'x');
            self.0 -= n;
            Ok(n)
        }
    }
    let mut wire = Vec::new();
    let e = send_stream(
        Failing(300_000),
        &mut wire,
        &SendOptions {
            chunk_size: 64 * 1024,
            ..Default::default()
        },
    )
    .expect_err("source error");
    assert!(e.to_string().contains("disk read error"), "{e}");
    let mut out = Vec::new();
    let r = receive_stream(&wire[..], &mut out, &ReceiveOptions::default());
    assert!(matches!(r, Err(StreamError::Truncated { .. })), "{r:?}");
}
