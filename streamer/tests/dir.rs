//! Directory trees: metadata survives a round trip; a failed or full-disk transfer leaves the
//! target absent and no staging directory behind.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use flocker_stream::backend::{DirSink, DirSource, FileSink, FileSource};
use flocker_stream::{Auth, ReceiveOptions, SendOptions, StreamError};

fn keyed() -> (SendOptions, ReceiveOptions) {
    let auth = Auth::PresharedKey([9; 32]);
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: 128 * 1024,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            ..Default::default()
        },
    )
}

fn set_mtime(path: &Path, secs: i64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .expect("open");
    f.set_modified(t).expect("set mtime");
}

fn build_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
    std::fs::write(root.join("a.txt"), common::text_bytes(300_000)).expect("write");
    std::fs::write(root.join("sub/b.bin"), common::random_bytes(700_000, 1)).expect("write");
    std::fs::write(root.join("sub/deeper/empty"), b"").expect("write");
    std::fs::write(root.join("secret"), b"x").expect("write");
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::set_permissions(
        root.join("sub/b.bin"),
        std::fs::Permissions::from_mode(0o751),
    )
    .expect("chmod");
    std::os::unix::fs::chown(root.join("sub/b.bin"), Some(1234), Some(5678)).expect("chown");
    symlink("../a.txt", root.join("sub/link")).expect("symlink");
    symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    set_mtime(&root.join("a.txt"), 1_000_000_000);
    set_mtime(&root.join("sub/deeper"), 1_100_000_000);
}

fn assert_same(a: &Path, b: &Path) {
    for rel in ["a.txt", "sub/b.bin", "sub/deeper/empty", "secret"] {
        assert_eq!(
            std::fs::read(a.join(rel)).expect("read a"),
            std::fs::read(b.join(rel)).expect("read b"),
            "{rel}"
        );
    }
    for rel in [
        "a.txt",
        "sub",
        "sub/deeper",
        "sub/b.bin",
        "secret",
        "sub/link",
        "dangling",
    ] {
        let (ma, mb) = (
            a.join(rel).symlink_metadata().expect("stat a"),
            b.join(rel).symlink_metadata().expect("stat b"),
        );
        assert_eq!(ma.mode(), mb.mode(), "mode of {rel}");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "owner of {rel}");
        if !ma.is_dir() || rel == "sub/deeper" {
            assert_eq!(ma.mtime(), mb.mtime(), "mtime of {rel}");
        }
    }
    assert_eq!(
        std::fs::read_link(b.join("sub/link")).expect("link"),
        Path::new("../a.txt")
    );
    assert_eq!(
        std::fs::read_link(b.join("dangling")).expect("link"),
        Path::new("/nonexistent/target")
    );
}

#[test]
fn directory_round_trip_preserves_modes_owners_symlinks_mtimes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    build_tree(&src);
    let dst = tmp.path().join("dst");
    let (so, ro) = keyed();
    let mut sink = DirSink::new(&dst);
    let (sent, got) = common::over_tcp(&mut DirSource::new(&src), &mut sink, &so, &ro);
    sent.expect("send");
    got.expect("receive");
    assert_same(&src, &dst);
    assert!(!sink.staging_path().exists());

    // The target exists now: a second receive must refuse rather than merge.
    let (_, got) = common::over_tcp(&mut DirSource::new(&src), &mut DirSink::new(&dst), &so, &ro);
    let e = got.expect_err("existing target");
    assert!(e.to_string().contains("exists"), "{e}");
}

#[test]
fn damaged_directory_stream_leaves_no_target_and_no_staging() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    build_tree(&src);
    let (so, ro) = keyed();
    let wire = common::to_wire(&mut DirSource::new(&src), &so);
    let dst = tmp.path().join("dst");
    for (cut, flip) in [
        (Some(wire.len() / 2), None),
        (None, Some(wire.len() / 3)),
        (Some(wire.len() - 1), None),
    ] {
        let mut w = wire.clone();
        if let Some(i) = flip {
            w[i] ^= 0x80;
        }
        if let Some(c) = cut {
            w.truncate(c);
        }
        let mut sink = DirSink::new(&dst);
        flocker_stream::receive_into(&w[..], &mut sink, &ro).expect_err("damaged");
        assert!(
            !dst.exists(),
            "target must not exist after a failed transfer"
        );
        assert!(
            !sink.staging_path().exists(),
            "staging directory must be removed"
        );
    }
    assert_eq!(
        std::fs::read(src.join("a.txt")).expect("source intact"),
        common::text_bytes(300_000)
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "flocker-test"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting a tmpfs failed (tests run as root)");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn full_disk_fails_cleanly_for_file_and_directory_sinks() {
    let fs = Tmpfs::mount("2m");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_file = tmp.path().join("big.bin");
    let data = common::random_bytes(4 << 20, 2);
    std::fs::write(&src_file, &data).expect("write source");
    let (so, ro) = keyed();

    let target = fs.0.path().join("big.bin");
    let mut sink = FileSink::new(&target);
    let (sent, got) = common::over_tcp(&mut FileSource::new(&src_file), &mut sink, &so, &ro);
    let e = got.expect_err("disk full");
    assert!(matches!(e, StreamError::SinkWrite(_)), "{e}");
    assert!(e.to_string().contains("No space left"), "{e}");
    let se = sent.expect_err("the sender must fail too");
    assert!(
        se.to_string().contains("No space left") || se.to_string().contains("transport"),
        "{se}"
    );
    assert!(
        !target.exists() && !sink.partial_path().exists(),
        "nothing left on the full disk"
    );
    assert_eq!(std::fs::read(&src_file).expect("source intact"), data);

    let src_dir = tmp.path().join("tree");
    std::fs::create_dir(&src_dir).expect("mkdir");
    std::fs::write(src_dir.join("big.bin"), &data).expect("write");
    let dst = fs.0.path().join("tree");
    let mut sink = DirSink::new(&dst);
    let (_, got) = common::over_tcp(&mut DirSource::new(&src_dir), &mut sink, &so, &ro);
    let e = got.expect_err("disk full");
    assert!(e.to_string().contains("space"), "{e}");
    assert!(
        !dst.exists() && !sink.staging_path().exists(),
        "nothing left on the full disk"
    );
    let left: Vec<_> = std::fs::read_dir(fs.0.path()).expect("ls").collect();
    assert!(left.is_empty(), "tmpfs should be empty: {left:?}");
}
