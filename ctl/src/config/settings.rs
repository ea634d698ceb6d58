//! The container settings both dialects share, read the same way in each: `command`,
//! `entrypoint`, `user`, `working_dir`, `hostname`, `container_name`, `labels`,
//! `stop_signal`, `stop_grace_period`, `cap_add`, `cap_drop`, `init`, `tty`, `stdin_open`,
//! `expose`, `cpus`, `tmpfs`, `extra_hosts`, `dns`, `ulimits`, `shm_size`, `sysctls`,
//! `security_opt`, `read_only`, `logging`, and `depends_on`. Compose's spelling is used in
//! the native format too, so nothing is compose-only. Each key maps to one field of Docker's
//! container create call (see `flocker_wire::container`).

use std::collections::BTreeMap;

use flocker_wire::ContainerSettings;
use flocker_wire::container::{Logging, Ulimit};

use super::fields::{
    Sink, expect_list, expect_map, find, join, parse_duration_ms, port_in_range, size,
};
use super::yaml::{Entry, Kind, Mark, Node, Resolved};

/// The keys this module reads.
pub const SETTINGS_KEYS: &[&str] = &[
    "command",
    "entrypoint",
    "user",
    "working_dir",
    "hostname",
    "container_name",
    "labels",
    "stop_signal",
    "stop_grace_period",
    "cap_add",
    "cap_drop",
    "init",
    "tty",
    "stdin_open",
    "expose",
    "cpus",
    "tmpfs",
    "extra_hosts",
    "dns",
    "ulimits",
    "shm_size",
    "sysctls",
    "security_opt",
    "read_only",
    "logging",
    "domainname",
    "dns_search",
    "dns_opt",
    "pids_limit",
    "mem_reservation",
    "memswap_limit",
    "group_add",
    "oom_score_adj",
];

/// The most ports one `expose` range may name.
const MAX_EXPOSE_RANGE: u32 = 1024;

/// A `depends_on` entry waiting for every application to be known.
#[derive(Debug, Clone)]
pub struct PendingDependency {
    pub application: String,
    pub target: String,
    pub mark: Mark,
    pub path: String,
}

/// Reads every settings key present in `entries` of application `name`. Problems go to
/// `sink`, each at its value; what is valid is kept.
pub fn parse_settings(sink: &mut Sink<'_>, entries: &[Entry], name: &str) -> ContainerSettings {
    let mut s = ContainerSettings::default();
    for entry in entries {
        let path = join(name, &entry.key);
        let node = &entry.value;
        match entry.key.as_str() {
            "command" => s.command = command_line(sink, node, &path),
            "entrypoint" => s.entrypoint = command_line(sink, node, &path),
            "user" => {
                s.user = text(
                    sink,
                    node,
                    &path,
                    "a user such as \"999\" or \"redis:redis\"",
                )
            }
            "working_dir" => s.working_dir = text(sink, node, &path, "an absolute path"),
            "hostname" => s.hostname = text(sink, node, &path, "a hostname"),
            "container_name" => s.container_name = text(sink, node, &path, "a container name"),
            "labels" => s.labels = key_values(sink, node, &path, "labels"),
            "stop_signal" => s.stop_signal = text(sink, node, &path, "a signal such as SIGQUIT"),
            "stop_grace_period" => s.stop_grace_ms = grace_period(sink, node, &path),
            "cap_add" => s.cap_add = strings(sink, node, &path, "a list of capabilities"),
            "cap_drop" => s.cap_drop = strings(sink, node, &path, "a list of capabilities"),
            "init" => s.init = boolean(sink, node, &path),
            "tty" => s.tty = boolean(sink, node, &path).unwrap_or(false),
            "stdin_open" => s.stdin_open = boolean(sink, node, &path).unwrap_or(false),
            "expose" => s.expose = expose(sink, node, &path),
            "cpus" => s.nano_cpus = cpus(sink, node, &path),
            "tmpfs" => s.tmpfs = tmpfs(sink, node, &path),
            "extra_hosts" => s.extra_hosts = extra_hosts(sink, node, &path),
            "dns" => s.dns = strings(sink, node, &path, "a name server address or a list"),
            "ulimits" => s.ulimits = ulimits(sink, node, &path),
            "shm_size" => s.shm_size = size(sink, node, &path),
            "sysctls" => s.sysctls = key_values(sink, node, &path, "sysctls"),
            "security_opt" => s.security_opt = strings(sink, node, &path, "a list of options"),
            "read_only" => s.read_only = boolean(sink, node, &path).unwrap_or(false),
            "logging" => s.logging = logging(sink, node, &path),
            "domainname" => s.domainname = text(sink, node, &path, "a domain name"),
            "dns_search" => s.dns_search = strings(sink, node, &path, "a domain or a list"),
            "dns_opt" => s.dns_opt = strings(sink, node, &path, "a list of resolver options"),
            "pids_limit" => s.pids_limit = signed(sink, node, &path),
            "mem_reservation" => s.mem_reservation = size(sink, node, &path),
            "memswap_limit" => {
                s.memswap_limit = if node.as_int() == Some(-1) {
                    Some(-1)
                } else {
                    size(sink, node, &path).and_then(|b| i64::try_from(b).ok())
                }
            }
            "group_add" => s.group_add = strings(sink, node, &path, "a list of groups"),
            "oom_score_adj" => s.oom_score_adj = signed(sink, node, &path),
            _ => {}
        }
    }
    // The wire crate's checks are what an agent applies; running them here reports the
    // same problems with a location.
    for problem in s.problems() {
        let (key, message) = problem.split_once(": ").unwrap_or(("", problem.as_str()));
        let entry = match key {
            "capabilities" => find(entries, "cap_add").or_else(|| find(entries, "cap_drop")),
            key => find(entries, key),
        };
        let (mark, key) = entry.map_or((Mark::default(), key), |e| (e.value.mark, e.key.as_str()));
        sink.error(mark, join(name, key), message);
    }
    s
}

/// `depends_on`: a list of names, or a mapping from names to `{condition, required, restart}`.
pub fn depends_on(
    sink: &mut Sink<'_>,
    node: &Node,
    application: &str,
    out: &mut Vec<PendingDependency>,
) {
    let path = join(application, "depends_on");
    let mut push = |target: &str, mark: Mark, path: String| {
        out.push(PendingDependency {
            application: application.to_owned(),
            target: target.to_owned(),
            mark,
            path,
        });
    };
    match &node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                match item.as_str() {
                    Some(target) => push(target, item.mark, item_path),
                    None => sink.error(
                        item.mark,
                        item_path,
                        format!("expected an application name, found {}", item.describe()),
                    ),
                }
            }
        }
        Kind::Map(entries) => {
            for entry in entries {
                let entry_path = join(&path, &entry.key);
                if dependency_options(sink, &entry.value, &entry_path) {
                    push(&entry.key, entry.key_mark, entry_path);
                }
            }
        }
        _ if node.is_null() => {}
        _ => sink.error(
            node.mark,
            path,
            format!(
                "expected a list of application names or a mapping of them, found {}",
                node.describe()
            ),
        ),
    }
}

/// The long form's options; false when the dependency cannot be honoured.
fn dependency_options(sink: &mut Sink<'_>, node: &Node, path: &str) -> bool {
    if node.is_null() {
        return true;
    }
    let Some(fields) = expect_map(sink, node, path, "a mapping with `condition`") else {
        return false;
    };
    let mut ok = true;
    for field in fields {
        let field_path = join(path, &field.key);
        match field.key.as_str() {
            "condition" => match field.value.as_str() {
                Some("service_started") => {}
                // A start is done only once its application is ready (its health check
                // passed, or its first port accepts connections), so the next wave of starts
                // waits for exactly that.
                Some("service_healthy") => {}
                Some("service_completed_successfully") => {
                    sink.error(
                        field.value.mark,
                        field_path,
                        "`service_completed_successfully` cannot be honoured: applications are \
                         long-running services, and a one-shot job has no node to finish on",
                    );
                    ok = false;
                }
                _ => {
                    sink.error(
                        field.value.mark,
                        field_path,
                        format!("expected service_started, found {}", field.value.describe()),
                    );
                    ok = false;
                }
            },
            // Whether compose restarts the dependent when the dependency is restarted:
            // Flocker restarts an application only when its own settings change.
            "restart" | "required" => {
                if boolean(sink, &field.value, &field_path).is_none() {
                    ok = false;
                }
            }
            _ => {
                sink.error(
                    field.key_mark,
                    field_path,
                    "unknown key; allowed keys are: condition, required, restart",
                );
                ok = false;
            }
        }
    }
    ok
}

/// Reports dependencies on applications the file does not define; returns the valid ones
/// per application.
pub fn resolve_dependencies(
    sink: &mut Sink<'_>,
    pending: Vec<PendingDependency>,
    defined: &BTreeMap<String, Mark>,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first_mark: BTreeMap<String, (Mark, String)> = BTreeMap::new();
    for dependency in pending {
        if !defined.contains_key(&dependency.target) {
            sink.error(
                dependency.mark,
                dependency.path,
                format!(
                    "depends on `{}`, which is not defined in this file",
                    dependency.target
                ),
            );
        } else if dependency.target == dependency.application {
            sink.error(
                dependency.mark,
                dependency.path,
                "an application cannot depend on itself",
            );
        } else {
            first_mark
                .entry(dependency.application.clone())
                .or_insert((dependency.mark, dependency.path));
            let list = out.entry(dependency.application).or_default();
            if !list.contains(&dependency.target) {
                list.push(dependency.target);
            }
        }
    }
    if let Some(cycle) = find_cycle(&out) {
        let (mark, path) = first_mark
            .get(&cycle[0])
            .cloned()
            .unwrap_or((Mark::default(), cycle[0].clone()));
        sink.error(
            mark,
            path,
            format!(
                "depends_on forms a cycle, so no application in it could start first: {}",
                cycle.join(" -> ")
            ),
        );
        out.clear();
    }
    out
}

/// A dependency cycle, as the names along it with the first repeated at the end.
fn find_cycle(graph: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    // Depth-first search with the path kept; `done` holds names known to reach no cycle.
    fn visit(
        name: &str,
        graph: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == name) {
            let mut cycle = path[start..].to_vec();
            cycle.push(name.to_owned());
            return Some(cycle);
        }
        if done.contains(name) {
            return None;
        }
        path.push(name.to_owned());
        for next in graph.get(name).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(name.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|name| visit(name, graph, &mut Vec::new(), &mut done))
}

/// A scalar as text: strings, and numbers as written. Booleans and null are refused.
fn text(sink: &mut Sink<'_>, node: &Node, path: &str, what: &str) -> Option<String> {
    match node.as_scalar().map(|s| (s, s.resolve())) {
        Some((_, Resolved::Str(s))) => Some(s.to_owned()),
        Some((s, Resolved::Int(_) | Resolved::Float)) => Some(s.text.clone()),
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected {what}, found {}", node.describe()),
            );
            None
        }
    }
}

pub(super) fn signed(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<i64> {
    let found = node.as_int().and_then(|i| i64::try_from(i).ok());
    if found.is_none() {
        sink.error(
            node.mark,
            path,
            format!("expected an integer, found {}", node.describe()),
        );
    }
    found
}

fn boolean(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<bool> {
    match node.as_scalar().map(|s| s.resolve()) {
        Some(Resolved::Bool(b)) => Some(b),
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected true or false, found {}", node.describe()),
            );
            None
        }
    }
}

/// A single string or a list of strings (numbers kept as written).
fn strings(sink: &mut Sink<'_>, node: &Node, path: &str, what: &str) -> Vec<String> {
    match &node.kind {
        Kind::Seq(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| text(sink, item, &format!("{path}[{i}]"), "a string"))
            .collect(),
        Kind::Scalar(_) if !node.is_null() => text(sink, node, path, what).into_iter().collect(),
        _ if node.is_null() => Vec::new(),
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected {what}, found {}", node.describe()),
            );
            Vec::new()
        }
    }
}

/// `command`/`entrypoint`: a list of arguments, or one string split like a shell would
/// (quotes and backslashes; no variables, globs or pipes).
fn command_line(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Vec<String>> {
    match &node.kind {
        Kind::Seq(items) => Some(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    text(sink, item, &format!("{path}[{i}]"), "an argument string")
                })
                .collect(),
        ),
        Kind::Scalar(_) if !node.is_null() => {
            let line = text(sink, node, path, "a command line or a list of arguments")?;
            split_command_line(&line)
                .map_err(|e| sink.error(node.mark, path, format!("{line:?}: {e}")))
                .ok()
        }
        _ => {
            sink.error(
                node.mark,
                path,
                format!(
                    "expected a command line or a list of arguments, found {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

/// Splits a command line into arguments the way a POSIX shell does for words: blanks
/// separate, single quotes keep everything, double quotes keep all but `\"`, `\\`, `\$` and
/// `` \` `` escapes, and a backslash outside quotes keeps the next character.
pub fn split_command_line(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("a single quote is not closed".to_owned()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("a double quote is not closed".to_owned()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("a double quote is not closed".to_owned()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => word.push(c),
                    None => return Err("the line ends with a lone backslash".to_owned()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A mapping of strings, or a list of `KEY=VALUE` (labels, sysctls, log options).
fn key_values(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    what: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.kind {
        Kind::Map(entries) => {
            for entry in entries {
                let entry_path = join(path, &entry.key);
                let value = if entry.value.is_null() {
                    Some(String::new())
                } else {
                    text(sink, &entry.value, &entry_path, "a string")
                };
                if let Some(value) = value {
                    out.insert(entry.key.clone(), value);
                }
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                let Some(line) = text(sink, item, &item_path, "a \"KEY=VALUE\" string") else {
                    continue;
                };
                let (key, value) = line.split_once('=').unwrap_or((line.as_str(), ""));
                if out.insert(key.to_owned(), value.to_owned()).is_some() {
                    sink.error(item.mark, item_path, format!("`{key}` is set twice"));
                }
            }
        }
        _ if node.is_null() => {}
        _ => sink.error(
            node.mark,
            path,
            format!(
                "expected {what} as a mapping or a list of \"KEY=VALUE\" strings, found {}",
                node.describe()
            ),
        ),
    }
    out
}

/// Compose durations: `10s`, `1m30s`, `1.5s`, `500ms`, `2h`.
fn grace_period(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u64> {
    let found = match node.as_scalar().map(|s| (s, s.resolve())) {
        Some((_, Resolved::Str(s))) => parse_duration_ms(s),
        Some((s, Resolved::Int(_))) => parse_duration_ms(&s.text),
        _ => Err(format!(
            "expected a duration such as \"10s\" or \"1m30s\", found {}",
            node.describe()
        )),
    };
    found.map_err(|e| sink.error(node.mark, path, e)).ok()
}

/// `expose`: ports as numbers or `"3000"`, `"3000/tcp"`, `"8000-8010"`.
fn expose(sink: &mut Sink<'_>, node: &Node, path: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, item) in expect_list(sink, node, path, "a list of ports")
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let item_path = format!("{path}[{i}]");
        let Some(spec) = text(sink, item, &item_path, "a port such as \"8080\"") else {
            continue;
        };
        let spec = spec
            .strip_suffix("/tcp")
            .or_else(|| spec.strip_suffix("/udp"))
            .unwrap_or(&spec);
        let range = match spec.split_once('-') {
            Some((low, high)) => {
                port_in_range(low).and_then(|l| port_in_range(high).map(|h| (l, h)))
            }
            None => port_in_range(spec).map(|p| (p, p)),
        };
        match range {
            Ok((low, high)) if low <= high && u32::from(high - low) < MAX_EXPOSE_RANGE => {
                out.extend(low..=high);
            }
            Ok(_) => sink.error(
                item.mark,
                item_path,
                format!("{spec:?}: a range must go up and name at most {MAX_EXPOSE_RANGE} ports"),
            ),
            Err(e) => sink.error(item.mark, item_path, e),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `cpus: 1.5` or `"0.5"`: a positive number of CPUs, in billionths.
pub(super) fn cpus(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u64> {
    let text = node.as_scalar().map(|s| s.text.trim().to_owned());
    let value = text.as_deref().and_then(|t| t.parse::<f64>().ok());
    match value {
        Some(v) if v.is_finite() && v > 0.0 && v <= 4096.0 => {
            // Bounded above, so the product fits.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some((v * 1e9).round() as u64)
        }
        _ => {
            sink.error(
                node.mark,
                path,
                format!(
                    "expected a positive number of CPUs such as 0.5 or 2, found {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

/// `tmpfs: /run` or a list of `PATH[:OPTIONS]`.
fn tmpfs(sink: &mut Sink<'_>, node: &Node, path: &str) -> BTreeMap<String, String> {
    strings(sink, node, path, "a path or a list of paths")
        .into_iter()
        .map(|spec| match spec.split_once(':') {
            Some((p, options)) => (p.to_owned(), options.to_owned()),
            None => (spec, String::new()),
        })
        .collect()
}

/// A list of `HOST:ADDRESS` (or `HOST=ADDRESS`), or a mapping from hosts to addresses.
fn extra_hosts(sink: &mut Sink<'_>, node: &Node, path: &str) -> Vec<String> {
    match &node.kind {
        Kind::Map(entries) => entries
            .iter()
            .filter_map(|e| {
                text(sink, &e.value, &join(path, &e.key), "an address")
                    .map(|address| format!("{}:{address}", e.key))
            })
            .collect(),
        _ => strings(sink, node, path, "a list of \"HOST:ADDRESS\" strings")
            .into_iter()
            .map(|line| line.replacen('=', ":", 1))
            .collect(),
    }
}

/// `ulimits: {nofile: {soft: 1024, hard: 4096}, nproc: 65535}`.
fn ulimits(sink: &mut Sink<'_>, node: &Node, path: &str) -> BTreeMap<String, Ulimit> {
    let mut out = BTreeMap::new();
    for entry in expect_map(sink, node, path, "a mapping of limits").unwrap_or(&[]) {
        let entry_path = join(path, &entry.key);
        let limit = match &entry.value.kind {
            Kind::Map(fields) => {
                super::fields::check_keys(sink, fields, &["soft", "hard"], &entry_path);
                let soft = find(fields, "soft")
                    .and_then(|f| limit_value(sink, &f.value, &join(&entry_path, "soft")));
                let hard = find(fields, "hard")
                    .and_then(|f| limit_value(sink, &f.value, &join(&entry_path, "hard")));
                match (soft, hard) {
                    (Some(soft), Some(hard)) => Some(Ulimit { soft, hard }),
                    _ => {
                        sink.error(
                            entry.value.mark,
                            entry_path,
                            "a limit needs both `soft` and `hard`",
                        );
                        None
                    }
                }
            }
            _ => limit_value(sink, &entry.value, &entry_path).map(|v| Ulimit { soft: v, hard: v }),
        };
        if let Some(limit) = limit {
            out.insert(entry.key.clone(), limit);
        }
    }
    out
}

fn limit_value(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<i64> {
    match node.as_int().and_then(|i| i64::try_from(i).ok()) {
        Some(v) if v >= -1 => Some(v),
        _ => {
            sink.error(
                node.mark,
                path,
                format!(
                    "expected an integer limit (-1 for unlimited), found {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

/// `logging: {driver: json-file, options: {max-size: 10m}}`.
fn logging(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Logging> {
    let fields = expect_map(sink, node, path, "a mapping with `driver` and `options`")?;
    super::fields::check_keys(sink, fields, &["driver", "options"], path);
    let driver = match find(fields, "driver") {
        Some(f) => text(sink, &f.value, &join(path, "driver"), "a log driver name")?,
        None => "json-file".to_owned(),
    };
    let options = find(fields, "options")
        .map(|f| key_values(sink, &f.value, &join(path, "options"), "log options"))
        .unwrap_or_default();
    Some(Logging { driver, options })
}
