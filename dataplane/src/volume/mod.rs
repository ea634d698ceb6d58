//! Volume backends behind one trait: ZFS datasets, btrfs subvolumes and plain directories.
//!
//! Owner and epoch live with the volume itself (ZFS user properties, a sidecar file for the
//! others), so a restarted agent recovers what it owns from its volumes alone. The backends
//! only store and move bytes; the ownership decisions live in [`crate::ownership`].

pub mod btrfs;
pub mod command;
pub mod dir;
pub mod mountinfo;
pub mod sidecar;
pub mod zfs;

use std::io::{Read, Write};
use std::path::PathBuf;

use flocker_wire::VolumeState;

pub use flocker_wire::snapshots::{PUSH_PREFIX, push_sequence};

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
}

/// A running `send`: the stream to read, then `finish` to learn whether it was complete.
pub trait SendStream: Read + Send {
    fn finish(self: Box<Self>) -> Result<(), VolumeError>;
}

/// A running `receive`: write the stream, then `finish` to apply it. Dropping it without
/// `finish` must leave the target as it was before.
pub trait ReceiveSink: Write + Send {
    fn finish(self: Box<Self>) -> Result<(), VolumeError>;
}

/// In which order the fields of a record are written. Backends that cannot write owner and
/// epoch atomically (ZFS user properties are set one at a time) follow it so that a crash
/// between the writes never leaves two owners at one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOrder {
    /// The source giving a volume away: read-only first, then the new epoch, then the new
    /// owner. A crash in between leaves "S at e+1" on S, which still names S alone.
    GiveAway,
    /// The target taking a volume over: owner first, then epoch, then writable. A crash in
    /// between leaves "T at e" on T, outranked by S's "T at e+1".
    TakeOver,
}

/// Where and how a received copy should be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub owner: String,
    pub epoch: u64,
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
    /// Streams `snapshot`, incrementally from `base` when given.
    fn send(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn SendStream>, VolumeError>;
    /// Receives a stream produced by [`VolumeBackend::send`] on another node. The copy
    /// must not exist for a full stream and must hold `base` for an incremental one, except
    /// with `replace`: a full stream then replaces the existing read-only replica (the agent
    /// allows it only for a stale replica this node does not own). The replica is left as it
    /// was until `finish`, which swaps the verified copy in; an abandoned sink changes nothing.
    fn receive(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
        replace: bool,
    ) -> Result<Box<dyn ReceiveSink>, VolumeError>;
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

/// The write half of a receive sink that wraps an inner command sink, which is taken away
/// once the sink finishes; writing after that is a broken pipe.
pub(crate) fn write_inner(
    inner: &mut Option<Box<dyn ReceiveSink>>,
    buf: &[u8],
) -> std::io::Result<usize> {
    match inner {
        Some(sink) => sink.write(buf),
        None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
    }
}

/// Flushes the inner command sink of a receive, if it is still there.
pub(crate) fn flush_inner(inner: &mut Option<Box<dyn ReceiveSink>>) -> std::io::Result<()> {
    match inner {
        Some(sink) => sink.flush(),
        None => Ok(()),
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

/// The name of the next push snapshot: one past the highest sequence present, stamped with
/// the time it is taken (see [`flocker_wire::snapshots`]).
pub fn next_push_snapshot(existing: &[String]) -> String {
    let next = existing
        .iter()
        .filter_map(|s| push_sequence(s))
        .max()
        .map_or(1, |n| n + 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    flocker_wire::snapshots::push_snapshot_name(next, now_ms)
}

/// Keeps only push snapshots, oldest first.
pub fn sort_push_snapshots(mut snapshots: Vec<String>) -> Vec<String> {
    snapshots.retain(|s| push_sequence(s).is_some());
    snapshots.sort_by_key(|s| push_sequence(s));
    snapshots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_snapshot_names_sort_by_age() {
        let snaps = vec![
            "push-0000000002".to_string(),
            "manual".into(),
            "push-0000000010".into(),
        ];
        assert!(next_push_snapshot(&snaps).starts_with("push-0000000011-"));
        assert!(next_push_snapshot(&[]).starts_with("push-0000000001-"));
        assert_eq!(
            sort_push_snapshots(snaps),
            vec!["push-0000000002".to_string(), "push-0000000010".into()]
        );
    }

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
