//! The receiver's listener against stray and hostile connections: a silent client that
//! connects first, a port scan, a flood of connections, and the timeouts (handshake, idle,
//! overall deadline). The bounds are generous; what is checked is the outcome.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use flocker_stream::backend::{ReaderSource, WriterSink};
use flocker_stream::listener::{ListenError, ListenLimits, accept_authenticated};
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError, Summary};

const KEY: [u8; 32] = [5; 32];

fn opts() -> (SendOptions, ReceiveOptions) {
    let auth = Auth::PresharedKey(KEY);
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: 64 * 1024,
            threads: 1,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            threads: 1,
            ..Default::default()
        },
    )
}

/// What the receiving side did: the payload it committed, or why it failed.
type Received = Result<(Vec<u8>, Summary), String>;

/// Listens, waits for an authenticated sender under `limits`, receives its stream into memory.
fn receive(listener: &TcpListener, limits: &ListenLimits) -> Received {
    let (_, ro) = opts();
    let (mut conn, _peer, session) =
        accept_authenticated(listener, None, &ro.auth, limits).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let summary = {
        let mut sink = WriterSink(&mut out);
        flocker_stream::receive_authenticated(&mut conn, &mut sink, &ro, &session)
            .map_err(|e| e.to_string())?
    };
    let _ = conn.finish();
    Ok((out, summary))
}

/// The real sender: connects and sends `data`.
fn send(addr: std::net::SocketAddr, data: &[u8]) -> Result<Summary, StreamError> {
    let (so, _) = opts();
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    flocker_stream::send_over(&mut ReaderSource(Some(data)), &mut conn, &so)
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

#[test]
fn a_silent_client_connected_first_does_not_block_the_real_sender() {
    let (l, addr) = listener();
    let data = common::random_bytes(300_000, 7);
    // A handshake timeout far beyond the bound below: only serving connections side by side
    // (not the timeout) lets the real sender through in time.
    let limits = ListenLimits {
        handshake_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let silent = TcpStream::connect(addr).expect("silent connect");
    let start = Instant::now();
    let (sent, got) = std::thread::scope(|s| {
        let r = s.spawn(|| receive(&l, &limits));
        let sent = send(addr, &data);
        (sent, r.join().expect("receiver thread"))
    });
    let took = start.elapsed();
    sent.expect("the real sender must succeed");
    let (out, _) = got.expect("the receiver must commit the real stream");
    assert_eq!(out, data);
    assert!(
        took < Duration::from_secs(300),
        "the silent client held the receiver for {took:?}"
    );
    drop(silent);
}

#[test]
fn a_port_scan_does_not_end_the_receiver() {
    let (l, addr) = listener();
    let data = common::text_bytes(500_000);
    let limits = ListenLimits::default();
    let (sent, got) = std::thread::scope(|s| {
        let r = s.spawn(|| receive(&l, &limits));
        // connect + close
        drop(TcpStream::connect(addr).expect("connect"));
        // connect + reset (SO_LINGER 0 is not in std; a half-close then close is the next best)
        let c = TcpStream::connect(addr).expect("connect");
        let _ = c.shutdown(Shutdown::Both);
        // garbage, short and long, then close
        for garbage in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            &common::random_bytes(100_000, 3),
        ] {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(garbage);
            let _ = c.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
        // a hello with a wrong key: the handshake fails, the receiver keeps listening
        let wrong = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let so = SendOptions {
                auth: Auth::PresharedKey([6; 32]),
                ..opts().0
            };
            flocker_stream::send_over(&mut ReaderSource(Some(&b"evil"[..])), &mut c, &so)
        });
        let wrong = wrong.join().expect("wrong-key sender");
        assert!(
            wrong
                .expect_err("a wrong key must fail")
                .to_string()
                .contains("different pre-shared key")
        );
        let sent = send(addr, &data);
        (sent, r.join().expect("receiver thread"))
    });
    sent.expect("the real sender must succeed after the scan");
    let (out, _) = got.expect("the receiver must survive the scan");
    assert_eq!(out, data);
}

#[test]
fn a_flood_of_silent_connections_evicts_the_oldest_and_the_sender_gets_through() {
    let (l, addr) = listener();
    let data = common::random_bytes(100_000, 9);
    let limits = ListenLimits {
        handshake_timeout: Duration::from_secs(600),
        max_pending: 4,
        ..Default::default()
    };
    let flood: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let (sent, got) = std::thread::scope(|s| {
        let r = s.spawn(|| receive(&l, &limits));
        let sent = send(addr, &data);
        (sent, r.join().expect("receiver thread"))
    });
    sent.expect("sender");
    assert_eq!(got.expect("receiver").0, data);
    drop(flood);
}

#[test]
fn a_silent_client_is_cut_after_the_handshake_timeout() {
    let (l, addr) = listener();
    let limits = ListenLimits {
        handshake_timeout: Duration::from_secs(1),
        deadline: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let mut silent = TcpStream::connect(addr).expect("connect");
    let got = std::thread::scope(|s| {
        let r = s.spawn(|| receive(&l, &limits));
        // The receiver cuts us: the read ends (EOF or reset) instead of blocking forever.
        silent
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let r2 = silent.read(&mut buf);
        assert!(
            matches!(r2, Ok(0) | Err(_)),
            "the silent client must be cut: {r2:?}"
        );
        if let Err(e) = &r2 {
            assert!(
                e.kind() != std::io::ErrorKind::WouldBlock,
                "not cut within 120 s"
            );
        }
        r.join().expect("receiver thread")
    });
    // Then the overall deadline ends the wait, counting the silent client as refused.
    let e = got.expect_err("nobody authenticated");
    assert!(e.contains("no sender authenticated"), "{e}");
    assert!(e.contains("1 connection(s) failed"), "{e}");
}

#[test]
fn the_deadline_ends_the_wait_without_a_sender() {
    let (l, _) = listener();
    let limits = ListenLimits {
        deadline: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let (_, ro) = opts();
    let e = accept_authenticated(&l, None, &ro.auth, &limits).expect_err("deadline");
    assert!(matches!(e, ListenError::Deadline { refused: 0, .. }), "{e}");
}

#[test]
fn an_authenticated_sender_that_stalls_hits_the_idle_timeout() {
    let (l, addr) = listener();
    let limits = ListenLimits {
        idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (so, _) = opts();
    let got = std::thread::scope(|s| {
        let r = s.spawn(|| receive(&l, &limits));
        let mut c = TcpStream::connect(addr).expect("connect");
        // Authenticate, then send nothing.
        flocker_stream::session::client_handshake(&mut c, &so.auth).expect("handshake");
        let got = r.join().expect("receiver thread");
        drop(c);
        got
    });
    let e = got.expect_err("idle");
    assert!(e.contains("timeout"), "{e}");
}
