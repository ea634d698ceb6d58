//! The application config in docker-compose form: the old fig style (services at the top
//! level) and the modern one (`services:`, optional `version: "2"`/`"3"`).
//!
//! Only what Flocker can honour is accepted. Keys it cannot honour (`build`, `command`,
//! `depends_on`, ...) are refused by name with the reason, never dropped: a file that
//! silently lost its `command` would run something else than its author tested. `x-*`
//! extension keys are skipped, since compose defines them as inert anchors holders.

use std::collections::BTreeMap;

use flocker_wire::{Application, Link, PortMap, Protocol, RestartPolicy, VolumeSpec};

use super::ApplicationConfig;
use super::fields::{
    PortClaim, Sink, alias_problem, application_name_problem, check_external_ports,
    env_name_problem, env_value, expect_list, expect_map, find, join, mountpoint_problem, port,
    port_in_range, positive_int, size, string,
};
use super::image::parse_image;
use super::yaml::{Entry, Kind, Mark, Node, Resolved};

pub const SERVICE_KEYS: &[&str] = &[
    "image",
    "ports",
    "environment",
    "links",
    "volumes",
    "mem_limit",
    "cpu_shares",
    "restart",
];

/// Compose keys Flocker cannot honour, each with the reason given to the user.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "build",
        "images are not built by Flocker; build and tag the image beforehand and name it with `image`",
    ),
    (
        "command",
        "the image's own command is run; bake the command into the image",
    ),
    (
        "entrypoint",
        "the image's own entrypoint is run; bake it into the image",
    ),
    (
        "volumes_from",
        "each application owns at most one volume of its own and volumes are not shared",
    ),
    (
        "net",
        "networking is managed by Flocker: use `ports` and `links`",
    ),
    (
        "network_mode",
        "networking is managed by Flocker: use `ports` and `links`",
    ),
    (
        "networks",
        "networking is managed by Flocker: use `ports` and `links`",
    ),
    (
        "depends_on",
        "applications start independently on their nodes; use `links` to reach another application",
    ),
    (
        "expose",
        "only published ports are routed; use `ports: [\"EXTERNAL:INTERNAL\"]`",
    ),
    (
        "external_links",
        "only applications of this file can be linked",
    ),
    (
        "env_file",
        "the environment must be written in the file so every node gets the same one",
    ),
    (
        "extends",
        "write each service out in full (YAML anchors and `<<` merge keys work)",
    ),
    (
        "dns",
        "name resolution inside containers is not configurable",
    ),
    (
        "dns_search",
        "name resolution inside containers is not configurable",
    ),
    (
        "extra_hosts",
        "name resolution inside containers is not configurable",
    ),
    (
        "container_name",
        "the container is named after the application",
    ),
    ("hostname", "the container's hostname is not configurable"),
    ("domainname", "the container's hostname is not configurable"),
    (
        "labels",
        "labels are reserved for Flocker's own bookkeeping",
    ),
    ("privileged", "privileged containers are not supported"),
    ("cap_add", "capabilities are not configurable"),
    ("cap_drop", "capabilities are not configurable"),
    (
        "devices",
        "host devices differ between nodes, so they cannot follow an application",
    ),
    ("user", "the image's user is used"),
    ("working_dir", "the image's working directory is used"),
    ("healthcheck", "health checks are not supported"),
    ("deploy", "placement comes from the deployment config"),
    ("logging", "logging is not configurable"),
    ("log_driver", "logging is not configurable"),
    ("memswap_limit", "only `mem_limit` is supported"),
    ("mem_reservation", "only `mem_limit` is supported"),
    ("cpus", "only `cpu_shares` is supported"),
    ("cpuset", "only `cpu_shares` is supported"),
    ("tmpfs", "only one persistent volume is supported"),
    ("secrets", "secrets are not supported"),
    ("configs", "configs are not supported"),
    ("profiles", "every service in the file is an application"),
];

/// Top-level keys of the modern form that cannot be honoured.
const UNSUPPORTED_TOP: &[(&str, &str)] = &[
    (
        "networks",
        "networking is managed by Flocker: use `ports` and `links`",
    ),
    ("secrets", "secrets are not supported"),
    ("configs", "configs are not supported"),
];

/// A `links` entry waiting for every service to be known.
struct PendingLink {
    service: String,
    target: String,
    alias: String,
    mark: Mark,
    path: String,
}

/// Validates a modern compose file (root mapping with `services`).
pub fn parse_modern(sink: &mut Sink<'_>, root: &Node) -> ApplicationConfig {
    let Some(top) = expect_map(sink, root, "", "a compose file mapping") else {
        return ApplicationConfig::default();
    };
    for entry in top {
        match entry.key.as_str() {
            "services" => {}
            "version" => check_compose_version(sink, &entry.value),
            "volumes" => check_volume_declarations(sink, &entry.value),
            k if k.starts_with("x-") => {}
            k => match UNSUPPORTED_TOP.iter().find(|(name, _)| *name == k) {
                Some((_, why)) => sink.error(
                    entry.key_mark,
                    k,
                    format!("`{k}` cannot be honoured: {why}"),
                ),
                None => sink.error(
                    entry.key_mark,
                    k,
                    "unknown key; allowed top-level keys are: version, services, volumes, x-*",
                ),
            },
        }
    }
    let Some(services) = super::fields::require(sink, top, "services", root.mark, "") else {
        return ApplicationConfig::default();
    };
    let Some(entries) = expect_map(
        sink,
        &services.value,
        "services",
        "a mapping from service names to their settings",
    ) else {
        return ApplicationConfig::default();
    };
    parse_services(sink, entries)
}

/// Validates a fig-style file: every top-level key is a service.
pub fn parse_fig(sink: &mut Sink<'_>, root: &Node) -> ApplicationConfig {
    let Some(top) = expect_map(
        sink,
        root,
        "",
        "a mapping from service names to their settings",
    ) else {
        return ApplicationConfig::default();
    };
    parse_services(sink, top)
}

fn check_compose_version(sink: &mut Sink<'_>, node: &Node) {
    let text = match node.as_scalar().map(|s| (s, s.resolve())) {
        Some((_, Resolved::Str(s))) => s.to_owned(),
        Some((s, Resolved::Int(_) | Resolved::Float)) => s.text.clone(),
        _ => String::new(),
    };
    if !(text.starts_with('2') || text.starts_with('3')) || text.len() > 8 {
        sink.error(
            node.mark,
            "version",
            format!("unsupported compose file version, expected \"2\" or \"3\" (or a 2.x/3.x), found {}", node.describe()),
        );
    }
}

/// Named volumes may be declared at the top level, but only plainly: driver options would be
/// dropped, since Flocker chooses the storage.
fn check_volume_declarations(sink: &mut Sink<'_>, node: &Node) {
    if node.is_null() {
        return;
    }
    let Some(entries) = expect_map(sink, node, "volumes", "a mapping of volume names") else {
        return;
    };
    for entry in entries {
        let empty = entry.value.is_null() || entry.value.as_map().is_some_and(<[Entry]>::is_empty);
        if !empty {
            sink.error(
                entry.value.mark,
                join("volumes", &entry.key),
                "volume options cannot be honoured: Flocker chooses the volume's storage; declare the volume with no settings",
            );
        }
    }
}

fn parse_services(sink: &mut Sink<'_>, entries: &[Entry]) -> ApplicationConfig {
    let mut config = ApplicationConfig::default();
    let mut claims = Vec::new();
    let mut pending = Vec::new();
    let mut broken = Vec::new();
    for entry in entries {
        if entry.key.starts_with("x-") {
            continue;
        }
        config.defined.insert(entry.key.clone(), entry.key_mark);
        let before = sink.diagnostics.len();
        let app = parse_service(
            sink,
            &entry.key,
            entry.key_mark,
            &entry.value,
            &mut claims,
            &mut pending,
        );
        match app {
            Some(app) if sink.diagnostics.len() == before => {
                config.applications.insert(entry.key.clone(), app);
            }
            _ => broken.push(entry.key.clone()),
        }
    }
    check_external_ports(sink, &claims);
    resolve_links(sink, &mut config, pending, &broken);
    config
}

/// Expands `app[:alias]` into one link per port of the target: the linking container reaches
/// the target's internal port number at the target's external port.
fn resolve_links(
    sink: &mut Sink<'_>,
    config: &mut ApplicationConfig,
    pending: Vec<PendingLink>,
    broken: &[String],
) {
    let mut resolved: BTreeMap<String, Vec<Link>> = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    for link in pending {
        let Some(target) = config.applications.get(&link.target) else {
            // A target with its own errors is reported there; only an absent one is reported here.
            if !config.defined.contains_key(&link.target) {
                sink.error(
                    link.mark,
                    link.path,
                    format!(
                        "links to `{}`, which is not a service in this file",
                        link.target
                    ),
                );
                failed.push(link.service);
            }
            continue;
        };
        if target.ports.is_empty() && !broken.contains(&link.target) {
            sink.error(
                link.mark,
                link.path,
                format!(
                    "links to `{}`, which publishes no ports, so there is nothing to link to",
                    link.target
                ),
            );
            failed.push(link.service);
            continue;
        }
        let links = resolved.entry(link.service).or_default();
        for port in &target.ports {
            links.push(Link {
                local_port: port.internal,
                remote_port: port.external,
                alias: link.alias.clone(),
                protocol: port.protocol,
            });
        }
    }
    for name in failed {
        config.applications.remove(&name);
    }
    for (name, links) in resolved {
        if let Some(app) = config.applications.get_mut(&name) {
            app.links = links;
        }
    }
}

fn parse_service(
    sink: &mut Sink<'_>,
    name: &str,
    key_mark: Mark,
    node: &Node,
    claims: &mut Vec<PortClaim>,
    pending: &mut Vec<PendingLink>,
) -> Option<Application> {
    if let Some(problem) = application_name_problem(name) {
        sink.error(key_mark, name, problem);
    }
    let entries = expect_map(sink, node, name, "a mapping of service settings")?;
    for entry in entries {
        let key = entry.key.as_str();
        if SERVICE_KEYS.contains(&key) || key.starts_with("x-") {
            continue;
        }
        let path = join(name, key);
        match UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => sink.error(
                entry.key_mark,
                path,
                format!("`{key}` cannot be honoured: {why}"),
            ),
            None => sink.error(
                entry.key_mark,
                path,
                format!("unknown key; allowed keys are: {}", SERVICE_KEYS.join(", ")),
            ),
        }
    }

    let image = match find(entries, "image") {
        Some(e) => {
            let path = join(name, "image");
            string(
                sink,
                &e.value,
                &path,
                "an image reference such as \"redis:7\"",
            )
            .and_then(|text| {
                parse_image(text)
                    .map_err(|err| sink.error(e.value.mark, path, err.to_string()))
                    .ok()
            })
        }
        None => {
            sink.error(
                key_mark,
                name,
                "missing key `image` (images are not built by Flocker)",
            );
            None
        }
    };

    let mut ports = Vec::new();
    if let Some(e) = find(entries, "ports") {
        let path = join(name, "ports");
        for (i, item) in expect_list(
            sink,
            &e.value,
            &path,
            "a list of \"EXTERNAL:INTERNAL\" strings",
        )
        .unwrap_or(&[])
        .iter()
        .enumerate()
        {
            let item_path = format!("{path}[{i}]");
            if let Some(map) = compose_port(sink, item, &item_path) {
                claims.push(PortClaim {
                    external: map.external,
                    protocol: map.protocol,
                    application: name.to_owned(),
                    mark: item.mark,
                    path: item_path,
                });
                ports.push(map);
            }
        }
    }

    let mut environment = BTreeMap::new();
    if let Some(e) = find(entries, "environment") {
        compose_environment(sink, &e.value, &join(name, "environment"), &mut environment);
    }

    if let Some(e) = find(entries, "links") {
        let path = join(name, "links");
        for (i, item) in expect_list(
            sink,
            &e.value,
            &path,
            "a list of \"service[:alias]\" strings",
        )
        .unwrap_or(&[])
        .iter()
        .enumerate()
        {
            let item_path = format!("{path}[{i}]");
            let Some(text) = string(sink, item, &item_path, "a \"service[:alias]\" string") else {
                continue;
            };
            let (target, alias) = text.split_once(':').unwrap_or((text, text));
            if let Some(problem) = alias_problem(alias) {
                sink.error(item.mark, item_path, problem);
                continue;
            }
            pending.push(PendingLink {
                service: name.to_owned(),
                target: target.to_owned(),
                alias: alias.to_owned(),
                mark: item.mark,
                path: item_path,
            });
        }
    }

    let volume = find(entries, "volumes")
        .and_then(|e| compose_volume(sink, &e.value, &join(name, "volumes")));
    let mem_limit =
        find(entries, "mem_limit").and_then(|e| size(sink, &e.value, &join(name, "mem_limit")));
    let cpu_shares = find(entries, "cpu_shares")
        .and_then(|e| positive_int(sink, &e.value, &join(name, "cpu_shares")));
    let restart_policy = find(entries, "restart")
        .map(|e| compose_restart(sink, &e.value, &join(name, "restart")))
        .unwrap_or(Some(RestartPolicy::Never))?;

    Some(Application {
        name: name.to_owned(),
        image: image?,
        ports,
        volume,
        environment,
        links: Vec::new(),
        mem_limit,
        cpu_shares,
        restart_policy,
    })
}

/// `"EXTERNAL:INTERNAL"` (optionally `/tcp` or `/udp`), or the long form
/// `{target, published, protocol}`.
fn compose_port(sink: &mut Sink<'_>, item: &Node, path: &str) -> Option<PortMap> {
    if let Kind::Map(fields) = &item.kind {
        super::fields::check_keys(sink, fields, &["target", "published", "protocol"], path);
        let internal = super::fields::require(sink, fields, "target", item.mark, path)
            .and_then(|f| port(sink, &f.value, &join(path, "target")));
        let external =
            super::fields::require(sink, fields, "published", item.mark, path).and_then(|f| {
                let ppath = join(path, "published");
                match f.value.as_str() {
                    Some(s) => port_in_range(s)
                        .map_err(|e| sink.error(f.value.mark, ppath, e))
                        .ok(),
                    None => port(sink, &f.value, &ppath),
                }
            });
        let protocol = match find(fields, "protocol") {
            Some(p) => super::fields::protocol(sink, &p.value, &join(path, "protocol")),
            None => Some(Protocol::Tcp),
        };
        return Some(PortMap {
            internal: internal?,
            external: external?,
            protocol: protocol?,
        });
    }
    let text = match item.as_scalar().map(|s| (s, s.resolve())) {
        Some((_, Resolved::Str(s))) => s.to_owned(),
        Some((s, Resolved::Int(_))) => s.text.clone(),
        _ => {
            sink.error(
                item.mark,
                path,
                format!(
                    "expected an \"EXTERNAL:INTERNAL\" string, found {}",
                    item.describe()
                ),
            );
            return None;
        }
    };
    let (spec, protocol) = match text.split_once('/') {
        None => (text.as_str(), Protocol::Tcp),
        Some((spec, suffix)) => match Protocol::parse(suffix) {
            Some(protocol) => (spec, protocol),
            None => {
                sink.error(
                    item.mark,
                    path,
                    format!("{text:?}: only tcp and udp ports are routed"),
                );
                return None;
            }
        },
    };
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [external, internal] => {
            if external.contains('-') || internal.contains('-') {
                sink.error(
                    item.mark,
                    path,
                    format!("{text:?}: port ranges are not supported, list each port"),
                );
                return None;
            }
            let external = port_in_range(external)
                .map_err(|e| sink.error(item.mark, path, format!("{text:?}: {e}")));
            let internal = port_in_range(internal)
                .map_err(|e| sink.error(item.mark, path, format!("{text:?}: {e}")));
            Some(PortMap {
                internal: internal.ok()?,
                external: external.ok()?,
                protocol,
            })
        }
        [single] => {
            sink.error(
                item.mark,
                path,
                format!(
                    "{text:?} publishes the port on a random host port, which cannot be routed across the cluster; \
                     give the external port too, e.g. \"{single}:{single}\""
                ),
            );
            None
        }
        _ => {
            sink.error(
                item.mark,
                path,
                format!("{text:?}: binding to a host address cannot be honoured; write \"EXTERNAL:INTERNAL\""),
            );
            None
        }
    }
}

fn compose_environment(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    out: &mut BTreeMap<String, String>,
) {
    match &node.kind {
        Kind::Map(vars) => {
            for var in vars {
                let var_path = join(path, &var.key);
                if let Some(problem) = env_name_problem(&var.key) {
                    sink.error(var.key_mark, var_path, problem);
                } else if let Some(value) = env_value(sink, &var.value, &var_path) {
                    out.insert(var.key.clone(), value);
                }
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                let Some(text) = string(sink, item, &item_path, "a \"KEY=VALUE\" string") else {
                    continue;
                };
                let Some((key, value)) = text.split_once('=') else {
                    sink.error(
                        item.mark,
                        item_path,
                        format!(
                            "{text:?} has no value; values are never taken from the shell running flockerctl, \
                             write \"{text}=VALUE\""
                        ),
                    );
                    continue;
                };
                if let Some(problem) = env_name_problem(key) {
                    sink.error(item.mark, item_path, problem);
                } else if out.insert(key.to_owned(), value.to_owned()).is_some() {
                    sink.error(
                        item.mark,
                        item_path,
                        format!("the variable `{key}` is set twice"),
                    );
                }
            }
        }
        _ if node.is_null() => {}
        _ => sink.error(
            node.mark,
            path,
            format!(
                "expected a mapping or a list of \"KEY=VALUE\" strings, found {}",
                node.describe()
            ),
        ),
    }
}

/// At most one volume: `"/container"`, `"/host:/container"` or `"name:/container"`; the
/// container path is the mount point. The host side is not used: Flocker owns the storage,
/// which is what lets the data move with the application.
fn compose_volume(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<VolumeSpec> {
    let items = expect_list(sink, node, path, "a list with one volume")?;
    if items.len() > 1 {
        sink.error(
            items[1].mark,
            format!("{path}[1]"),
            "at most one volume per application is supported",
        );
        return None;
    }
    let item = items.first()?;
    let item_path = format!("{path}[0]");
    let text = string(
        sink,
        item,
        &item_path,
        "a \"/container/path\" or \"/host:/container\" string",
    )?;
    let parts: Vec<&str> = text.split(':').collect();
    let container = match parts.as_slice() {
        [container] => *container,
        [_, container] => container,
        [_, container, "rw"] => container,
        [_, _, mode] => {
            sink.error(
                item.mark,
                item_path,
                format!(
                    "{text:?}: the volume mode {mode:?} cannot be honoured; volumes are read-write"
                ),
            );
            return None;
        }
        _ => {
            sink.error(
                item.mark,
                item_path,
                format!("{text:?} is not a volume spec"),
            );
            return None;
        }
    };
    if let Some(problem) = mountpoint_problem(container) {
        sink.error(item.mark, item_path, problem);
        return None;
    }
    Some(VolumeSpec {
        mountpoint: container.to_owned(),
        maximum_size: None,
    })
}

/// `no`, `always`, `on-failure` or `on-failure:N`.
fn compose_restart(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<RestartPolicy> {
    let Some(text) = node.as_str() else {
        let hint = if matches!(
            node.as_scalar().map(|s| s.resolve()),
            Some(Resolved::Bool(false))
        ) {
            "; write \"no\""
        } else {
            ""
        };
        sink.error(
            node.mark,
            path,
            format!(
                "expected no, always or on-failure[:N], found {}{hint}",
                node.describe()
            ),
        );
        return None;
    };
    match text {
        "no" => Some(RestartPolicy::Never),
        "always" => Some(RestartPolicy::Always),
        "on-failure" => Some(RestartPolicy::OnFailure {
            maximum_retry_count: None,
        }),
        "unless-stopped" => {
            sink.error(node.mark, path, "`unless-stopped` cannot be honoured: Flocker stops containers itself; use `always`");
            None
        }
        other => {
            match other.strip_prefix("on-failure:") {
                Some(n) => match n.parse::<u32>() {
                    Ok(count) if count >= 1 => Some(RestartPolicy::OnFailure {
                        maximum_retry_count: Some(count),
                    }),
                    _ => {
                        sink.error(
                            node.mark,
                            path,
                            format!("{other:?}: the retry count must be a positive integer"),
                        );
                        None
                    }
                },
                None => {
                    sink.error(node.mark, path, format!("unknown restart policy {other:?}; expected no, always or on-failure[:N]"));
                    None
                }
            }
        }
    }
}
