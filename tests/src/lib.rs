//! Shared harness for the privileged end-to-end and integration tests: network namespaces,
//! ZFS pools on files served by zfs-fuse, and `dockerd` instances inside namespaces. The
//! tests themselves live in `tests/tests/`.

pub mod binaries;
pub mod chaos;
pub mod client_view;
pub mod cluster;
pub mod docker;
pub mod images;
pub mod netns;
pub mod node_zfs;
pub mod probe;
pub mod prometheus;
pub mod reap;
pub mod redis;
pub mod scenario;
pub mod zfs;

/// Marks every file descriptor above stderr close-on-exec, so that daemons the harness starts
/// (zfs-fuse, dockerd, agents) do not inherit them. Tests run as `flock LOCK cargo test ...`,
/// which hands the lock's descriptor down to the test binary: a daemon that outlives the test
/// and inherited it would hold the machine-wide test lock for as long as it runs.
pub fn keep_descriptors_from_daemons() {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::BorrowedFd;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: only the flags of a descriptor listed in /proc/self/fd are changed; one
        // that was closed since makes fcntl fail with EBADF, which is ignored.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl(borrowed, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(borrowed, FcntlArg::F_SETFD(flags));
        }
    }
}
