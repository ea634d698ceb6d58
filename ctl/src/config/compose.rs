//! The application config in docker-compose form: the old fig style (services at the top
//! level) and the modern one (`services:`, optional `version: "2"`/`"3"`).
//!
//! Only what Flocker can honour is accepted. Keys it cannot honour (`build`, `command`,
//! `depends_on`, ...) are refused by name with the reason, never dropped: a file that
//! silently lost its `command` would run something else than its author tested. `x-*`
//! extension keys are skipped, since compose defines them as inert anchors holders.

use std::collections::{BTreeMap, BTreeSet};

use flocker_wire::{Application, FileContent, FileKind, Link, PortMap, Protocol, RestartPolicy};

use super::compose_volumes::service_volumes;
use super::fields::{
    PortClaim, Sink, alias_problem, application_name_problem, check_external_ports,
    env_name_problem, env_value, expect_list, expect_map, find, join, port, port_in_range,
    positive_int, size, string,
};
use super::files::{Declared, declarations, service_files};
use super::image::parse_image;
use super::interpolate::{ComposeEnv, parse_env_file};
use super::settings::{
    PendingDependency, SETTINGS_KEYS, depends_on, parse_settings, resolve_dependencies,
};
use super::yaml::{Entry, Kind, Mark, Node, Resolved};
use super::{ApplicationConfig, Diagnostic};

/// Service keys read here; the container settings both dialects share are in
/// [`SETTINGS_KEYS`].
pub const SERVICE_KEYS: &[&str] = &[
    "image",
    "ports",
    "environment",
    "env_file",
    "links",
    "depends_on",
    "networks",
    "volumes",
    "mem_limit",
    "cpu_shares",
    "restart",
    "deploy",
    "secrets",
    "configs",
    "healthcheck",
];

/// Compose keys Flocker cannot honour, each with the reason given to the user.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "build",
        "images are not built by Flocker; build and push the image beforehand and name it with `image` (beside `build`, `image` is what every node pulls)",
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
        "external_links",
        "only applications of this file can be linked",
    ),
    (
        "extends",
        "write each service out in full (YAML anchors and `<<` merge keys work)",
    ),
    (
        "privileged",
        "a privileged container can reach its node's storage, and with it another application's volume: Flocker could no longer promise one writer per volume",
    ),
    (
        "devices",
        "host devices differ between nodes, so they cannot follow an application",
    ),
    (
        "log_driver",
        "the version 1 spelling; write `logging: {driver: ...}`",
    ),
    (
        "cpuset",
        "CPU numbers differ from node to node; use `cpus` or `cpu_shares`",
    ),
    ("profiles", "every service in the file is an application"),
];

/// Top-level keys of the modern form that cannot be honoured.
const UNSUPPORTED_TOP: &[(&str, &str)] = &[];

/// A `links` entry waiting for every service to be known.
struct PendingLink {
    service: String,
    target: String,
    alias: String,
    mark: Mark,
    path: String,
}

/// Validates a modern compose file (root mapping with `services`).
pub fn parse_modern(sink: &mut Sink<'_>, root: &Node, env: &ComposeEnv) -> ApplicationConfig {
    let Some(top) = expect_map(sink, root, "", "a compose file mapping") else {
        return ApplicationConfig::default();
    };
    let mut file = ComposeFile {
        env,
        project: None,
        networks: BTreeSet::from(["default".to_owned()]),
        secrets: Declared::new(),
        configs: Declared::new(),
    };
    for entry in top {
        match entry.key.as_str() {
            "services" => {}
            "version" => check_compose_version(sink, &entry.value),
            "volumes" => check_volume_declarations(sink, &entry.value),
            "name" => file.project = project_name(sink, &entry.value),
            "networks" => file.networks.extend(check_network_declarations(sink, &entry.value)),
            "secrets" => file.secrets = declarations(sink, &entry.value, FileKind::Secret, env),
            "configs" => file.configs = declarations(sink, &entry.value, FileKind::Config, env),
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
                    "unknown key; allowed top-level keys are: name, version, services, volumes, networks, secrets, configs, x-*",
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
    parse_services(sink, entries, &file)
}

/// What the services of one file share: the variables and directory it is read with, its
/// project name and the networks it declares.
struct ComposeFile<'e> {
    env: &'e ComposeEnv,
    project: Option<String>,
    networks: BTreeSet<String>,
    secrets: Declared,
    configs: Declared,
}

/// Validates a fig-style file: every top-level key is a service.
pub fn parse_fig(sink: &mut Sink<'_>, root: &Node, env: &ComposeEnv) -> ApplicationConfig {
    let Some(top) = expect_map(
        sink,
        root,
        "",
        "a mapping from service names to their settings",
    ) else {
        return ApplicationConfig::default();
    };
    let file = ComposeFile {
        env,
        project: None,
        networks: BTreeSet::from(["default".to_owned()]),
        secrets: Declared::new(),
        configs: Declared::new(),
    };
    parse_services(sink, top, &file)
}

/// The top-level `name:` (compose's project name), set on each container as compose's own
/// `com.docker.compose.project` label.
fn project_name(sink: &mut Sink<'_>, node: &Node) -> Option<String> {
    let name = string(sink, node, "name", "a project name")?;
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !valid {
        sink.error(
            node.mark,
            "name",
            format!(
                "{name:?} is not a project name: lowercase letters, digits, dashes and underscores, starting with a letter or digit"
            ),
        );
        return None;
    }
    Some(name.to_owned())
}

/// Top-level `networks:`. A network that only groups services is accepted; what no set of
/// nodes can honour is refused with the reason. Returns the declared names.
fn check_network_declarations(sink: &mut Sink<'_>, node: &Node) -> Vec<String> {
    let mut names = Vec::new();
    if node.is_null() {
        return names;
    }
    let Some(entries) = expect_map(sink, node, "networks", "a mapping of network names") else {
        return names;
    };
    for entry in entries {
        names.push(entry.key.clone());
        let path = join("networks", &entry.key);
        if entry.value.is_null() {
            continue;
        }
        let Some(fields) = expect_map(sink, &entry.value, &path, "a mapping of network settings")
        else {
            continue;
        };
        for field in fields {
            let field_path = join(&path, &field.key);
            let refusal = match field.key.as_str() {
                "name" | "labels" | "attachable" => None,
                "driver" => match field.value.as_str() {
                    Some("bridge") => None,
                    _ => Some(format!(
                        "the driver {:?} cannot be honoured: a network spanning nodes is Flocker's routing, and a host or macvlan network ties containers to one host; remove `driver` or write `bridge`",
                        field.value.as_scalar().map_or("", |s| s.text.as_str())
                    )),
                },
                "external" => Some("an external network exists on the host that made it, not on the node an application moves to".to_owned()),
                "internal" => Some("an internal network would cut the application off from the ports Flocker routes to it".to_owned()),
                "ipam" | "driver_opts" | "enable_ipv6" => Some(format!(
                    "`{}` cannot be honoured: addresses and drivers differ between nodes, and Flocker routes by port",
                    field.key
                )),
                _ => Some("unknown network setting; allowed: name, labels, attachable, driver: bridge".to_owned()),
            };
            if let Some(why) = refusal {
                sink.error(field.key_mark, field_path, why);
            }
        }
    }
    names
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
        // `driver: local` is what every node has, and what Flocker's storage replaces.
        let empty = entry.value.is_null()
            || entry.value.as_map().is_some_and(|fields| {
                fields
                    .iter()
                    .all(|f| f.key == "driver" && f.value.as_str() == Some("local"))
            });
        if !empty {
            sink.error(
                entry.value.mark,
                join("volumes", &entry.key),
                "volume options cannot be honoured: Flocker chooses the volume's storage; declare the volume with no settings",
            );
        }
    }
}

fn parse_services(
    sink: &mut Sink<'_>,
    entries: &[Entry],
    file: &ComposeFile<'_>,
) -> ApplicationConfig {
    let mut config = ApplicationConfig::default();
    let mut claims = Vec::new();
    let mut pending = Vec::new();
    let mut dependencies = Vec::new();
    let mut files = BTreeMap::new();
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
            &mut Collected {
                claims: &mut claims,
                links: &mut pending,
                dependencies: &mut dependencies,
                files: &mut files,
            },
            file,
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
    for (name, targets) in resolve_dependencies(sink, dependencies, &config.defined) {
        if let Some(app) = config.applications.get_mut(&name) {
            app.depends_on = targets;
        }
    }
    files.retain(|name, _| config.applications.contains_key(name));
    config.files = files;
    config
}

/// What services hand on to checks that need the whole file.
struct Collected<'a> {
    claims: &'a mut Vec<PortClaim>,
    links: &'a mut Vec<PendingLink>,
    dependencies: &'a mut Vec<PendingDependency>,
    files: &'a mut BTreeMap<String, BTreeMap<String, FileContent>>,
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
    collected: &mut Collected<'_>,
    file: &ComposeFile<'_>,
) -> Option<Application> {
    if let Some(problem) = application_name_problem(name) {
        sink.error(key_mark, name, problem);
    }
    let entries = expect_map(sink, node, name, "a mapping of service settings")?;
    for entry in entries {
        let key = entry.key.as_str();
        if SERVICE_KEYS.contains(&key) || SETTINGS_KEYS.contains(&key) || key.starts_with("x-") {
            continue;
        }
        // With `image` beside it, compose pulls the image and builds only if the pull
        // fails; every node pulls it, so `build` is not needed.
        if key == "build" && find(entries, "image").is_some() {
            continue;
        }
        let path = join(name, key);
        match UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => sink.error(
                entry.key_mark,
                path,
                format!("`{key}` cannot be honoured: {why}"),
            ),
            None => {
                let allowed: Vec<&str> =
                    SERVICE_KEYS.iter().chain(SETTINGS_KEYS).copied().collect();
                sink.error(
                    entry.key_mark,
                    path,
                    super::fields::unknown_key(key, &allowed),
                );
            }
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
                collected.claims.push(PortClaim {
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
    if let Some(e) = find(entries, "env_file") {
        env_files(
            sink,
            &e.value,
            &join(name, "env_file"),
            file.env,
            &mut environment,
        );
    }
    if let Some(e) = find(entries, "environment") {
        // `environment` wins over `env_file`.
        let mut explicit = BTreeMap::new();
        compose_environment(
            sink,
            &e.value,
            &join(name, "environment"),
            &file.env.vars,
            &mut explicit,
        );
        environment.extend(explicit);
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
            collected.links.push(PendingLink {
                service: name.to_owned(),
                target: target.to_owned(),
                alias: alias.to_owned(),
                mark: item.mark,
                path: item_path,
            });
        }
    }

    if let Some(e) = find(entries, "depends_on") {
        depends_on(sink, &e.value, name, collected.dependencies);
    }
    if let Some(e) = find(entries, "networks") {
        service_networks(sink, &e.value, &join(name, "networks"), &file.networks);
    }
    let mut mounts = Vec::new();
    for (key, kind, declared) in [
        ("secrets", FileKind::Secret, &file.secrets),
        ("configs", FileKind::Config, &file.configs),
    ] {
        if let Some(e) = find(entries, key) {
            for (mount, content) in service_files(sink, &e.value, kind, name, declared) {
                collected
                    .files
                    .entry(name.to_owned())
                    .or_default()
                    .insert(mount.name.clone(), content);
                mounts.push(mount);
            }
        }
    }
    let mut container = parse_settings(sink, entries, name);
    if let Some(project) = &file.project {
        for (key, value) in [
            ("com.docker.compose.project", project.as_str()),
            ("com.docker.compose.service", name),
        ] {
            container
                .labels
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
    }
    let limits = find(entries, "deploy")
        .map(|e| deploy_limits(sink, &e.value, &join(name, "deploy")))
        .unwrap_or_default();
    let volumes = service_volumes(sink, entries, name);
    container.node_local_binds = volumes.node_local;
    container.tmpfs.extend(volumes.tmpfs);
    let mut mem_limit =
        find(entries, "mem_limit").and_then(|e| size(sink, &e.value, &join(name, "mem_limit")));
    if let Some(pids) = limits.pids {
        container.pids_limit = Some(pids);
    }
    for (given, from_deploy, key) in [
        (&mut mem_limit, limits.memory, "memory"),
        (&mut container.nano_cpus, limits.nano_cpus, "cpus"),
    ] {
        if let Some(value) = from_deploy {
            if given.is_some() {
                sink.error(
                    limits.mark,
                    join(name, "deploy/resources/limits"),
                    format!("the {key} limit is given twice, here and as a service key; keep one"),
                );
            }
            *given = Some(value);
        }
    }
    let cpu_shares = find(entries, "cpu_shares")
        .and_then(|e| positive_int(sink, &e.value, &join(name, "cpu_shares")));
    let restart_policy = find(entries, "restart")
        .map(|e| compose_restart(sink, &e.value, &join(name, "restart")))
        .unwrap_or(Some(RestartPolicy::Never))?;
    let health_check = match find(entries, "healthcheck") {
        Some(e) => Some(super::health::health_check(
            sink,
            &e.value,
            &join(name, "healthcheck"),
            ports
                .iter()
                .any(|p| p.protocol == flocker_wire::Protocol::Tcp),
        )?),
        None => None,
    };

    Some(Application {
        name: name.to_owned(),
        image: image?,
        ports,
        volume: volumes.main,
        volumes: volumes.further,
        environment,
        links: Vec::new(),
        mem_limit,
        cpu_shares,
        restart_policy,
        container,
        depends_on: Vec::new(),
        files: mounts,
        health_check,
    })
}

/// `env_file`: one path or a list of paths or `{path, required}`, relative to the compose
/// file, read now by flockerctl so every node gets the same values. `environment` wins over
/// these; a later file wins over an earlier one.
fn env_files(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    env: &ComposeEnv,
    out: &mut BTreeMap<String, String>,
) {
    let items: Vec<(usize, &Node)> = match &node.kind {
        Kind::Seq(items) => items.iter().enumerate().collect(),
        _ => vec![(0, node)],
    };
    for (i, item) in items {
        let item_path = if matches!(node.kind, Kind::Seq(_)) {
            format!("{path}[{i}]")
        } else {
            path.to_owned()
        };
        let (file, required) = match &item.kind {
            Kind::Map(fields) => {
                super::fields::check_keys(
                    sink,
                    fields,
                    &["path", "required", "format"],
                    &item_path,
                );
                let file = super::fields::require(sink, fields, "path", item.mark, &item_path)
                    .and_then(|f| string(sink, &f.value, &join(&item_path, "path"), "a file path"));
                let required = match find(fields, "required")
                    .map(|f| f.value.as_scalar().map(|s| s.resolve()))
                {
                    None => true,
                    Some(Some(Resolved::Bool(b))) => b,
                    Some(_) => {
                        sink.error(
                            item.mark,
                            join(&item_path, "required"),
                            "expected true or false",
                        );
                        true
                    }
                };
                (file, required)
            }
            _ => (string(sink, item, &item_path, "a file path"), true),
        };
        let Some(file) = file else { continue };
        let full = env.base_dir.join(file);
        match std::fs::read_to_string(&full) {
            Ok(text) => {
                let mut file_sink = Sink::new(&full);
                for (key, value) in parse_env_file(&mut file_sink, &text, &env.vars) {
                    out.insert(key, value);
                }
                let problems: Vec<Diagnostic> = file_sink.finish();
                sink.diagnostics.extend(problems);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(e) => sink.error(
                item.mark,
                item_path,
                format!("cannot read the env file {}: {e}", full.display()),
            ),
        }
    }
}

/// A service's `networks`: names declared at the top level (or `default`), as a list or a
/// mapping. Only grouping is honoured; fixed addresses are refused with the reason.
fn service_networks(sink: &mut Sink<'_>, node: &Node, path: &str, declared: &BTreeSet<String>) {
    let check_name = |sink: &mut Sink<'_>, name: &str, mark, item_path: String| {
        if !declared.contains(name) {
            sink.error(
                mark,
                item_path,
                format!("the network `{name}` is not declared under the top-level `networks:`"),
            );
        }
    };
    match &node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                if let Some(name) = string(sink, item, &item_path, "a network name") {
                    check_name(sink, name, item.mark, item_path);
                }
            }
        }
        Kind::Map(entries) => {
            for entry in entries {
                let entry_path = join(path, &entry.key);
                check_name(sink, &entry.key, entry.key_mark, entry_path.clone());
                let Some(fields) = entry.value.as_map() else {
                    if !entry.value.is_null() {
                        sink.error(
                            entry.value.mark,
                            entry_path,
                            "expected a mapping of network settings or nothing",
                        );
                    }
                    continue;
                };
                for field in fields {
                    let why = match field.key.as_str() {
                        "ipv4_address" | "ipv6_address" | "link_local_ips" | "mac_address" => {
                            "a fixed address exists on one node's bridge only; Flocker routes by port, so the address would change when the application moves"
                        }
                        "aliases" => {
                            "other services reach this one by its service name (or a `links` alias); extra network aliases are not resolved"
                        }
                        "priority" | "gw_priority" => continue,
                        _ => "unknown network setting",
                    };
                    sink.error(
                        field.key_mark,
                        join(&entry_path, &field.key),
                        format!("`{}` cannot be honoured: {why}", field.key),
                    );
                }
            }
        }
        _ if node.is_null() => {}
        _ => sink.error(
            node.mark,
            path,
            format!(
                "expected a list of network names, found {}",
                node.describe()
            ),
        ),
    }
}

/// The limits `deploy.resources.limits` gives, and where.
#[derive(Default)]
struct DeployLimits {
    memory: Option<u64>,
    nano_cpus: Option<u64>,
    pids: Option<i64>,
    mark: super::yaml::Mark,
}

/// `deploy:` — only what one container on one node means: `resources.limits` (memory,
/// cpus) and `replicas: 1`. Swarm's placement and update settings are refused by name.
fn deploy_limits(sink: &mut Sink<'_>, node: &Node, path: &str) -> DeployLimits {
    let mut limits = DeployLimits::default();
    let Some(fields) = expect_map(sink, node, path, "a mapping") else {
        return limits;
    };
    for field in fields {
        let field_path = join(path, &field.key);
        match field.key.as_str() {
            "resources" => {
                let Some(resources) =
                    expect_map(sink, &field.value, &field_path, "a mapping with `limits`")
                else {
                    continue;
                };
                for resource in resources {
                    let resource_path = join(&field_path, &resource.key);
                    match resource.key.as_str() {
                        "limits" => {
                            limits.mark = resource.value.mark;
                            let Some(items) = expect_map(sink, &resource.value, &resource_path, "a mapping with `memory` and `cpus`") else {
                                continue;
                            };
                            for item in items {
                                let item_path = join(&resource_path, &item.key);
                                match item.key.as_str() {
                                    "memory" => limits.memory = size(sink, &item.value, &item_path),
                                    "cpus" => limits.nano_cpus = super::settings::cpus(sink, &item.value, &item_path),
                                    "pids" => limits.pids = super::settings::signed(sink, &item.value, &item_path),
                                    _ => sink.error(item.key_mark, item_path, "unknown limit; allowed: memory, cpus, pids"),
                                }
                            }
                        }
                        "reservations" => sink.error(
                            resource.key_mark,
                            resource_path,
                            "reservations cannot be honoured: placement comes from the deployment config, and host devices differ between nodes; use `limits`",
                        ),
                        _ => sink.error(resource.key_mark, resource_path, "unknown key; allowed: limits"),
                    }
                }
            }
            "replicas" => {
                if field.value.as_int() != Some(1) {
                    sink.error(
                        field.value.mark,
                        field_path,
                        "an application runs as one container, on the node the deployment config names: remove `replicas` or write 1",
                    );
                }
            }
            "mode" if field.value.as_str() == Some("replicated") => {}
            "placement" | "mode" | "endpoint_mode" => sink.error(
                field.key_mark,
                field_path,
                format!(
                    "`{}` cannot be honoured: placement comes from the deployment config",
                    field.key
                ),
            ),
            "restart_policy" | "update_config" | "rollback_config" | "labels" => sink.error(
                field.key_mark,
                field_path,
                format!(
                    "`{}` is swarm's; use the service's own `restart` and `labels`",
                    field.key
                ),
            ),
            _ => sink.error(
                field.key_mark,
                field_path,
                "unknown key; allowed: resources, replicas",
            ),
        }
    }
    limits
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
    vars: &BTreeMap<String, String>,
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
                // A bare name takes its value from flockerctl's environment, once, so every
                // node gets the same value.
                let Some((key, value)) = text
                    .split_once('=')
                    .or_else(|| vars.get(text).map(|value| (text, value.as_str())))
                else {
                    sink.error(
                        item.mark,
                        item_path,
                        format!(
                            "{text:?} has no value and flockerctl's environment does not set it; \
                             write \"{text}=VALUE\" or set it where flockerctl runs"
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
                "expected no, always, unless-stopped or on-failure[:N], found {}{hint}",
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
        "unless-stopped" => Some(RestartPolicy::UnlessStopped),
        other => match other.strip_prefix("on-failure:") {
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
                sink.error(node.mark, path, format!("unknown restart policy {other:?}; expected no, always, unless-stopped or on-failure[:N]"));
                None
            }
        },
    }
}
