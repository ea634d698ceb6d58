//! Checks of resolved values, shared by `flockerctl` (which reports them with the file, line
//! and column of the value) and the agent (which runs them again on everything a converge
//! request carries, as if the config had never been validated: a request may come from
//! another client, an older `flockerctl` or an attacker holding a user certificate).
//!
//! Each `*_problem` function returns `None` for a good value or the reason it is refused.

use std::collections::{BTreeMap, BTreeSet};
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

/// Syntax only: an IP literal (an IPv6 one spelled canonically, `crate::address`) or a DNS
/// hostname. Whether it resolves is a cross-file check
/// behind [`super::NodeResolver`], so unit tests do not depend on DNS.
pub fn address_problem(address: &str) -> Option<String> {
    if let Some(problem) = crate::address::spelling_problem(address) {
        return Some(problem);
    }
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
    out.extend(volume_problems(app));
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
    out.extend(app.container.problems());
    let mut names = std::collections::BTreeSet::new();
    let mut targets = std::collections::BTreeSet::new();
    for mount in &app.files {
        out.extend(mount.problems());
        if !names.insert(&mount.name) {
            out.push(format!("files: {:?} is mounted twice", mount.name));
        }
        if !targets.insert(&mount.target) {
            out.push(format!("files: two files at {:?}", mount.target));
        }
    }
    for dependency in &app.depends_on {
        out.extend(application_name_problem(dependency).map(|p| format!("depends_on: {p}")));
        if dependency == &app.name {
            out.push("depends_on: an application cannot depend on itself".to_owned());
        }
    }
    if let Some(check) = &app.health_check {
        out.extend(health_check_problem(check));
        if check.answer.as_ref().is_some_and(|a| a.port.is_none())
            && !app.ports.iter().any(|p| p.protocol == crate::Protocol::Tcp)
        {
            out.push(
                "health check: an answer check needs a `port`, as the application has no TCP port"
                    .into(),
            );
        }
    }
    out.into_iter()
        .map(|p| format!("application {:?}: {p}", app.name))
        .collect()
}

/// The longest interval, timeout or start period of a health check (one hour).
pub const MAX_HEALTH_DURATION_MS: u64 = 3_600_000;

/// What is wrong with a health check, if anything: Docker's three forms only, bounded
/// durations and retries, no NUL, a command of reasonable size.
pub fn health_check_problem(check: &crate::HealthCheck) -> Option<String> {
    if let Some(answer) = &check.answer {
        return answer_check_problem(answer, check);
    }
    let arity_ok = match check.test.first().map(String::as_str) {
        Some("NONE") => check.test.len() == 1,
        Some("CMD") => check.test.len() >= 2,
        Some("CMD-SHELL") => check.test.len() == 2,
        _ => false,
    };
    if !arity_ok {
        return Some(
            "health check: test must be [NONE], [CMD, program, args...] or [CMD-SHELL, command]"
                .into(),
        );
    }
    if check.test.iter().any(|w| w.contains('\0'))
        || check.test.iter().map(String::len).sum::<usize>() > 4096
    {
        return Some(
            "health check: the command has a NUL byte or is longer than 4096 bytes".into(),
        );
    }
    let durations = [check.interval_ms, check.timeout_ms, check.start_period_ms];
    if check.interval_ms == 0
        || check.timeout_ms == 0
        || durations.iter().any(|&d| d > MAX_HEALTH_DURATION_MS)
    {
        return Some(
            "health check: interval and timeout must be above 0, and every duration at most 1 h"
                .into(),
        );
    }
    if !(1..=100).contains(&check.retries) {
        return Some("health check: retries must be from 1 to 100".into());
    }
    None
}

/// The longest `send` or `expect` of an answer check.
pub const MAX_ANSWER_BYTES: usize = 1024;
/// The longest one try of an answer check may take: every state query tries the checks of
/// the running applications, so a hung application holds the answer this long at most.
pub const MAX_ANSWER_TIMEOUT_MS: u64 = 10_000;

/// What is wrong with an answer check: a command beside it, an empty `expect`, oversized
/// texts, port 0, or a try bound outside 1 ms to 10 s.
fn answer_check_problem(answer: &crate::AnswerCheck, check: &crate::HealthCheck) -> Option<String> {
    if !check.test.is_empty() {
        return Some(
            "health check: a `test` command and an answer check exclude each other".into(),
        );
    }
    if answer.expect.is_empty() {
        return Some("health check: an answer check's `expect` must not be empty".into());
    }
    if answer.send.len() > MAX_ANSWER_BYTES || answer.expect.len() > MAX_ANSWER_BYTES {
        return Some(format!(
            "health check: `send` and `expect` are at most {MAX_ANSWER_BYTES} bytes each"
        ));
    }
    if answer.port == Some(0) {
        return Some("health check: port 0 cannot be connected to".into());
    }
    if !(1..=MAX_ANSWER_TIMEOUT_MS).contains(&check.timeout_ms) {
        return Some("health check: an answer check's timeout must be from 1 ms to 10 s".into());
    }
    None
}

/// The application's volumes: further volumes named `APP.KEY` with a valid name, every
/// mount point valid and used once.
fn volume_problems(app: &Application) -> Vec<String> {
    let mut out = Vec::new();
    let prefix = format!("{}.", app.name);
    for name in app.volumes.keys() {
        // `fenced-` names the copies fencing sets aside (`NAME.fenced-eEPOCH-MS`).
        let key_ok = name
            .strip_prefix(&prefix)
            .is_some_and(|key| !key.is_empty() && !key.starts_with("fenced-"));
        if !key_ok {
            out.push(format!(
                "volume {name:?}: a further volume of {:?} is named {prefix}KEY (KEY not starting with `fenced-`)",
                app.name
            ));
        } else if let Some(problem) = application_name_problem(name) {
            out.push(format!("volume {name:?}: {problem}"));
        }
    }
    let mut mountpoints = BTreeSet::new();
    for (name, spec) in app.volumes() {
        out.extend(mountpoint_problem(&spec.mountpoint).map(|p| format!("volume {name:?}: {p}")));
        if !mountpoints.insert(spec.mountpoint.as_str()) {
            out.push(format!(
                "volume {name:?}: mount point {:?} is used by two volumes",
                spec.mountpoint
            ));
        }
    }
    out
}

/// Volume names are cluster-wide: no two applications may name the same volume (an
/// application named `a.b` and a further volume `b` of `a`, say).
fn volume_name_clashes(desired: &DesiredState) -> Vec<String> {
    let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
    let mut out = Vec::new();
    for app in desired.applications.values() {
        for (volume, _) in app.volumes() {
            if let Some(first) = owners.insert(volume, &app.name) {
                out.push(format!(
                    "volume {volume:?} is claimed by both {first:?} and {:?}",
                    app.name
                ));
            }
        }
    }
    for app in desired.applications.values() {
        if let Some(&holder) = owners.get(app.name.as_str())
            && holder != app.name
        {
            out.push(format!(
                "application {:?} has the name of a volume of {holder:?}",
                app.name
            ));
        }
    }
    out
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
    out.extend(dependency_problems(desired));
    for (application, files) in &desired.files {
        match desired.applications.get(application) {
            None => out.push(format!(
                "files sent for {application:?}, which is not deployed"
            )),
            Some(app) => {
                for name in files.keys() {
                    if !app.files.iter().any(|m| &m.name == name) {
                        out.push(format!(
                            "application {application:?}: {name:?} is sent but not mounted"
                        ));
                    }
                }
            }
        }
    }
    out.extend(container_name_clashes(desired));
    out.extend(volume_name_clashes(desired));
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

/// Two applications may run on one node (and move onto one), so their containers' names
/// must differ cluster-wide, defaults (`flocker-NAME`) included.
fn container_name_clashes(desired: &DesiredState) -> Vec<String> {
    let mut out = Vec::new();
    let mut names: BTreeMap<String, &str> = BTreeMap::new();
    for app in desired.applications.values() {
        let name = app
            .container
            .container_name
            .clone()
            .unwrap_or_else(|| format!("flocker-{}", app.name));
        if let Some(first) = names.insert(name.clone(), &app.name) {
            out.push(format!(
                "applications {first:?} and {:?} both run in a container named {name:?}",
                app.name
            ));
        }
    }
    out
}

/// `depends_on` forms no cycle among the applications present. A dependency on an
/// application not in this desired state is not an error here: a node's converge request
/// holds only the applications it runs, and flockerctl checks placements with locations.
fn dependency_problems(desired: &DesiredState) -> Vec<String> {
    match start_order(desired) {
        Ok(_) => Vec::new(),
        Err(cycle) => vec![format!("depends_on forms a cycle: {}", cycle.join(" -> "))],
    }
}

/// The applications in waves: each wave depends only on earlier ones. `Err` names a cycle.
/// Dependencies on applications that are not in `desired` are ignored.
pub fn start_order(desired: &DesiredState) -> Result<Vec<Vec<String>>, Vec<String>> {
    let mut remaining: BTreeMap<&str, Vec<&str>> = desired
        .applications
        .values()
        .map(|app| {
            let deps = app
                .depends_on
                .iter()
                .map(String::as_str)
                .filter(|d| desired.applications.contains_key(*d))
                .collect();
            (app.name.as_str(), deps)
        })
        .collect();
    let mut waves = Vec::new();
    while !remaining.is_empty() {
        let wave: Vec<String> = remaining
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !remaining.contains_key(d)))
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if wave.is_empty() {
            return Err(find_cycle(&remaining));
        }
        for name in &wave {
            remaining.remove(name.as_str());
        }
        waves.push(wave);
    }
    Ok(waves)
}

/// Follows first unresolved dependencies from the smallest name until one repeats.
fn find_cycle(remaining: &BTreeMap<&str, Vec<&str>>) -> Vec<String> {
    let mut path: Vec<&str> = Vec::new();
    let mut current = remaining.keys().next().copied();
    while let Some(name) = current {
        if let Some(start) = path.iter().position(|n| *n == name) {
            let mut cycle: Vec<String> = path[start..].iter().map(|n| (*n).to_owned()).collect();
            cycle.push(name.to_owned());
            return cycle;
        }
        path.push(name);
        current = remaining
            .get(name)
            .and_then(|deps| deps.iter().find(|d| remaining.contains_key(**d)).copied());
    }
    path.iter().map(|n| (*n).to_owned()).collect()
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
            volumes: Default::default(),
            volume: Some(VolumeSpec {
                mountpoint: "/data".into(),
                maximum_size: None,
            }),
            environment: BTreeMap::from([("MODE".into(), "x".into())]),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
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
    fn further_volumes_are_named_by_their_application_and_never_shared() {
        let mut db = app("db");
        let spec = |m: &str| VolumeSpec {
            mountpoint: m.into(),
            maximum_size: None,
        };
        db.volumes.insert("db.logs".into(), spec("/logs"));
        let mut d = DesiredState::default();
        d.applications.insert("db".into(), db.clone());
        assert_eq!(desired_problems(&d), Vec::<String>::new());

        db.volumes.insert("other.x".into(), spec("/x"));
        db.volumes.insert("db.fenced-e1-2".into(), spec("/y"));
        db.volumes.insert("db.more".into(), spec("/logs"));
        let problems = application_problems(&db).join("\n");
        assert!(
            problems.contains("\"other.x\": a further volume of \"db\" is named db.KEY"),
            "{problems}"
        );
        assert!(problems.contains("\"db.fenced-e1-2\""), "{problems}");
        assert!(
            problems.contains("mount point \"/logs\" is used by two volumes"),
            "{problems}"
        );

        // An application named like another's further volume would share its dataset.
        let mut clash = app("db.logs");
        clash.volume = Some(spec("/data"));
        d.applications.insert("db.logs".into(), clash);
        let problems = desired_problems(&d).join("\n");
        assert!(
            problems.contains("volume \"db.logs\" is claimed by both"),
            "{problems}"
        );
    }

    #[test]
    fn answer_checks_are_bounded_and_need_a_port() {
        let redis = crate::AnswerCheck {
            send: "PING\r\n".into(),
            expect: "+PONG".into(),
            port: None,
        };
        let check = crate::HealthCheck::with_answer(redis.clone());
        assert_eq!(health_check_problem(&check), None);
        let mut bad = check.clone();
        bad.test = vec!["CMD".into(), "true".into()];
        assert!(health_check_problem(&bad).is_some());
        for answer in [
            crate::AnswerCheck {
                expect: String::new(),
                ..redis.clone()
            },
            crate::AnswerCheck {
                send: "x".repeat(MAX_ANSWER_BYTES + 1),
                ..redis.clone()
            },
            crate::AnswerCheck {
                port: Some(0),
                ..redis.clone()
            },
        ] {
            let bad = crate::HealthCheck::with_answer(answer.clone());
            assert!(health_check_problem(&bad).is_some(), "{answer:?}");
        }
        let mut slow = check.clone();
        slow.timeout_ms = MAX_ANSWER_TIMEOUT_MS + 1;
        assert!(health_check_problem(&slow).is_some());
        // Without a port of its own, the application's first TCP port is the one checked.
        let mut portless = app("db");
        portless.ports.clear();
        portless.health_check = Some(check);
        assert!(
            application_problems(&portless)
                .iter()
                .any(|p| p.contains("needs a `port`")),
            "{:?}",
            application_problems(&portless)
        );
    }

    #[test]
    fn hostile_health_checks_are_refused() {
        let mut check = crate::HealthCheck::with_test(vec!["CMD".into(), "true".into()]);
        assert_eq!(health_check_problem(&check), None);
        assert_eq!(health_check_problem(&crate::HealthCheck::disabled()), None);
        check.retries = 0;
        assert!(health_check_problem(&check).is_some());
        check.retries = 3;
        check.interval_ms = u64::MAX;
        assert!(health_check_problem(&check).is_some());
        check.interval_ms = 1000;
        check.test = vec!["RUN".into(), "x".into()];
        assert!(health_check_problem(&check).is_some());
        check.test = vec!["CMD-SHELL".into(), "a".into(), "b".into()];
        assert!(health_check_problem(&check).is_some());
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

    #[test]
    fn start_order_puts_dependencies_first_and_names_cycles() {
        let mut d = DesiredState::default();
        for (name, port, deps) in [
            ("web", 1, vec!["api"]),
            ("api", 2, vec!["db", "cache"]),
            ("db", 3, vec![]),
            ("cache", 4, vec![]),
        ] {
            let mut a = app(name);
            a.ports[0].external = port;
            a.depends_on = deps.into_iter().map(String::from).collect();
            d.applications.insert(name.into(), a);
        }
        assert_eq!(desired_problems(&d), Vec::<String>::new());
        assert_eq!(
            start_order(&d).expect("no cycle"),
            vec![vec!["cache", "db"], vec!["api"], vec!["web"]]
        );

        if let Some(db) = d.applications.get_mut("db") {
            db.depends_on = vec!["web".into()];
        }
        let problems = desired_problems(&d).join("\n");
        assert!(
            problems.contains("depends_on forms a cycle: api -> db -> web -> api"),
            "{problems}"
        );

        if let Some(db) = d.applications.get_mut("db") {
            db.depends_on = vec!["ghost".into(), "db".into()];
        }
        let problems = desired_problems(&d).join("\n");
        // A node's request holds only its own applications: an absent one is not an error.
        assert!(!problems.contains("ghost"), "{problems}");
        assert!(problems.contains("cannot depend on itself"), "{problems}");

        if let Some(db) = d.applications.get_mut("db") {
            db.depends_on.clear();
            db.container.container_name = Some("flocker-web".into());
        }
        let problems = desired_problems(&d).join("\n");
        assert!(
            problems.contains("both run in a container named \"flocker-web\""),
            "{problems}"
        );
    }
}
