//! btrfs round trips (full and incremental with a parent) and abort cleanup, on real btrfs
//! filesystems on loop devices.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use flocker_stream::backend::{BtrfsSink, BtrfsSource};
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A btrfs filesystem on a loop device, mounted; unmounted and detached on drop.
struct LoopBtrfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    dev: String,
}

impl LoopBtrfs {
    fn new(size_mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image");
        let img_s = img.to_str().expect("utf8");
        let dev = run("losetup", &["--find", "--show", img_s])
            .trim()
            .to_owned();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let fs = Self {
            _dir: dir,
            mnt,
            dev,
        };
        run("mkfs.btrfs", &["-q", "-f", &fs.dev]);
        run("mount", &[&fs.dev, fs.mnt.to_str().expect("utf8")]);
        fs
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn snapshot_ro(src: &Path, dst: &Path) {
    run(
        "btrfs",
        &[
            "subvolume",
            "snapshot",
            "-r",
            src.to_str().expect("utf8"),
            dst.to_str().expect("utf8"),
        ],
    );
}

fn keyed() -> (SendOptions, ReceiveOptions) {
    let auth = Auth::PresharedKey([0x42; 32]);
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: 256 * 1024,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            ..Default::default()
        },
    )
}

#[test]
#[ignore = "privileged: needs root, loop devices and btrfs; `cargo xtask ci` runs it"]
fn btrfs_full_and_incremental_round_trip_then_damaged_receive_is_deleted() {
    let a = LoopBtrfs::new(256);
    let b = LoopBtrfs::new(256);
    let vol = a.path("vol");
    run(
        "btrfs",
        &["subvolume", "create", vol.to_str().expect("utf8")],
    );
    let x = common::random_bytes(3 << 20, 21);
    std::fs::write(vol.join("x.bin"), &x).expect("write");
    std::fs::write(vol.join("t.txt"), common::text_bytes(1 << 20)).expect("write");
    let s1 = a.path("vol@s1");
    snapshot_ro(&vol, &s1);
    let recv_dir = b.path("");
    let (so, ro) = keyed();

    let (sent, got) = common::over_tcp(
        &mut BtrfsSource::full(&s1),
        &mut BtrfsSink::new(&recv_dir),
        &so,
        &ro,
    );
    sent.expect("send full");
    got.expect("receive full");
    assert_eq!(std::fs::read(b.path("vol@s1/x.bin")).expect("received"), x);

    let y = common::random_bytes(1 << 20, 22);
    std::fs::write(vol.join("y.bin"), &y).expect("write");
    let s2 = a.path("vol@s2");
    snapshot_ro(&vol, &s2);
    let (sent, got) = common::over_tcp(
        &mut BtrfsSource::incremental(&s2, &s1),
        &mut BtrfsSink::new(&recv_dir),
        &so,
        &ro,
    );
    sent.expect("send incremental");
    let got = got.expect("receive incremental");
    assert!(
        got.bytes_in < 3 << 20,
        "incremental carries only the delta: {}",
        got.bytes_in
    );
    assert_eq!(std::fs::read(b.path("vol@s2/y.bin")).expect("received"), y);
    assert_eq!(std::fs::read(b.path("vol@s2/x.bin")).expect("received"), x);

    // A third snapshot whose stream is cut short, or arrives complete except the end frame:
    // no partial subvolume may remain.
    std::fs::write(vol.join("z.bin"), common::random_bytes(4 << 20, 23)).expect("write");
    let s3 = a.path("vol@s3");
    snapshot_ro(&vol, &s3);
    let wire = common::to_wire(&mut BtrfsSource::incremental(&s3, &s2), &so);
    for cut in [wire.len() / 2, wire.len() - 1] {
        let e = flocker_stream::receive_into(&wire[..cut], &mut BtrfsSink::new(&recv_dir), &ro)
            .expect_err("cut stream");
        assert!(matches!(e, StreamError::Truncated { .. }), "{e}");
        assert!(
            !b.path("vol@s3").exists(),
            "partial subvolume left behind (cut at {cut})"
        );
    }
    assert!(
        b.path("vol@s2/y.bin").exists(),
        "earlier subvolumes untouched"
    );
    assert!(s3.join("z.bin").exists(), "source untouched");
    flocker_stream::receive_into(&wire[..], &mut BtrfsSink::new(&recv_dir), &ro)
        .expect("clean stream");
    assert!(b.path("vol@s3/z.bin").exists());
}
