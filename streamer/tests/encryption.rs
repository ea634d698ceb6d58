//! The pre-shared-key mode encrypts (since wire format v2): no plaintext on the wire, sealed
//! frames cannot be altered, reordered or replayed, and a version-1 or -2 peer gets a clear
//! error. Since v3 a raw chunk is verified by its seal alone (it is not BLAKE3-hashed), a
//! compressed chunk's decompressed output still by BLAKE3 through the stream hash.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use flocker_stream::backend::{ReaderSource, WriterSink};
use flocker_stream::format::{FRAME_HEADER_LEN, STREAM_HEADER_LEN};
use flocker_stream::seal::AEAD_TAG_LEN;
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError, receive_stream, send_stream};

const KEY: [u8; 32] = [0x17; 32];
const CHUNK: usize = 16 * 1024;

/// Text with a marker on every line, sent uncompressed, so any plaintext on the wire would
/// show up verbatim.
fn payload() -> Vec<u8> {
    let mut d = Vec::new();
    let mut i = 0;
    while d.len() < 5 * CHUNK + 123 {
        d.extend_from_slice(format!("FLOCKER-SECRET-{i:06} volume data line\n").as_bytes());
        i += 1;
    }
    d
}

fn opts(auth: Auth) -> (SendOptions, ReceiveOptions) {
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: CHUNK as u32,
            compression: flocker_stream::Compression::Fixed(0),
            threads: 2,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            threads: 2,
            ..Default::default()
        },
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What crossed a tee'ing relay in each direction.
#[derive(Default)]
struct Capture {
    to_receiver: Vec<u8>,
    to_sender: Vec<u8>,
}

/// Copies `from` to `to`, recording every byte.
fn pump(mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Capture>>, up: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Ok(mut c) = log.lock() {
            let v = if up {
                &mut c.to_receiver
            } else {
                &mut c.to_sender
            };
            v.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// One transfer, sender -> tee'ing relay -> receiver over loopback TCP; returns both results,
/// what the sink got and the capture.
fn relayed(
    auth: Auth,
    data: &[u8],
) -> (
    Result<flocker_stream::Summary, StreamError>,
    Result<flocker_stream::Summary, StreamError>,
    Vec<u8>,
    Capture,
) {
    let (so, ro) = opts(auth);
    let receiver = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let raddr = receiver.local_addr().expect("addr");
    let relay = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let relay_addr = relay.local_addr().expect("addr");
    let log = Arc::new(Mutex::new(Capture::default()));
    let mut out = Vec::new();
    let (sent, got) = std::thread::scope(|s| {
        let recv = s.spawn(|| {
            let (mut conn, _) = receiver.accept().expect("accept");
            let mut sink = WriterSink(&mut out);
            let r = flocker_stream::receive_over(&mut conn, &mut sink, &ro);
            let _ = conn.shutdown(Shutdown::Write);
            r
        });
        let log2 = Arc::clone(&log);
        s.spawn(move || {
            let (client, _) = relay.accept().expect("relay accept");
            let server = TcpStream::connect(raddr).expect("relay connect");
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let log3 = Arc::clone(&log2);
            let up = std::thread::spawn(move || pump(client, server, log2, true));
            pump(s2, c2, log3, false);
            let _ = up.join();
        });
        let mut conn = TcpStream::connect(relay_addr).expect("connect relay");
        let sent = flocker_stream::send_over(&mut ReaderSource(Some(data)), &mut conn, &so);
        drop(conn);
        (sent, recv.join().expect("receiver"))
    });
    let capture = std::mem::take(&mut *log.lock().expect("capture"));
    (sent, got, out, capture)
}

#[test]
fn psk_mode_puts_no_plaintext_on_the_wire_and_insecure_mode_does() {
    let data = payload();
    let markers: Vec<Vec<u8>> = [0usize, 1, 500, 1500, 2000]
        .iter()
        .map(|i| format!("FLOCKER-SECRET-{i:06}").into_bytes())
        .collect();

    let (sent, got, out, cap) = relayed(Auth::PresharedKey(KEY), &data);
    let summary = sent.expect("send");
    got.expect("receive");
    assert_eq!(out, data);
    assert!(
        cap.to_receiver.len() > data.len(),
        "the relay saw the stream"
    );
    for m in &markers {
        assert!(
            !contains(&cap.to_receiver, m),
            "plaintext {:?} on the wire in PSK mode",
            String::from_utf8_lossy(m)
        );
    }
    assert!(!contains(&cap.to_receiver, b"volume data line"));
    // The acknowledgement (the stream hash in hex) is sealed too.
    assert!(!contains(
        &cap.to_sender,
        summary.stream_hash_hex().as_bytes()
    ));

    // The control: without a key the same payload crosses in the clear, so the search above
    // would have found it.
    let (sent, got, out, cap) = relayed(Auth::None, &data);
    let summary = sent.expect("send");
    got.expect("receive");
    assert_eq!(out, data);
    for m in &markers {
        assert!(
            contains(&cap.to_receiver, m),
            "the control must see plaintext"
        );
    }
    assert!(contains(
        &cap.to_sender,
        summary.stream_hash_hex().as_bytes()
    ));
}

#[test]
fn a_recorded_session_replayed_to_a_receiver_is_refused() {
    let data = payload();
    let (_, got, _, cap) = relayed(Auth::PresharedKey(KEY), &data);
    got.expect("the recorded session itself succeeds");
    // Replay the sender's bytes to a fresh receiver with the same key: its server nonce is new,
    // so the recorded confirm (and every frame keyed by the old session) fails.
    let (_, ro) = opts(Auth::PresharedKey(KEY));
    let receiver = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = receiver.local_addr().expect("addr");
    let mut out = Vec::new();
    let r = std::thread::scope(|s| {
        let recv = s.spawn(|| {
            let (mut conn, _) = receiver.accept().expect("accept");
            flocker_stream::receive_over(&mut conn, &mut WriterSink(&mut out), &ro)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let _ = c.write_all(&cap.to_receiver);
        let _ = c.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
        recv.join().expect("receiver")
    });
    let e = r.expect_err("replay");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(out.is_empty());
}

/// Where each frame starts in a one-way PSK stream (16-byte tags).
fn frame_starts(wire: &[u8]) -> Vec<(usize, usize)> {
    let mut at = STREAM_HEADER_LEN;
    let mut out = Vec::new();
    while at + FRAME_HEADER_LEN <= wire.len() {
        let h = &wire[at..at + FRAME_HEADER_LEN];
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let end = at + FRAME_HEADER_LEN + len + AEAD_TAG_LEN;
        out.push((at, end));
        at = end;
    }
    out
}

fn set_seq(frame: &mut [u8], seq: u64) {
    frame[16..24].copy_from_slice(&seq.to_le_bytes());
}

#[test]
fn sealed_frames_cannot_be_altered_reordered_or_replayed() {
    let data = payload();
    let (so, ro) = opts(Auth::PresharedKey(KEY));
    let mut wire = Vec::new();
    send_stream(&data[..], &mut wire, &so).expect("send");
    assert!(
        !contains(&wire, b"FLOCKER-SECRET"),
        "one-way mode encrypts too"
    );
    let fr = frame_starts(&wire);
    assert_eq!(fr.len(), 7, "6 data frames and the end frame");
    assert_eq!(fr[6].1, wire.len());
    let frame = |i: usize| wire[fr[i].0..fr[i].1].to_vec();
    let rebuild = |frames: Vec<Vec<u8>>| {
        let mut w = wire[..STREAM_HEADER_LEN].to_vec();
        for f in frames {
            w.extend_from_slice(&f);
        }
        w
    };
    let receive = |w: &[u8]| {
        let mut out = Vec::new();
        let r = receive_stream(w, &mut out, &ro);
        (r, out)
    };
    let (r, out) = receive(&wire);
    r.expect("untouched");
    assert_eq!(out, data);

    // Tampering: one bit of ciphertext, of a header (associated data), of a tag.
    for (at, what) in [
        (fr[2].0 + FRAME_HEADER_LEN + 100, "ciphertext"),
        (fr[2].0 + 12, "header reserved"),
        (fr[2].1 - 3, "tag"),
        (fr[6].0 + FRAME_HEADER_LEN + 3, "end frame"),
    ] {
        let mut w = wire.clone();
        w[at] ^= 0x04;
        let (r, out) = receive(&w);
        let e = r.expect_err(what);
        assert!(
            matches!(
                e,
                StreamError::DataTag { .. } | StreamError::EndTag | StreamError::Frame { .. }
            ),
            "{what}: {e}"
        );
        assert!(out.len() <= 2 * CHUNK || what == "end frame", "{what}");
        assert_eq!(&out[..], &data[..out.len()], "{what}: only verified bytes");
    }

    // Reordering: frames 2 and 3 swapped, with their sequence numbers rewritten so the headers
    // look in order. The seal binds the number (nonce and associated data).
    let mut f = (0..7).map(frame).collect::<Vec<_>>();
    f.swap(2, 3);
    set_seq(&mut f[2], 2);
    set_seq(&mut f[3], 3);
    let (r, out) = receive(&rebuild(f));
    // Both swapped frames fail; with parallel verifiers either may be reported first.
    assert!(
        matches!(r, Err(StreamError::DataTag { seq: 2 | 3 })),
        "{r:?}"
    );
    assert_eq!(&out[..], &data[..out.len()]);
    assert!(out.len() <= 2 * CHUNK);

    // Reordering as is: the sequence check names it.
    let mut f = (0..7).map(frame).collect::<Vec<_>>();
    f.swap(2, 3);
    let (r, _) = receive(&rebuild(f));
    assert!(
        matches!(
            r,
            Err(StreamError::OutOfOrder {
                expected: 2,
                got: 3
            })
        ),
        "{r:?}"
    );

    // Replay within the stream: frame 1 again in place of frame 2, renumbered.
    let mut f = (0..7).map(frame).collect::<Vec<_>>();
    let mut again = f[1].clone();
    set_seq(&mut again, 2);
    f[2] = again;
    let (r, _) = receive(&rebuild(f));
    assert!(matches!(r, Err(StreamError::DataTag { seq: 2 })), "{r:?}");

    // Dropping a frame and renumbering the rest.
    let mut f = (0..7).map(frame).collect::<Vec<_>>();
    f.remove(3);
    for (i, fr) in f.iter_mut().enumerate().skip(3) {
        set_seq(fr, i as u64);
    }
    let (r, _) = receive(&rebuild(f));
    // Every frame from 3 on is refused; which one the parallel verifiers report first varies.
    assert!(
        matches!(r, Err(StreamError::DataTag { seq }) if seq >= 3),
        "{r:?}"
    );
}

#[test]
fn a_version_1_or_2_peer_gets_a_clear_error_either_way() {
    for old in [1u16, 2] {
        an_old_peer_gets_a_clear_error_either_way(old);
    }
}

fn an_old_peer_gets_a_clear_error_either_way(old: u16) {
    // An old sender's hello to this receiver.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_, ro) = opts(Auth::PresharedKey(KEY));
    let (reply, got) = std::thread::scope(|s| {
        let recv = s.spawn(|| {
            let (mut conn, _) = listener.accept().expect("accept");
            flocker_stream::receive_over(&mut conn, &mut WriterSink(Vec::new()), &ro)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let mut hello = b"FLKHELLO".to_vec();
        hello.extend_from_slice(&old.to_le_bytes());
        hello.extend_from_slice(&[1, 0]);
        hello.extend_from_slice(&[9; 32]);
        c.write_all(&hello).expect("hello");
        let mut reply = [0u8; 76];
        c.read_exact(&mut reply).expect("reply");
        (reply, recv.join().expect("receiver"))
    });
    assert_eq!(&reply[..8], b"FLKHELLO");
    assert_eq!(
        u16::from_le_bytes([reply[8], reply[9]]),
        3,
        "the reply names v3"
    );
    assert_eq!(reply[11], 1, "status 1: version mismatch");
    let e = got.expect_err("old sender");
    assert!(
        e.to_string().contains(&format!(
            "version mismatch: sender speaks v{old}, this receiver v3"
        )),
        "{e}"
    );

    // This sender against an old receiver, which answers with status 1 and its version.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (so, _) = opts(Auth::PresharedKey(KEY));
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut hello = [0u8; 44];
            conn.read_exact(&mut hello).expect("hello");
            assert_eq!(
                u16::from_le_bytes([hello[8], hello[9]]),
                3,
                "hello names v3"
            );
            let mut reply = b"FLKHELLO".to_vec();
            reply.extend_from_slice(&old.to_le_bytes());
            reply.extend_from_slice(&[1, 1]);
            reply.extend_from_slice(&[0; 64]);
            conn.write_all(&reply).expect("reply");
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        flocker_stream::send_over(&mut ReaderSource(Some(&b"x"[..])), &mut c, &so)
    });
    let e = sent.expect_err("old receiver");
    assert!(
        e.to_string().contains(&format!(
            "version mismatch: receiver speaks v{old}, this sender v3"
        )),
        "{e}"
    );

    // An old stream header on a one-way transport.
    let mut wire = Vec::new();
    send_stream(&b"hello"[..], &mut wire, &so).expect("send");
    assert_eq!(u16::from_le_bytes([wire[8], wire[9]]), 3, "header names v3");
    wire[8..10].copy_from_slice(&old.to_le_bytes());
    let e = receive_stream(&wire[..], Vec::new(), &ro).expect_err("old stream");
    assert!(
        e.to_string()
            .contains(&format!("sender speaks v{old}, this receiver speaks v3")),
        "{e}"
    );
}
