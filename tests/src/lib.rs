//! Shared harness for the privileged end-to-end and integration tests: network namespaces,
//! ZFS pools on files served by zfs-fuse, and `dockerd` instances inside namespaces. The
//! tests themselves live in `tests/tests/`.

pub mod binaries;
pub mod cluster;
pub mod docker;
pub mod images;
pub mod netns;
pub mod probe;
pub mod reap;
pub mod redis;
pub mod zfs;
