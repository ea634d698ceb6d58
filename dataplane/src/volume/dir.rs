//! Plain directories: the fallback where neither ZFS nor btrfs is available.
//!
//! Layout under the root: `NAME/data` (bind-mounted into the container), `NAME/flocker.json`
//! (the ownership sidecar), `NAME/snapshots/SNAP` (full copies made with `cp -a`). Pushes
//! are always full tar streams of a snapshot, whatever the base, through the streamer's
//! [`DirSource`] and [`DirSink`] (which unpacks into a staging directory beside the snapshot
//! and removes it on abort); quotas are recorded but not enforced, and read-only copies are
//! protected only by the agent refusing to start their application.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flocker_stream::backend::{DirSink, DirSource, Runner, Sink, Source};
use flocker_wire::VolumeState;

use super::sidecar::{self, Sidecar};
use super::{FinishingSink, Record, RecordOrder, VolumeBackend, VolumeError, check_name};
use crate::ownership::sort_push_snapshots;

/// Volumes as directories below `root`.
pub struct DirBackend {
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

impl DirBackend {
    pub fn open(root: &Path, runner: Arc<dyn Runner>) -> Result<Self, VolumeError> {
        fs::create_dir_all(root).map_err(io(root))?;
        Ok(DirBackend {
            root: root.to_path_buf(),
            runner,
        })
    }

    /// The directory holding every volume (and copies set aside by fencing).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn volume_dir(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn sidecar_path(&self, name: &str) -> Result<PathBuf, VolumeError> {
        Ok(self.volume_dir(name)?.join("flocker.json"))
    }

    fn read_sidecar(&self, name: &str) -> Result<Sidecar, VolumeError> {
        sidecar::read(&self.sidecar_path(name)?, name)?
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))
    }

    fn snapshots(&self, name: &str) -> Result<Vec<String>, VolumeError> {
        let dir = self.volume_dir(name)?.join("snapshots");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(io(&dir))?;
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        Ok(sort_push_snapshots(out))
    }
}

impl VolumeBackend for DirBackend {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn set_aside(&self, name: &str, aside: &str) -> Result<(), VolumeError> {
        super::check_aside(aside)?;
        let (from, to) = (self.volume_dir(name)?, self.volume_dir(aside)?);
        if to.exists() {
            return Err(VolumeError::Exists(aside.to_string()));
        }
        fs::rename(&from, &to).map_err(io(&from))
    }

    fn list(&self) -> Result<Vec<VolumeState>, VolumeError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let e = e.map_err(io(&self.root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() || super::is_set_aside(&name) {
                continue;
            }
            let Some(car) = sidecar::read(&self.sidecar_path(&name)?, &name)? else {
                continue;
            };
            out.push(VolumeState {
                snapshots: self.snapshots(&name)?,
                name,
                owner: car.owner,
                epoch: car.epoch,
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
        let dir = self.volume_dir(name)?;
        let car = self.sidecar_path(name)?;
        if car.exists() {
            return Err(VolumeError::Exists(name.to_string()));
        }
        for sub in ["data", "snapshots"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        sidecar::write(
            &car,
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
        Ok(self.volume_dir(name)?.join("data"))
    }

    fn verify(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let data = self.mountpoint(name)?;
        let not = |found: String| VolumeError::NotProven {
            volume: name.to_string(),
            path: data.clone(),
            found,
        };
        let car_path = self.sidecar_path(name)?;
        match sidecar::read(&car_path, name)? {
            Some(car) if car.volume.as_deref().is_none_or(|v| v == name) => {}
            Some(car) => {
                return Err(not(format!(
                    "the record {} names volume {:?}",
                    car_path.display(),
                    car.volume.unwrap_or_default()
                )));
            }
            None => {
                return Err(not(format!(
                    "there is no ownership record {} beside it (is the filesystem holding the volumes mounted?)",
                    car_path.display()
                )));
            }
        }
        let meta =
            |p: &Path| fs::symlink_metadata(p).map_err(|e| not(format!("{}: {e}", p.display())));
        let (data_meta, dir_meta) = (meta(&data)?, meta(&self.volume_dir(name)?)?);
        if !data_meta.is_dir() {
            return Err(not("it is not a directory".into()));
        }
        // Something mounted over the data directory would take the writes instead.
        if data_meta.dev() != dir_meta.dev() {
            return Err(not(
                "another filesystem is mounted there, not the volume's directory".into(),
            ));
        }
        Ok(data)
    }

    fn quota(&self, name: &str) -> Result<Option<u64>, VolumeError> {
        Ok(self.read_sidecar(name)?.maximum_size)
    }

    fn set_quota(&self, name: &str, bytes: u64) -> Result<(), VolumeError> {
        let mut car = self.read_sidecar(name)?;
        car.maximum_size = Some(bytes);
        sidecar::write(&self.sidecar_path(name)?, &car)
    }

    fn set_record(
        &self,
        name: &str,
        record: &Record,
        writable: bool,
        _order: RecordOrder,
    ) -> Result<(), VolumeError> {
        // One atomic rename writes the whole record: no ordering to worry about. A freshly
        // received copy has no sidecar yet.
        let path = self.sidecar_path(name)?;
        let maximum_size = sidecar::read(&path, name)?.and_then(|c| c.maximum_size);
        sidecar::write(
            &path,
            &Sidecar {
                volume: Some(name.to_string()),
                owner: record.owner.clone(),
                epoch: record.epoch,
                writable,
                maximum_size,
            },
        )
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let dir = self.volume_dir(name)?;
        let target = dir.join("snapshots").join(snapshot);
        cp(self.runner.as_ref(), &dir.join("data"), &target)
    }

    fn destroy_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let target = self.volume_dir(name)?.join("snapshots").join(snapshot);
        fs::remove_dir_all(&target).map_err(io(&target))
    }

    fn send(
        &self,
        name: &str,
        _base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn Source>, VolumeError> {
        check_name(snapshot)?;
        let snap = self.volume_dir(name)?.join("snapshots").join(snapshot);
        if !snap.is_dir() {
            return Err(VolumeError::NoSnapshot {
                volume: name.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        Ok(Box::new(DirSource::new(snap)))
    }

    /// Unpacks into the snapshot (through the sink's staging directory); only the commit
    /// makes it the data and, for a stream replacing a stale replica, removes the replica's
    /// other snapshots.
    fn receive(
        &self,
        name: &str,
        _base: Option<&str>,
        snapshot: &str,
        replace: bool,
    ) -> Result<Box<dyn Sink>, VolumeError> {
        check_name(snapshot)?;
        let dir = self.volume_dir(name)?;
        let snaps = dir.join("snapshots");
        fs::create_dir_all(&snaps).map_err(io(&snaps))?;
        let snap = snaps.join(snapshot);
        let inner = DirSink::new(&snap);
        let runner = self.runner.clone();
        Ok(Box::new(FinishingSink::new(inner, move || {
            let data = dir.join("data");
            let fresh = dir.join(".data-new");
            if fresh.exists() {
                fs::remove_dir_all(&fresh).map_err(io(&fresh))?;
            }
            cp(runner.as_ref(), &snap, &fresh)?;
            if data.exists() {
                fs::remove_dir_all(&data).map_err(io(&data))?;
            }
            fs::rename(&fresh, &data).map_err(io(&data))?;
            if replace {
                for e in fs::read_dir(&snaps).map_err(io(&snaps))? {
                    let e = e.map_err(io(&snaps))?;
                    if e.path() != snap {
                        fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                    }
                }
            }
            Ok(())
        })))
    }
}

/// `cp -a FROM TO`: a full copy with modes, owners and times.
fn cp(runner: &dyn Runner, from: &Path, to: &Path) -> Result<(), VolumeError> {
    runner.run("cp", &["-a".into(), s(from), s(to)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flocker_stream::backend::SystemRunner;

    /// Runs real `cp` and `tar` on a temporary directory: no privileges needed.
    #[test]
    fn create_snapshot_send_receive_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runner: Arc<dyn Runner> = Arc::new(SystemRunner);
        let a = DirBackend::open(&tmp.path().join("a"), runner.clone()).expect("a");
        let b = DirBackend::open(&tmp.path().join("b"), runner).expect("b");
        a.create("db", Some(10), "A").expect("create");
        assert!(matches!(
            a.create("db", None, "A"),
            Err(VolumeError::Exists(_))
        ));
        fs::write(a.mountpoint("db").expect("mp").join("f"), "hello").expect("write");
        a.snapshot("db", "push-0000000001").expect("snap");
        let mut send = a.send("db", None, "push-0000000001").expect("send");
        let mut recv = b
            .receive("db", None, "push-0000000001", false)
            .expect("recv");
        flocker_stream::backend::copy(send.as_mut(), recv.as_mut()).expect("copy");
        // The receiver has data but no record until the agent writes one.
        assert!(b.list().expect("list").is_empty());
        b.set_record(
            "db",
            &Record {
                owner: "A".into(),
                epoch: 1,
            },
            false,
            RecordOrder::TakeOver,
        )
        .expect("record");
        let listed = b.list().expect("list");
        assert_eq!(listed[0].snapshots, vec!["push-0000000001"]);
        let got = fs::read_to_string(b.mountpoint("db").expect("mp").join("f")).expect("read");
        assert_eq!(got, "hello");
        let rec = Record {
            owner: "B".into(),
            epoch: 2,
        };
        b.set_record("db", &rec, true, RecordOrder::TakeOver)
            .expect("record");
        let v = b.get("db").expect("get").expect("present");
        assert_eq!((v.owner.as_str(), v.epoch), ("B", 2));
        assert_eq!(a.quota("db").expect("quota"), Some(10));
    }

    #[test]
    fn proof_wants_the_record_that_names_the_volume() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = DirBackend::open(tmp.path(), Arc::new(SystemRunner)).expect("open");
        b.create("db", None, "A").expect("create");
        assert_eq!(b.prove("db").expect("proven"), tmp.path().join("db/data"));

        let car = tmp.path().join("db/flocker.json");
        let text = fs::read_to_string(&car).expect("read");
        fs::write(&car, text.replace("\"db\"", "\"web\"")).expect("write");
        let e = b.prove("db").expect_err("other volume").to_string();
        assert!(e.contains("names volume \"web\""), "{e}");

        // The filesystem holding the volumes is not mounted: a bare directory with data
        // but no record is not the volume.
        fs::remove_file(&car).expect("rm");
        let e = b.prove("db").expect_err("no record").to_string();
        assert!(e.contains("no ownership record"), "{e}");

        // Records written before they named their volume are still accepted.
        b.create("old", None, "A").expect("create");
        let car = tmp.path().join("old/flocker.json");
        let text = fs::read_to_string(&car).expect("read");
        fs::write(&car, text.replace("\"volume\": \"old\",", "")).expect("write");
        assert!(b.prove("old").is_ok());
    }
}
