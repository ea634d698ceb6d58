//! [`SendOptions`], [`ReceiveOptions`], [`Progress`] and [`Summary`].

use std::sync::Arc;
use std::time::Duration;

use crate::adapt::ChunkMode;
use crate::auth::Auth;
use crate::error::StreamError;
use crate::format::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Called from the pipeline's writer thread after every chunk; keep it cheap (throttle output
/// yourself).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Uncompressed stream bytes sent (sender) or verified and written to the sink (receiver).
    pub bytes_in: u64,
    /// Bytes on the transport so far, framing included.
    pub bytes_on_wire: u64,
    /// Time since the stream started.
    pub elapsed: Duration,
    /// The sender's current compression level (`None` on the receiver).
    pub mode: Option<ChunkMode>,
}

/// Default chunk size: 1 MiB keeps the in-flight memory small and compresses nearly as well as
/// 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// The zstd level `--compress-level` used by default before adaptive compression.
pub const DEFAULT_COMPRESS_LEVEL: i32 = 1;

/// How the sender compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Per chunk, raw or the zstd level that delivers the most bytes per second given the
    /// measured CPU and network (see [`crate::adapt`]). The default.
    Adaptive,
    /// Every chunk at this zstd level (negative = faster, up to 22); 0 sends everything raw.
    Fixed(i32),
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Sender settings. Memory in flight is bounded by [`SendOptions::memory_bound`].
#[derive(Clone)]
pub struct SendOptions {
    /// Uncompressed bytes per chunk, `4 KiB..=16 MiB`.
    pub chunk_size: u32,
    /// Adaptive or a fixed zstd level. Chunks that do not shrink are sent raw whatever the
    /// level.
    pub compression: Compression,
    /// Compression worker threads (at least 1).
    pub threads: usize,
    /// How frames are keyed.
    pub auth: Auth,
    /// Cap on bytes per second on the transport, framing included.
    pub limit_rate: Option<u64>,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::Adaptive,
            threads: default_threads(),
            auth: Auth::None,
            limit_rate: None,
            progress: None,
        }
    }
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOptions")
            .field("chunk_size", &self.chunk_size)
            .field("compression", &self.compression)
            .field("threads", &self.threads)
            .field("auth", &self.auth)
            .field("limit_rate", &self.limit_rate)
            .finish_non_exhaustive()
    }
}

/// Number of chunk buffers one end keeps in flight for `threads` workers.
pub(crate) fn slots(threads: usize) -> usize {
    2 * threads + 2
}

impl SendOptions {
    /// Upper bound on the sender's chunk memory: `(2 * threads + 2)` buffers, each holding one
    /// raw chunk and at most one compressed copy no larger than the raw chunk. It does not depend
    /// on the stream's length.
    pub fn memory_bound(&self) -> u64 {
        slots(self.threads.max(1)) as u64 * 2 * u64::from(self.chunk_size)
    }

    pub(crate) fn validate(&self) -> Result<(), StreamError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(StreamError::Options(format!(
                "chunk size {} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if let Compression::Fixed(level) = self.compression
            && !(-131072..=22).contains(&level)
        {
            return Err(StreamError::Options(format!(
                "compress level {level} outside -131072..=22"
            )));
        }
        if self.limit_rate == Some(0) {
            return Err(StreamError::Options("limit rate must be positive".into()));
        }
        Ok(())
    }
}

/// Receiver settings. Memory in flight is bounded by [`ReceiveOptions::memory_bound`].
#[derive(Clone)]
pub struct ReceiveOptions {
    /// Decompression and verification worker threads (at least 1).
    pub threads: usize,
    /// What the receiver requires; a stream keyed differently is refused.
    pub auth: Auth,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            auth: Auth::None,
            progress: None,
        }
    }
}

impl std::fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("threads", &self.threads)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl ReceiveOptions {
    /// Upper bound on the receiver's chunk memory for a stream with `chunk_size` chunks:
    /// `(2 * threads + 2)` buffers, each one payload plus one decompressed chunk.
    pub fn memory_bound(&self, chunk_size: u32) -> u64 {
        slots(self.threads.max(1)) as u64 * 2 * u64::from(chunk_size)
    }
}

/// What a finished stream did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Uncompressed stream bytes.
    pub bytes_in: u64,
    /// Bytes on the transport, framing included.
    pub bytes_on_wire: u64,
    /// The whole-stream BLAKE3 (same on both ends; see `format::StreamHasher`).
    pub stream_hash: [u8; 32],
    /// Wall time.
    pub elapsed: Duration,
    /// Data frames.
    pub chunks: u64,
    /// Data frames sent compressed.
    pub compressed_chunks: u64,
    /// Sender only: chunks and bytes per mode as sent (a chunk chosen for zstd that did not
    /// shrink counts as raw), cheapest mode first. Empty on the receiver.
    pub modes: Vec<ModeStats>,
}

/// What went out in one [`ChunkMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeStats {
    /// The mode.
    pub mode: ChunkMode,
    /// Data frames.
    pub chunks: u64,
    /// Uncompressed bytes.
    pub bytes_in: u64,
    /// Payload bytes on the wire (framing excluded).
    pub payload_bytes: u64,
}

impl Summary {
    /// `bytes_in / bytes_on_wire`.
    pub fn ratio(&self) -> f64 {
        if self.bytes_on_wire == 0 {
            1.0
        } else {
            self.bytes_in as f64 / self.bytes_on_wire as f64
        }
    }

    /// Uncompressed bytes per second.
    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes_in as f64 / s
        } else {
            0.0
        }
    }

    /// The stream hash in hex.
    pub fn stream_hash_hex(&self) -> String {
        self.stream_hash
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
