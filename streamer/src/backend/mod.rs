//! Sources and sinks: where a stream comes from and where it goes, behind [`Source`] and
//! [`Sink`].
//!
//! A [`Source`] opens a reader; a producer's failure (say `zfs send` exiting non-zero) shows up
//! as a read error at its EOF, so the sender never writes an end frame for a broken source. A
//! [`Sink`] opens a writer and is then either committed (the stream verified end to end) or
//! aborted (anything else), and an abort leaves the target as it was: `zfs recv` and
//! `btrfs receive` are killed (and waited for) and anything they created is destroyed, the
//! directory and file sinks write into a staging path that is removed. The ZFS, btrfs and
//! directory sinks also abort when dropped after `open` without `commit` or `abort`, and a
//! committed sink's abort takes nothing back.
//!
//! Every process (`zfs`, `btrfs`) is started through [`runner::Runner`], the seam unit tests
//! fake; a caller that manages volumes runs its other commands through it too.
//!
//! Resuming: none of the sinks resumes an interrupted transfer. zfs-fuse (pool version 23) has
//! no resume tokens (`zfs recv -s` / `zfs send -t` need OpenZFS 0.7+); btrfs receive has none;
//! the directory sink restarts from scratch. An interrupted transfer starts over, and the
//! target is left as it was before.

mod btrfs;
mod dir;
mod direct;
mod file;
pub mod runner;
mod spec;
mod zfs;

use std::io::{Read, Write};

pub use btrfs::{BtrfsSink, BtrfsSource};
pub use dir::{DirSink, DirSource};
pub use file::{FileSink, FileSource, ReaderSource, StdinSource, StdoutSink, WriterSink};
pub use runner::{ChildInput, Runner, SystemRunner};
pub use spec::Spec;
pub use zfs::{ZfsSink, ZfsSource};

/// Why a source or sink failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A command could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Fs {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The target is unusable (exists already, missing, ...).
    #[error("{0}")]
    Target(String),
    /// Abort could not restore the target.
    #[error("abort left a partial target behind: {0}")]
    Leftover(String),
    /// A helper thread panicked.
    #[error("internal error: a {0} thread panicked")]
    Panic(&'static str),
}

/// Where a stream comes from.
pub trait Source: Send {
    /// Starts producing the stream. The reader returns an error instead of EOF if the producer
    /// failed, so a broken source never yields a complete-looking stream.
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError>;

    /// Stream size if known in advance (for progress ETA).
    fn size_hint(&self) -> Option<u64> {
        None
    }
}

/// Where a stream goes.
pub trait Sink: Send {
    /// Starts the consumer and returns the writer verified bytes go to. The writer borrows the
    /// sink: drop it, then call [`Sink::commit`] or [`Sink::abort`].
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError>;

    /// The stream verified end to end: make it durable and visible.
    fn commit(&mut self) -> Result<(), BackendError>;

    /// Anything went wrong: discard everything written and leave the target as it was (after
    /// a successful [`Sink::commit`], nothing is taken back).
    /// Returns what the consumer said on its way out (a tool's stderr), if anything, so the
    /// caller can name the real cause of a write error (say "out of space").
    fn abort(&mut self) -> Result<Option<String>, BackendError>;
}

/// Copies `source` into `sink` on this host, without the wire: commits when every byte
/// arrived and the source ended cleanly, aborts otherwise. Returns the bytes copied.
pub fn copy(source: &mut dyn Source, sink: &mut dyn Sink) -> Result<u64, BackendError> {
    let copied = source.open().and_then(|mut reader| {
        let mut writer = sink.open()?;
        std::io::copy(&mut reader, &mut writer)
            .map_err(|e| BackendError::Target(format!("copying the stream into its sink: {e}")))
    });
    let result = copied.and_then(|n| sink.commit().map(|()| n));
    if result.is_err()
        && let Err(abort) = sink.abort()
    {
        tracing::error!(error = %abort, "aborting the sink failed");
    }
    result
}
