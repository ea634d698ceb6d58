//! A compose service's `volumes:` (short `SRC:DST:MODE` strings and the long form) and its
//! `x-flocker-node-local` list.
//!
//! - A named volume (`db:/var/lib/mysql`), an anonymous one (`/data`) and, as Flocker has
//!   always read it, a read-write host path (`./data:/data`, the host side unused) are volumes
//!   Flocker owns and moves with the application. One such volume is the application's main
//!   volume, named as the application; with several, each is a further volume `APP.KEY`,
//!   KEY being the volume's name or, for the others, its container path (`/var/www/html`
//!   gives `var-www-html`), so the order of the list never matters.
//! - A read-only host path is mounted from the node itself, only if the service lists it
//!   under `x-flocker-node-local` (a promise that every node has it). Anything else naming
//!   a host path read-only is refused: no other node has the operator's files.
//! - `type: tmpfs` is an in-memory mount, as the service's `tmpfs:`.

use std::collections::BTreeMap;

use flocker_wire::VolumeSpec;
use flocker_wire::container::node_local_bind_problem;

use super::application::further_volume;
use super::fields::{
    Sink, check_keys, expect_list, expect_map, find, join, mountpoint_problem, size, string,
};
use super::yaml::{Entry, Mark, Node, Resolved};

/// What a service's volumes resolve to.
#[derive(Debug, Default)]
pub struct ServiceVolumes {
    /// The main volume, when the service has exactly one.
    pub main: Option<VolumeSpec>,
    /// With several: every one, by volume name `APP.KEY`.
    pub further: BTreeMap<String, VolumeSpec>,
    /// Read-only host paths from `x-flocker-node-local`: host path -> container path.
    pub node_local: BTreeMap<String, String>,
    /// `type: tmpfs` mounts: container path -> options.
    pub tmpfs: BTreeMap<String, String>,
}

/// One entry of `volumes:`, read but not yet named.
struct Mount {
    source: Option<String>,
    target: String,
    read_only: bool,
    tmpfs_size: Option<u64>,
    kind: MountKind,
    mark: Mark,
    path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MountKind {
    Volume,
    Bind,
    Tmpfs,
}

/// Reads `volumes` and `x-flocker-node-local` of the service `service`.
pub fn service_volumes(sink: &mut Sink<'_>, entries: &[Entry], service: &str) -> ServiceVolumes {
    let mut out = ServiceVolumes::default();
    let node_local = find(entries, "x-flocker-node-local")
        .map(|e| node_local_paths(sink, &e.value, &join(service, "x-flocker-node-local")))
        .unwrap_or_default();
    let Some(entry) = find(entries, "volumes") else {
        return out;
    };
    let path = join(service, "volumes");
    let Some(items) = expect_list(sink, &entry.value, &path, "a list of volumes") else {
        return out;
    };
    let mut owned: Vec<Mount> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(mount) = read_mount(sink, item, item_path) else {
            continue;
        };
        match classify(&mount, &node_local) {
            Use::Owned => owned.push(mount),
            Use::NodeLocal(host) => {
                if let Some(problem) = node_local_bind_problem(&host, &mount.target) {
                    sink.error(mount.mark, mount.path, problem);
                } else {
                    out.node_local.insert(host, mount.target);
                }
            }
            Use::Tmpfs => {
                let options = mount
                    .tmpfs_size
                    .map(|bytes| format!("size={bytes}"))
                    .unwrap_or_default();
                out.tmpfs.insert(mount.target, options);
            }
            Use::Refused(reason) => sink.error(mount.mark, mount.path, reason),
        }
    }
    name_owned(sink, service, owned, &mut out);
    out
}

/// What becomes of one mount.
enum Use {
    Owned,
    NodeLocal(String),
    Tmpfs,
    Refused(String),
}

fn classify(mount: &Mount, node_local: &[String]) -> Use {
    if mount.kind == MountKind::Tmpfs {
        return Use::Tmpfs;
    }
    let host_path = mount
        .source
        .as_deref()
        .filter(|s| mount.kind == MountKind::Bind || is_path(s));
    if let Some(host) = host_path
        && host.ends_with("docker.sock")
        && let Some(problem) = node_local_bind_problem(host, &mount.target)
    {
        return Use::Refused(problem);
    }
    match (host_path, mount.read_only) {
        (Some(host), true) if host.starts_with('/') && node_local.iter().any(|p| p == host) => {
            Use::NodeLocal(host.to_owned())
        }
        (Some(host), true) if host.starts_with('/') => Use::Refused(format!(
            "{host:?} cannot be honoured: other nodes may not have this host path and its content \
             does not move with the application; if every node has it, list it under `x-flocker-node-local` \
             (it is then mounted read-only from each node)"
        )),
        (Some(host), true) => Use::Refused(format!(
            "{host:?} cannot be honoured: it is a path on the machine running flockerctl, which the \
             nodes do not have; ship a file with `configs:`, or name an absolute path that every node has and list \
             it under `x-flocker-node-local`"
        )),
        (None, true) => Use::Refused(format!(
            "a read-only volume cannot be honoured: {:?} would stay empty; volumes are read-write",
            mount.target
        )),
        (_, false) => Use::Owned,
    }
}

/// A compose source that names a host path rather than a volume.
fn is_path(source: &str) -> bool {
    source.starts_with(['/', '.', '~'])
}

/// Names the volumes Flocker owns: one is the main volume, several are `APP.KEY` each.
fn name_owned(sink: &mut Sink<'_>, service: &str, owned: Vec<Mount>, out: &mut ServiceVolumes) {
    let single = owned.len() == 1;
    let mut mountpoints = std::collections::BTreeSet::new();
    for mount in owned {
        if let Some(problem) = mountpoint_problem(&mount.target) {
            sink.error(mount.mark, mount.path, problem);
            continue;
        }
        if !mountpoints.insert(mount.target.clone()) {
            sink.error(
                mount.mark,
                mount.path,
                format!("{:?} is mounted twice", mount.target),
            );
            continue;
        }
        let spec = VolumeSpec {
            mountpoint: mount.target.clone(),
            maximum_size: None,
        };
        if single {
            out.main = Some(spec);
            continue;
        }
        let key = match mount.source.as_deref().filter(|s| !is_path(s)) {
            Some(name) => name.to_owned(),
            None => key_of_path(&mount.target),
        };
        let Some(volume) = further_volume(sink, service, &key, mount.mark, &mount.path) else {
            continue;
        };
        if out.further.contains_key(&volume) {
            sink.error(
                mount.mark,
                mount.path,
                format!(
                    "a second volume would be named {volume:?}; give one of them a volume name"
                ),
            );
            continue;
        }
        out.further.insert(volume, spec);
    }
}

/// The volume key of an unnamed volume: its container path as a name
/// (`/var/www/html` -> `var-www-html`).
pub fn key_of_path(target: &str) -> String {
    let mapped: String = target
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '.') => c,
            _ => '-',
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "root".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn read_mount(sink: &mut Sink<'_>, node: &Node, path: String) -> Option<Mount> {
    if node.as_str().is_some() {
        short_mount(sink, node, path)
    } else {
        long_mount(sink, node, path)
    }
}

/// `DST`, `SRC:DST` or `SRC:DST:MODE` with MODE a comma list of `rw`, `ro` and hints that
/// change nothing here (`z`, `Z`, `nocopy`, `cached`, `delegated`, `consistent`).
fn short_mount(sink: &mut Sink<'_>, node: &Node, path: String) -> Option<Mount> {
    let text = string(
        sink,
        node,
        &path,
        "a \"/container/path\" or \"SOURCE:/container\" string",
    )?;
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => (None, *target, ""),
        [source, target] => (Some(*source), *target, ""),
        [source, target, mode] => (Some(*source), *target, *mode),
        _ => {
            sink.error(node.mark, path, format!("{text:?} is not a volume spec"));
            return None;
        }
    };
    let mut read_only = false;
    for option in mode.split(',').filter(|o| !o.is_empty()) {
        match option {
            "ro" => read_only = true,
            "rw" | "z" | "Z" | "nocopy" | "cached" | "delegated" | "consistent" => {}
            other => {
                sink.error(
                    node.mark,
                    path,
                    format!("{text:?}: the volume mode {other:?} cannot be honoured"),
                );
                return None;
            }
        }
    }
    Some(Mount {
        source: source.map(str::to_owned),
        target: target.to_owned(),
        read_only,
        tmpfs_size: None,
        kind: if source.is_some_and(is_path) {
            MountKind::Bind
        } else {
            MountKind::Volume
        },
        mark: node.mark,
        path,
    })
}

/// The long form: `type`, `source`, `target`, `read_only`, and per type `volume`, `bind` or
/// `tmpfs` options.
fn long_mount(sink: &mut Sink<'_>, node: &Node, path: String) -> Option<Mount> {
    let fields = expect_map(
        sink,
        node,
        &path,
        "a volume string or a mapping with `type` and `target`",
    )?;
    check_keys(
        sink,
        fields,
        &[
            "type",
            "source",
            "target",
            "read_only",
            "volume",
            "bind",
            "tmpfs",
            "consistency",
        ],
        &path,
    );
    let kind = match find(fields, "type") {
        None => MountKind::Volume,
        Some(e) => match string(
            sink,
            &e.value,
            &join(&path, "type"),
            "volume, bind or tmpfs",
        )? {
            "volume" => MountKind::Volume,
            "bind" => MountKind::Bind,
            "tmpfs" => MountKind::Tmpfs,
            other => {
                sink.error(
                    e.value.mark,
                    join(&path, "type"),
                    format!("mount type {other:?} cannot be honoured; use volume, bind or tmpfs"),
                );
                return None;
            }
        },
    };
    let Some(target) = find(fields, "target") else {
        sink.error(
            node.mark,
            path,
            "missing `target`, the path inside the container",
        );
        return None;
    };
    let target = string(
        sink,
        &target.value,
        &join(&path, "target"),
        "an absolute path",
    )?
    .to_owned();
    let source = match find(fields, "source") {
        Some(e) => Some(
            string(
                sink,
                &e.value,
                &join(&path, "source"),
                "a volume name or host path",
            )?
            .to_owned(),
        ),
        None => None,
    };
    let read_only = match find(fields, "read_only") {
        Some(e) => match e.value.as_scalar().map(|s| s.resolve()) {
            Some(Resolved::Bool(b)) => b,
            _ => {
                sink.error(
                    e.value.mark,
                    join(&path, "read_only"),
                    format!("expected true or false, found {}", e.value.describe()),
                );
                return None;
            }
        },
        None => false,
    };
    let tmpfs_size = match find(fields, "tmpfs") {
        Some(e) => {
            let tmpfs_path = join(&path, "tmpfs");
            let options = expect_map(sink, &e.value, &tmpfs_path, "a mapping with `size`")?;
            check_keys(sink, options, &["size", "mode"], &tmpfs_path);
            match find(options, "size") {
                Some(s) => Some(size(sink, &s.value, &join(&tmpfs_path, "size"))?),
                None => None,
            }
        }
        None => None,
    };
    if kind == MountKind::Bind && source.is_none() {
        sink.error(
            node.mark,
            path,
            "a bind mount needs `source`, the host path",
        );
        return None;
    }
    Some(Mount {
        source,
        target,
        read_only,
        tmpfs_size,
        kind,
        mark: node.mark,
        path,
    })
}

/// `x-flocker-node-local: [/etc/ssl/certs, ...]`: absolute host paths every node has.
fn node_local_paths(sink: &mut Sink<'_>, node: &Node, path: &str) -> Vec<String> {
    let Some(items) = expect_list(sink, node, path, "a list of absolute host paths") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(text) = string(sink, item, &item_path, "an absolute host path") else {
            continue;
        };
        if !text.starts_with('/') {
            sink.error(
                item.mark,
                item_path,
                format!("{text:?} is not an absolute path"),
            );
            continue;
        }
        out.push(text.to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::key_of_path;

    #[test]
    fn container_paths_become_volume_keys() {
        assert_eq!(key_of_path("/var/www/html"), "var-www-html");
        assert_eq!(key_of_path("/Data/My Files/"), "data-my-files");
        assert_eq!(key_of_path("/"), "root");
    }
}
