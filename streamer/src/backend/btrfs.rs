//! btrfs: `btrfs send [-p PARENT] SNAPSHOT` as a source, `btrfs receive DIR` as a sink.
//!
//! The source must be a read-only snapshot (`btrfs subvolume snapshot -r`). On abort the sink
//! kills `btrfs receive` and deletes every subvolume that appeared in the target directory
//! since it started (btrfs receive leaves a partial subvolume behind otherwise). btrfs has no
//! resumable receive: an interrupted transfer starts over.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;

use super::child::{ToolReader, ToolWriter, run};
use super::{BackendError, Sink, Source};

/// `btrfs send [-p PARENT] SNAPSHOT`.
#[derive(Debug, Clone)]
pub struct BtrfsSource {
    snapshot: PathBuf,
    parent: Option<PathBuf>,
}

impl BtrfsSource {
    /// The full stream of read-only snapshot `snapshot`.
    pub fn full(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            parent: None,
        }
    }

    /// The delta from read-only snapshot `parent` (present on the receiver) to `snapshot`.
    pub fn incremental(snapshot: impl Into<PathBuf>, parent: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            parent: Some(parent.into()),
        }
    }
}

impl Source for BtrfsSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        let mut cmd = Command::new("btrfs");
        cmd.arg("send");
        if let Some(p) = &self.parent {
            cmd.arg("-p").arg(p);
        }
        cmd.arg(&self.snapshot);
        Ok(Box::new(ToolReader::spawn(cmd)?))
    }
}

/// `btrfs receive DIR`, deleting any partial subvolume on abort.
#[derive(Debug)]
pub struct BtrfsSink {
    dir: PathBuf,
    before: Option<BTreeSet<String>>,
    receiver: ToolWriter,
}

impl BtrfsSink {
    /// Receives into directory `dir` on a btrfs filesystem; the subvolume is named by the
    /// stream.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            before: None,
            receiver: ToolWriter::default(),
        }
    }

    fn entries(&self) -> Result<BTreeSet<String>, BackendError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| BackendError::Fs {
            op: "list",
            path: self.dir.clone(),
            source,
        })?;
        Ok(rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }
}

impl Sink for BtrfsSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        self.before = Some(self.entries()?);
        let mut cmd = Command::new("btrfs");
        cmd.arg("receive").arg(&self.dir);
        Ok(Box::new(self.receiver.start(cmd, "btrfs receive")?))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        self.receiver.finish("btrfs sink")
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        let stderr = self.receiver.kill();
        if let Some(before) = self.before.take() {
            let mut left = Vec::new();
            for name in self.entries()?.difference(&before) {
                let path = self.dir.join(name);
                tracing::warn!(path = %path.display(), "deleting the partial subvolume");
                let mut cmd = Command::new("btrfs");
                cmd.args(["subvolume", "delete"]).arg(&path);
                if let Err(e) = run(cmd) {
                    tracing::warn!(error = %e, "btrfs subvolume delete failed");
                    left.push(path.display().to_string());
                }
            }
            if !left.is_empty() {
                return Err(BackendError::Leftover(left.join(", ")));
            }
        }
        Ok(stderr.filter(|s| !s.is_empty()))
    }
}
