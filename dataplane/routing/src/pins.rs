//! Where the eBPF backend pins its maps and links in bpffs, so routing outlives the agent:
//! while the agent restarts (or after it crashed), its programs stay attached and their maps
//! (routes, addresses, the TC program's flows) stay filled, and the next agent takes them over
//! and replaces the programs in place instead of starting from nothing.
//!
//! Layout: `/sys/fs/bpf/flocker/net-INODE/OBJECT/`. One directory per network namespace
//! (INODE of `/proc/thread-self/ns/net`), since bpffs is shared by every namespace of a mount
//! namespace and the test cluster runs several nodes on one host; below it one directory per
//! build of the BPF object (OBJECT, a hash of its bytes), since a new build's maps may be laid
//! out differently: it starts with maps of its own, and removes the older builds' directories
//! (detaching their programs) once its own programs are attached.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::mounts;

/// bpffs, mounted here if nothing is.
const BPFFS: &str = "/sys/fs/bpf";

/// A failure preparing the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot mount bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// This namespace's pin directory for this build of the BPF object.
#[derive(Debug)]
pub struct Pins {
    /// `.../net-INODE`
    namespace: PathBuf,
    /// `.../net-INODE/OBJECT`
    dir: PathBuf,
}

impl Pins {
    /// Mounts bpffs if needed and creates the directory for `object` (the BPF ELF bytes) in
    /// the calling thread's network namespace.
    pub fn open(object: &[u8]) -> Result<Pins, PinError> {
        ensure_bpffs()?;
        let namespace = namespace_dir(current_namespace()?);
        let dir = namespace.join(format!("{:016x}", fnv1a(object)));
        fs::create_dir_all(&dir).map_err(|source| PinError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Pins { namespace, dir })
    }

    /// Where the map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the link `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join(format!("link-{name}"))
    }

    /// Removes the directories of other builds in this namespace: their links go (detaching
    /// their programs) and their maps with them.
    pub fn remove_other_builds(&self) {
        let Ok(entries) = fs::read_dir(&self.namespace) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != self.dir {
                remove(&path);
            }
        }
    }

    /// Removes this build's pinned links other than `kept` (an earlier agent's links for
    /// interfaces that are gone), detaching their programs.
    pub fn remove_links_except(&self, kept: &[&Path]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_link = entry.file_name().to_string_lossy().starts_with("link-");
            if is_link && !kept.contains(&path.as_path()) {
                remove(&path);
            }
        }
    }

    /// Removes every pin of this namespace.
    pub fn remove_all(&self) {
        remove(&self.namespace);
    }
}

/// Removes every pin of the calling thread's network namespace, if it has any.
pub fn remove_current_namespace() -> Result<(), PinError> {
    remove(&namespace_dir(current_namespace()?));
    Ok(())
}

fn current_namespace() -> Result<u64, PinError> {
    let path = Path::new("/proc/thread-self/ns/net");
    fs::metadata(path)
        .map(|meta| meta.ino())
        .map_err(|source| PinError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The pin directory of the network namespace with inode `inode`, for tools that clean up
/// after a namespace (`/sys/fs/bpf/flocker/net-INODE`).
pub fn namespace_dir(inode: u64) -> PathBuf {
    Path::new(BPFFS)
        .join("flocker")
        .join(format!("net-{inode}"))
}

/// Removes a pinned object (a link's program is detached unless a process still holds the
/// link), or a directory of them.
pub(crate) fn remove(path: &Path) {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Ok(()) => info!(path = %path.display(), "eBPF pins removed"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => warn!(path = %path.display(), %error, "cannot remove eBPF pins"),
    }
}

fn ensure_bpffs() -> Result<(), PinError> {
    let path = Path::new(BPFFS);
    if mounts::mount_points("bpf").iter().any(|dir| dir == path) {
        return Ok(());
    }
    mounts::mount("bpf", path).map_err(|source| PinError::Mount {
        path: path.to_owned(),
        source,
    })
}

/// FNV-1a, 64 bits: a stable name for a build of the BPF object.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_namespaces_get_their_own_directories() {
        assert_ne!(fnv1a(b"object one"), fnv1a(b"object two"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            namespace_dir(4026531840),
            PathBuf::from("/sys/fs/bpf/flocker/net-4026531840")
        );
    }
}
