//! Moves a volume stream between two agents over their mutually authenticated connection
//! with `flocker-stream`: the sending side chunks, compresses and tags `zfs send` (or
//! `btrfs send`, `tar`) output; the receiving side verifies every chunk before it reaches
//! `zfs recv`, so a corrupted or cut stream never lands. Frames carry no key of their own
//! (`Auth::None`): mutual TLS already authenticates both ends. Both run on blocking threads.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flocker_stream::{Auth, Progress, ReceiveOptions, SendOptions, receive_stream, send_stream};

/// Errors of a transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("volume stream: {0}")]
    Stream(#[from] flocker_stream::StreamError),
}

/// Sends `source` over `transport`, counting uncompressed bytes into `progress`. Returns the
/// stream's uncompressed size.
pub fn send(
    source: &mut (dyn Read + Send),
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
    let summary = send_stream(source, transport, &options)?;
    Ok(summary.bytes_in)
}

/// Receives from `transport` into `sink`; nothing unverified is written. Returns the
/// stream's uncompressed size.
pub fn receive(
    transport: &mut (dyn Read + Send),
    sink: &mut (dyn Write + Send),
) -> Result<u64, TransferError> {
    let options = ReceiveOptions {
        auth: Auth::None,
        ..ReceiveOptions::default()
    };
    let summary = receive_stream(transport, sink, &options)?;
    Ok(summary.bytes_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_is_refused() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        let progress = Arc::new(AtomicU64::new(0));
        let sent = send(&mut &data[..], &mut wire, progress.clone(), None).expect("send");
        assert_eq!(sent, data.len() as u64);
        assert_eq!(progress.load(Ordering::Relaxed), data.len() as u64);
        let mut out = Vec::new();
        let got = receive(&mut &wire[..], &mut out).expect("receive");
        assert_eq!((got, out == data), (data.len() as u64, true));

        let cut = &wire[..wire.len() / 2];
        let mut out = Vec::new();
        assert!(receive(&mut &cut[..], &mut out).is_err());
    }
}
