//! ZFS pools on files, served by the zfs-fuse daemon (no kernel module here).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let pool = flocker_e2e::zfs::TestPool::create("demo", 128)?; // starts zfs-fuse if needed
//! pool.zfs(&["create", &format!("{}/vol", pool.name())])?;
//! // ... `zfs`/`zpool` against pool.name() ...
//! # Ok(()) } // dropping `pool` destroys it and deletes its backing file
//! ```
//!
//! zfs-fuse serves pool version 23: no resume tokens (`recv -s`), no `send -c`. Datasets are
//! mounted through FUSE under `/POOL/...` unless a mountpoint is set.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Runs `zfs`/`zpool` (or anything) and returns stdout, failing with stderr on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn daemon_answers() -> bool {
    Command::new("zpool")
        .arg("list")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where the daemon records its pid. zfs-fuse refuses to start (exit 1, a message only to
/// syslog) while this file exists and is newer than the boot, even when the process it names
/// is long gone, so a daemon that was killed blocks every later start.
const PIDFILE: &str = "/run/zfs-fuse.pid";

/// Whether a zfs-fuse process is alive (perhaps still starting, perhaps still exiting).
fn daemon_process_alive() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "zfs-fuse")
    })
}

/// Starts the daemon, which forks into the background by itself; the caller has seen no
/// zfs-fuse process alive, so a pidfile left behind is stale and goes first. Returns what the
/// daemon printed when it exited with an error (which may only mean that another process
/// started it first).
fn start_daemon() -> Option<String> {
    if std::path::Path::new(PIDFILE).exists() {
        eprintln!("zfs: removing stale {PIDFILE} (no zfs-fuse process is running)");
        let _ = std::fs::remove_file(PIDFILE);
    }
    crate::keep_descriptors_from_daemons();
    match Command::new("zfs-fuse")
        .args(["--pidfile", PIDFILE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "zfs-fuse exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run zfs-fuse: {e}")),
    }
}

/// Makes sure the zfs-fuse daemon is running, starting it (daemonized, so it outlives the
/// test) if `zpool list` gets no answer. Idempotent and safe to race: a second daemon refuses
/// to start and the first one answers. A daemon that is still exiting when this is called
/// makes a start fail, so the start is tried again while no zfs-fuse process runs.
pub fn ensure_daemon() -> anyhow::Result<()> {
    let mut last_failure = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if daemon_answers() {
            return Ok(());
        }
        if !daemon_process_alive() {
            last_failure = start_daemon();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "zfs-fuse did not come up within 30 s ({}); is the zfs-fuse package installed?",
        last_failure
            .as_deref()
            .unwrap_or("the daemon started but never answered")
    )
}

/// A pool on a sparse file, destroyed (with everything in it) on drop.
#[derive(Debug)]
pub struct TestPool {
    name: String,
    file: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestPool {
    /// Creates pool `PREFIX-PID-N` on a `size_mib` MiB file in the temp dir. zfs-fuse needs
    /// at least 64 MiB per pool.
    pub fn create(prefix: &str, size_mib: u64) -> anyhow::Result<Self> {
        ensure_daemon()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let file = std::env::temp_dir().join(format!("flocker-zpool-{name}.img"));
        let f =
            std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
        f.set_len(size_mib << 20)
            .with_context(|| format!("sizing {}", file.display()))?;
        drop(f);
        let path = file.to_string_lossy().into_owned();
        // Mount under a private directory so pools of concurrent tests do not collide in /.
        let mountpoint = format!("/tmp/flocker-zfs-mnt/{name}");
        if let Err(e) = run("zpool", &["create", "-m", &mountpoint, &name, &path]) {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        Ok(Self { name, file })
    }

    /// The pool's name (also its root dataset).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `zfs ARGS...`.
    pub fn zfs(&self, args: &[&str]) -> anyhow::Result<String> {
        run("zfs", args)
    }

    /// Whether `dataset` (a filesystem or `fs@snap`) exists.
    pub fn exists(&self, dataset: &str) -> bool {
        run("zfs", &["list", "-H", "-t", "all", "-o", "name", dataset]).is_ok()
    }

    /// Mountpoint of a mounted filesystem.
    pub fn mountpoint(&self, fs: &str) -> anyhow::Result<PathBuf> {
        let out = run("zfs", &["get", "-H", "-o", "value", "mountpoint", fs])?;
        Ok(PathBuf::from(out.trim()))
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        // Retry: zfs-fuse can report the pool busy for a moment after a receive or unmount.
        for _ in 0..20 {
            match run("zpool", &["destroy", "-f", &self.name]) {
                Ok(_) => break,
                Err(e) if e.to_string().contains("no such pool") => break,
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(format!("/tmp/flocker-zfs-mnt/{}", self.name));
    }
}
