//! [`StreamError`]: every way a send or receive can fail, each naming its cause.

use crate::backend::BackendError;
use crate::format::{FrameError, HeaderError};

/// Why a stream failed. Messages name the cause, so a user seeing only the message knows which
/// end or which stage to look at.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The options are unusable.
    #[error("invalid options: {0}")]
    Options(String),
    /// Reading the source failed.
    #[error("reading the source failed: {0}")]
    SourceRead(#[source] std::io::Error),
    /// Writing to the sink failed (for example a full disk).
    #[error("writing to the sink failed: {0}")]
    SinkWrite(#[source] std::io::Error),
    /// Reading from or writing to the transport failed.
    #[error("transport failed while {stage}: {source}")]
    Transport {
        /// What was being done.
        stage: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The transport closed before the end frame.
    #[error(
        "stream truncated: the connection ended after {chunks} chunks ({bytes} bytes) without an end frame (sender killed or connection cut)"
    )]
    Truncated {
        /// Data frames received.
        chunks: u64,
        /// Verified bytes received.
        bytes: u64,
    },
    /// The stream header was refused (bad magic, version mismatch...).
    #[error("stream header refused: {0}")]
    Header(#[from] HeaderError),
    /// The two ends disagree about authentication.
    #[error("authentication mode mismatch: sender uses {sender}, receiver expects {receiver}")]
    AuthMismatch {
        /// Sender's mode.
        sender: &'static str,
        /// Receiver's mode.
        receiver: &'static str,
    },
    /// The stream header's tag does not verify: the sender holds another key, or the header was
    /// altered.
    #[error("stream header failed authentication: wrong key, or the header was corrupted")]
    HeaderTag,
    /// A frame header is malformed.
    #[error("frame {seq} header malformed (corrupted in transit?): {source}")]
    Frame {
        /// The frame's expected position.
        seq: u64,
        /// The cause.
        source: FrameError,
    },
    /// A frame arrived with the wrong sequence number (dropped, reordered or replayed frame).
    #[error(
        "frame out of order: expected sequence {expected}, got {got} (corrupted, dropped or replayed frame)"
    )]
    OutOfOrder {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
    /// A data frame's payload did not decompress.
    #[error("data frame {seq} failed to decompress (corrupted in transit): {reason}")]
    Decompress {
        /// The frame.
        seq: u64,
        /// The cause.
        reason: String,
    },
    /// A data frame's tag (checksum or seal) does not match its contents.
    #[error(
        "data frame {seq} failed verification: its bytes were corrupted, tampered with, reordered or replayed (or the key is wrong)"
    )]
    DataTag {
        /// The frame.
        seq: u64,
    },
    /// The end frame's tag does not match.
    #[error("end frame failed verification: corrupted or tampered with")]
    EndTag,
    /// The end frame's totals disagree with what arrived.
    #[error(
        "end frame disagrees with the data received: sender reports {sent_chunks} chunks / {sent_bytes} bytes, received {got_chunks} chunks / {got_bytes} bytes (or stream hash differs)"
    )]
    EndMismatch {
        /// Chunks the sender reports.
        sent_chunks: u64,
        /// Bytes the sender reports.
        sent_bytes: u64,
        /// Chunks received.
        got_chunks: u64,
        /// Bytes received.
        got_bytes: u64,
    },
    /// The session handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The peer reported a failure on its side.
    #[error("the receiver failed: {0}")]
    Peer(String),
    /// A source or sink backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A pipeline thread panicked (a bug).
    #[error("internal error: a pipeline thread panicked")]
    Panic,
    /// The cipher refused to seal (a payload beyond its limit: a bug).
    #[error("internal error: sealing a frame failed")]
    Seal,
}

impl StreamError {
    pub(crate) fn transport(stage: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Transport { stage, source }
    }
}
