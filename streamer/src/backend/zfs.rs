//! ZFS: `zfs send` (full, or incremental with `-i`) as a source, `zfs recv` as a sink.
//!
//! ```no_run
//! use flocker_stream::{SendOptions, ReceiveOptions, backend::{ZfsSource, ZfsSink}};
//! # fn main() -> Result<(), flocker_stream::StreamError> {
//! // Full stream of tank/vol@s1, then the delta s1 -> s2, into backup/vol.
//! let (mut wire_a, mut wire_b) = (Vec::new(), Vec::new());
//! flocker_stream::send_from(&mut ZfsSource::full("tank/vol@s1"), &mut wire_a, &SendOptions::default())?;
//! flocker_stream::send_from(&mut ZfsSource::incremental("tank/vol@s2", "s1"), &mut wire_b, &SendOptions::default())?;
//! flocker_stream::receive_into(&wire_a[..], &mut ZfsSink::new("backup/vol"), &ReceiveOptions::default())?;
//! flocker_stream::receive_into(&wire_b[..], &mut ZfsSink::new("backup/vol"), &ReceiveOptions::default())?;
//! # Ok(()) }
//! ```
//! Over a network use [`crate::send_over`] / [`crate::receive_over`] with the same types.
//!
//! On abort the sink kills `zfs recv`, then checks the pool: a dataset or snapshot that did
//! not exist before the receive is destroyed, and if one still remains the abort fails with
//! [`BackendError::Leftover`]. zfs-fuse (pool v23) has no resumable receive, so an
//! interrupted transfer starts over.

use std::io::{Read, Write};
use std::process::Command;

use super::child::{ToolReader, ToolWriter, run};
use super::{BackendError, Sink, Source};

/// `zfs send [-i BASE] POOL/FS@SNAP`.
#[derive(Debug, Clone)]
pub struct ZfsSource {
    snapshot: String,
    base: Option<String>,
    zfs: String,
}

impl ZfsSource {
    /// The full stream of `snapshot` (`pool/fs@snap`).
    pub fn full(snapshot: impl Into<String>) -> Self {
        Self {
            snapshot: snapshot.into(),
            base: None,
            zfs: "zfs".into(),
        }
    }

    /// The delta from `base` (`@snap`, `snap` or `pool/fs@snap`) to `snapshot`.
    pub fn incremental(snapshot: impl Into<String>, base: impl Into<String>) -> Self {
        Self {
            snapshot: snapshot.into(),
            base: Some(base.into()),
            zfs: "zfs".into(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.zfs);
        cmd.arg("send");
        if let Some(base) = &self.base {
            // `zfs send -i` wants `@snap` or a full name.
            let base = if base.contains('@') {
                base.clone()
            } else {
                format!("@{base}")
            };
            cmd.arg("-i").arg(base);
        }
        cmd.arg(&self.snapshot);
        cmd
    }
}

impl Source for ZfsSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        if !self.snapshot.contains('@') {
            return Err(BackendError::Target(format!(
                "zfs source {:?} is not a snapshot (POOL/FS@SNAP)",
                self.snapshot
            )));
        }
        Ok(Box::new(ToolReader::spawn(self.command())?))
    }
}

/// `zfs recv [-F] POOL/FS`, destroying whatever a failed receive created.
#[derive(Debug)]
pub struct ZfsSink {
    target: String,
    rollback: bool,
    zfs: String,
    before: Option<Vec<String>>,
    receiver: ToolWriter,
}

impl ZfsSink {
    /// Receives into dataset `target` (`pool/fs`): a full stream creates it, an incremental one
    /// needs its base snapshot there.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            rollback: false,
            zfs: "zfs".into(),
            before: None,
            receiver: ToolWriter::default(),
        }
    }

    /// Passes `-F`: roll the target back to its newest snapshot before an incremental receive.
    pub fn rollback(mut self, yes: bool) -> Self {
        self.rollback = yes;
        self
    }

    /// The dataset and its snapshots as they exist now (empty if absent).
    fn existing(&self) -> Result<Vec<String>, BackendError> {
        let mut cmd = Command::new(&self.zfs);
        cmd.args([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem,volume,snapshot",
            "-r",
            &self.target,
        ]);
        match run(cmd) {
            Ok(out) => Ok(out.lines().map(str::to_owned).collect()),
            // `zfs list` of a missing dataset fails; that is the "absent" answer.
            Err(BackendError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    fn destroy_new(&self, before: &[String]) -> Result<(), BackendError> {
        let now = self.existing()?;
        let mut fresh: Vec<&String> = now.iter().filter(|n| !before.contains(n)).collect();
        // Snapshots first, then datasets deepest first.
        fresh.sort_by_key(|n| (!n.contains('@'), std::cmp::Reverse(n.len())));
        for name in fresh {
            tracing::warn!(%name, "destroying what the failed receive created");
            let mut cmd = Command::new(&self.zfs);
            cmd.args(["destroy", "-r", name]);
            if let Err(e) = run(cmd) {
                tracing::warn!(error = %e, %name, "destroy failed");
            }
        }
        let after = self.existing()?;
        let left: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Leftover(format!("{left:?}")))
        }
    }
}

impl Sink for ZfsSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        self.before = Some(self.existing()?);
        let mut cmd = Command::new(&self.zfs);
        cmd.arg("recv");
        if self.rollback {
            cmd.arg("-F");
        }
        cmd.arg(&self.target);
        Ok(Box::new(self.receiver.start(cmd, "zfs recv")?))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        // Closing stdin is zfs recv's EOF.
        self.receiver.finish("zfs sink")
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        // Kill before closing stdin: an EOF at a record boundary must not look like the end.
        let stderr = self.receiver.kill();
        if let Some(before) = self.before.take() {
            // With zfs-fuse the receive runs inside the daemon, which may still be unwinding
            // (or, if every byte arrived, finishing) after the client is gone: clean up until
            // the pool is back to `before` twice in a row.
            let mut clean_in_a_row = 0;
            let mut last = Ok(());
            for _ in 0..50 {
                last = self.destroy_new(&before);
                clean_in_a_row = if last.is_ok() { clean_in_a_row + 1 } else { 0 };
                if clean_in_a_row == 2 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            last?;
        }
        Ok(stderr.filter(|s| !s.is_empty()))
    }
}
