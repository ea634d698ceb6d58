//! btrfs: `btrfs send [-p PARENT] SNAPSHOT` as a source, `btrfs receive DIR` as a sink.
//!
//! The source must be a read-only snapshot (`btrfs subvolume snapshot -r`). On abort (or when
//! dropped after `open` without `commit`) the sink kills `btrfs receive`, waits for it, and
//! deletes every subvolume that appeared in the target directory since it started (btrfs
//! receive leaves a partial subvolume behind otherwise). btrfs has no resumable receive: an
//! interrupted transfer starts over. Commands go through a [`Runner`].

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::runner::{ChildInput, Runner, finish, system};
use super::{BackendError, Sink, Source};

fn shown(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// `btrfs send [-p PARENT] SNAPSHOT`.
#[derive(Clone)]
pub struct BtrfsSource {
    snapshot: PathBuf,
    parent: Option<PathBuf>,
    runner: Arc<dyn Runner>,
}

impl BtrfsSource {
    /// The full stream of read-only snapshot `snapshot`.
    pub fn full(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            parent: None,
            runner: system(),
        }
    }

    /// The delta from read-only snapshot `parent` (present on the receiver) to `snapshot`.
    pub fn incremental(snapshot: impl Into<PathBuf>, parent: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            parent: Some(parent.into()),
            runner: system(),
        }
    }

    /// Runs `btrfs` through `runner`.
    pub fn runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = runner;
        self
    }
}

impl Source for BtrfsSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        let mut a = vec!["send".to_string()];
        if let Some(p) = &self.parent {
            a.push("-p".into());
            a.push(shown(p));
        }
        a.push(shown(&self.snapshot));
        self.runner.spawn_reader("btrfs", &a)
    }
}

/// `btrfs receive DIR`, deleting any partial subvolume on abort.
pub struct BtrfsSink {
    dir: PathBuf,
    runner: Arc<dyn Runner>,
    /// The directory's entries when the receive started; `Some` from `open` until commit or
    /// abort.
    before: Option<BTreeSet<String>>,
    receiver: Option<Box<dyn ChildInput>>,
}

impl BtrfsSink {
    /// Receives into directory `dir` on a btrfs filesystem; the subvolume is named by the
    /// stream.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            runner: system(),
            before: None,
            receiver: None,
        }
    }

    /// Runs `btrfs` through `runner`.
    pub fn runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = runner;
        self
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
        let before = self.entries()?;
        let receiver = self
            .runner
            .spawn_writer("btrfs", &["receive".into(), shown(&self.dir)])?;
        self.before = Some(before);
        Ok(Box::new(self.receiver.insert(receiver)))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        // Closing stdin is btrfs receive's EOF.
        finish(&mut self.receiver, "btrfs sink")?;
        // Received: an abort from now on has nothing to take back.
        self.before = None;
        Ok(())
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        let stderr = self.receiver.take().map(|r| r.kill());
        if let Some(before) = self.before.take() {
            let mut left = Vec::new();
            for name in self.entries()?.difference(&before) {
                let path = self.dir.join(name);
                tracing::warn!(path = %path.display(), "deleting the partial subvolume");
                let a = ["subvolume".into(), "delete".into(), shown(&path)];
                if let Err(e) = self.runner.run("btrfs", &a) {
                    tracing::warn!(error = %e, "btrfs subvolume delete failed");
                    left.push(shown(&path));
                }
            }
            if !left.is_empty() {
                return Err(BackendError::Leftover(left.join(", ")));
            }
        }
        Ok(stderr.filter(|s| !s.is_empty()))
    }
}

impl Drop for BtrfsSink {
    fn drop(&mut self) {
        if self.before.is_some()
            && let Err(e) = self.abort()
        {
            tracing::error!(dir = %self.dir.display(), error = %e, "aborting the dropped btrfs sink failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::runner::fake::FakeRunner;

    #[test]
    fn a_dropped_sink_deletes_the_partial_subvolume_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("old")).expect("mkdir");
        let fake = Arc::new(FakeRunner::default());
        {
            let mut sink = BtrfsSink::new(tmp.path()).runner(fake.clone());
            drop(sink.open().expect("open"));
            // What `btrfs receive` had created when the stream was cut.
            std::fs::create_dir(tmp.path().join("partial")).expect("mkdir");
        }
        let dir = tmp.path().display();
        assert_eq!(
            fake.calls(),
            [
                format!("btrfs receive {dir}"),
                format!("btrfs subvolume delete {dir}/partial"),
            ]
        );
    }
}
