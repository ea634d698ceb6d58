//! Moves a volume stream between two agents over their mutually authenticated connection
//! with `flocker-stream`: the sending side chunks, compresses and tags what a backend's
//! source yields (`zfs send`, `btrfs send`, a tar stream); the receiving side verifies every
//! chunk before it reaches the backend's sink, commits the sink only once the whole stream
//! verified and aborts it otherwise, so a corrupted or cut stream never lands. Frames carry no
//! key of their own (`Auth::None`): mutual TLS already authenticates both ends. Both run on
//! blocking threads.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flocker_stream::backend::{Sink, Source};
use flocker_stream::{Auth, Progress, ReceiveOptions, SendOptions, receive_into, send_from};

/// Errors of a transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("volume stream: {0}")]
    Stream(#[from] flocker_stream::StreamError),
}

/// Sends `source` over `transport`, counting uncompressed bytes into `progress`. Returns the
/// stream's uncompressed size.
pub fn send(
    source: &mut dyn Source,
    transport: &mut (dyn Write + Send),
    progress: Arc<AtomicU64>,
    limit_rate: Option<u64>,
) -> Result<u64, TransferError> {
    let options = SendOptions {
        auth: Auth::None,
        limit_rate,
        progress: Some(Arc::new(move |p: &Progress| {
            progress.store(p.bytes_in, Ordering::Relaxed);
        })),
        ..SendOptions::default()
    };
    let summary = send_from(source, transport, &options)?;
    Ok(summary.bytes_in)
}

/// Receives from `transport` into `sink`; nothing unverified is written, and the sink is
/// committed or aborted before this returns. Returns the stream's uncompressed size.
pub fn receive(
    transport: &mut (dyn Read + Send),
    sink: &mut dyn Sink,
) -> Result<u64, TransferError> {
    let options = ReceiveOptions {
        auth: Auth::None,
        ..ReceiveOptions::default()
    };
    let summary = receive_into(transport, sink, &options)?;
    Ok(summary.bytes_in)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flocker_stream::backend::{ReaderSource, WriterSink};

    #[test]
    fn round_trip_and_truncation_is_refused() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        let progress = Arc::new(AtomicU64::new(0));
        let mut source = ReaderSource(Some(&data[..]));
        let sent = send(&mut source, &mut wire, progress.clone(), None).expect("send");
        assert_eq!(sent, data.len() as u64);
        assert_eq!(progress.load(Ordering::Relaxed), data.len() as u64);
        let mut out = WriterSink(Vec::new());
        let got = receive(&mut &wire[..], &mut out).expect("receive");
        assert_eq!((got, out.0 == data), (data.len() as u64, true));

        let cut = &wire[..wire.len() / 2];
        let mut out = WriterSink(Vec::new());
        assert!(receive(&mut &cut[..], &mut out).is_err());
    }
}
