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
#[ignore = "privileged: needs root (chown, tmpfs mounts); `cargo xtask ci` runs it"]
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
#[ignore = "privileged: needs root (chown, tmpfs mounts); `cargo xtask ci` runs it"]
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
#[ignore = "privileged: needs root (chown, tmpfs mounts); `cargo xtask ci` runs it"]
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

/// A tar entry with a raw name (and link name), as a hostile sender would write it: the `tar`
/// crate's own `set_path` refuses `..` and absolute paths, so the header bytes are set by hand.
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_mtime(12345);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    let old = h.as_old_mut();
    assert!(name.len() < old.name.len() && link.is_none_or(|l| l.len() < old.linkname.len()));
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        old.linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    builder.append(&h, data).expect("append");
}

/// Everything under `dir` (which lies outside the sink's target): path -> (mtime, contents).
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, i64, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = p.symlink_metadata().expect("stat");
        let contents = if m.is_file() {
            Some(std::fs::read(&p).expect("read"))
        } else {
            None
        };
        out.push((p.clone(), m.mtime(), contents));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("ls") {
                stack.push(e.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_tar_cannot_touch_anything_outside_the_sink() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let tmp = tempfile::tempdir().expect("tempdir");
    // The sink's staging directory is tmp/.dst.flocker-partial, so "../victim" from there
    // (and from the target) is tmp/victim.
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).expect("mkdir");
    std::fs::write(victim.join("file"), b"original").expect("write");
    set_mtime(&victim.join("file"), 1_000_000_000);
    set_mtime(&victim, 1_100_000_000);
    let abs = victim.to_str().expect("utf8").to_owned();
    let abs_file = format!("{abs}/file");
    let dst = tmp.path().join("dst");

    type Entry<'a> = (tar::EntryType, &'a str, Option<&'a str>, &'a [u8]);
    let attacks: Vec<(&str, Vec<Entry>)> = vec![
        (
            "absolute paths",
            vec![
                (Directory, "./", None, b""),
                (Directory, &abs, None, b""),
                (Regular, &abs_file, None, b"pwned"),
            ],
        ),
        (
            "parent components",
            vec![
                (Directory, "../victim", None, b""),
                (Directory, "..", None, b""),
                (Regular, "../victim/file", None, b"pwned"),
                (Directory, "a/", None, b""),
                (Directory, "a/../../victim", None, b""),
            ],
        ),
        (
            "a symlink out, then a file through it",
            vec![
                (Symlink, "esc", Some(&abs), b""),
                (Regular, "esc/file", None, b"pwned"),
            ],
        ),
        (
            "a symlink out, then a directory at it",
            vec![
                (Symlink, "esc", Some(&abs), b""),
                (Directory, "esc", None, b""),
            ],
        ),
        (
            "a symlink out, then a directory under it",
            vec![
                (Symlink, "esc", Some(&abs), b""),
                (Directory, "esc/sub", None, b""),
            ],
        ),
        (
            "a symlink to a file out, then the file",
            vec![
                (Symlink, "f", Some(&abs_file), b""),
                (Regular, "f", None, b"pwned"),
            ],
        ),
        (
            "a hard link to a file out, then the file",
            vec![
                (Link, "h", Some(&abs_file), b""),
                (Regular, "h", None, b"pwned"),
            ],
        ),
        (
            "a relative symlink out",
            vec![
                (Symlink, "up", Some("../victim"), b""),
                (Directory, "up/", None, b""),
                (Regular, "up/file", None, b"pwned"),
            ],
        ),
    ];
    let before = snapshot(&victim);
    let (so, ro) = keyed();
    for (what, entries) in attacks {
        let mut builder = tar::Builder::new(Vec::new());
        for (kind, name, link, data) in entries {
            raw_entry(&mut builder, kind, name, link, data);
        }
        let archive = builder.into_inner().expect("tar");
        let mut wire = Vec::new();
        flocker_stream::send_stream(&archive[..], &mut wire, &so).expect("send");
        let mut sink = DirSink::new(&dst);
        let result = flocker_stream::receive_into(&wire[..], &mut sink, &ro);
        assert_eq!(
            snapshot(&victim),
            before,
            "{what}: outside the target changed"
        );
        // Only the target itself may have appeared next to it (not counting its staging).
        let mut names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        let expect: Vec<std::ffi::OsString> = if result.is_ok() {
            vec!["dst".into(), "victim".into()]
        } else {
            vec!["victim".into()]
        };
        assert_eq!(names, expect, "{what}: {result:?}");
        if result.is_ok() {
            for entry in snapshot(&dst) {
                assert!(entry.0.starts_with(&dst));
            }
            std::fs::remove_dir_all(&dst).expect("rm dst");
        }
    }
}
