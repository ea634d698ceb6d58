//! Volume backends behind one trait: ZFS datasets, btrfs subvolumes and plain directories.
//!
//! Owner and epoch live with the volume itself (ZFS user properties, a sidecar file for the
//! others), so a restarted agent recovers what it owns from its volumes alone. The backends
//! only store and move bytes; the ownership decisions, the record they store and the names
//! of push snapshots live in [`crate::ownership`], which knows nothing of this module.
//!
//! This is the agent's layout on top of the streamer's storage layer
//! ([`flocker_stream::backend`]): `send` and `receive` hand out its sources and sinks, and
//! every command runs through its [`Runner`], so there is one implementation of each tool's
//! send, receive and abort, and one seam for unit tests to fake.

pub mod btrfs;
pub mod dir;
pub mod mountinfo;
pub mod sidecar;
pub mod zfs;

use std::io::Write;
use std::path::PathBuf;

use flocker_stream::backend::{BackendError, Sink, Source};
use flocker_wire::VolumeState;

pub use crate::ownership::{Record, RecordOrder};
pub use flocker_stream::backend::{Runner, SystemRunner};

/// Errors of the volume backends.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("snapshot {snapshot:?} of volume {volume:?} does not exist")]
    NoSnapshot { volume: String, snapshot: String },
    #[error("invalid volume or snapshot name {0:?}: use letters, digits, '.', '-' and '_'")]
    InvalidName(String),
    #[error("corrupt metadata of volume {volume:?}: {detail}")]
    Corrupt { volume: String, detail: String },
    #[error("{0}")]
    Unsupported(String),
    /// The path where the volume should be is not the volume: using it would put the
    /// application on the wrong filesystem (an empty directory, or someone else's data).
    #[error("volume {volume:?} is not at {}: {found}", path.display())]
    NotProven {
        volume: String,
        path: PathBuf,
        found: String,
    },
    /// A source or sink of the storage layer failed otherwise.
    #[error(transparent)]
    Storage(BackendError),
}

impl From<BackendError> for VolumeError {
    /// A command's failure keeps the shape it always had here: the command line, then its
    /// exit status and stderr.
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Command {
                command,
                status,
                stderr,
            } => VolumeError::Command {
                command,
                detail: format!("{status}: {stderr}"),
            },
            BackendError::Spawn { command, source } => VolumeError::Command {
                command,
                detail: source.to_string(),
            },
            BackendError::Fs { path, source, .. } => VolumeError::Io { path, source },
            other => VolumeError::Storage(other),
        }
    }
}

/// One volume storage technology. Calls block (they run commands), so async callers use
/// `spawn_blocking`.
pub trait VolumeBackend: Send + Sync {
    /// Short name for logs and `--volumes` (`zfs`, `btrfs`, `dir`).
    fn kind(&self) -> &'static str;
    /// Every volume copy on this node with its ownership record and push snapshots.
    fn list(&self) -> Result<Vec<VolumeState>, VolumeError>;
    /// One volume copy, if present.
    fn get(&self, name: &str) -> Result<Option<VolumeState>, VolumeError> {
        Ok(self.list()?.into_iter().find(|v| v.name == name))
    }
    /// Creates an empty writable volume recorded as owned by `owner` at epoch 1.
    fn create(&self, name: &str, maximum_size: Option<u64>, owner: &str)
    -> Result<(), VolumeError>;
    /// Where the volume's data should be on the host. Only a path that [`VolumeBackend::prove`]
    /// or [`VolumeBackend::verify`] returned may be used: this one may be a bare directory.
    fn mountpoint(&self, name: &str) -> Result<PathBuf, VolumeError>;
    /// Proves, without changing anything, that the volume's path *is* the volume (the ZFS
    /// dataset mounted there, the btrfs subvolume, the directory whose record names it) and
    /// returns it; [`VolumeError::NotProven`] says what is there instead.
    fn verify(&self, name: &str) -> Result<PathBuf, VolumeError>;
    /// [`VolumeBackend::verify`], after mounting the volume where that is safe (ZFS: the
    /// dataset is not mounted and its mountpoint holds nothing of its own). Every use of a
    /// volume's data (start, restart, push, snapshot, handoff) goes through this.
    fn prove(&self, name: &str) -> Result<PathBuf, VolumeError> {
        self.verify(name)
    }
    /// The volume's quota, if it has one.
    fn quota(&self, name: &str) -> Result<Option<u64>, VolumeError>;
    fn set_quota(&self, name: &str, bytes: u64) -> Result<(), VolumeError>;
    /// Writes the ownership record. `writable` is false for copies this node does not own.
    /// The order of the writes is chosen by the caller's protocol step, see
    /// [`RecordOrder`].
    fn set_record(
        &self,
        name: &str,
        record: &Record,
        writable: bool,
        order: RecordOrder,
    ) -> Result<(), VolumeError>;
    fn snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError>;
    fn destroy_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError>;
    /// The stream of `snapshot`, incrementally from `base` when given: a source of the
    /// streamer, started when it is opened.
    fn send(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn Source>, VolumeError>;
    /// A sink for a stream produced by [`VolumeBackend::send`] on another node. The copy
    /// must not exist for a full stream and must hold `base` for an incremental one, except
    /// with `replace`: a full stream then replaces the existing read-only replica (the agent
    /// allows it only for a stale replica this node does not own). The replica is left as it
    /// was until [`Sink::commit`], which swaps the verified copy in; an aborted sink, or one
    /// dropped unfinished, leaves no partial dataset, subvolume or directory behind.
    fn receive(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
        replace: bool,
    ) -> Result<Box<dyn Sink>, VolumeError>;
    /// Keeps a fenced copy (see `agent::fencing`) under `aside`, a name marked by
    /// [`ASIDE_MARK`]: renamed with its snapshots and data untouched, and no longer listed, so
    /// the volume's own name is free for a fresh replica. Removing it is left to a person.
    fn set_aside(&self, name: &str, aside: &str) -> Result<(), VolumeError>;
}

/// What marks the name of a copy set aside by fencing (`NAME.fenced-eEPOCH-UNIXMS`).
pub const ASIDE_MARK: &str = ".fenced-";

/// Whether a volume name is that of a copy set aside by fencing; listings skip those.
pub fn is_set_aside(name: &str) -> bool {
    name.contains(ASIDE_MARK)
}

/// Refuses an aside name without the mark (it would reappear as a volume).
fn check_aside(aside: &str) -> Result<(), VolumeError> {
    check_name(aside)?;
    if is_set_aside(aside) {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(aside.to_string()))
    }
}

/// What a backend does once its inner sink committed (the verified stream landed): make it
/// the volume. It runs inside [`Sink::commit`]; when it fails, the caller's abort takes
/// nothing back (the inner sink is committed), so it cleans up after itself.
type AfterCommit = Box<dyn FnOnce() -> Result<(), VolumeError> + Send>;

/// A sink of the storage layer followed by the backend's own step at commit.
pub(crate) struct FinishingSink {
    inner: Box<dyn Sink>,
    then: Option<AfterCommit>,
}

impl FinishingSink {
    pub(crate) fn new(
        inner: impl Sink + 'static,
        then: impl FnOnce() -> Result<(), VolumeError> + Send + 'static,
    ) -> Self {
        Self {
            inner: Box::new(inner),
            then: Some(Box::new(then)),
        }
    }
}

impl Sink for FinishingSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        self.inner.open()
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        self.inner.commit()?;
        match self.then.take() {
            Some(then) => then().map_err(|e| BackendError::Target(e.to_string())),
            None => Ok(()),
        }
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        self.then = None;
        self.inner.abort()
    }
}

/// Volume, application and snapshot names end up in commands and paths: keep them tame.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape() {
        for bad in ["", "../x", "a/b", "-rf", ".hidden", "a b", "x@y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["redis", "my_app-2", "db.1"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
