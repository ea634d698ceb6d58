//! Checks of resolved values, shared by `flockerctl` (which reports them with the file, line
//! and column of the value) and the agent (which runs them again on everything a converge
//! request carries, as if the config had never been validated: a request may come from
//! another client, an older `flockerctl` or an attacker holding a user certificate).
//!
//! Each `*_problem` function returns `None` for a good value or the reason it is refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::{Application, DesiredState};

/// The agent API's default port. Routing it elsewhere would cut the node off from
/// `flockerctl` and its peers.
pub const DEFAULT_AGENT_PORT: u16 = 4523;

/// Names become container names and dataset names, so they use the charset both accept and
/// that is the same on every backend: `[a-z0-9][a-z0-9_.-]*`, at most 63 characters.
pub fn application_name_problem(name: &str) -> Option<String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    (!valid).then(|| {
        format!(
            "{name:?} cannot be an application name: it names the container and the volume, so \
             use 1 to 63 characters from a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit"
        )
    })
}

/// Link aliases become environment variable prefixes (`<ALIAS>_PORT_...`).
pub fn alias_problem(alias: &str) -> Option<String> {
    let valid = !alias.is_empty()
        && alias.len() <= 63
        && alias.starts_with(|c: char| c.is_ascii_alphabetic())
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    (!valid).then(|| {
        format!(
            "{alias:?} cannot be a link alias: it prefixes environment variable names, so use \
             letters, digits, `_` and `-`, starting with a letter, at most 63 characters"
        )
    })
}

/// A container mount point: absolute, ASCII, no `..`, not `/` itself, and no `:` (Docker's
/// volume syntax separator).
pub fn mountpoint_problem(path: &str) -> Option<String> {
    if !path.is_ascii() {
        return Some(format!("the mount point {path:?} must be ASCII"));
    }
    if !path.starts_with('/') {
        return Some(format!(
            "the mount point {path:?} must be an absolute path (start with `/`)"
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Some(format!("the mount point {path:?} must not contain `..`"));
    }
    if path.trim_end_matches('/').is_empty() {
        return Some("the mount point cannot be `/` itself".to_owned());
    }
    if path.chars().any(|c| c.is_ascii_control() || c == ':') {
        return Some(format!(
            "the mount point {path:?} must not contain `:` or control characters"
        ));
    }
    None
}

/// Environment variable names: no `=`, no NUL, not empty.
pub fn env_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.contains(['=', '\0']) {
        Some(format!("{name:?} cannot be an environment variable name"))
    } else {
        None
    }
}

/// Syntax only: an IP literal or a DNS hostname. Whether it resolves is a cross-file check
/// behind [`super::NodeResolver`], so unit tests do not depend on DNS.
pub fn address_problem(address: &str) -> Option<String> {
    if address.parse::<IpAddr>().is_ok() {
        return None;
    }
    let valid = !address.is_empty()
        && address.len() <= 253
        && address.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then(|| format!("{address:?} is neither an IP address nor a hostname"))
}

/// Every problem of one resolved application, each naming the value.
pub fn application_problems(app: &Application) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    out.extend(application_name_problem(&app.name));
    let image = format!("{}:{}", app.image.repository, app.image.tag);
    match crate::image::parse_image(&image) {
        Ok(parsed) if parsed == app.image => {}
        Ok(_) => out.push(format!("invalid image reference {image:?}")),
        Err(e) => out.push(e.to_string()),
    }
    for port in &app.ports {
        if port.internal == 0 || port.external == 0 {
            out.push(format!(
                "port {}:{} (external:internal): port 0 is not a port",
                port.external, port.internal
            ));
        }
    }
    if let Some(volume) = &app.volume {
        out.extend(mountpoint_problem(&volume.mountpoint));
    }
    for name in app.environment.keys() {
        out.extend(env_name_problem(name));
    }
    for value in app.environment.values() {
        if value.contains('\0') {
            out.push("environment values cannot contain NUL".to_owned());
        }
    }
    for link in &app.links {
        out.extend(alias_problem(&link.alias));
        if link.local_port == 0 || link.remote_port == 0 {
            out.push(format!("link {:?}: port 0 is not a port", link.alias));
        }
    }
    out.into_iter()
        .map(|p| format!("application {:?}: {p}", app.name))
        .collect()
}

/// Every problem of a desired state: each application, each node address, applications
/// keyed by their own name and placed on at most one node, external ports claimed once.
pub fn desired_problems(desired: &DesiredState) -> Vec<String> {
    let mut out = Vec::new();
    let mut ports: BTreeMap<(crate::Protocol, u16), &str> = BTreeMap::new();
    for (key, app) in &desired.applications {
        if key != &app.name {
            out.push(format!(
                "application {key:?} carries the name {:?}",
                app.name
            ));
        }
        out.extend(application_problems(app));
        for port in &app.ports {
            if let Some(first) = ports.insert((port.protocol, port.external), &app.name) {
                out.push(format!(
                    "external port {}/{} is claimed by both {first:?} and {:?}",
                    port.external, port.protocol, app.name
                ));
            }
        }
    }
    let mut placed: BTreeMap<&str, &str> = BTreeMap::new();
    for (node, apps) in &desired.nodes {
        out.extend(address_problem(node).map(|p| format!("node {p}")));
        for app in apps {
            if !desired.applications.contains_key(app) {
                out.push(format!("node {node} runs unknown application {app:?}"));
            }
            if let Some(first) = placed.insert(app, node) {
                out.push(format!(
                    "application {app:?} is placed on both {first} and {node}"
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{Image, Link, PortMap, Protocol, RestartPolicy, VolumeSpec};

    fn app(name: &str) -> Application {
        Application {
            name: name.into(),
            image: Image {
                repository: "redis".into(),
                tag: "7".into(),
            },
            ports: vec![PortMap {
                internal: 6379,
                external: 6379,
                protocol: Protocol::Tcp,
            }],
            volume: Some(VolumeSpec {
                mountpoint: "/data".into(),
                maximum_size: None,
            }),
            environment: BTreeMap::from([("MODE".into(), "x".into())]),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
        }
    }

    #[test]
    fn a_good_desired_state_has_no_problems() {
        let mut d = DesiredState::default();
        d.applications.insert("db".into(), app("db"));
        d.nodes
            .insert("198.18.0.11".into(), BTreeSet::from(["db".into()]));
        assert_eq!(desired_problems(&d), Vec::<String>::new());
    }

    #[test]
    fn hostile_values_are_named() {
        let mut bad = app("../etc");
        bad.image.repository = "Evil Image".into();
        bad.volume = Some(VolumeSpec {
            mountpoint: "/data/../../host".into(),
            maximum_size: None,
        });
        bad.environment.insert("A=B".into(), "x".into());
        bad.links.push(Link {
            local_port: 0,
            remote_port: 1,
            alias: "$(reboot)".into(),
            protocol: Protocol::Tcp,
        });
        bad.ports[0].external = 0;
        let problems = application_problems(&bad).join("\n");
        for needle in [
            "cannot be an application name",
            "invalid image reference",
            "must not contain `..`",
            "cannot be an environment variable name",
            "cannot be a link alias",
            "link \"$(reboot)\": port 0",
            "port 0:6379",
        ] {
            assert!(problems.contains(needle), "{needle:?} in:\n{problems}");
        }

        let mut d = DesiredState::default();
        d.applications.insert("db".into(), app("web"));
        d.applications.insert("web".into(), app("web"));
        d.nodes
            .insert("a b".into(), BTreeSet::from(["db".into(), "ghost".into()]));
        d.nodes.insert("n2".into(), BTreeSet::from(["db".into()]));
        let problems = desired_problems(&d).join("\n");
        for needle in [
            "application \"db\" carries the name \"web\"",
            "external port 6379/tcp is claimed by both",
            "\"a b\" is neither an IP address nor a hostname",
            "unknown application \"ghost\"",
            "placed on both",
        ] {
            assert!(problems.contains(needle), "{needle:?} in:\n{problems}");
        }
    }
}
