//! The Debian packages the tests and benchmarks need, installed with apt-get when missing.

use std::process::Command;

use anyhow::Result;

/// Every system package the workspace's build, tests and benchmarks use.
pub const PACKAGES: &[&str] = &[
    // building: nftnl's C libraries, the eBPF programs
    "pkg-config",
    "libnftnl-dev",
    "libmnl-dev",
    "clang",
    "llvm",
    "libbpf-dev",
    // real components the tests drive
    "docker.io",
    "zfs-fuse",
    "btrfs-progs",
    "nftables",
    "iptables",
    "iproute2",
    "conntrack",
    "busybox-static",
    "redis-server",
    // peers the benchmarks compare against
    "socat",
    "mbuffer",
    "zstd",
    "iperf3",
    "openssh-server",
    "openssh-client",
];

/// Installs whatever is missing; does nothing (and needs no network) when all are present.
pub fn install() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}
