//! Network namespaces for privileged tests: named namespaces (`ip netns`), veth pairs, a
//! bridge, and running a closure or a command inside a namespace. Everything created is
//! removed by `Drop` guards, also when a test fails.
//!
//! Addresses come from 198.18.0.0/15 only (RFC 2544 benchmarking space), inside namespaces
//! the test created, so no traffic ever reaches a real network.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use flocker_e2e::netns::Netns;
//! let a = Netns::create("demo-a")?;
//! let b = Netns::create("demo-b")?;
//! flocker_e2e::netns::veth(&a, "eth0", &b, "eth0")?;
//! a.ip(&["addr", "add", "198.18.9.1/24", "dev", "eth0"])?;
//! a.ip(&["link", "set", "eth0", "up"])?;
//! let bound = a.run(|| std::net::TcpListener::bind("198.18.9.1:0").is_ok())?;
//! # Ok(()) }
//! ```

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, bail};

/// A named network namespace (`/var/run/netns/NAME`), deleted on drop. Names are prefixed with
/// the test process id so parallel test binaries do not collide.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn run_checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

impl Netns {
    /// Creates namespace `flk<pid>-<suffix>` with its loopback up.
    pub fn create(suffix: &str) -> anyhow::Result<Netns> {
        let name = format!("flk{}-{suffix}", std::process::id());
        // A leftover from a crashed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The full namespace name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))?;
        Ok(())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(move || std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// A command that runs inside the namespace. Uses `nsenter --net`, not `ip netns exec`,
    /// which remounts `/sys` and so hides the cgroup hierarchy.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg(program);
        cmd
    }

    /// A command that runs inside the namespace and inside the cgroup v2 directory `cgroup`
    /// (it moves itself there before `exec`, so the program runs in it from its first
    /// instruction).
    pub fn command_in_cgroup(&self, cgroup: &Path, program: &str) -> Command {
        let mut cmd = self.command("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(cgroup)
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it opens stay in the
    /// namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("closure panicked in namespace"))?
        })
    }

    /// Spawns a thread that stays in the namespace, for servers.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.name))?;
        Ok(std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes every interface inside it, veth peers included.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Creates a veth pair `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A bridge `br0` inside its own namespace, standing in for the switch of a LAN.
#[derive(Debug)]
pub struct Switch {
    ns: Netns,
    ports: usize,
}

impl Switch {
    pub fn create(suffix: &str) -> anyhow::Result<Switch> {
        let ns = Netns::create(suffix)?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Switch { ns, ports: 0 })
    }

    /// Plugs `host` in: interface `ifname` in `host` with `cidr` (e.g. `198.18.0.1/24`).
    pub fn plug(&mut self, host: &Netns, ifname: &str, cidr: &str) -> anyhow::Result<()> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        veth(&self.ns, &port, host, ifname)?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        host.ip(&["addr", "add", cidr, "dev", ifname])?;
        Ok(())
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }
}

/// A cgroup v2 directory, removed on drop (its processes must have
/// exited by then).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `flk<pid>-SUFFIX` in the cgroup v2 hierarchy (wherever `/proc/self/mounts` says
    /// it is mounted: `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub fn create(suffix: &str) -> anyhow::Result<Cgroup> {
        let path = cgroup2_root()?.join(format!("flk{}-{suffix}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the cgroup v2 hierarchy is mounted, as `/proc/self/mounts` says.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let Some(root) = mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    }) else {
        bail!("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)");
    };
    Ok(root)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
