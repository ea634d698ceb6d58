//! Small Docker images built from host binaries, since no registry is reachable: a rootfs
//! directory holding the binaries and the shared libraries `ldd` names, packed with `tar`
//! and loaded with `docker import`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// The Redis image the examples use: Debian's `redis-server` plus busybox for a shell.
pub const REDIS_IMAGE: &str = "redis-flocker:latest";
/// A busybox image whose default command serves `/www` over HTTP on port 80.
pub const BUSYBOX_IMAGE: &str = "busybox-flocker:latest";

/// A UDP echo server on port 5353: each datagram comes back to its sender, from the port it
/// was sent to (socat, one short-lived child per datagram).
pub const UDP_ECHO_IMAGE: &str = "udp-echo-flocker:latest";

/// Builds the images into the Docker daemon at `docker_host` (`unix:///...`), unless it
/// already has them.
pub fn ensure_images(docker_host: &str) -> Result<()> {
    if !has_image(docker_host, BUSYBOX_IMAGE)? {
        import(
            docker_host,
            &["/bin/busybox"],
            &["CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]"],
            BUSYBOX_IMAGE,
        )?;
    }
    if !has_image(docker_host, UDP_ECHO_IMAGE)? {
        import(
            docker_host,
            &["/bin/busybox", "/usr/bin/socat"],
            &["CMD [\"/usr/bin/socat\", \"UDP-RECVFROM:5353,fork\", \"EXEC:/bin/cat\"]"],
            UDP_ECHO_IMAGE,
        )?;
    }
    if !has_image(docker_host, REDIS_IMAGE)? {
        import(
            docker_host,
            &["/bin/busybox", "/usr/bin/redis-server"],
            &[concat!(
                "CMD [\"/usr/bin/redis-server\", \"--dir\", \"/data\", \"--appendonly\", \"yes\", ",
                "\"--appendfsync\", \"always\", \"--protected-mode\", \"no\", \"--bind\", \"0.0.0.0\"]"
            )],
            REDIS_IMAGE,
        )?;
    }
    Ok(())
}

fn has_image(docker_host: &str, image: &str) -> Result<bool> {
    let out = Command::new("docker")
        .args(["-H", docker_host, "image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run docker image inspect")?;
    Ok(out.success())
}

/// Packs `binaries` (and their libraries) into a rootfs and imports it as `tag`.
fn import(docker_host: &str, binaries: &[&str], changes: &[&str], tag: &str) -> Result<()> {
    let root = tempfile::tempdir().context("rootfs dir")?;
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for binary in binaries {
        files.insert(PathBuf::from(binary));
        files.extend(libraries(Path::new(binary))?);
    }
    for file in &files {
        let relative = file.strip_prefix("/").unwrap_or(file);
        let dest = root.path().join(relative);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(file, &dest).with_context(|| format!("copy {}", file.display()))?;
    }
    // busybox applets a shell user expects, plus the directories images conventionally have.
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    for applet in [
        "sh",
        "ls",
        "cat",
        "echo",
        "sleep",
        "nc",
        "wget",
        "mkdir",
        "sha256sum",
    ] {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)?;
        }
    }
    for dir in ["data", "www", "tmp", "etc"] {
        std::fs::create_dir_all(root.path().join(dir))?;
    }
    std::fs::write(root.path().join("www/index.html"), "flocker\n")?;
    // As distribution images have it: names are looked up in /etc/hosts first (glibc's
    // default without this file asks DNS first and stops at its "not found").
    std::fs::write(root.path().join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    let tar = Command::new("tar")
        .args(["-C"])
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("run tar")?;
    let mut import = Command::new("docker");
    import.args(["-H", docker_host, "import"]);
    for change in changes {
        import.args(["--change", change]);
    }
    let status = import
        .args(["-", tag])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()
        .context("run docker import")?;
    ensure!(status.success(), "docker import of {tag} failed: {status}");
    Ok(())
}

/// The shared libraries `ldd` lists for a binary (none for a static one).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || out.stderr.starts_with(b"\tnot a dynamic") {
            return Ok(vec![]);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("not a dynamic executable") {
            return Ok(vec![]);
        }
        bail!("ldd {} failed: {stderr}", binary.display());
    }
    Ok(text
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}
