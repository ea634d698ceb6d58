//! ZFS datasets under one parent dataset (`POOL/PARENT/NAME`), with the ownership record in
//! the user properties `flocker:owner` and `flocker:epoch`, read-only copies via
//! `readonly=on`, quotas from `maximum_size`, and pushes through `zfs send`/`zfs recv`.
//!
//! Written for the oldest ZFS in use here (zfs-fuse, pool version 23): one property per
//! `zfs set`, no `zfs list -p`, no resume tokens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use flocker_wire::VolumeState;

use super::command::CommandRunner;
use super::{
    ReceiveSink, Record, SendStream, VolumeBackend, VolumeError, check_name, sort_push_snapshots,
};
use crate::ownership::RecordOrder;

const OWNER: &str = "flocker:owner";
const EPOCH: &str = "flocker:epoch";

/// Volumes as ZFS datasets below `root`.
pub struct ZfsBackend {
    root: String,
    runner: Arc<dyn CommandRunner>,
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl ZfsBackend {
    /// Opens the backend on `root` (`POOL` or `POOL/PARENT`; a bare pool gets the parent
    /// `flocker`), creating the parent dataset when missing.
    pub fn open(spec: &str, runner: Arc<dyn CommandRunner>) -> Result<Self, VolumeError> {
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
        self.runner.run("zfs", &args(a))
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
}

/// Parses `zfs get -H -p -o name,property,value -r ...` below `root` into volume states.
/// Datasets without an owner are not Flocker's and are left out.
pub fn parse_volumes(root: &str, output: &str) -> Vec<VolumeState> {
    #[derive(Default)]
    struct Acc {
        owner: Option<String>,
        epoch: u64,
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
                    EPOCH => entry.epoch = value.parse().unwrap_or(0),
                    "used" => entry.used = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            None => {}
        }
    }
    acc.into_iter()
        .filter_map(|(name, a)| {
            Some(VolumeState {
                name,
                owner: a.owner?,
                epoch: a.epoch,
                snapshots: sort_push_snapshots(a.snapshots),
                used_bytes: a.used,
            })
        })
        .collect()
}

impl VolumeBackend for ZfsBackend {
    fn kind(&self) -> &'static str {
        "zfs"
    }

    fn list(&self) -> Result<Vec<VolumeState>, VolumeError> {
        let out = self.zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "name,property,value",
            "-r",
            &format!("{OWNER},{EPOCH},used"),
            &self.root,
        ])?;
        Ok(parse_volumes(&self.root, &out))
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
        let owner_opt = format!("{OWNER}={owner}");
        let epoch_opt = format!("{EPOCH}=1");
        let mut a = vec!["create", "-o", &owner_opt, "-o", &epoch_opt];
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
        let mp = self.get(&dataset, "mountpoint")?;
        if mp.starts_with('/') {
            Ok(PathBuf::from(mp))
        } else {
            Err(VolumeError::Unsupported(format!(
                "dataset {dataset} has no mountpoint ({mp})"
            )))
        }
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
        let epoch = record.epoch.to_string();
        match order {
            RecordOrder::GiveAway => {
                self.set(&dataset, "readonly", readonly)?;
                self.set(&dataset, EPOCH, &epoch)?;
                self.set(&dataset, OWNER, &record.owner)
            }
            RecordOrder::TakeOver => {
                self.set(&dataset, OWNER, &record.owner)?;
                self.set(&dataset, EPOCH, &epoch)?;
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

    fn destroy_replica(&self, name: &str) -> Result<(), VolumeError> {
        let dataset = self.dataset(name)?;
        self.zfs(&["destroy", "-r", "-f", &dataset]).map(drop)
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
    ) -> Result<Box<dyn SendStream>, VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        let mut a = args(&["send"]);
        if let Some(base) = base {
            check_name(base)?;
            a.push("-i".into());
            a.push(format!("{dataset}@{base}"));
        }
        a.push(format!("{dataset}@{snapshot}"));
        self.runner.spawn_reader("zfs", &a)
    }

    fn receive(
        &self,
        name: &str,
        base: Option<&str>,
        snapshot: &str,
    ) -> Result<Box<dyn ReceiveSink>, VolumeError> {
        check_name(snapshot)?;
        let dataset = self.dataset(name)?;
        let a = match base {
            // -F rolls back whatever changed since `base` (atime updates on a mounted copy).
            Some(base) => {
                check_name(base)?;
                args(&["recv", "-F", &dataset])
            }
            None => {
                if self.exists(&dataset) {
                    return Err(VolumeError::Exists(name.to_string()));
                }
                args(&["recv", &dataset])
            }
        };
        self.runner.spawn_writer("zfs", &a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::command::fake::FakeRunner;

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
        let vols = parse_volumes("pool/flocker", LISTING);
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
            &calls[calls.len() - 3..],
            &[
                "zfs set readonly=on pool/flocker/db",
                "zfs set flocker:epoch=4 pool/flocker/db",
                "zfs set flocker:owner=T pool/flocker/db",
            ]
        );
    }

    #[test]
    fn create_sets_owner_epoch_and_quota_and_refuses_existing() {
        let (fake, b) = backend();
        fake.answer("zfs list -H -o name pool/flocker/db", Err("does not exist"));
        b.create("db", Some(1 << 20), "S").expect("create");
        assert!(fake.calls().contains(
            &"zfs create -o flocker:owner=S -o flocker:epoch=1 -o quota=1048576 pool/flocker/db"
                .to_string()
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
        drop(b.send("db", Some("push-1"), "push-2").expect("send"));
        drop(b.receive("db", Some("push-1"), "push-2").expect("recv"));
        let calls = fake.calls();
        assert!(
            calls.contains(&"zfs send -i pool/flocker/db@push-1 pool/flocker/db@push-2".into())
        );
        assert!(calls.contains(&"zfs recv -F pool/flocker/db".into()));
        assert!(b.send("../x", None, "s").is_err());
    }
}
