//! Per-container hosts files: how every container resolves service names (and its link
//! aliases) to service addresses (`flocker_wire::services`).
//!
//! The agent keeps one file per container under its state directory and bind-mounts it at
//! `/etc/hosts` when it creates the container. When the node's service routes change (every
//! `FollowRoutes`, `SetRoutes`, and after a start) it rewrites the files of its running
//! containers **in place** (truncate and write, never rename: a bind mount holds the inode),
//! so adding, moving or removing an application never restarts another one. The name list is
//! therefore not part of the container's configuration.
//!
//! A reader can see the file empty for the moment between truncate and write; the file is
//! small (one line per service) and written with one `write`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use flocker_wire::services::{hosts_entries, hosts_file};
use flocker_wire::{Application, Route, ServiceRoute};

/// Errors writing hosts files.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("hosts file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the hosts files live: one per container name.
#[derive(Debug, Clone)]
pub struct HostsFiles {
    dir: PathBuf,
}

/// Inside the container.
pub const CONTAINER_PATH: &str = "/etc/hosts";

impl HostsFiles {
    pub fn new(dir: PathBuf) -> HostsFiles {
        HostsFiles { dir }
    }

    pub fn path(&self, container: &str) -> PathBuf {
        self.dir.join(container)
    }

    /// Writes the file of `container` in place, creating it (and the directory) when absent.
    pub fn write(&self, container: &str, content: &str) -> Result<(), HostsError> {
        let path = self.path(container);
        let io = |source| HostsError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        file.write_all(content.as_bytes()).map_err(io)?;
        Ok(())
    }

    /// Rewrites the file of `container` only if it has one (containers created before
    /// hosts files existed keep Docker's).
    pub fn rewrite(&self, container: &str, content: &str) -> Result<bool, HostsError> {
        if !self.path(container).exists() {
            return Ok(false);
        }
        self.write(container, content).map(|()| true)
    }

    pub fn remove(&self, container: &str) -> Result<(), HostsError> {
        let path = self.path(container);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(HostsError::Io { path, source })
            }
            _ => Ok(()),
        }
    }
}

/// The hosts file of a container of `app`: its own address and name when known, its
/// `extra_hosts`, every service of the node's service routes by name, and `app`'s link
/// aliases (a link names an external port; `routes` says which application publishes it).
pub fn content(
    app: &Application,
    services: &[ServiceRoute],
    routes: &[Route],
    own: Option<(Ipv4Addr, &str)>,
) -> String {
    let addresses: BTreeMap<String, Ipv4Addr> = services
        .iter()
        .map(|s| (s.application.clone(), s.address))
        .collect();
    let entries = hosts_entries(app, &addresses, |protocol, port| {
        routes
            .iter()
            .find(|r| r.external_port == port && r.protocol == protocol)
            .map(|r| r.application.clone())
    });
    hosts_file(own, &app.container.extra_hosts, &entries)
}

/// The hostname a running container's process sees, read through its root (the agent runs
/// on the host, as root).
pub fn container_hostname(pid: u32) -> Option<String> {
    let path = Path::new("/proc")
        .join(pid.to_string())
        .join("root/etc/hostname");
    let text = std::fs::read_to_string(path).ok()?;
    let name = text.trim();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flocker_wire::{Link, Protocol, RouteTarget};

    fn app(name: &str) -> Application {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "image": {"repository": "busybox", "tag": "latest"},
        }))
        .expect("app")
    }

    #[test]
    fn rewriting_keeps_the_inode_a_bind_mount_holds() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let files = HostsFiles::new(dir.path().join("hosts"));
        assert!(
            !files.rewrite("c", "x").expect("rewrite"),
            "no file, nothing written"
        );
        files.write("c", "first version, longer\n").expect("write");
        let inode = std::fs::metadata(files.path("c")).expect("meta").ino();
        assert!(files.rewrite("c", "second\n").expect("rewrite"));
        let meta = std::fs::metadata(files.path("c")).expect("meta");
        assert_eq!(meta.ino(), inode);
        assert_eq!(
            std::fs::read_to_string(files.path("c")).expect("read"),
            "second\n"
        );
        files.remove("c").expect("remove");
        files.remove("c").expect("absent is fine");
    }

    #[test]
    fn content_names_services_and_aliases() {
        let mut web = app("web");
        web.links.push(Link {
            local_port: 6379,
            remote_port: 16379,
            alias: "redis".into(),
            protocol: Protocol::Tcp,
        });
        let vip = Ipv4Addr::new(198, 19, 130, 1);
        let services = vec![ServiceRoute {
            application: "cache".into(),
            address: vip,
            port: 6379,
            protocol: Protocol::Tcp,
            relay: Some(30001),
            target: RouteTarget::Node {
                address: "198.18.0.2".into(),
            },
        }];
        let routes = vec![Route {
            external_port: 16379,
            protocol: Protocol::Tcp,
            application: "cache".into(),
            target: RouteTarget::Node {
                address: "198.18.0.2".into(),
            },
        }];
        let text = content(
            &web,
            &services,
            &routes,
            Some((Ipv4Addr::new(172, 17, 0, 3), "abcdef")),
        );
        assert!(text.contains("198.19.130.1\tcache redis\n"), "{text}");
        assert!(text.contains("172.17.0.3\tabcdef\n"), "{text}");
        let plain = content(&app("other"), &services, &routes, None);
        assert!(plain.contains("198.19.130.1\tcache\n"), "{plain}");
    }
}
