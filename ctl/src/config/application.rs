//! Flocker's native application config: `version: 1` and `applications:`, each application
//! a mapping with the keys Flocker accepted.

use std::collections::BTreeMap;

use flocker_wire::{Application, Link, PortMap, Protocol, RestartPolicy, VolumeSpec};

use super::ApplicationConfig;
use super::fields::{
    PortClaim, Sink, alias_problem, application_name_problem, check_external_ports, check_keys,
    env_name_problem, env_value, expect_list, expect_map, find, join, mountpoint_problem, port,
    positive_int, protocol, require, size, string,
};
use super::image::parse_image;
use super::settings::{
    PendingDependency, SETTINGS_KEYS, depends_on, parse_settings, resolve_dependencies,
};
use super::yaml::{Mark, Node};

pub const APPLICATION_KEYS: &[&str] = &[
    "image",
    "ports",
    "volume",
    "volumes",
    "environment",
    "links",
    "mem_limit",
    "cpu_shares",
    "restart_policy",
    "depends_on",
    "health_check",
];

/// Validates a native config whose root is a mapping that has an `applications` key.
pub fn parse_native(sink: &mut Sink<'_>, root: &Node) -> ApplicationConfig {
    let mut config = ApplicationConfig::default();
    let Some(top) = expect_map(
        sink,
        root,
        "",
        "a mapping with `version: 1` and `applications:`",
    ) else {
        return config;
    };
    check_keys(sink, top, &["version", "applications"], "");
    check_version(sink, top, root.mark);
    let Some(apps) = require(sink, top, "applications", root.mark, "") else {
        return config;
    };
    let Some(entries) = expect_map(
        sink,
        &apps.value,
        "applications",
        "a mapping from application names to their settings",
    ) else {
        return config;
    };
    let mut claims = Vec::new();
    let mut dependencies = Vec::new();
    for entry in entries {
        config.defined.insert(entry.key.clone(), entry.key_mark);
        if let Some(app) = parse_one(
            sink,
            &entry.key,
            entry.key_mark,
            &entry.value,
            &mut claims,
            &mut dependencies,
        ) {
            config.applications.insert(entry.key.clone(), app);
        }
    }
    check_external_ports(sink, &claims);
    for (name, targets) in resolve_dependencies(sink, dependencies, &config.defined) {
        if let Some(app) = config.applications.get_mut(&name) {
            app.depends_on = targets;
        }
    }
    config
}

/// `version: 1` is required in both native files; it is how Flocker told its formats apart.
pub fn check_version(sink: &mut Sink<'_>, top: &[super::yaml::Entry], root_mark: Mark) {
    if let Some(version) = require(sink, top, "version", root_mark, "")
        && version.value.as_int() != Some(1)
    {
        sink.error(
            version.value.mark,
            "version",
            format!("expected the integer 1, found {}", version.value.describe()),
        );
    }
}

fn parse_one(
    sink: &mut Sink<'_>,
    name: &str,
    key_mark: Mark,
    node: &Node,
    claims: &mut Vec<PortClaim>,
    dependencies: &mut Vec<PendingDependency>,
) -> Option<Application> {
    let before = sink.diagnostics.len();
    if let Some(problem) = application_name_problem(name) {
        sink.error(key_mark, name, problem);
    }
    let entries = expect_map(sink, node, name, "a mapping of application settings")?;
    let allowed: Vec<&str> = APPLICATION_KEYS
        .iter()
        .chain(SETTINGS_KEYS)
        .copied()
        .collect();
    check_keys(sink, entries, &allowed, name);
    let container = parse_settings(sink, entries, name);
    if let Some(e) = find(entries, "depends_on") {
        depends_on(sink, &e.value, name, dependencies);
    }

    let image = require(sink, entries, "image", key_mark, name).and_then(|e| {
        let path = join(name, "image");
        let text = string(
            sink,
            &e.value,
            &path,
            "an image reference such as \"redis:7\"",
        )?;
        parse_image(text)
            .map_err(|err| sink.error(e.value.mark, path, err.to_string()))
            .ok()
    });

    let mut ports = Vec::new();
    if let Some(e) = find(entries, "ports") {
        let path = join(name, "ports");
        for (i, item) in expect_list(sink, &e.value, &path, "a list of {internal, external}")
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let item_path = format!("{path}[{i}]");
            let Some(fields) = expect_map(
                sink,
                item,
                &item_path,
                "a mapping with `internal` and `external`",
            ) else {
                continue;
            };
            check_keys(
                sink,
                fields,
                &["internal", "external", "protocol"],
                &item_path,
            );
            // Absent means TCP, so every file written before UDP existed keeps its meaning.
            let protocol = match find(fields, "protocol") {
                Some(f) => protocol(sink, &f.value, &join(&item_path, "protocol")),
                None => Some(Protocol::Tcp),
            };
            let internal = require(sink, fields, "internal", item.mark, &item_path)
                .and_then(|f| port(sink, &f.value, &join(&item_path, "internal")));
            let external = require(sink, fields, "external", item.mark, &item_path).and_then(|f| {
                let p = port(sink, &f.value, &join(&item_path, "external"))?;
                claims.push(PortClaim {
                    external: p,
                    protocol: protocol.unwrap_or_default(),
                    application: name.to_owned(),
                    mark: f.value.mark,
                    path: join(&item_path, "external"),
                });
                Some(p)
            });
            if let (Some(internal), Some(external), Some(protocol)) = (internal, external, protocol)
            {
                ports.push(PortMap {
                    internal,
                    external,
                    protocol,
                });
            }
        }
    }

    let volume =
        find(entries, "volume").and_then(|e| native_volume(sink, &e.value, &join(name, "volume")));
    let volumes = find(entries, "volumes")
        .map(|e| native_further_volumes(sink, name, &e.value, &join(name, "volumes")))
        .unwrap_or_default();

    let mut environment = BTreeMap::new();
    if let Some(e) = find(entries, "environment") {
        let path = join(name, "environment");
        if !e.value.is_null()
            && let Some(vars) = expect_map(
                sink,
                &e.value,
                &path,
                "a mapping of variable names to strings",
            )
        {
            for var in vars {
                let var_path = join(&path, &var.key);
                if let Some(problem) = env_name_problem(&var.key) {
                    sink.error(var.key_mark, &var_path, problem);
                    continue;
                }
                if let Some(value) = env_value(sink, &var.value, &var_path) {
                    environment.insert(var.key.clone(), value);
                }
            }
        }
    }

    let mut links = Vec::new();
    if let Some(e) = find(entries, "links") {
        let path = join(name, "links");
        for (i, item) in expect_list(
            sink,
            &e.value,
            &path,
            "a list of {local_port, remote_port, alias}",
        )
        .unwrap_or(&[])
        .iter()
        .enumerate()
        {
            let item_path = format!("{path}[{i}]");
            let Some(fields) = expect_map(
                sink,
                item,
                &item_path,
                "a mapping with `local_port`, `remote_port` and `alias`",
            ) else {
                continue;
            };
            check_keys(
                sink,
                fields,
                &["local_port", "remote_port", "alias", "protocol"],
                &item_path,
            );
            let link_protocol = match find(fields, "protocol") {
                Some(f) => protocol(sink, &f.value, &join(&item_path, "protocol")),
                None => Some(Protocol::Tcp),
            };
            let local_port = require(sink, fields, "local_port", item.mark, &item_path)
                .and_then(|f| port(sink, &f.value, &join(&item_path, "local_port")));
            let remote_port = require(sink, fields, "remote_port", item.mark, &item_path)
                .and_then(|f| port(sink, &f.value, &join(&item_path, "remote_port")));
            let alias = require(sink, fields, "alias", item.mark, &item_path).and_then(|f| {
                let apath = join(&item_path, "alias");
                let text = string(sink, &f.value, &apath, "an alias name")?;
                match alias_problem(text) {
                    Some(problem) => {
                        sink.error(f.value.mark, apath, problem);
                        None
                    }
                    None => Some(text.to_owned()),
                }
            });
            if let (Some(local_port), Some(remote_port), Some(alias), Some(protocol)) =
                (local_port, remote_port, alias, link_protocol)
            {
                links.push(Link {
                    local_port,
                    remote_port,
                    alias,
                    protocol,
                });
            }
        }
    }

    let mem_limit =
        find(entries, "mem_limit").and_then(|e| size(sink, &e.value, &join(name, "mem_limit")));
    let cpu_shares = find(entries, "cpu_shares")
        .and_then(|e| positive_int(sink, &e.value, &join(name, "cpu_shares")));
    let restart_policy = match find(entries, "restart_policy") {
        Some(e) => {
            restart_policy(sink, &e.value, &join(name, "restart_policy")).unwrap_or_default()
        }
        None => RestartPolicy::Never,
    };

    let has_tcp_port = ports
        .iter()
        .any(|p| p.protocol == flocker_wire::Protocol::Tcp);
    let health_check = find(entries, "health_check").and_then(|e| {
        super::health::health_check(sink, &e.value, &join(name, "health_check"), has_tcp_port)
    });

    if sink.diagnostics.len() != before {
        return None;
    }
    Some(Application {
        name: name.to_owned(),
        image: image?,
        ports,
        volume,
        volumes,
        environment,
        links,
        mem_limit,
        cpu_shares,
        restart_policy,
        container,
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check,
    })
}

/// `{mountpoint, maximum_size}`: one volume.
fn native_volume(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<VolumeSpec> {
    let fields = expect_map(
        sink,
        node,
        path,
        "a mapping with `mountpoint` (and optionally `maximum_size`)",
    )?;
    check_keys(sink, fields, &["mountpoint", "maximum_size"], path);
    let mountpoint = require(sink, fields, "mountpoint", node.mark, path).and_then(|m| {
        let mpath = join(path, "mountpoint");
        let text = string(sink, &m.value, &mpath, "an absolute path")?;
        match mountpoint_problem(text) {
            Some(problem) => {
                sink.error(m.value.mark, mpath, problem);
                None
            }
            None => Some(text.to_owned()),
        }
    });
    let maximum_size = match find(fields, "maximum_size") {
        Some(m) => Some(size(sink, &m.value, &join(path, "maximum_size"))?),
        None => None,
    };
    Some(VolumeSpec {
        mountpoint: mountpoint?,
        maximum_size,
    })
}

/// `volumes: {KEY: {mountpoint, maximum_size}}`: further volumes, named `APP.KEY`, that
/// move with the application beside its main `volume`.
fn native_further_volumes(
    sink: &mut Sink<'_>,
    application: &str,
    node: &Node,
    path: &str,
) -> BTreeMap<String, VolumeSpec> {
    let mut out = BTreeMap::new();
    let Some(entries) = expect_map(sink, node, path, "a mapping of volume names to volumes") else {
        return out;
    };
    for entry in entries {
        let entry_path = join(path, &entry.key);
        let Some(volume) =
            further_volume(sink, application, &entry.key, entry.key_mark, &entry_path)
        else {
            continue;
        };
        if let Some(spec) = native_volume(sink, &entry.value, &entry_path) {
            out.insert(volume, spec);
        }
    }
    out
}

/// The volume name `APP.KEY` of a further volume, or an error at `mark`.
pub(super) fn further_volume(
    sink: &mut Sink<'_>,
    application: &str,
    key: &str,
    mark: Mark,
    path: &str,
) -> Option<String> {
    let volume = flocker_wire::further_volume_name(application, key);
    let problem = if key.starts_with("fenced-") {
        Some(format!(
            "{key:?} cannot name a volume: `fenced-` is how Flocker names copies it sets aside"
        ))
    } else {
        flocker_wire::checks::application_name_problem(&volume).map(|_| {
            format!(
                "{key:?} cannot name a volume: its full name {volume:?} must be 1 to 63 characters from a-z, 0-9, `_`, `.`, `-`"
            )
        })
    };
    match problem {
        Some(problem) => {
            sink.error(mark, path, problem);
            None
        }
        None => Some(volume),
    }
}

fn restart_policy(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<RestartPolicy> {
    let fields = expect_map(
        sink,
        node,
        path,
        "a mapping with `name` (never, always or on-failure)",
    )?;
    check_keys(sink, fields, &["name", "maximum_retry_count"], path);
    let name_entry = require(sink, fields, "name", node.mark, path)?;
    let name_path = join(path, "name");
    let name = string(
        sink,
        &name_entry.value,
        &name_path,
        "never, always or on-failure",
    )?;
    let count = find(fields, "maximum_retry_count");
    match name {
        "never" | "always" => {
            if let Some(c) = count {
                sink.error(
                    c.key_mark,
                    join(path, "maximum_retry_count"),
                    format!("`maximum_retry_count` is only allowed with `name: on-failure`, not `{name}`"),
                );
                return None;
            }
            Some(if name == "never" {
                RestartPolicy::Never
            } else {
                RestartPolicy::Always
            })
        }
        "on-failure" => {
            let maximum_retry_count = match count {
                Some(c) => {
                    let cpath = join(path, "maximum_retry_count");
                    let n = positive_int(sink, &c.value, &cpath)?;
                    Some(u32::try_from(n).ok().or_else(|| {
                        sink.error(c.value.mark, cpath, format!("{n} is too large"));
                        None
                    })?)
                }
                None => None,
            };
            Some(RestartPolicy::OnFailure {
                maximum_retry_count,
            })
        }
        other => {
            sink.error(
                name_entry.value.mark,
                name_path,
                format!("unknown restart policy {other:?}; expected never, always or on-failure"),
            );
            None
        }
    }
}
