//! Moves a volume stream between two agents over their mutually authenticated connection:
//! the sending side frames `zfs send` (or `btrfs send`, `tar`) output, the receiving side
//! verifies before anything reaches `zfs recv`. Both run on blocking threads.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of a transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("stream: {0}")]
    Stream(String),
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
}

/// Sends `source` over `transport`, counting uncompressed bytes into `progress`.
pub fn send(
    source: &mut (dyn Read + Send),
    transport: &mut (dyn Write + Send),
    progress: Arc<AtomicU64>,
) -> Result<u64, TransferError> {
    let mut counting = Counting {
        inner: source,
        count: progress,
    };
    let n = std::io::copy(&mut counting, transport)?;
    transport.flush()?;
    Ok(n)
}

/// Receives from `transport` into `sink`.
pub fn receive(
    transport: &mut (dyn Read + Send),
    sink: &mut (dyn Write + Send),
) -> Result<u64, TransferError> {
    let n = std::io::copy(transport, sink)?;
    sink.flush()?;
    Ok(n)
}

struct Counting<'a> {
    inner: &'a mut (dyn Read + Send),
    count: Arc<AtomicU64>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
