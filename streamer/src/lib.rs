//! `flocker-stream`: moves a byte stream (a ZFS or btrfs snapshot stream, a directory tree, a
//! file) between hosts, pipelined, compressed, verified, authenticated and (with a pre-shared
//! key) encrypted.
//!
//! ```text
//! source -> chunks -> parallel zstd (adaptive level) + BLAKE3 + seal -> frames -> transport
//!        -> parallel open + decompress + verify -> in-order sink
//! ```
//!
//! Every chunk is verified before the sink: by its AES-256-GCM seal with a pre-shared key, by a
//! keyed BLAKE3 checksum without one; compressed chunks (and every chunk without a key) are also
//! BLAKE3-hashed into the stream hash the end frame carries (wire format v3, `FORMAT.md`).
//!
//! The core is two functions over plain `Read`/`Write`: [`send_stream`] and
//! [`receive_stream`]. The receiver never passes an unverified byte to its sink and returns an
//! error naming the cause on corruption, truncation, a wrong key or a version mismatch. Around
//! them:
//! - [`backend`]: [`backend::Source`] and [`backend::Sink`] for ZFS, btrfs, directory trees,
//!   files and stdio, with commit/abort so a failed stream leaves the target untouched.
//! - [`adapt`]: the per-chunk choice between raw and zstd levels from what the sender measures
//!   (waiting on the network or on the compressor).
//! - [`seal`]: how frames are protected: AES-256-GCM with a pre-shared key, keyed BLAKE3
//!   checksums without one.
//! - [`session`]: a duplex connection with a nonce handshake and the receiver's acknowledgement
//!   ([`send_over`] / [`receive_over`]).
//! - [`transport`]: TCP, TLS (rustls, cluster CA) and listening helpers.
//! - [`listener`]: waits for the one authenticated sender among whatever connects, with
//!   handshake, idle and overall timeouts.
//!
//! **Memory**: each end keeps at most `2 * threads + 2` chunk buffer pairs in flight
//! ([`SendOptions::memory_bound`], [`ReceiveOptions::memory_bound`]): with the default 1 MiB
//! chunks and 2 threads, 12 MiB per end, whatever the stream's length.
//!
//! The crate knows nothing about Docker, the agent or the CLI.
//!
//! ```
//! use flocker_stream::{receive_stream, send_stream, Auth, ReceiveOptions, SendOptions};
//! let key = [7u8; 32];
//! let data = vec![42u8; 3 << 20];
//! let mut wire = Vec::new();
//! let sent = send_stream(&data[..], &mut wire,
//!     &SendOptions { auth: Auth::PresharedKey(key), ..Default::default() })?;
//! let mut out = Vec::new();
//! let got = receive_stream(&wire[..], &mut out,
//!     &ReceiveOptions { auth: Auth::PresharedKey(key), ..Default::default() })?;
//! assert_eq!(out, data);
//! assert_eq!(sent.stream_hash, got.stream_hash);
//! # Ok::<(), flocker_stream::StreamError>(())
//! ```
#![forbid(unsafe_code)]

pub mod adapt;
mod aligned;
mod auth;
pub mod backend;
mod error;
pub mod format;
pub mod listener;
mod options;
mod receive;
pub mod seal;
mod send;
pub mod session;
pub mod transport;

pub use adapt::ChunkMode;
pub use auth::{Auth, KeyError, SessionKey, read_key_file};
pub use error::StreamError;
pub use options::{
    Compression, DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESS_LEVEL, ModeStats, Progress, ProgressFn,
    ReceiveOptions, SendOptions, Summary,
};
pub use receive::receive_stream;
pub use send::send_stream;
pub use session::{receive_authenticated, receive_into, receive_over, send_from, send_over};
