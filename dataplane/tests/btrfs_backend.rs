//! The btrfs volume backend against a real btrfs filesystem on a loop device: create, write,
//! snapshot, full and incremental send/receive between two backend roots, ownership records
//! and read-only copies. Needs root and `btrfs-progs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use flocker_dataplane::ownership::RecordOrder;
use flocker_dataplane::volume::SystemRunner;
use flocker_dataplane::volume::btrfs::BtrfsBackend;
use flocker_dataplane::volume::{Record, VolumeBackend};

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A btrfs filesystem on a loop device, unmounted and detached on drop.
struct LoopBtrfs {
    mount: tempfile::TempDir,
    device: String,
    _image: tempfile::NamedTempFile,
}

impl LoopBtrfs {
    fn create() -> Result<Self> {
        let image = tempfile::NamedTempFile::new()?;
        image.as_file().set_len(256 << 20)?;
        let path = image.path().display().to_string();
        let device = run("losetup", &["-f", "--show", &path])?;
        let mount = tempfile::tempdir()?;
        let fs = LoopBtrfs {
            mount,
            device,
            _image: image,
        };
        run("mkfs.btrfs", &["-q", &fs.device])?;
        run(
            "mount",
            &[&fs.device, &fs.mount.path().display().to_string()],
        )?;
        Ok(fs)
    }

    fn path(&self) -> PathBuf {
        self.mount.path().to_path_buf()
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = run("umount", &[&self.mount.path().display().to_string()]);
        let _ = run("losetup", &["-d", &self.device]);
    }
}

fn copy(
    from: &dyn VolumeBackend,
    to: &dyn VolumeBackend,
    base: Option<&str>,
    snap: &str,
) -> Result<()> {
    let mut send = from.send("db", base, snap)?;
    let mut recv = to.receive("db", base, snap, false)?;
    flocker_stream::backend::copy(send.as_mut(), recv.as_mut())?;
    Ok(())
}

fn read(backend: &dyn VolumeBackend, file: &str) -> Result<String> {
    Ok(std::fs::read_to_string(
        backend.mountpoint("db")?.join(file),
    )?)
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(".probe");
    let ok = std::fs::write(&probe, "x").is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

#[test]
#[ignore = "privileged: needs root, loop devices and btrfs; `cargo xtask ci` runs it"]
fn btrfs_volumes_move_full_then_incremental_with_their_records() -> Result<()> {
    let fs = LoopBtrfs::create()?;
    let runner = Arc::new(SystemRunner);
    let a = BtrfsBackend::open(&fs.path().join("a"), runner.clone())?;
    let b = BtrfsBackend::open(&fs.path().join("b"), runner)?;

    a.create("db", Some(1 << 20), "A")?;
    std::fs::write(a.mountpoint("db")?.join("f"), "one")?;
    a.snapshot("db", "push-0000000001")?;
    copy(&a, &b, None, "push-0000000001")?;
    b.set_record(
        "db",
        &Record {
            owner: "A".into(),
            epoch: 1,
        },
        false,
        RecordOrder::TakeOver,
    )?;
    assert_eq!(read(&b, "f")?, "one");
    assert!(
        !writable(&b.mountpoint("db")?),
        "a replica must be read-only"
    );

    std::fs::write(a.mountpoint("db")?.join("g"), "two")?;
    a.snapshot("db", "push-0000000002")?;
    copy(&a, &b, Some("push-0000000001"), "push-0000000002")?;
    b.set_record(
        "db",
        &Record {
            owner: "A".into(),
            epoch: 1,
        },
        false,
        RecordOrder::TakeOver,
    )?;
    assert_eq!(
        (read(&b, "f")?, read(&b, "g")?),
        ("one".into(), "two".into())
    );
    a.destroy_snapshot("db", "push-0000000001")?;
    b.destroy_snapshot("db", "push-0000000001")?;

    // Handoff: A freezes and names B at epoch 2, B takes over and becomes writable.
    let handed = Record {
        owner: "B".into(),
        epoch: 2,
    };
    a.set_record("db", &handed, false, RecordOrder::GiveAway)?;
    b.set_record("db", &handed, true, RecordOrder::TakeOver)?;
    assert!(!writable(&a.mountpoint("db")?));
    assert!(writable(&b.mountpoint("db")?));
    for backend in [&a, &b] {
        let v = backend.get("db")?.context("listed")?;
        assert_eq!((v.owner.as_str(), v.epoch), ("B", 2));
        assert_eq!(v.snapshots, vec!["push-0000000002"]);
    }
    assert_eq!(a.quota("db")?, Some(1 << 20));
    Ok(())
}

/// Issue 23 on btrfs: the volume's path is proven to be its subvolume. A plain directory in
/// its place (the subvolume gone, a directory made by hand or by Docker's bind mount) and the
/// volumes' filesystem unmounted (its root left as a bare directory on the parent
/// filesystem) are both refused, naming what is there.
#[test]
#[ignore = "privileged: needs root, loop devices and btrfs; `cargo xtask ci` runs it"]
fn btrfs_proof_refuses_a_plain_directory_or_an_unmounted_filesystem() -> Result<()> {
    let fs = LoopBtrfs::create()?;
    let runner = Arc::new(SystemRunner);
    let root = fs.path().join("vols");
    let b = BtrfsBackend::open(&root, runner.clone())?;
    b.create("db", None, "A")?;
    assert_eq!(b.prove("db")?, root.join("db"));

    run(
        "btrfs",
        &[
            "subvolume",
            "delete",
            &root.join("db").display().to_string(),
        ],
    )?;
    std::fs::create_dir(root.join("db"))?;
    let e = b.prove("db").expect_err("plain directory").to_string();
    ensure!(e.contains("plain directory"), "{e}");

    // The whole filesystem gone: the same paths now lie on the parent filesystem.
    run("umount", &[&fs.path().display().to_string()])?;
    std::fs::create_dir_all(root.join(".flocker"))?;
    std::fs::create_dir_all(root.join("db"))?;
    let e = b.prove("db").expect_err("unmounted").to_string();
    ensure!(e.contains("not btrfs"), "{e}");
    run("mount", &[&fs.device, &fs.path().display().to_string()])?;
    Ok(())
}

/// Issue 11 item 3 on btrfs: a full stream replacing a stale replica, cut off before it
/// verified, leaves the replica and its snapshots as they were; completed, it swaps in the
/// new copy and drops the stale snapshots.
#[test]
#[ignore = "privileged: needs root, loop devices and btrfs; `cargo xtask ci` runs it"]
fn btrfs_replace_swaps_only_a_complete_stream() -> Result<()> {
    let fs = LoopBtrfs::create()?;
    let runner = Arc::new(SystemRunner);
    let a = BtrfsBackend::open(&fs.path().join("a"), runner.clone())?;
    let b = BtrfsBackend::open(&fs.path().join("b"), runner)?;
    let replica = Record {
        owner: "A".into(),
        epoch: 1,
    };
    a.create("db", None, "A")?;
    std::fs::write(a.mountpoint("db")?.join("f"), "old")?;
    a.snapshot("db", "push-0000000001")?;
    copy(&a, &b, None, "push-0000000001")?;
    b.set_record("db", &replica, false, RecordOrder::TakeOver)?;

    // A new history on A that shares no snapshot with B's replica.
    std::fs::write(a.mountpoint("db")?.join("f"), "new")?;
    a.snapshot("db", "push-0000000005")?;
    a.destroy_snapshot("db", "push-0000000001")?;

    let mut send = a.send("db", None, "push-0000000005")?;
    let mut whole = Vec::new();
    // Reads to the end, where a failed `btrfs send` would be an error.
    std::io::Read::read_to_end(&mut send.open()?, &mut whole)?;
    {
        let mut recv = b.receive("db", None, "push-0000000005", true)?;
        std::io::Write::write_all(&mut recv.open()?, &whole[..whole.len() / 2])?;
        // Dropped unfinished: the cut-off stream.
    }
    assert_eq!(read(&b, "f")?, "old");
    assert_eq!(
        b.get("db")?.context("listed")?.snapshots,
        vec!["push-0000000001"]
    );

    let mut recv = b.receive("db", None, "push-0000000005", true)?;
    std::io::Write::write_all(&mut recv.open()?, &whole)?;
    recv.commit()?;
    assert_eq!(read(&b, "f")?, "new");
    assert_eq!(
        b.get("db")?.context("listed")?.snapshots,
        vec!["push-0000000005"]
    );
    Ok(())
}
