//! Clean-up after a node whose daemons died hard.
//!
//! A `dockerd` killed with SIGKILL leaves its `containerd`, the container shims and the
//! containers themselves running (they are not its children in any way a signal follows),
//! their mounts (overlay roots, network namespace files, bind mounts of the data root) in the
//! node's directory, mounts of the node's pool datasets inside the orphaned containers (so the
//! pool stays busy), and pid files that make the next `dockerd` refuse to start. `reap`
//! removes all of it, from what the node's directory names, so `cluster down` and the next
//! `cluster up` succeed after a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// One process, from `/proc/PID/stat` and `/proc/PID/cmdline`.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub parent: u32,
    pub command_line: String,
}

/// Every process on the host.
pub fn processes() -> Vec<Process> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // The command name may hold spaces and parentheses: fields follow the last ')'.
            let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
            let state = rest.next()?;
            if state == "Z" || state == "X" {
                return None;
            }
            let parent = rest.next()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let command_line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(Process {
                pid,
                parent,
                command_line,
            })
        })
        .collect()
}

/// The processes whose command line names `dir` (the node's `containerd`, its shims, its
/// `dockerd` and agent), with every descendant (the containers under the shims).
pub fn processes_of(all: &[Process], dir: &Path) -> BTreeSet<u32> {
    // With the separator, so node n1 does not claim n10's processes.
    let needle = format!("{}/", dir.display());
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in all {
        children.entry(p.parent).or_default().push(p.pid);
    }
    let mut found = BTreeSet::new();
    let mut stack: Vec<u32> = all
        .iter()
        .filter(|p| p.command_line.contains(&needle))
        .map(|p| p.pid)
        .collect();
    while let Some(pid) = stack.pop() {
        if found.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    found.remove(&std::process::id());
    found
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // The kernel writes a space in a path as \040.
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    found.dedup();
    found
}

/// Kills every process of the node's directory (SIGKILL), waits until they are gone (at
/// most 10 s), unmounts what is left below the directory and removes stale pid files.
/// Returns what it could not clean, for the caller to report.
pub fn reap(dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let victims = processes_of(&processes(), dir);
    for pid in &victims {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !processes_of(&processes(), dir).is_empty() {
        sleep(Duration::from_millis(100));
    }
    for pid in processes_of(&processes(), dir) {
        left.push(format!("process {pid} survived SIGKILL"));
    }
    for mount in mounts_below(dir) {
        let ok = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mount)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            left.push(format!("mount {} could not be unmounted", mount.display()));
        }
    }
    for pidfile in ["docker.pid", "agent.pid", "exec/containerd/containerd.pid"] {
        let path = dir.join(pidfile);
        if path.exists() && fs::remove_file(&path).is_err() {
            left.push(format!("pid file {} could not be removed", path.display()));
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, parent: u32, command_line: &str) -> Process {
        Process {
            pid,
            parent,
            command_line: command_line.into(),
        }
    }

    #[test]
    fn finds_the_shims_and_their_containers_but_not_other_nodes() {
        let all = vec![
            p(1, 0, "/sbin/init"),
            p(
                10,
                1,
                "containerd-shim-runc-v2 -namespace moby -id ab -address /c/n1/exec/containerd/containerd.sock",
            ),
            p(11, 10, "redis-server *:6379"),
            p(12, 11, "redis-rdb-bgsave"),
            p(
                20,
                1,
                "containerd-shim-runc-v2 -namespace moby -id cd -address /c/n2/exec/containerd/containerd.sock",
            ),
            p(21, 20, "redis-server *:6379"),
            p(
                30,
                1,
                "dockerd --data-root /c/n1/docker --exec-root /c/n1/exec",
            ),
            p(
                40,
                1,
                "dockerd --data-root /c/n10/docker --exec-root /c/n10/exec",
            ),
        ];
        assert_eq!(
            processes_of(&all, Path::new("/c/n1")),
            BTreeSet::from([10, 11, 12, 30])
        );
    }
}
