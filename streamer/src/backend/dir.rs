//! A directory tree in a portable format (POSIX tar via the `tar` crate), for hosts with
//! neither ZFS nor btrfs. Modes, ownership (numeric uid/gid), symlinks (not followed), and
//! mtimes are preserved; hard links are stored as separate files, and extended attributes,
//! ACLs, sockets and device nodes are not carried.
//!
//! The sink unpacks into a staging directory next to the target and renames it into place on
//! commit, so the target either does not exist or is complete. It does not resume: an
//! interrupted transfer starts over.

use std::io::{PipeReader, PipeWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{BackendError, Sink, Source};

/// Packs a directory tree.
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// Streams the tree under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

fn pack(root: &Path, out: PipeWriter) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", root)?;
    builder.into_inner()?.flush()
}

/// Reads the packer's output; its failure becomes a read error at EOF.
struct PackReader {
    pipe: PipeReader,
    packer: Option<JoinHandle<std::io::Result<()>>>,
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0
            && !buf.is_empty()
            && let Some(t) = self.packer.take()
        {
            t.join()
                .map_err(|_| std::io::Error::other("directory packer thread panicked"))??;
        }
        Ok(n)
    }
}

impl Source for DirSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        let meta = std::fs::metadata(&self.root).map_err(|source| BackendError::Fs {
            op: "stat",
            path: self.root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(BackendError::Target(format!(
                "{} is not a directory",
                self.root.display()
            )));
        }
        let (reader, writer) = std::io::pipe().map_err(|source| BackendError::Fs {
            op: "pipe for",
            path: self.root.clone(),
            source,
        })?;
        let root = self.root.clone();
        let packer = std::thread::spawn(move || {
            pack(&root, writer).map_err(|e| {
                std::io::Error::new(e.kind(), format!("packing {}: {e}", root.display()))
            })
        });
        Ok(Box::new(PackReader {
            pipe: reader,
            packer: Some(packer),
        }))
    }
}

/// Unpacks entries one by one so directory mtimes can be restored last (unpacking a child
/// changes its parent's mtime, and the `tar` crate leaves directory mtimes alone).
///
/// The stream verified, but its sender may still be hostile (or its tree odd): the `tar` crate
/// skips entries with a `..` component, strips a leading `/`, and refuses to write through a
/// symlink leading out of `staging`. Directory mtimes are therefore applied only to the
/// directories it accepted, at the path it used ([`inside_path`]), and opened component by
/// component without following any symlink ([`open_dir_nofollow`]).
fn unpack(reader: &mut impl Read, staging: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut dir_mtimes = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let dir = if entry.header().entry_type().is_dir() {
            let mtime = entry.header().mtime()?;
            inside_path(&entry.path()?).map(|rel| (rel, mtime))
        } else {
            None
        };
        if !entry.unpack_in(staging)? {
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            tracing::warn!(%path, "skipped a tar entry leading out of the target");
            continue;
        }
        dir_mtimes.extend(dir);
    }
    // Deepest first, so setting a child's time cannot disturb its parent afterwards.
    dir_mtimes.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    let root = std::fs::File::open(staging)?;
    for (rel, mtime) in dir_mtimes {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        open_dir_nofollow(&root, &rel)
            .and_then(|dir| dir.set_modified(t))
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("setting the mtime of {}: {e}", rel.display()),
                )
            })?;
    }
    Ok(())
}

/// Where `tar::Entry::unpack_in` puts an entry named `path`, relative to its destination:
/// leading `/`, prefixes and `.` components dropped; `None` when it skips the entry (a `..`
/// component). The empty path is the destination itself.
fn inside_path(path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut rel = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(name) => rel.push(name),
        }
    }
    Some(rel)
}

/// Opens the directory `rel` (from [`inside_path`]) under `root`, one component at a time with
/// `O_NOFOLLOW`, so no symlink anywhere on the way can lead outside `root`.
fn open_dir_nofollow(root: &std::fs::File, rel: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, openat};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = root.try_clone()?;
    for part in rel.components() {
        let std::path::Component::Normal(name) = part else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unexpected component in {}", rel.display()),
            ));
        };
        let fd = openat(&dir, name, flags, Mode::empty()).map_err(std::io::Error::from)?;
        dir = std::fs::File::from(fd);
    }
    Ok(dir)
}

/// An error with its causes, so "failed to unpack x" also says "No space left on device".
fn chain(e: &std::io::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.get_ref().and_then(|inner| inner.source());
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Unpacks a tree into `target` (which must not exist) via a staging directory.
#[derive(Debug)]
pub struct DirSink {
    target: PathBuf,
    staging: PathBuf,
    pipe: Option<PipeWriter>,
    unpacker: Option<JoinHandle<std::io::Result<()>>>,
    /// The staging directory is ours to remove: from `open` until commit or abort.
    staged: bool,
}

impl DirSink {
    /// A sink creating directory `target`.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        let target = target.into();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dir".into());
        let staging = target.with_file_name(format!(".{name}.flocker-partial"));
        Self {
            target,
            staging,
            pipe: None,
            unpacker: None,
            staged: false,
        }
    }

    /// Where the tree is unpacked before the rename.
    pub fn staging_path(&self) -> &Path {
        &self.staging
    }

    fn join_unpacker(&mut self) -> Result<(), BackendError> {
        self.pipe = None;
        match self.unpacker.take() {
            None => Ok(()),
            Some(t) => t
                .join()
                .map_err(|_| BackendError::Panic("directory unpacker"))?
                .map_err(|source| BackendError::Fs {
                    op: "unpack into",
                    path: self.staging.clone(),
                    source,
                }),
        }
    }

    fn remove_staging(&self) -> Result<(), BackendError> {
        match std::fs::remove_dir_all(&self.staging) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BackendError::Fs {
                op: "remove staging directory",
                path: self.staging.clone(),
                source,
            }),
        }
    }
}

impl Sink for DirSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        if self.target.symlink_metadata().is_ok() {
            return Err(BackendError::Target(format!(
                "{} exists already",
                self.target.display()
            )));
        }
        // A leftover from a crashed run is ours to discard.
        self.remove_staging()?;
        std::fs::create_dir(&self.staging).map_err(|source| BackendError::Fs {
            op: "create staging directory",
            path: self.staging.clone(),
            source,
        })?;
        self.staged = true;
        let (reader, writer) = std::io::pipe().map_err(|source| BackendError::Fs {
            op: "pipe for",
            path: self.staging.clone(),
            source,
        })?;
        let staging = self.staging.clone();
        self.unpacker = Some(std::thread::spawn(move || {
            let mut reader = std::io::BufReader::with_capacity(1 << 20, reader);
            let result =
                unpack(&mut reader, &staging).map_err(|e| std::io::Error::new(e.kind(), chain(&e)));
            // Drain so the writer never blocks on a pipe nobody reads.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            result
        }));
        let pipe = self.pipe.insert(writer);
        Ok(Box::new(pipe))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        self.join_unpacker()?;
        // Durable before it is renamed into place, and the rename durable after: a crash
        // leaves the old target or the complete new one, never a tree of empty files.
        sync_tree(&self.staging).map_err(|source| BackendError::Fs {
            op: "sync",
            path: self.staging.clone(),
            source,
        })?;
        std::fs::rename(&self.staging, &self.target).map_err(|source| BackendError::Fs {
            op: "rename into place",
            path: self.target.clone(),
            source,
        })?;
        self.staged = false;
        sync_parent(&self.target).map_err(|source| BackendError::Fs {
            op: "sync the directory of",
            path: self.target.clone(),
            source,
        })
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        let why = self.join_unpacker().err().map(|e| e.to_string());
        if self.staged {
            self.remove_staging()?;
            self.staged = false;
        }
        Ok(why)
    }
}

/// `fsync`s every regular file and directory under `root` (symlinks are not followed; their
/// entries are made durable by their directory's sync).
fn sync_tree(root: &Path) -> std::io::Result<()> {
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                std::fs::File::open(entry.path())?.sync_all()?;
            }
        }
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(())
}

/// `fsync`s the directory holding `path`, which makes a rename to `path` durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for DirSink {
    fn drop(&mut self) {
        if self.staged
            && let Err(e) = self.abort()
        {
            tracing::error!(target = %self.target.display(), error = %e, "aborting the dropped directory sink failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    use super::*;
    use crate::backend::{ReaderSource, copy};

    /// The commit's sync walks nested directories and files, and neither follows nor
    /// stumbles on symlinks (a dangling one, one to a directory outside the tree).
    #[test]
    fn syncing_a_tree_covers_nested_entries_without_following_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/b/file"), b"data").expect("write");
        std::os::unix::fs::symlink("/nonexistent/target", root.join("a/dangling")).expect("ln");
        std::os::unix::fs::symlink("/proc", root.join("out")).expect("ln");
        sync_tree(&root).expect("sync");
        sync_parent(&root).expect("sync parent");
        // A tree it cannot read is an error, not a silent skip.
        assert!(sync_tree(&dir.path().join("missing")).is_err());
    }

    /// Agents before issue 12 sent `tar -C SNAP -c .` and unpacked with `tar -x`: streams
    /// still go both ways between the `tar` crate and GNU tar.
    #[test]
    fn gnu_tar_streams_interoperate_both_ways() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        let long = "n".repeat(150);
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        std::fs::write(src.join("sub").join(&long), "long").expect("write");
        std::fs::write(src.join("f"), "hello").expect("write");
        std::os::unix::fs::symlink("f", src.join("link")).expect("symlink");
        let check = |root: &Path| {
            let read = |p: &Path| std::fs::read_to_string(root.join(p)).expect("read");
            assert_eq!(read(Path::new("f")), "hello");
            assert_eq!(read(&Path::new("sub").join(&long)), "long");
            let link = std::fs::read_link(root.join("link")).expect("link");
            assert_eq!(link, Path::new("f"));
        };

        let gnu = Command::new("tar")
            .arg("-C")
            .arg(&src)
            .args(["-c", "."])
            .output()
            .expect("tar -c");
        assert!(gnu.status.success());
        let got = tmp.path().join("got");
        copy(
            &mut ReaderSource(Some(&gnu.stdout[..])),
            &mut DirSink::new(&got),
        )
        .expect("unpack GNU tar");
        check(&got);

        let mut ours = Vec::new();
        DirSource::new(&src)
            .open()
            .expect("open")
            .read_to_end(&mut ours)
            .expect("pack");
        let back = tmp.path().join("back");
        std::fs::create_dir(&back).expect("mkdir");
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&back)
            .arg("-x")
            .stdin(Stdio::piped())
            .spawn()
            .expect("tar -x");
        tar.stdin
            .take()
            .expect("stdin")
            .write_all(&ours)
            .expect("feed");
        assert!(tar.wait().expect("wait").success());
        check(&back);
    }
}
