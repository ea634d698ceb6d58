//! A zfs-fuse daemon of a node's own, for a cluster whose nodes each have one
//! ([`crate::cluster::Cluster::up_with_zfs_per_node`]) so that one node's daemon can be killed
//! alone (the chaos matrix's `kill-target-zfs-fuse`).
//!
//! zfs-fuse keys on fixed paths: its socket in `/var/run/zfs`, its lock in `/var/lock/zfs`,
//! the pool cache `/var/lib/zfs/zpool.cache` (which every daemon imports from when it starts:
//! shared, a node's daemon would import the other nodes' pools from the same files). The
//! node's daemon therefore runs in a mount namespace of its own with private tmpfs over those
//! three (it only reads `/etc/zfs`, the host's configuration), kept
//! alive by its namespace file bind-mounted at `/run/flocker-zfs/NETNS/mnt`. The host's `/` has
//! private propagation, so the datasets the daemon mounts would stay in its namespace; the
//! pool's mountpoint `/POOL` is made a shared mount (bound onto itself) before the namespace
//! is made, so the namespace's copy of it is a peer and every dataset mount below it appears
//! on the host too, where the node's dockerd bind-mounts it into containers. The node's agent
//! runs in the namespace (every `zfs` it runs reaches its own daemon), and so does every `zfs`
//! and `zpool` the harness runs for the node ([`NodeZfs::command`]).
//!
//! Killed (SIGKILL), the daemon leaves its FUSE mounts answering "Transport endpoint is not
//! connected" in the namespace and on the host; [`NodeZfs::restart`] does what a service
//! manager restarting it would: unmounts the dead mounts, starts the daemon (which imports
//! the pool again from its cache file) and mounts the datasets (`zfs mount -a`).
//! [`NodeZfs::remove`] leaves nothing: pool destroyed, daemon killed, namespace file and
//! shared mountpoint unmounted, its directory removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cluster::{pid_alive, read_pid};

/// Where every node's namespace file and pid file live (a private mount of its own, since a
/// namespace file cannot be bind-mounted below a shared mount).
pub const ROOT: &str = "/run/flocker-zfs";

/// The paths zfs-fuse writes to, each a private tmpfs in the node's namespace.
const PRIVATE_DIRS: [&str; 3] = ["/run/zfs", "/run/lock/zfs", "/var/lib/zfs"];

/// How long a started daemon may take to answer.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a killed daemon may take to be gone.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeZfsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("the zfs-fuse of {netns} did not answer within {START_WITHIN:?} ({last})")]
    NoAnswer { netns: String, last: String },
}

type Result<T> = std::result::Result<T, NodeZfsError>;

/// One node's zfs-fuse and mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeZfs {
    /// `ROOT/NETNS`: the namespace file and the daemon's pid file.
    home: PathBuf,
    /// The node's network namespace name, for messages.
    netns: String,
    /// The pool's mountpoint, `/POOL`: a shared mount.
    mountpoint: PathBuf,
}

impl NodeZfs {
    /// The daemon of the node whose network namespace is `netns` and whose pool is `pool`.
    pub fn new(netns: &str, pool: &str) -> NodeZfs {
        NodeZfs {
            home: Path::new(ROOT).join(netns),
            netns: netns.into(),
            mountpoint: Path::new("/").join(pool),
        }
    }

    /// The namespace file, for `nsenter --mount`.
    pub fn namespace(&self) -> PathBuf {
        self.home.join("mnt")
    }

    fn pidfile(&self) -> PathBuf {
        self.home.join("zfs-fuse.pid")
    }

    /// Whether an earlier `ensure` left this node's namespace (so `down` knows the layout).
    pub fn exists(&self) -> bool {
        self.home.exists()
    }

    /// `program` run in the node's mount namespace (and the caller's network namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.namespace().display()))
            .arg(program);
        cmd
    }

    /// `zfs`/`zpool ARGS` in the node's namespace; stdout, or an error with stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        output(&mut cmd)
    }

    /// Makes the namespace (unless it is there) and starts the daemon unless it answers
    /// (as [`NodeZfs::restart`] does, for a daemon that was killed).
    pub fn ensure(&self) -> Result<()> {
        if !is_mount_point(&self.namespace()) {
            self.make_namespace()?;
        }
        if !self.answers() {
            self.restart()?;
        }
        Ok(())
    }

    fn make_namespace(&self) -> Result<()> {
        ensure_private_root()?;
        create_dir(&self.home)?;
        create_dir(&self.mountpoint)?;
        if !is_mount_point(&self.mountpoint) {
            let at = self.mountpoint.as_os_str();
            output(Command::new("mount").arg("--bind").arg(at).arg(at))?;
        }
        output(
            Command::new("mount")
                .arg("--make-shared")
                .arg(&self.mountpoint),
        )?;
        fs::write(self.namespace(), "").map_err(|source| NodeZfsError::Io {
            what: format!("create {}", self.namespace().display()),
            source,
        })?;
        // `unchanged`: unshare makes every mount private by default, which would cut the
        // pool's mountpoint from its host peer.
        output(
            Command::new("unshare")
                .arg(format!("--mount={}", self.namespace().display()))
                .args(["--propagation", "unchanged", "true"]),
        )?;
        for dir in PRIVATE_DIRS {
            create_dir(Path::new(dir))?;
            self.run("mount", &["-t", "tmpfs", "tmpfs", dir])?;
        }
        Ok(())
    }

    /// Whether the daemon answers `zpool list`.
    pub fn answers(&self) -> bool {
        self.run("zpool", &["list"]).is_ok()
    }

    fn start(&self) -> Result<()> {
        // zfs-fuse refuses to start while its pid file exists, even naming a dead process.
        if !pid_alive(&self.pidfile()) {
            let _ = fs::remove_file(self.pidfile());
            crate::keep_descriptors_from_daemons();
            let mut start = self.command("zfs-fuse");
            start
                .arg("--pidfile")
                .arg(self.pidfile())
                .stdout(Stdio::null());
            output(&mut start)?;
        }
        let deadline = Instant::now() + START_WITHIN;
        loop {
            match self.run("zpool", &["list"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(NodeZfsError::NoAnswer {
                        netns: self.netns.clone(),
                        last: e.to_string(),
                    });
                }
                Err(_) => sleep(Duration::from_millis(200)),
            }
        }
    }

    /// SIGKILL to the daemon, as a crash would; returns once it is gone (at most 10 s).
    pub fn kill(&self) -> Result<()> {
        let Some(pid) = read_pid(&self.pidfile()).filter(|_| pid_alive(&self.pidfile())) else {
            return Ok(());
        };
        output(Command::new("kill").args(["-KILL", &pid]))?;
        let deadline = Instant::now() + EXIT_WITHIN;
        while pid_alive(&self.pidfile()) && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Starts a killed daemon again as a service manager would: the dead FUSE mounts
    /// unmounted, the daemon started (the pool comes back from its cache file), the datasets
    /// mounted.
    pub fn restart(&self) -> Result<()> {
        self.kill()?;
        self.unmount_dead()?;
        self.start()?;
        self.run("zfs", &["mount", "-a"])?;
        Ok(())
    }

    /// Lazily unmounts the `fuse.zfs` mounts at and below the pool's mountpoint, deepest
    /// first (the unmounts propagate to the host's copies). Only those: the namespace holds
    /// peer copies of the other nodes' shared mountpoints too, and unmounting their datasets
    /// here would unmount them under their own live daemons.
    fn unmount_dead(&self) -> Result<()> {
        let table = self.run("cat", &["/proc/self/mountinfo"])?;
        for mount in self.own_mounts(&table) {
            self.run("umount", &["-l", &mount])?;
        }
        Ok(())
    }

    /// The `fuse.zfs` mount points of `table` at or below the pool's mountpoint.
    fn own_mounts(&self, table: &str) -> Vec<String> {
        fuse_zfs_mounts(table)
            .into_iter()
            .filter(|m| Path::new(m).starts_with(&self.mountpoint))
            .collect()
    }

    /// Removes everything: `pool` destroyed (retried while the daemon reports it busy), the
    /// daemon killed, the namespace file and the shared mountpoint unmounted, the directory
    /// removed. Returns what it could not clean.
    pub fn remove(&self, pool: &str) -> Vec<String> {
        let mut left = Vec::new();
        if is_mount_point(&self.namespace()) && self.answers() {
            let mut last = None;
            for _ in 0..20 {
                match self.run("zpool", &["destroy", "-f", pool]) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.to_string().contains("no such pool") => {
                        last = None;
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        sleep(Duration::from_millis(500));
                    }
                }
            }
            if let Some(e) = last {
                left.push(format!("pool {pool} could not be destroyed: {e}"));
            }
        }
        if let Err(e) = self.kill() {
            left.push(format!("zfs-fuse of {}: {e}", self.netns));
        }
        if is_mount_point(&self.namespace()) {
            if let Ok(table) = self.run("cat", &["/proc/self/mountinfo"]) {
                for mount in self.own_mounts(&table) {
                    let _ = self.run("umount", &["-l", &mount]);
                }
            }
            if let Err(e) = output(Command::new("umount").arg(self.namespace())) {
                left.push(e.to_string());
            }
        }
        for mount in crate::reap::mounts_below(&self.mountpoint) {
            if let Err(e) = output(Command::new("umount").arg("-l").arg(&mount)) {
                left.push(e.to_string());
            }
        }
        if self.home.exists()
            && let Err(e) = fs::remove_dir_all(&self.home)
        {
            left.push(format!("remove {}: {e}", self.home.display()));
        }
        remove_root_if_empty();
        left
    }
}

/// Binds [`ROOT`] onto itself with private propagation (once), so namespace files can be
/// bind-mounted below it.
fn ensure_private_root() -> Result<()> {
    let root = Path::new(ROOT);
    create_dir(root)?;
    if !is_mount_point(root) {
        output(Command::new("mount").args(["--bind", ROOT, ROOT]))?;
    }
    output(Command::new("mount").args(["--make-private", ROOT]))?;
    Ok(())
}

/// Unmounts and removes [`ROOT`] once no node's directory is left in it.
fn remove_root_if_empty() {
    let root = Path::new(ROOT);
    let empty = fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_none());
    if !empty {
        return;
    }
    if is_mount_point(root) {
        let _ = output(Command::new("umount").arg(root));
    }
    let _ = fs::remove_dir(root);
}

/// Whether something is mounted exactly at `path` (in this process's namespace).
fn is_mount_point(path: &Path) -> bool {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&table).any(|m| Path::new(&m) == path)
}

/// The mount points of a mountinfo table (the kernel writes a space as `\040`).
fn mount_points(table: &str) -> impl Iterator<Item = String> + '_ {
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
}

/// The `fuse.zfs` mount points of a mountinfo table, deepest first.
pub fn fuse_zfs_mounts(table: &str) -> Vec<String> {
    let mut found: Vec<String> = table
        .lines()
        .filter(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, rest)| rest.split(' ').next() == Some("fuse.zfs"))
        })
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found.dedup();
    found
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| NodeZfsError::Io {
        what: format!("mkdir {}", dir.display()),
        source,
    })
}

/// Runs `cmd` and returns its stdout, or an error with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NodeZfsError::Io {
            what: format!("run {cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(NodeZfsError::Failed {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fuse_zfs_mounts_are_dead_mounts_deepest_first() {
        let table = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
47 27 0:40 / /zfs-kstat rw,nosuid - fuse /dev/fuse rw\n\
60 27 254:0 /flk-n2 /flk-n2 rw shared:7 - ext4 /dev/vda rw\n\
61 60 0:50 / /flk-n2 rw shared:7 - fuse.zfs flk-n2 rw\n\
62 61 0:51 / /flk-n2/flocker/my\\040db rw shared:7 - fuse.zfs flk-n2/flocker/my\\040db rw\n\
63 61 0:52 / /flk-n2/flocker rw shared:7 - fuse.zfs flk-n2/flocker rw\n";
        assert_eq!(
            fuse_zfs_mounts(table),
            vec!["/flk-n2/flocker/my db", "/flk-n2/flocker", "/flk-n2"]
        );
    }

    #[test]
    fn a_node_unmounts_only_its_own_pool_s_mounts() {
        let table = "\
61 60 0:50 / /flk-n2 rw shared:7 - fuse.zfs flk-n2 rw\n\
62 61 0:51 / /flk-n2/flocker/db rw shared:7 - fuse.zfs flk-n2/flocker/db rw\n\
70 69 0:60 / /flk-n1 rw shared:8 - fuse.zfs flk-n1 rw\n\
71 70 0:61 / /flk-n1/flocker/db rw shared:8 - fuse.zfs flk-n1/flocker/db rw\n\
80 79 0:70 / /flk-n20 rw shared:9 - fuse.zfs flk-n20 rw\n";
        let zfs = NodeZfs::new("flk-n2", "flk-n2");
        assert_eq!(zfs.own_mounts(table), vec!["/flk-n2/flocker/db", "/flk-n2"]);
    }

    #[test]
    fn a_node_s_namespace_lives_under_the_private_root() {
        let zfs = NodeZfs::new("flk-n2", "flk-n2");
        assert_eq!(zfs.namespace(), Path::new("/run/flocker-zfs/flk-n2/mnt"));
        let cmd = zfs.command("zpool");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["--mount=/run/flocker-zfs/flk-n2/mnt", "zpool"]);
    }
}
