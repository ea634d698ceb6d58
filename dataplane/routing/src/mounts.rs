//! The pseudo-filesystems the eBPF backend needs (cgroup v2 to attach its socket programs to,
//! bpffs to pin into): where they are mounted, and mounting one where it is not.

use std::path::{Path, PathBuf};

use tracing::info;

/// The mount points of filesystems of type `fstype`, as `/proc/self/mounts` lists them.
pub fn mount_points(fstype: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == fstype).then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Mounts a filesystem of type `fstype` (no device, no options) at `dir`.
pub fn mount(fstype: &str, dir: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )?;
    info!(fstype, path = %dir.display(), "mounted");
    Ok(())
}
