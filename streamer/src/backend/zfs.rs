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
//! On abort the sink kills `zfs recv` and waits for it, then checks the pool: a dataset or
//! snapshot that did not exist before the receive is destroyed, and if one still remains the
//! abort fails with [`BackendError::Leftover`]. A sink dropped after `open` without `commit`
//! or `abort` aborts. zfs-fuse (pool v23) has no resumable receive, so an interrupted
//! transfer starts over. Every command goes through a [`Runner`] (real processes unless
//! [`ZfsSource::runner`] / [`ZfsSink::runner`] say otherwise).

use std::io::{Read, Write};
use std::sync::Arc;

use super::runner::{ChildInput, Runner, args, finish, system};
use super::{BackendError, Sink, Source};

/// `zfs send [-i BASE] POOL/FS@SNAP`.
#[derive(Clone)]
pub struct ZfsSource {
    snapshot: String,
    base: Option<String>,
    runner: Arc<dyn Runner>,
}

impl ZfsSource {
    /// The full stream of `snapshot` (`pool/fs@snap`).
    pub fn full(snapshot: impl Into<String>) -> Self {
        Self {
            snapshot: snapshot.into(),
            base: None,
            runner: system(),
        }
    }

    /// The delta from `base` (`@snap`, `snap` or `pool/fs@snap`) to `snapshot`.
    pub fn incremental(snapshot: impl Into<String>, base: impl Into<String>) -> Self {
        Self {
            snapshot: snapshot.into(),
            base: Some(base.into()),
            runner: system(),
        }
    }

    /// Runs `zfs` through `runner`.
    pub fn runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = runner;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut a = args(&["send"]);
        if let Some(base) = &self.base {
            // `zfs send -i` wants `@snap` or a full name.
            let base = if base.contains('@') {
                base.clone()
            } else {
                format!("@{base}")
            };
            a.push("-i".into());
            a.push(base);
        }
        a.push(self.snapshot.clone());
        a
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
        self.runner.spawn_reader("zfs", &self.args())
    }

    /// `zfs send -nP` (a dry run that prints the stream size) where the tool has it. zfs-fuse
    /// (pool v23) has no `-n`: there a full stream is estimated by the snapshot's
    /// `referenced` bytes, and an incremental one is left unknown.
    fn size_hint(&self) -> Option<u64> {
        let mut dry_run = self.args();
        dry_run.insert(1, "-nP".into());
        if let Ok(out) = self.runner.run("zfs", &dry_run)
            && let Some(size) = parse_dry_run_size(&out)
        {
            return Some(size);
        }
        if self.base.is_some() {
            return None;
        }
        let referenced = args(&["get", "-Hp", "-o", "value", "referenced", &self.snapshot]);
        self.runner
            .run("zfs", &referenced)
            .ok()
            .and_then(|out| out.trim().parse().ok())
    }
}

/// The `size` line of `zfs send -nP` output (`size\t12345`).
fn parse_dry_run_size(output: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some("size"), Some(n)) => n.parse().ok(),
            _ => None,
        }
    })
}

/// `zfs recv [-F] POOL/FS`, destroying whatever a failed receive created.
pub struct ZfsSink {
    target: String,
    rollback: bool,
    runner: Arc<dyn Runner>,
    /// What existed when the receive started; `Some` from `open` until commit or abort.
    before: Option<Vec<String>>,
    receiver: Option<Box<dyn ChildInput>>,
}

impl ZfsSink {
    /// Receives into dataset `target` (`pool/fs`): a full stream creates it, an incremental one
    /// needs its base snapshot there.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            rollback: false,
            runner: system(),
            before: None,
            receiver: None,
        }
    }

    /// Runs `zfs` through `runner`.
    pub fn runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = runner;
        self
    }

    /// Passes `-F`: roll the target back to its newest snapshot before an incremental receive.
    pub fn rollback(mut self, yes: bool) -> Self {
        self.rollback = yes;
        self
    }

    /// The dataset and its snapshots as they exist now (empty if absent).
    fn existing(&self) -> Result<Vec<String>, BackendError> {
        let listed = self.runner.run(
            "zfs",
            &args(&[
                "list",
                "-H",
                "-o",
                "name",
                "-t",
                "filesystem,volume,snapshot",
                "-r",
                &self.target,
            ]),
        );
        match listed {
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
            if let Err(e) = self.runner.run("zfs", &args(&["destroy", "-r", name])) {
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
        let before = self.existing()?;
        let mut a = args(&["recv"]);
        if self.rollback {
            a.push("-F".into());
        }
        a.push(self.target.clone());
        let receiver = self.runner.spawn_writer("zfs", &a)?;
        self.before = Some(before);
        Ok(Box::new(self.receiver.insert(receiver)))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        // Closing stdin is zfs recv's EOF.
        finish(&mut self.receiver, "zfs sink")?;
        // Received: an abort from now on has nothing to take back.
        self.before = None;
        Ok(())
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        // Kill before closing stdin: an EOF at a record boundary must not look like the end.
        let stderr = self.receiver.take().map(|r| r.kill());
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

impl Drop for ZfsSink {
    fn drop(&mut self) {
        if self.before.is_some()
            && let Err(e) = self.abort()
        {
            tracing::error!(target = %self.target, error = %e, "aborting the dropped zfs sink failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::runner::fake::FakeRunner;

    const LIST: &str = "zfs list -H -o name -t filesystem,volume,snapshot -r tank/v";

    #[test]
    fn the_size_comes_from_a_dry_run_or_the_snapshot() {
        let fake = Arc::new(FakeRunner::default());
        fake.answer(
            "zfs send -nP -i @s1 tank/v@s2",
            Ok("incremental\ts1\ttank/v@s2\t4096\nsize\t4096\n"),
        );
        let source = ZfsSource::incremental("tank/v@s2", "s1").runner(fake.clone());
        assert_eq!(source.size_hint(), Some(4096));
        // zfs-fuse: no dry run; a full stream falls back to `referenced`.
        fake.answer("zfs send -nP tank/v@s1", Err("invalid option 'n'"));
        fake.answer("zfs get -Hp -o value referenced tank/v@s1", Ok("1048576\n"));
        let full = ZfsSource::full("tank/v@s1").runner(fake.clone());
        assert_eq!(full.size_hint(), Some(1_048_576));
        fake.answer("zfs send -nP -i @s2 tank/v@s3", Err("invalid option 'n'"));
        let unknown = ZfsSource::incremental("tank/v@s3", "s2").runner(fake);
        assert_eq!(unknown.size_hint(), None);
    }

    #[test]
    fn an_abort_kills_the_receive_and_destroys_what_it_created() {
        let fake = Arc::new(FakeRunner::default());
        fake.answer(LIST, Err("cannot open 'tank/v': dataset does not exist"));
        let mut sink = ZfsSink::new("tank/v").runner(fake.clone());
        drop(sink.open().expect("open"));
        // What the cut-off receive left; once destroyed, the listing is empty again.
        fake.answer_once(LIST, Ok("tank/v\ntank/v@s1\n"));
        sink.abort().expect("abort");
        let calls = fake.calls();
        let destroys: Vec<&String> = calls.iter().filter(|c| c.contains("destroy")).collect();
        assert_eq!(
            destroys,
            ["zfs destroy -r tank/v@s1", "zfs destroy -r tank/v"],
            "{calls:?}"
        );
        assert!(calls.contains(&"zfs recv tank/v".to_string()), "{calls:?}");
    }

    #[test]
    fn a_dropped_sink_aborts_and_a_committed_one_takes_nothing_back() {
        let fake = Arc::new(FakeRunner::default());
        fake.answer(LIST, Ok("tank/v\n"));
        {
            let mut sink = ZfsSink::new("tank/v").rollback(true).runner(fake.clone());
            drop(sink.open().expect("open"));
            fake.answer_once(LIST, Ok("tank/v\ntank/v@s2\n"));
        }
        assert!(
            fake.calls()
                .contains(&"zfs destroy -r tank/v@s2".to_string())
        );

        let fake = Arc::new(FakeRunner::default());
        fake.answer(LIST, Ok("tank/v\n"));
        let mut sink = ZfsSink::new("tank/v").rollback(true).runner(fake.clone());
        drop(sink.open().expect("open"));
        sink.commit().expect("commit");
        fake.answer(LIST, Ok("tank/v\ntank/v@s2\n"));
        assert_eq!(sink.abort().expect("abort"), None);
        drop(sink);
        assert!(!fake.calls().iter().any(|c| c.contains("destroy")));
        assert!(fake.calls().contains(&"zfs recv -F tank/v".to_string()));
    }
}
