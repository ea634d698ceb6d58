//! Embedding the streamer: send a file to a receiver thread over loopback TCP with a
//! pre-shared key, the way the node agent moves a volume between nodes.
//!
//! `cargo run -p flocker-stream --example embed [FILE]` (defaults to the running binary).

use std::net::{TcpListener, TcpStream};

use flocker_stream::backend::{FileSink, FileSource};
use flocker_stream::{Auth, ReceiveOptions, SendOptions};

fn main() -> anyhow::Result<()> {
    let source = match std::env::args().nth(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()?,
    };
    let out_dir = tempfile::tempdir()?;
    let target = out_dir.path().join("copy");
    let key = [0x11; 32]; // in real use: flocker_stream::read_key_file(path)?

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = {
        let target = target.clone();
        std::thread::spawn(move || -> anyhow::Result<flocker_stream::Summary> {
            let (mut conn, _) = listener.accept()?;
            let opts = ReceiveOptions {
                auth: Auth::PresharedKey(key),
                ..Default::default()
            };
            Ok(flocker_stream::receive_over(
                &mut conn,
                &mut FileSink::new(&target),
                &opts,
            )?)
        })
    };

    let mut conn = TcpStream::connect(addr)?;
    let progress: flocker_stream::ProgressFn = std::sync::Arc::new(|p| {
        eprintln!("  {} bytes in, {} on the wire", p.bytes_in, p.bytes_on_wire);
    });
    let opts = SendOptions {
        auth: Auth::PresharedKey(key),
        progress: Some(progress),
        ..Default::default()
    };
    let sent = flocker_stream::send_over(&mut FileSource::new(&source), &mut conn, &opts)?;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;

    println!(
        "sent {} bytes as {} on the wire (ratio {:.2}); stream BLAKE3 {}",
        sent.bytes_in,
        sent.bytes_on_wire,
        sent.ratio(),
        sent.stream_hash_hex()
    );
    assert_eq!(sent.stream_hash, got.stream_hash);
    assert_eq!(std::fs::read(&source)?, std::fs::read(&target)?);
    println!("receiver committed an identical copy");
    Ok(())
}
