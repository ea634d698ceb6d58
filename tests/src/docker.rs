//! `dockerd` instances inside network namespaces, for tests that need real containers.
//!
//! Each [`Dockerd`] has its own data root, exec root, socket, pidfile and bridge subnet, and
//! is started with `nsenter --net=/var/run/netns/NAME` (not `ip netns exec`, which remounts
//! `/sys` and hides the cgroup hierarchy from dockerd). Dropping it removes its containers,
//! stops the daemon and deletes its files, also when the test failed.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use flocker_e2e::{docker::Dockerd, netns::Netns};
//! let ns = Netns::create("demo")?;
//! let docker = Dockerd::start(&ns, "demo", "198.19.200.1/24")?;
//! docker.ensure_images()?; // busybox-flocker:latest, redis-flocker:latest
//! docker.docker(&["run", "--rm", flocker_e2e::images::BUSYBOX_IMAGE, "true"])?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// How long dockerd gets to answer after start, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running dockerd, stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Dockerd {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    /// `/var/run/netns/NAME` of the namespace it runs in.
    netns: PathBuf,
    bip: String,
}

impl Dockerd {
    /// Starts a dockerd in `netns`, its files under `/tmp/flkd<pid>-NAME` (short: the socket
    /// path must fit in a `sockaddr_un`), its default bridge on `bip` (e.g. `198.19.7.1/24`).
    pub fn start(netns: &Netns, name: &str, bip: &str) -> Result<Dockerd> {
        let dir = PathBuf::from(format!("/tmp/flkd{}-{name}", std::process::id()));
        if dir.exists() {
            unmount_below(&dir);
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("remove stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("docker.sock");
        let mut dockerd = Dockerd {
            child: None,
            dir,
            socket,
            netns: netns.path(),
            bip: bip.to_owned(),
        };
        dockerd.spawn()?;
        Ok(dockerd)
    }

    /// Starts the daemon the way a real host does: forwarding is left to dockerd, which turns
    /// it on itself and then sets the iptables `FORWARD` policy to `DROP` (only what Docker
    /// publishes passes), and creates `DOCKER-USER`.
    fn spawn(&mut self) -> Result<()> {
        crate::keep_descriptors_from_daemons();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .context("dockerd log")?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("--bip")
            .arg(&self.bip)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start dockerd (is docker.io installed?)")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Stops dockerd (SIGTERM, as a service manager would) and starts it again; dockerd
    /// rewrites its iptables chains on start. Containers stay (not removed), as on a host.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// SIGTERM, then SIGKILL after `STOP_TIMEOUT`.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("dockerd exited at start ({status}): {}", self.log_tail());
            }
            if self.socket.exists() && self.docker(&["version"]).is_ok() {
                return Ok(());
            }
            sleep(Duration::from_millis(250));
        }
        bail!(
            "dockerd did not answer within {START_TIMEOUT:?}: {}",
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `unix:///...` for `docker -H` and `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The socket path (what the agent's `--docker-host` takes, with or without `unix://`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `docker -H SOCKET ARGS...` and returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run docker")?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the harness images (`images::BUSYBOX_IMAGE`, `images::REDIS_IMAGE`) here.
    pub fn ensure_images(&self) -> Result<()> {
        crate::images::ensure_images(&self.host())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        self.stop();
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts everything mounted below `dir` (overlays and netns files a killed dockerd left
/// behind), deepest first, so the directory can be removed.
fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    targets.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for target in targets {
        let _ = Command::new("umount").arg("-l").arg(target).output();
    }
}
