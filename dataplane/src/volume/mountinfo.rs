//! `/proc/PID/mountinfo` as plain data: which filesystem a path is on, seen from the host
//! or from inside a container's mount namespace.
//!
//! Two views of the same directory agree exactly when they name the same filesystem
//! (`major:minor`) and the same directory inside it (the mount's root plus the rest of the
//! path). A container whose volume was bind-mounted from a bare directory (the dataset was
//! not mounted when it started) shows another filesystem or another directory than the
//! host's view of the proven volume, which is how a container running on the wrong
//! filesystem is told apart from one running on its volume.

use std::path::{Component, Path, PathBuf};

/// One line of a mountinfo file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem.
    pub device: String,
    /// The directory of the filesystem that is the root of this mount (`/` for a whole
    /// filesystem, the source directory for a bind mount).
    pub root: PathBuf,
    /// Where it is mounted, relative to the reader's root.
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source (`pool/flocker/db` for ZFS, a device for block filesystems).
    pub source: String,
}

/// Where a path lives: a filesystem and a directory inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsLocation {
    pub device: String,
    pub directory: PathBuf,
}

impl std::fmt::Display for FsLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on device {}", self.directory.display(), self.device)
    }
}

/// The kernel escapes space, tab, newline and backslash in paths as `\NNN` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a mountinfo file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let mut tail = after.split(' ');
    let (device, root, mount_point) = (fields.get(2)?, fields.get(3)?, fields.get(4)?);
    Some(MountEntry {
        device: device.to_string(),
        root: PathBuf::from(unescape(root)),
        mount_point: PathBuf::from(unescape(mount_point)),
        fstype: tail.next()?.to_string(),
        source: unescape(tail.next()?),
    })
}

/// The mount whose mount point is exactly `path`; the topmost when several are stacked.
pub fn mounted_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// Which filesystem and directory `path` (absolute, without `..`) is on: the topmost mount
/// with the longest mount point containing it.
pub fn locate(entries: &[MountEntry], path: &Path) -> Option<FsLocation> {
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    let mut best: Option<&MountEntry> = None;
    for e in entries {
        if path.starts_with(&e.mount_point)
            && best
                .is_none_or(|b| e.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len())
        {
            best = Some(e);
        }
    }
    let e = best?;
    let rest = path.strip_prefix(&e.mount_point).ok()?;
    let directory = if rest.as_os_str().is_empty() {
        e.root.clone()
    } else {
        e.root.join(rest)
    };
    Some(FsLocation {
        device: e.device.clone(),
        directory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host of a zfs-fuse node: the pool, the parent dataset and one volume mounted.
    const HOST: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
46 22 0:41 / /pool rw,relatime - fuse.zfs pool rw,user_id=0
47 46 0:42 / /pool/flocker rw,relatime - fuse.zfs pool/flocker rw,user_id=0
48 47 0:43 / /pool/flocker/db rw,relatime - fuse.zfs pool/flocker/db rw,user_id=0
49 22 0:50 / /srv/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_and_unescapes_paths() {
        let entries = parse(HOST);
        assert_eq!(entries.len(), 5);
        assert_eq!(
            entries[3],
            MountEntry {
                device: "0:43".into(),
                root: "/".into(),
                mount_point: "/pool/flocker/db".into(),
                fstype: "fuse.zfs".into(),
                source: "pool/flocker/db".into(),
            }
        );
        assert_eq!(entries[4].mount_point, PathBuf::from("/srv/with space"));
        assert!(parse("garbage\n\n1 2 3").is_empty());
    }

    #[test]
    fn locates_paths_in_the_innermost_mount() {
        let entries = parse(HOST);
        let loc = |p: &str| locate(&entries, Path::new(p)).map(|l| l.to_string());
        assert_eq!(loc("/pool/flocker/db").as_deref(), Some("/ on device 0:43"));
        assert_eq!(
            loc("/pool/flocker/db/sub").as_deref(),
            Some("/sub on device 0:43")
        );
        // A sibling that merely shares a prefix is not inside the volume.
        assert_eq!(
            loc("/pool/flocker/dbx").as_deref(),
            Some("/dbx on device 0:42")
        );
        assert_eq!(loc("/etc").as_deref(), Some("/etc on device 254:1"));
        assert_eq!(loc("/pool/../etc"), None);
        assert_eq!(
            mounted_at(&entries, Path::new("/pool/flocker/db")).map(|e| e.source.as_str()),
            Some("pool/flocker/db")
        );
        assert_eq!(mounted_at(&entries, Path::new("/pool/flocker/x")), None);
    }

    #[test]
    fn a_container_bound_to_the_bare_directory_differs_from_the_volume() {
        let host = parse(HOST);
        let volume = locate(&host, Path::new("/pool/flocker/db")).expect("volume");
        // Started while the dataset was mounted: the bind mount's root is the dataset's root.
        let good = parse("600 500 0:43 / /data rw - fuse.zfs pool/flocker/db rw\n");
        // Started while it was not: the bare directory inside the parent dataset.
        let bad = parse("600 500 0:42 /db /data rw - fuse.zfs pool/flocker rw\n");
        assert_eq!(locate(&good, Path::new("/data")), Some(volume.clone()));
        assert_ne!(locate(&bad, Path::new("/data")), Some(volume));
    }
}
