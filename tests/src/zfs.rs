//! ZFS pools on files served by zfs-fuse (filled by the streamer issue).
