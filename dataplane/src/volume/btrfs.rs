//! btrfs subvolumes: `ROOT/NAME` is the writable subvolume, `ROOT/.snapshots/NAME/SNAP` are
//! read-only snapshots, `ROOT/.flocker/NAME.json` the ownership sidecar. Pushes use
//! `btrfs send [-p base]` and `btrfs receive`; a received snapshot becomes the volume by a
//! writable snapshot of it. Quotas are recorded but not enforced (qgroups are not set up).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flocker_stream::backend::{BtrfsSink, BtrfsSource, Runner, Sink, Source};
use flocker_wire::VolumeState;

use super::sidecar::{self, Sidecar};
use super::{FinishingSink, Record, RecordOrder, VolumeBackend, VolumeError, check_name};
use crate::ownership::sort_push_snapshots;

/// Volumes as btrfs subvolumes below `root` (which must be on a btrfs filesystem).
pub struct BtrfsBackend {
    root: PathBuf,
    runner: Arc<dyn Runner>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl BtrfsBackend {
    pub fn open(root: &Path, runner: Arc<dyn Runner>) -> Result<Self, VolumeError> {
        for sub in [".snapshots", ".flocker"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(BtrfsBackend {
            root: root.to_path_buf(),
            runner,
        })
    }

    fn subvolume(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn snapshot_dir(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name)?;
        Ok(self.root.join(".snapshots").join(name))
    }

    fn sidecar_path(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name)?;
        Ok(self.root.join(".flocker").join(format!("{name}.json")))
    }

    fn btrfs(&self, a: &[String]) -> Result<String, VolumeError> {
        Ok(self.runner.run("btrfs", a)?)
    }

    fn snapshots(&self, name: &str) -> Result<Vec<String>, VolumeError> {
        let dir = self.snapshot_dir(name)?;
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries {
                let e = e.map_err(io(&dir))?;
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(sort_push_snapshots(out))
    }
}

impl VolumeBackend for BtrfsBackend {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn set_aside(&self, name: &str, aside: &str) -> Result<(), VolumeError> {
        super::check_aside(aside)?;
        if self.subvolume(aside)?.exists() {
            return Err(VolumeError::Exists(aside.to_string()));
        }
        // Snapshots and data first, the record last: until the record moves, the volume is
        // still listed under its own name, so a crash in between is visible, not lost.
        for (from, to) in [
            (self.snapshot_dir(name)?, self.snapshot_dir(aside)?),
            (self.subvolume(name)?, self.subvolume(aside)?),
            (self.sidecar_path(name)?, self.sidecar_path(aside)?),
        ] {
            if from.exists() {
                fs::rename(&from, &to).map_err(io(&from))?;
            }
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<VolumeState>, VolumeError> {
        let dir = self.root.join(".flocker");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if check_name(name).is_err() || super::is_set_aside(name) {
                continue;
            }
            let Some(car) = sidecar::read(&e.path(), name)? else {
                continue;
            };
            out.push(VolumeState {
                name: name.to_string(),
                owner: car.owner,
                epoch: car.epoch,
                snapshots: self.snapshots(name)?,
                used_bytes: 0,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create(
        &self,
        name: &str,
        maximum_size: Option<u64>,
        owner: &str,
    ) -> Result<(), VolumeError> {
        let sub = self.subvolume(name)?;
        if sub.exists() {
            return Err(VolumeError::Exists(name.to_string()));
        }
        self.btrfs(&["subvolume".into(), "create".into(), s(&sub)])?;
        sidecar::write(
            &self.sidecar_path(name)?,
            &Sidecar {
                volume: Some(name.to_string()),
                owner: owner.to_string(),
                epoch: 1,
                writable: true,
                maximum_size,
            },
        )
    }

    fn mountpoint(&self, name: &str) -> Result<PathBuf, VolumeError> {
        self.subvolume(name)
    }

    fn verify(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let path = self.subvolume(name)?;
        let not = |found: String| VolumeError::NotProven {
            volume: name.to_string(),
            path: path.clone(),
            found,
        };
        let shown = s(&path);
        let stat = |a: &[&str]| -> Result<String, VolumeError> {
            let mut argv: Vec<String> = a.iter().map(|x| x.to_string()).collect();
            argv.push(shown.clone());
            self.runner
                .run("stat", &argv)
                .map(|o| o.trim().to_string())
                .map_err(|e| not(format!("cannot stat it ({})", VolumeError::from(e))))
        };
        let fstype = stat(&["-f", "-c", "%T"])?;
        if fstype != "btrfs" {
            return Err(not(format!("it is on a {fstype} filesystem, not btrfs")));
        }
        // Inode 256 is the root directory of a btrfs subvolume; anything else is a plain
        // directory.
        let inode = stat(&["-c", "%i"])?;
        if inode != "256" {
            return Err(not(format!(
                "it is a plain directory (inode {inode}), not a btrfs subvolume"
            )));
        }
        match sidecar::read(&self.sidecar_path(name)?, name)? {
            Some(car) if car.volume.as_deref().is_none_or(|v| v == name) => Ok(path),
            Some(car) => Err(not(format!(
                "its record names volume {:?}",
                car.volume.unwrap_or_default()
            ))),
            None => Err(not("it has no ownership record".into())),
        }
    }

    fn quota(&self, name: &str) -> Result<Option<u64>, VolumeError> {
        Ok(sidecar::read(&self.sidecar_path(name)?, name)?.and_then(|c| c.maximum_size))
    }

    fn set_quota(&self, name: &str, bytes: u64) -> Result<(), VolumeError> {
        let path = self.sidecar_path(name)?;
        let mut car =
            sidecar::read(&path, name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        car.maximum_size = Some(bytes);
        sidecar::write(&path, &car)
    }

    fn set_record(
        &self,
        name: &str,
        record: &Record,
        writable: bool,
        order: RecordOrder,
    ) -> Result<(), VolumeError> {
        let sub = s(&self.subvolume(name)?);
        let ro = |on: bool| -> Result<(), VolumeError> {
            let value = if on { "true" } else { "false" };
            self.btrfs(&[
                "property".into(),
                "set".into(),
                sub.clone(),
                "ro".into(),
                value.into(),
            ])
            .map(drop)
        };
        let path = self.sidecar_path(name)?;
        let maximum_size = sidecar::read(&path, name)?.and_then(|c| c.maximum_size);
        let car = Sidecar {
            volume: Some(name.to_string()),
            owner: record.owner.clone(),
            epoch: record.epoch,
            writable,
            maximum_size,
        };
        // Giving away: freeze before the record names the new owner; taking over: record
        // first, thaw last.
        match order {
            RecordOrder::GiveAway => {
                ro(!writable)?;
                sidecar::write(&path, &car)
            }
            RecordOrder::TakeOver => {
                sidecar::write(&path, &car)?;
                ro(!writable)
            }
        }
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let dir = self.snapshot_dir(name)?;
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        self.btrfs(&[
            "subvolume".into(),
            "snapshot".into(),
            "-r".into(),
            s(&self.subvolume(name)?),
            s(&dir.join(snapshot)),
        ])
        .map(drop)
    }

    fn destroy_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let path = self.snapshot_dir(name)?.join(snapshot);
        self.btrfs(&["subvolume".into(), "delete".into(), s(&path)])
            .map(drop)
    }

    fn send(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn Source>, VolumeError> {
        check_name(snapshot)?;
        let dir = self.snapshot_dir(name)?;
        let source = match base {
            Some(base) => {
                check_name(base)?;
                BtrfsSource::incremental(dir.join(snapshot), dir.join(base))
            }
            None => BtrfsSource::full(dir.join(snapshot)),
        };
        Ok(Box::new(source.runner(self.runner.clone())))
    }

    /// `btrfs receive` lands the read-only snapshot; the commit then replaces the volume by a
    /// writable snapshot of it (made read-only again by the record that follows) and, for a
    /// stream replacing a stale replica, deletes the replica's old snapshots.
    fn receive(
        &self,
        name: &str,
        _base: Option<&str>,
        snapshot: &str,
        replace: bool,
    ) -> Result<Box<dyn Sink>, VolumeError> {
        check_name(snapshot)?;
        let dir = self.snapshot_dir(name)?;
        // A stale replica's snapshots stay until the new one is in; then they go.
        let stale: Vec<PathBuf> = if replace {
            self.snapshots(name)?.iter().map(|s| dir.join(s)).collect()
        } else {
            vec![]
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let inner = BtrfsSink::new(&dir).runner(self.runner.clone());
        let (received, volume) = (dir.join(snapshot), self.subvolume(name)?);
        let runner = self.runner.clone();
        let delete = move |path: &Path| -> Result<(), VolumeError> {
            runner.run("btrfs", &["subvolume".into(), "delete".into(), s(path)])?;
            Ok(())
        };
        let runner = self.runner.clone();
        Ok(Box::new(FinishingSink::new(inner, move || {
            if volume.exists() {
                delete(&volume)?;
            }
            runner.run(
                "btrfs",
                &[
                    "subvolume".into(),
                    "snapshot".into(),
                    s(&received),
                    s(&volume),
                ],
            )?;
            stale.iter().try_for_each(|old| delete(old))
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flocker_stream::backend::runner::fake::FakeRunner;

    #[test]
    fn incremental_send_uses_the_base_as_parent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(FakeRunner::default());
        let b = BtrfsBackend::open(tmp.path(), fake.clone()).expect("open");
        let mut send = b
            .send("db", Some("push-0000000001"), "push-0000000002")
            .expect("send");
        drop(send.open().expect("open"));
        let root = tmp.path().display();
        assert_eq!(
            fake.calls(),
            vec![format!(
                "btrfs send -p {root}/.snapshots/db/push-0000000001 {root}/.snapshots/db/push-0000000002"
            )]
        );
    }

    #[test]
    fn giving_away_freezes_before_writing_the_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(FakeRunner::default());
        let b = BtrfsBackend::open(tmp.path(), fake.clone()).expect("open");
        b.create("db", None, "S").expect("create");
        let rec = Record {
            owner: "T".into(),
            epoch: 2,
        };
        b.set_record("db", &rec, false, RecordOrder::GiveAway)
            .expect("record");
        let v = b.get("db").expect("get").expect("present");
        assert_eq!((v.owner.as_str(), v.epoch), ("T", 2));
        let root = tmp.path().display();
        assert_eq!(
            fake.calls().last().cloned(),
            Some(format!("btrfs property set {root}/db ro true"))
        );
    }

    #[test]
    fn proof_wants_a_btrfs_subvolume_with_its_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let prove = |fs: &str, inode: &str| {
            let fake = Arc::new(FakeRunner::default());
            let b = BtrfsBackend::open(tmp.path(), fake.clone()).expect("open");
            let _ = b.create("db", None, "S");
            fake.answer("stat -f -c %T", Ok(fs));
            fake.answer("stat -c %i", Ok(inode));
            b.prove("db").map_err(|e| e.to_string())
        };
        assert_eq!(prove("btrfs\n", "256\n"), Ok(tmp.path().join("db")));
        let e = prove("ext2/ext3\n", "256\n").expect_err("not btrfs");
        assert!(e.contains("on a ext2/ext3 filesystem, not btrfs"), "{e}");
        // The subvolume's mount is gone and a plain directory is left in its place.
        let e = prove("btrfs\n", "4711\n").expect_err("plain dir");
        assert!(e.contains("plain directory (inode 4711)"), "{e}");
    }
}
