//! Helpers shared by the streamer's integration tests.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};

use flocker_stream::backend::{Sink, Source};
use flocker_stream::{ReceiveOptions, SendOptions, StreamError, Summary};

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like compressible bytes.
pub fn text_bytes(len: usize) -> Vec<u8> {
    let words = [
        "volume ",
        "snapshot ",
        "flocker ",
        "stream ",
        "chunk ",
        "zfs ",
        "\n",
        "node-",
        "42 ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0usize;
    while out.len() < len {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Runs `send_over` and `receive_over` across a real loopback TCP connection.
pub fn over_tcp(
    source: &mut (dyn Source + Send),
    sink: &mut (dyn Sink + Send),
    send: &SendOptions,
    recv: &ReceiveOptions,
) -> (Result<Summary, StreamError>, Result<Summary, StreamError>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let r = flocker_stream::receive_over(&mut conn, sink, recv);
            let _ = conn.shutdown(std::net::Shutdown::Write);
            r
        });
        let mut conn = TcpStream::connect(addr).expect("connect");
        let sent = flocker_stream::send_over(source, &mut conn, send);
        drop(conn);
        (sent, receiver.join().expect("receiver thread"))
    })
}

/// Sends `source` into memory (one-way).
pub fn to_wire(source: &mut dyn Source, opts: &SendOptions) -> Vec<u8> {
    let mut wire = Vec::new();
    flocker_stream::send_from(source, &mut wire, opts).expect("send into memory");
    wire
}
