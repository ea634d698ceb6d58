//! ZFS datasets under one parent dataset (`POOL/PARENT/NAME`), with the ownership record in
//! the user property `flocker:record` (`EPOCH:OWNER`, one `zfs set` per record; datasets
//! written before it carry `flocker:owner` and `flocker:epoch`, still read while they have
//! no `flocker:record`), read-only copies via `readonly=on`, quotas from `maximum_size`, and
//! pushes through the streamer's [`ZfsSource`] and [`ZfsSink`] (`zfs send`/`zfs recv`; an
//! aborted receive destroys what it created).
//!
//! Written for the oldest ZFS in use here (zfs-fuse, pool version 23): one property per
//! `zfs set`, no `zfs list -p`, no resume tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flocker_wire::VolumeState;

use flocker_stream::backend::runner::args;
use flocker_stream::backend::{BackendError, Runner, Sink, Source, ZfsSink, ZfsSource};

use super::{FinishingSink, Record, RecordOrder, VolumeBackend, VolumeError, check_name};
use crate::ownership::sort_push_snapshots;

/// The ownership record, `EPOCH:OWNER`, in one property so that it is written at once.
const RECORD: &str = "flocker:record";
/// The record's owner and epoch as two properties, as volumes made before
/// [`RECORD`] carry them; read while a dataset has no [`RECORD`], never written.
const OWNER: &str = "flocker:owner";
const EPOCH: &str = "flocker:epoch";

/// The value of [`RECORD`] for `record`.
fn record_value(record: &Record) -> String {
    format!("{}:{}", record.epoch, record.owner)
}

/// Reads a [`RECORD`] value; `None` for a malformed one. The owner may hold colons (an IPv6
/// address), the epoch never does.
fn parse_record(value: &str) -> Option<Record> {
    let (epoch, owner) = value.split_once(':')?;
    let epoch = epoch.parse().ok()?;
    (!owner.is_empty()).then(|| Record {
        owner: owner.to_string(),
        epoch,
    })
}

/// What a dataset's [`RECORD`] property says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum RecordValue {
    /// Not set (`-`): the dataset has no record in this layout.
    #[default]
    Unset,
    Set(Record),
    /// Set, but not `EPOCH:OWNER`: nothing can be decided on it.
    Malformed(String),
}

fn read_record(value: &str) -> RecordValue {
    match value {
        "-" | "" => RecordValue::Unset,
        v => {
            parse_record(v).map_or_else(|| RecordValue::Malformed(v.to_string()), RecordValue::Set)
        }
    }
}

/// Volumes as ZFS datasets below `root`.
pub struct ZfsBackend {
    root: String,
    runner: Arc<dyn Runner>,
}

impl ZfsBackend {
    /// Opens the backend on `root` (`POOL` or `POOL/PARENT`; a bare pool gets the parent
    /// `flocker`), creating the parent dataset when missing.
    pub fn open(spec: &str, runner: Arc<dyn Runner>) -> Result<Self, VolumeError> {
        let root = if spec.contains('/') {
            spec.trim_end_matches('/').to_string()
        } else {
            format!("{spec}/flocker")
        };
        for part in root.split('/') {
            check_name(part)?;
        }
        let backend = ZfsBackend { root, runner };
        if backend
            .zfs(&["list", "-H", "-o", "name", &backend.root])
            .is_err()
        {
            backend.zfs(&["create", &backend.root])?;
        }
        Ok(backend)
    }

    /// The parent dataset.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn dataset(&self, name: &str) -> Result<String, VolumeError> {
        check_name(name)?;
        Ok(format!("{}/{name}", self.root))
    }

    fn zfs(&self, a: &[&str]) -> Result<String, VolumeError> {
        Ok(self.runner.run("zfs", &args(a))?)
    }

    fn set(&self, dataset: &str, property: &str, value: &str) -> Result<(), VolumeError> {
        self.zfs(&["set", &format!("{property}={value}"), dataset])
            .map(drop)
    }

    fn get(&self, dataset: &str, property: &str) -> Result<String, VolumeError> {
        Ok(self
            .zfs(&["get", "-H", "-p", "-o", "value", property, dataset])?
            .trim()
            .to_string())
    }

    fn exists(&self, dataset: &str) -> bool {
        self.zfs(&["list", "-H", "-o", "name", dataset]).is_ok()
    }

    /// Whether `dataset` is what a full receive cut off before its record leaves: neither a
    /// record nor the owner of the older layout, and as its only snapshot the push snapshot
    /// the stream carried. Every volume gets its record with its creation, and a received one
    /// right after `zfs recv`; an agent killed between the two left such a dataset, which the
    /// listing does not show, so every later full push to it was refused as already existing.
    /// A dataset someone made by hand under the root (no snapshot, or others) is not one.
    fn unrecorded(&self, dataset: &str) -> Result<bool, VolumeError> {
        let record = self.get(dataset, RECORD)?;
        let owner = self.get(dataset, OWNER)?;
        if read_record(&record) != RecordValue::Unset || !matches!(owner.as_str(), "-" | "") {
            return Ok(false);
        }
        let listed = self.zfs(&["list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset])?;
        let own = format!("{dataset}@");
        let snapshots: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.trim().strip_prefix(own.as_str()))
            .collect();
        Ok(
            matches!(snapshots.as_slice(), [only] if flocker_wire::snapshots::push_sequence(only).is_some()),
        )
    }
}

/// Whether a dataset is mounted, and where it should be.
enum MountState {
    Mounted(PathBuf),
    Unmounted(PathBuf),
}

impl MountState {
    fn path(&self) -> &Path {
        match self {
            MountState::Mounted(p) | MountState::Unmounted(p) => p,
        }
    }
}

/// `None` when `dir` is missing or empty; otherwise how many entries it holds and one name.
fn own_entries(dir: &Path) -> Result<Option<String>, VolumeError> {
    let io = |source| VolumeError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                names.push(e.map_err(io)?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    names.sort();
    Ok(names
        .first()
        .map(|first| format!("{} entries, e.g. {first:?}", names.len())))
}

impl ZfsBackend {
    fn mount_state(&self, name: &str, dataset: &str) -> Result<MountState, VolumeError> {
        let out = self.zfs(&["get", "-H", "-o", "value", "mounted,mountpoint", dataset])?;
        let mut lines = out.lines().map(str::trim);
        let (mounted, mp) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        if !mp.starts_with('/') {
            return Err(VolumeError::NotProven {
                volume: name.to_string(),
                path: PathBuf::from(mp),
                found: format!("dataset {dataset} has no mountpoint of its own ({mp:?})"),
            });
        }
        let path = PathBuf::from(mp);
        Ok(if mounted == "yes" {
            MountState::Mounted(path)
        } else {
            MountState::Unmounted(path)
        })
    }

    /// ZFS says the dataset is mounted: check that the topmost mount at `path` is it, not
    /// another dataset or filesystem stacked there.
    fn check_mounted_at(
        &self,
        name: &str,
        dataset: &str,
        path: PathBuf,
    ) -> Result<PathBuf, VolumeError> {
        let shown = path.display().to_string();
        let found = match self.runner.run(
            "findmnt",
            &args(&["-r", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint", &shown]),
        ) {
            Ok(out) => match out.lines().last().and_then(|l| l.split_once(' ')) {
                Some((source, fstype))
                    if source == dataset && (fstype == "zfs" || fstype.starts_with("fuse.zfs")) =>
                {
                    return Ok(path);
                }
                Some((source, fstype)) => {
                    format!("{source} ({fstype}) is mounted there instead of dataset {dataset}")
                }
                None => format!(
                    "findmnt shows no filesystem there, though ZFS reports dataset {dataset} mounted"
                ),
            },
            Err(e) => format!(
                "no filesystem is mounted there, though ZFS reports dataset {dataset} mounted ({})",
                VolumeError::from(e)
            ),
        };
        Err(VolumeError::NotProven {
            volume: name.to_string(),
            path,
            found,
        })
    }
}

/// Parses `zfs get -H -p -o name,property,value -r ...` below `root` into volume states.
/// Datasets without an owner are not Flocker's and are left out. A record that is set but
/// cannot be read is an error, never a guess: falling back to the old layout's properties
/// (stale once the record was written) or to epoch 0 could hand the volume to a wrong owner.
pub fn parse_volumes(root: &str, output: &str) -> Result<Vec<VolumeState>, VolumeError> {
    #[derive(Default)]
    struct Acc {
        owner: Option<String>,
        epoch: Option<String>,
        record: RecordValue,
        used: u64,
        snapshots: Vec<String>,
    }
    let prefix = format!("{root}/");
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    for line in output.lines() {
        let mut cols = line.split('\t');
        let (Some(name), Some(property), Some(value)) = (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if super::is_set_aside(rest) {
            continue;
        }
        match rest.split_once('@') {
            // Every snapshot lists each property once; counting it under one avoids duplicates.
            Some((volume, snapshot)) if property == OWNER && !volume.contains('/') => {
                acc.entry(volume.to_string())
                    .or_default()
                    .snapshots
                    .push(snapshot.to_string());
            }
            Some(_) => {}
            None if !rest.contains('/') => {
                let entry = acc.entry(rest.to_string()).or_default();
                match property {
                    OWNER if value != "-" && !value.is_empty() => {
                        entry.owner = Some(value.to_string())
                    }
                    EPOCH if value != "-" => entry.epoch = Some(value.to_string()),
                    RECORD => entry.record = read_record(value),
                    "used" => entry.used = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            None => {}
        }
    }
    let mut volumes = Vec::new();
    for (name, a) in acc {
        let corrupt = |detail: String| VolumeError::Corrupt {
            volume: name.clone(),
            detail,
        };
        // The one-property record wins: once written, the old two are stale.
        let record = match a.record {
            RecordValue::Set(r) => r,
            RecordValue::Malformed(v) => {
                return Err(corrupt(format!(
                    "{RECORD}={v:?} is not EPOCH:OWNER; set it right (zfs set {RECORD}=EPOCH:OWNER {root}/{name}) before Flocker uses this volume"
                )));
            }
            RecordValue::Unset => {
                let Some(owner) = a.owner else { continue };
                let epoch = a.epoch.as_deref().unwrap_or("-");
                let epoch = epoch.parse().map_err(|_| {
                    corrupt(format!(
                        "{OWNER}={owner:?} with {EPOCH}={epoch:?}, not a number"
                    ))
                })?;
                Record { owner, epoch }
            }
        };
        volumes.push(VolumeState {
            name,
            owner: record.owner,
            epoch: record.epoch,
            snapshots: sort_push_snapshots(a.snapshots),
            used_bytes: a.used,
        });
    }
    Ok(volumes)
}

impl VolumeBackend for ZfsBackend {
    fn kind(&self) -> &'static str {
        "zfs"
    }

    fn set_aside(&self, name: &str, aside: &str) -> Result<(), VolumeError> {
        super::check_aside(aside)?;
        let (from, to) = (self.dataset(name)?, self.dataset(aside)?);
        if self.exists(&to) {
            return Err(VolumeError::Exists(aside.to_string()));
        }
        // Renaming remounts the dataset; while anything still has it open (a container being
        // torn down, a `zfs send` just ended) ZFS says "busy". Wait a little, then unmount it
        // by force: its application was stopped, and what is set aside is not served.
        let rename = || self.runner.run("zfs", &args(&["rename", &from, &to]));
        match retry_while_busy(&from, rename) {
            Err(BackendError::Command { stderr, .. }) if stderr.contains("busy") => {
                tracing::warn!(dataset = %from, "still busy: unmounting it by force to set it aside");
                self.zfs(&["unmount", "-f", &from])?;
                self.zfs(&["rename", &from, &to]).map(drop)
            }
            other => other.map(drop).map_err(VolumeError::from),
        }
    }

    fn list(&self) -> Result<Vec<VolumeState>, VolumeError> {
        let out = self.zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "name,property,value",
            "-r",
            &format!("{OWNER},{EPOCH},{RECORD},used"),
            &self.root,
        ])?;
        parse_volumes(&self.root, &out)
    }

    fn create(
        &self,
        name: &str,
        maximum_size: Option<u64>,
        owner: &str,
    ) -> Result<(), VolumeError> {
        let dataset = self.dataset(name)?;
        if self.exists(&dataset) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let record_opt = format!(
            "{RECORD}={}",
            record_value(&Record {
                owner: owner.to_string(),
                epoch: 1,
            })
        );
        let mut a = vec!["create", "-o", &record_opt];
        let quota;
        if let Some(bytes) = maximum_size {
            quota = format!("quota={bytes}");
            a.extend(["-o", &quota]);
        }
        a.push(&dataset);
        self.zfs(&a).map(drop)
    }

    fn mountpoint(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let dataset = self.dataset(name)?;
        Ok(self.mount_state(name, &dataset)?.path().to_path_buf())
    }

    fn verify(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let dataset = self.dataset(name)?;
        match self.mount_state(name, &dataset)? {
            MountState::Mounted(path) => self.check_mounted_at(name, &dataset, path),
            MountState::Unmounted(path) => Err(VolumeError::NotProven {
                volume: name.to_string(),
                path,
                found: format!("dataset {dataset} is not mounted"),
            }),
        }
    }

    fn prove(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let dataset = self.dataset(name)?;
        let path = match self.mount_state(name, &dataset)? {
            // The common case: one `zfs get` and one `findmnt`, as `verify` does.
            MountState::Mounted(path) => return self.check_mounted_at(name, &dataset, path),
            MountState::Unmounted(path) => path,
        };
        // Mounting over files would hide them; they may be writes an application made
        // while the dataset was away, which a person has to look at.
        if let Some(found) = own_entries(&path)? {
            return Err(VolumeError::NotProven {
                volume: name.to_string(),
                path,
                found: format!(
                    "dataset {dataset} is not mounted, and the directory holds files of its own ({found}); \
                     move them away, then `zfs mount {dataset}`"
                ),
            });
        }
        tracing::warn!(volume = name, %dataset, path = %path.display(), "volume was not mounted: mounting it");
        self.zfs(&["mount", &dataset])?;
        self.verify(name)
    }
    fn quota(&self, name: &str) -> Result<Option<u64>, VolumeError> {
        let value = self.get(&self.dataset(name)?, "quota")?;
        Ok(value.parse().ok().filter(|&q: &u64| q > 0))
    }

    fn set_quota(&self, name: &str, bytes: u64) -> Result<(), VolumeError> {
        self.set(&self.dataset(name)?, "quota", &bytes.to_string())
    }

    fn set_record(
        &self,
        name: &str,
        record: &Record,
        writable: bool,
        order: RecordOrder,
    ) -> Result<(), VolumeError> {
        let dataset = self.dataset(name)?;
        let readonly = if writable { "off" } else { "on" };
        // Owner and epoch change together, in one property: no crash leaves half a record.
        let value = record_value(record);
        match order {
            RecordOrder::GiveAway => {
                self.set(&dataset, "readonly", readonly)?;
                self.set(&dataset, RECORD, &value)
            }
            RecordOrder::TakeOver => {
                self.set(&dataset, RECORD, &value)?;
                self.set(&dataset, "readonly", readonly)
            }
        }
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        self.zfs(&["snapshot", &format!("{dataset}@{snapshot}")])
            .map(drop)
    }

    fn destroy_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        self.zfs(&["destroy", &format!("{dataset}@{snapshot}")])
            .map(drop)
    }

    fn send(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn Source>, VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        let full = format!("{dataset}@{snapshot}");
        let source = match base {
            Some(base) => {
                check_name(base)?;
                ZfsSource::incremental(full, format!("{dataset}@{base}"))
            }
            None => ZfsSource::full(full),
        };
        Ok(Box::new(source.runner(self.runner.clone())))
    }

    fn receive(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
        replace: bool,
    ) -> Result<Box<dyn Sink>, VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        let sink = match base {
            // -F rolls back whatever changed since `base` (atime updates on a mounted copy).
            Some(base) => {
                check_name(base)?;
                let inner = ZfsSink::new(&dataset)
                    .rollback(true)
                    .runner(self.runner.clone());
                let runner = self.runner.clone();
                return Ok(Box::new(FinishingSink::new(inner, move || {
                    remount_if_mounted(runner.as_ref(), &dataset)
                })));
            }
            None if replace => return self.receive_replacing(name, &dataset),
            None => {
                if self.exists(&dataset) {
                    if self.unrecorded(&dataset)? {
                        tracing::warn!(
                            volume = name,
                            "a copy without a record (a receive cut off between its commit and its record) is replaced by this stream once it verifies"
                        );
                        return self.receive_replacing(name, &dataset);
                    }
                    return Err(VolumeError::Exists(name.to_string()));
                }
                ZfsSink::new(&dataset)
            }
        };
        Ok(Box::new(sink.runner(self.runner.clone())))
    }
}

impl ZfsBackend {
    /// The parent of datasets being received to replace a replica. `:` never appears in a
    /// volume name, so it cannot collide with one; its mountpoint `none` keeps staged copies
    /// unmounted until they are renamed into place.
    fn staging(&self) -> String {
        format!("{}/{STAGING}", self.root)
    }

    /// A full stream received beside the replica it replaces: only the commit destroys the
    /// old replica and renames the verified copy into its place. Aborted or dropped
    /// unfinished, the streamer's sink destroys the staged copy and the replica stays as it
    /// was.
    fn receive_replacing(&self, name: &str, dataset: &str) -> Result<Box<dyn Sink>, VolumeError> {
        let parent = self.staging();
        if !self.exists(&parent) {
            self.zfs(&["create", "-o", "mountpoint=none", &parent])?;
        }
        let staged = format!("{parent}/{name}");
        if self.exists(&staged) {
            // Left by a receive that was cut off before an earlier agent could clean up.
            self.zfs(&["destroy", "-r", &staged])?;
        }
        let inner = ZfsSink::new(&staged).runner(self.runner.clone());
        let (runner, dataset) = (self.runner.clone(), dataset.to_string());
        Ok(Box::new(FinishingSink::new(inner, move || {
            let swapped = destroy_when_idle(runner.as_ref(), &dataset)
                .and_then(|_| runner.run("zfs", &args(&["rename", &staged, &dataset])));
            if swapped.is_err() {
                let _ = runner.run("zfs", &args(&["destroy", "-r", &staged]));
            }
            Ok(swapped.map(drop)?)
        })))
    }
}

/// The name of the staging parent dataset below the root.
const STAGING: &str = "flocker:staging";

/// Unmounts and mounts again a dataset that `zfs recv` just changed under its mount.
///
/// zfs-fuse leaves the kernel's caches of a mounted dataset as they were when a receive
/// changes its files: attributes for `fuse-attr-timeout` (an hour in Debian's
/// `/etc/zfs/zfsrc`) and pages. An application started on the received copy then read its
/// files at their old size and content (the fault matrix of issue 17 found Redis missing every
/// write acknowledged since the last move, and appending over them). A new mount has none of
/// those caches. A replica still busy after [`retry_while_busy`] fails the receive rather than
/// keep a stale view (never by force: a forced unmount on zfs-fuse can leave the dataset
/// wedged, every later mount "busy"); the next push receives and remounts again.
fn remount_if_mounted(runner: &dyn Runner, dataset: &str) -> Result<(), VolumeError> {
    let mounted = runner.run(
        "zfs",
        &args(&["get", "-H", "-o", "value", "mounted", dataset]),
    )?;
    if mounted.trim() != "yes" {
        return Ok(());
    }
    retry_while_busy(dataset, || runner.run("zfs", &args(&["unmount", dataset])))?;
    retry_while_busy(dataset, || runner.run("zfs", &args(&["mount", dataset])))?;
    Ok(())
}

/// How long a dataset that is briefly busy (zfs-fuse releases files a reader just closed
/// asynchronously) may take to become destroyable.
const BUSY_RETRIES: u32 = 20;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// `zfs destroy -r -f`, retried while ZFS says the dataset is busy, for up to 5 s.
fn destroy_when_idle(runner: &dyn Runner, dataset: &str) -> Result<String, BackendError> {
    retry_while_busy(dataset, || {
        runner.run("zfs", &args(&["destroy", "-r", "-f", dataset]))
    })
}

/// Runs `command` again while ZFS says `dataset` is busy, for up to 5 s (zfs-fuse releases a
/// file just read asynchronously).
fn retry_while_busy(
    dataset: &str,
    command: impl Fn() -> Result<String, BackendError>,
) -> Result<String, BackendError> {
    let mut attempt = 0;
    loop {
        match command() {
            Err(BackendError::Command { stderr, .. })
                if stderr.contains("busy") && attempt < BUSY_RETRIES =>
            {
                attempt += 1;
                tracing::debug!(%dataset, attempt, "dataset busy, retrying");
                std::thread::sleep(BUSY_PAUSE);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flocker_stream::backend::runner::fake::FakeRunner;

    const LISTING: &str = "pool/flocker\tflocker:owner\t-
pool/flocker\tflocker:epoch\t-
pool/flocker\tused\t729088
pool/flocker/db\tflocker:owner\t198.18.0.1
pool/flocker/db\tflocker:epoch\t3
pool/flocker/db\tused\t114688
pool/flocker/db@push-0000000002\tflocker:owner\t198.18.0.1
pool/flocker/db@push-0000000002\tused\t0
pool/flocker/db@push-0000000001\tflocker:owner\t198.18.0.1
pool/flocker/db@manual\tflocker:owner\t198.18.0.1
pool/flocker/stray\tflocker:owner\t-
pool/flocker/stray\tused\t5
";

    #[test]
    fn parses_records_and_push_snapshots_oldest_first() {
        let vols = parse_volumes("pool/flocker", LISTING).expect("a well-formed listing");
        assert_eq!(vols.len(), 1, "{vols:?}");
        assert_eq!(vols[0].name, "db");
        assert_eq!(vols[0].owner, "198.18.0.1");
        assert_eq!(vols[0].epoch, 3);
        assert_eq!(vols[0].used_bytes, 114688);
        assert_eq!(
            vols[0].snapshots,
            vec!["push-0000000001", "push-0000000002"]
        );
    }

    fn backend() -> (Arc<FakeRunner>, ZfsBackend) {
        let fake = Arc::new(FakeRunner::default());
        let b = ZfsBackend::open("pool", fake.clone()).expect("open");
        (fake, b)
    }

    #[test]
    fn giving_away_turns_read_only_before_naming_the_new_owner() {
        let (fake, b) = backend();
        let record = Record {
            owner: "T".into(),
            epoch: 4,
        };
        b.set_record("db", &record, false, RecordOrder::GiveAway)
            .expect("set");
        let calls = fake.calls();
        assert_eq!(
            &calls[calls.len() - 2..],
            &[
                "zfs set readonly=on pool/flocker/db",
                "zfs set flocker:record=4:T pool/flocker/db",
            ]
        );
    }

    #[test]
    fn taking_over_records_first_and_thaws_last() {
        let (fake, b) = backend();
        let record = Record {
            owner: "fd00:18::12".into(),
            epoch: 5,
        };
        b.set_record("db", &record, true, RecordOrder::TakeOver)
            .expect("set");
        let calls = fake.calls();
        assert_eq!(
            &calls[calls.len() - 2..],
            &[
                "zfs set flocker:record=5:fd00:18::12 pool/flocker/db",
                "zfs set readonly=off pool/flocker/db",
            ]
        );
    }

    #[test]
    fn the_one_property_record_wins_and_the_old_layout_still_reads() {
        // `db` was written before `flocker:record`; `web` by both layouts, the old two stale;
        // `v6` only by the new one, its owner an IPv6 address; `other` is not Flocker's.
        let listing = "pool/flocker/db\tflocker:owner\t198.18.0.1
pool/flocker/db\tflocker:epoch\t3
pool/flocker/db\tflocker:record\t-
pool/flocker/web\tflocker:owner\t198.18.0.1
pool/flocker/web\tflocker:epoch\t3
pool/flocker/web\tflocker:record\t4:198.18.0.2
pool/flocker/web@push-0000000001\tflocker:owner\t198.18.0.1
pool/flocker/v6\tflocker:owner\t-
pool/flocker/v6\tflocker:epoch\t-
pool/flocker/v6\tflocker:record\t7:fd00:18::12
pool/flocker/other\tflocker:owner\t-
pool/flocker/other\tflocker:record\t-
";
        let vols = parse_volumes("pool/flocker", listing).expect("a well-formed listing");
        let found: Vec<(&str, &str, u64)> = vols
            .iter()
            .map(|v| (v.name.as_str(), v.owner.as_str(), v.epoch))
            .collect();
        assert_eq!(
            found,
            [
                ("db", "198.18.0.1", 3),
                ("v6", "fd00:18::12", 7),
                ("web", "198.18.0.2", 4)
            ]
        );
        assert_eq!(vols[2].snapshots, vec!["push-0000000001"]);
        assert_eq!(parse_record("-"), None);
        assert_eq!(parse_record("3:"), None);
        assert_eq!(
            parse_record(&record_value(&Record {
                owner: "S".into(),
                epoch: 9
            })),
            Some(Record {
                owner: "S".into(),
                epoch: 9
            })
        );
    }

    #[test]
    fn a_record_that_cannot_be_read_is_an_error_not_a_guess() {
        // Stale old-layout properties under a broken record must not be read instead.
        let broken = "pool/flocker/db\tflocker:owner\t198.18.0.1
pool/flocker/db\tflocker:epoch\t3
pool/flocker/db\tflocker:record\tseven:198.18.0.2
";
        let err = parse_volumes("pool/flocker", broken).expect_err("a broken record");
        assert!(
            matches!(&err, VolumeError::Corrupt { volume, detail } if volume == "db" && detail.contains("seven:198.18.0.2")),
            "{err}"
        );
        for value in ["7:", ":S", "S"] {
            let listing = format!("pool/flocker/db\tflocker:record\t{value}\n");
            assert!(
                parse_volumes("pool/flocker", &listing).is_err(),
                "{value:?} is not a record"
            );
        }
        // The old layout with an unreadable epoch would otherwise read as epoch 0.
        let old = "pool/flocker/db\tflocker:owner\t198.18.0.1
pool/flocker/db\tflocker:epoch\tlots
";
        assert!(matches!(
            parse_volumes("pool/flocker", old),
            Err(VolumeError::Corrupt { .. })
        ));
    }

    #[test]
    fn create_sets_owner_epoch_and_quota_and_refuses_existing() {
        let (fake, b) = backend();
        fake.answer("zfs list -H -o name pool/flocker/db", Err("does not exist"));
        b.create("db", Some(1 << 20), "S").expect("create");
        assert!(fake.calls().contains(
            &"zfs create -o flocker:record=1:S -o quota=1048576 pool/flocker/db".to_string()
        ));
        let (_, b2) = backend();
        assert!(matches!(
            b2.create("db", None, "S"),
            Err(VolumeError::Exists(_))
        ));
    }

    #[test]
    fn incremental_send_and_receive_commands() {
        let (fake, b) = backend();
        let mut send = b.send("db", Some("push-1"), "push-2").expect("send");
        drop(send.open().expect("send open"));
        let mut recv = b
            .receive("db", Some("push-1"), "push-2", false)
            .expect("recv");
        drop(recv.open().expect("recv open"));
        recv.commit().expect("commit");
        let calls = fake.calls();
        assert!(
            calls.contains(&"zfs send -i pool/flocker/db@push-1 pool/flocker/db@push-2".into())
        );
        assert!(calls.contains(&"zfs recv -F pool/flocker/db".into()));
        assert!(b.send("../x", None, "s").is_err());
    }

    /// Regression (issue 17): a receive into the mounted replica must not leave the kernel's
    /// cached view of the old files for the application started there next.
    #[test]
    fn an_incremental_receive_remounts_a_mounted_replica_after_it_committed() {
        let (fake, b) = backend();
        fake.answer("zfs get -H -o value mounted pool/flocker/db", Ok("yes\n"));
        fake.answer_once(
            "zfs unmount pool/flocker/db",
            Err("cannot unmount: dataset is busy"),
        );
        fake.answer_once(
            "zfs mount pool/flocker/db",
            Err("mountpoint or dataset is busy"),
        );
        let mut recv = b
            .receive("db", Some("push-1"), "push-2", false)
            .expect("recv");
        drop(recv.open().expect("recv open"));
        recv.commit().expect("commit");
        let calls = fake.calls();
        let received = calls
            .iter()
            .position(|c| c == "zfs recv -F pool/flocker/db")
            .expect("received");
        let unmounted = calls
            .iter()
            .rposition(|c| c == "zfs unmount pool/flocker/db")
            .expect("unmounted");
        let mounted = calls
            .iter()
            .rposition(|c| c == "zfs mount pool/flocker/db")
            .expect("mounted again");
        assert!(received < unmounted && unmounted < mounted, "{calls:?}");

        let (fake, b) = backend();
        fake.answer("zfs get -H -o value mounted pool/flocker/db", Ok("no\n"));
        let mut recv = b
            .receive("db", Some("push-1"), "push-2", false)
            .expect("recv");
        drop(recv.open().expect("recv open"));
        recv.commit().expect("commit");
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| c.contains("mount pool/flocker/db")),
            "an unmounted replica stays unmounted: {:?}",
            fake.calls()
        );
    }

    /// A replica that stays busy fails the receive with the reason; it is never unmounted by
    /// force (that wedges zfs-fuse) and never left with a stale view reported as received.
    #[test]
    fn a_replica_that_stays_busy_fails_the_receive_without_force() {
        let (fake, b) = backend();
        fake.answer("zfs get -H -o value mounted pool/flocker/db", Ok("yes\n"));
        fake.answer(
            "zfs unmount pool/flocker/db",
            Err("cannot unmount: dataset is busy"),
        );
        let mut recv = b
            .receive("db", Some("push-1"), "push-2", false)
            .expect("recv");
        drop(recv.open().expect("recv open"));
        let e = recv.commit().expect_err("busy").to_string();
        assert!(e.contains("busy"), "{e}");
        let calls = fake.calls();
        assert!(!calls.iter().any(|c| c.contains("unmount -f")), "{calls:?}");
        assert!(
            !calls.iter().any(|c| c == "zfs mount pool/flocker/db"),
            "{calls:?}"
        );
    }

    /// Where `db` is staged while a full stream replaces it.
    const STAGED: &str = "pool/flocker/flocker:staging/db";

    /// A fake with no staged copy of `db` yet.
    fn staging_backend() -> (Arc<FakeRunner>, ZfsBackend) {
        let (fake, b) = backend();
        fake.answer(
            &format!("zfs list -H -o name {STAGED}"),
            Err("dataset does not exist"),
        );
        (fake, b)
    }

    /// Asserts that the last calls received into the staged copy, destroyed `db` and renamed
    /// the staged copy into its place.
    fn assert_swapped_in_at_commit(fake: &FakeRunner) {
        let calls = fake.calls();
        let tail: Vec<&str> = calls.iter().map(String::as_str).rev().take(3).collect();
        assert_eq!(
            tail,
            [
                "zfs rename pool/flocker/flocker:staging/db pool/flocker/db",
                "zfs destroy -r -f pool/flocker/db",
                "zfs recv pool/flocker/flocker:staging/db",
            ],
            "{calls:?}"
        );
    }

    #[test]
    fn a_replacing_receive_is_staged_and_swapped_in_only_at_commit() {
        let (fake, b) = staging_backend();
        let mut recv = b.receive("db", None, "push-5", true).expect("recv");
        drop(recv.open().expect("open"));
        recv.commit().expect("commit");
        assert_swapped_in_at_commit(&fake);

        // Cut off: the staged copy the receive made goes, the replica is not touched.
        let (fake, b) = backend();
        let list = format!("zfs list -H -o name -t filesystem,volume,snapshot -r {STAGED}");
        fake.answer(&list, Err("dataset does not exist"));
        fake.answer(
            &format!("zfs list -H -o name {STAGED}"),
            Err("dataset does not exist"),
        );
        {
            let mut recv = b.receive("db", None, "push-5", true).expect("recv");
            drop(recv.open().expect("open"));
            fake.answer_once(&list, Ok(&format!("{STAGED}\n{STAGED}@push-5\n")));
        }
        let destroys: Vec<String> = fake
            .calls()
            .into_iter()
            .filter(|c| c.contains("destroy") || c.contains("rename"))
            .collect();
        assert_eq!(
            destroys,
            [
                format!("zfs destroy -r {STAGED}@push-5"),
                format!("zfs destroy -r {STAGED}")
            ]
        );
    }

    /// `pool/flocker/db` exists (the fake answers every `zfs list`), with no record and these
    /// snapshots.
    fn unrecorded_copy(fake: &FakeRunner, snapshots: &str) {
        fake.answer(
            &format!("zfs get -H -p -o value {RECORD} pool/flocker/db"),
            Ok("-\n"),
        );
        fake.answer(
            &format!("zfs get -H -p -o value {OWNER} pool/flocker/db"),
            Ok("-\n"),
        );
        fake.answer(
            "zfs list -H -o name -t snapshot -r pool/flocker/db",
            Ok(snapshots),
        );
    }

    #[test]
    fn a_full_stream_replaces_a_copy_a_cut_off_receive_left_without_a_record() {
        let (fake, b) = staging_backend();
        let pushed = flocker_wire::snapshots::push_snapshot_name(3, 1_796_425_771_444);
        unrecorded_copy(&fake, &format!("pool/flocker/db@{pushed}\n"));
        let mut recv = b.receive("db", None, "push-1", false).expect("recv");
        drop(recv.open().expect("open"));
        // Nothing of the leftover goes before the stream verified.
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| c.contains("destroy -r -f pool/flocker/db")),
            "{:?}",
            fake.calls()
        );
        recv.commit().expect("commit");
        assert_swapped_in_at_commit(&fake);

        // Made by hand, not by a receive: no snapshot, another one, or more than the pushed one.
        for snapshots in [
            String::new(),
            "pool/flocker/db@before-upgrade\n".to_string(),
            format!("pool/flocker/db@{pushed}\npool/flocker/db@mine\n"),
        ] {
            let (fake, b) = staging_backend();
            unrecorded_copy(&fake, &snapshots);
            assert!(
                matches!(
                    b.receive("db", None, "push-1", false),
                    Err(VolumeError::Exists(_))
                ),
                "{snapshots:?}"
            );
        }

        // A copy with a record is a volume: a full stream is refused.
        let (fake, b) = backend();
        fake.answer(
            &format!("zfs get -H -p -o value {RECORD} pool/flocker/db"),
            Ok("3:198.18.0.11\n"),
        );
        assert!(matches!(
            b.receive("db", None, "push-1", false),
            Err(VolumeError::Exists(_))
        ));
    }

    /// A fake whose dataset `pool/flocker/db` should be at `mp`.
    fn proving(
        mp: &Path,
        mounted: &str,
        findmnt: Result<&str, &str>,
    ) -> (Arc<FakeRunner>, ZfsBackend) {
        let (fake, b) = backend();
        let props = format!("{mounted}\n{}\n", mp.display());
        fake.answer(
            "zfs get -H -o value mounted,mountpoint pool/flocker/db",
            Ok(&props),
        );
        fake.answer("findmnt", findmnt);
        (fake, b)
    }

    #[test]
    fn proof_accepts_only_the_dataset_mounted_at_its_mountpoint() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mp = tmp.path().join("db");
        let (_, b) = proving(&mp, "yes", Ok("pool/flocker/db fuse.zfs\n"));
        assert_eq!(b.verify("db").expect("proven"), mp);
        assert_eq!(b.prove("db").expect("proven"), mp);

        // Another dataset stacked on the path (the topmost mount is the last line).
        let (_, b) = proving(
            &mp,
            "yes",
            Ok("pool/flocker/db fuse.zfs\npool/other fuse.zfs\n"),
        );
        let e = b.prove("db").expect_err("another dataset").to_string();
        assert!(e.contains("pool/other (fuse.zfs) is mounted there"), "{e}");

        // ZFS says mounted, but the kernel shows nothing there.
        let (_, b) = proving(&mp, "yes", Err("exit status: 1"));
        let e = b.verify("db").expect_err("nothing mounted").to_string();
        assert!(e.contains("no filesystem is mounted there"), "{e}");
    }

    #[test]
    fn proof_mounts_an_unmounted_dataset_over_an_empty_directory_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mp = tmp.path().join("db");
        std::fs::create_dir(&mp).expect("mkdir");

        // Read-only verification reports it and changes nothing.
        let (fake, b) = proving(&mp, "no", Ok("pool/flocker/db zfs\n"));
        let e = b.verify("db").expect_err("unmounted").to_string();
        assert!(e.contains("dataset pool/flocker/db is not mounted"), "{e}");
        assert!(!fake.calls().iter().any(|c| c.starts_with("zfs mount")));

        // The empty bare directory: mounted, then proven (the fake answers "no" again, so
        // the check after the mount is the one that fails; what matters is the mount).
        let _ = b.prove("db");
        assert!(
            fake.calls()
                .contains(&"zfs mount pool/flocker/db".to_string())
        );

        // Files written into the bare directory (an application ran there): refused,
        // naming what was found, and nothing is mounted over them.
        std::fs::write(mp.join("dump.rdb"), "stray").expect("write");
        let (fake, b) = proving(&mp, "no", Ok("pool/flocker/db zfs\n"));
        let e = b.prove("db").expect_err("stale files").to_string();
        assert!(
            e.contains("not mounted")
                && e.contains("1 entries, e.g. \"dump.rdb\"")
                && e.contains(&mp.display().to_string()),
            "{e}"
        );
        assert!(!fake.calls().iter().any(|c| c.starts_with("zfs mount")));
    }

    #[test]
    fn proof_refuses_a_dataset_without_a_mountpoint() {
        let (fake, b) = backend();
        fake.answer(
            "zfs get -H -o value mounted,mountpoint pool/flocker/db",
            Ok("no\nlegacy\n"),
        );
        let e = b.prove("db").expect_err("legacy").to_string();
        assert!(e.contains("has no mountpoint of its own"), "{e}");
    }
}
