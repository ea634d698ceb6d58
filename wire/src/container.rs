//! How an application's container runs beyond its image, environment, ports and volume: the
//! process (`command`, `entrypoint`, `user`, `working_dir`), its identity (`hostname`,
//! `labels`), how it stops (`stop_signal`, `stop_grace_ms`), its privileges (`cap_add`,
//! `cap_drop`) and terminal (`init`, `tty`, `stdin_open`), ports it only exposes, and a CPU
//! limit. Every field maps to one field of Docker's container create call, so every node runs
//! the same container.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels under this prefix are Flocker's own bookkeeping and cannot be set by a config.
pub const RESERVED_LABEL_PREFIX: &str = "flocker.";

/// The longest command line, label or other free-form value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The longest stop grace period (one hour): a stop that takes longer holds a move.
pub const MAX_STOP_GRACE_MS: u64 = 3_600_000;

/// Container settings; all empty by default, and then absent from the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSettings {
    /// The Docker container's name; `flocker-APPLICATION` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Replaces the image's command (`CMD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's entrypoint; an empty list clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The signal that asks the process to stop, e.g. `SIGQUIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// How long a stop waits after the signal before killing, in milliseconds (Docker counts
    /// whole seconds, so it is rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Run an init process as PID 1 that forwards signals and reaps zombies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin_open: bool,
    /// Ports the container exposes without routing them (compose `expose`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<u16>,
    /// CPU limit in billionths of a CPU (`cpus: 1.5` is 1,500,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus: Option<u64>,
    /// In-memory mounts: container path -> mount options (`size=64m`), never moved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tmpfs: BTreeMap<String, String>,
    /// Extra `/etc/hosts` lines as `HOST:ADDRESS`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
    /// Name servers (IP addresses) for the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    /// Size of `/dev/shm` in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
    /// Namespaced kernel parameters, e.g. `net.core.somaxconn`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_opt: Vec<String>,
    /// Mount the container's root filesystem read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Docker's log driver and its options (`json-file` with `max-size`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domainname: Option<String>,
    /// DNS search domains and resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_opt: Vec<String>,
    /// The most processes the container may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<i64>,
    /// Soft memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_reservation: Option<u64>,
    /// Memory plus swap limit in bytes; -1 for unlimited swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memswap_limit: Option<i64>,
    /// Extra groups for the container's process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i64>,
    /// Host paths the config declares present on every node (compose
    /// `x-flocker-node-local`), mounted read-only: host path -> container path. They never
    /// move; each node mounts its own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_local_binds: BTreeMap<String, String>,
}

/// A resource limit of the container's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

/// Where Docker sends the container's output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    pub driver: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// Why a host path cannot be mounted read-only into a container, if it cannot: both paths
/// absolute and plain (no `..`, no `:` or `,` that Docker's bind syntax splits on), and never
/// the Docker socket, which would give the container its node.
pub fn node_local_bind_problem(host: &str, target: &str) -> Option<String> {
    for (what, path) in [("host path", host), ("container path", target)] {
        let plain = path.starts_with('/')
            && !path.contains([':', ',', '\0'])
            && !path.split('/').any(|part| part == "..");
        if !plain {
            return Some(format!(
                "the {what} {path:?} must be an absolute path without `..`, `:` or `,`"
            ));
        }
    }
    if host.ends_with("docker.sock") {
        return Some(format!(
            "{host:?} cannot be honoured: the Docker socket gives the container control of its node, and with it \
             of every volume there; Flocker could no longer promise one writer per volume"
        ));
    }
    None
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl ContainerSettings {
    /// True when nothing is set, so the application's JSON leaves the field out.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The stop timeout Docker takes, in whole seconds, rounded up.
    pub fn stop_timeout_seconds(&self) -> Option<i64> {
        self.stop_grace_ms
            .map(|ms| i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX))
    }

    /// Every problem, each naming the value; used on what arrives over the network.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut free_form: Vec<(&str, &str)> = Vec::new();
        for (what, list) in [("command", &self.command), ("entrypoint", &self.entrypoint)] {
            if let Some(list) = list {
                free_form.extend(list.iter().map(|v| (what, v.as_str())));
                if what == "command" && list.is_empty() {
                    out.push("command: an empty command runs nothing".to_owned());
                }
            }
        }
        for (what, value) in [
            ("container_name", &self.container_name),
            ("user", &self.user),
            ("working_dir", &self.working_dir),
            ("hostname", &self.hostname),
            ("stop_signal", &self.stop_signal),
        ] {
            if let Some(value) = value {
                free_form.push((what, value));
                if value.is_empty() {
                    out.push(format!("{what}: empty"));
                }
            }
        }
        for (key, value) in &self.labels {
            free_form.push(("labels", key));
            free_form.push(("labels", value));
            out.extend(label_key_problem(key).map(|p| format!("labels: {p}")));
        }
        for (path, options) in &self.tmpfs {
            free_form.push(("tmpfs", path));
            free_form.push(("tmpfs", options));
            if !path.starts_with('/') || path.contains(',') {
                out.push(format!("tmpfs: {path:?} is not an absolute path"));
            }
        }
        for (host, target) in &self.node_local_binds {
            free_form.push(("node_local_binds", host));
            free_form.push(("node_local_binds", target));
            out.extend(
                node_local_bind_problem(host, target).map(|p| format!("node_local_binds: {p}")),
            );
        }
        for line in &self.extra_hosts {
            free_form.push(("extra_hosts", line));
            out.extend(extra_host_problem(line).map(|p| format!("extra_hosts: {p}")));
        }
        for server in &self.dns {
            if server.parse::<std::net::IpAddr>().is_err() {
                out.push(format!("dns: {server:?} is not an IP address"));
            }
        }
        for (name, limit) in &self.ulimits {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase()) {
                out.push(format!(
                    "ulimits: {name:?} is not a limit name such as nofile"
                ));
            }
            if limit.soft > limit.hard || limit.soft < -1 {
                out.push(format!(
                    "ulimits: {name}: soft limit {} above hard limit {} (or below -1)",
                    limit.soft, limit.hard
                ));
            }
        }
        for (key, value) in &self.sysctls {
            free_form.push(("sysctls", value));
            let valid = !key.is_empty()
                && key.len() <= 128
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
            if !valid {
                out.push(format!("sysctls: {key:?} is not a kernel parameter name"));
            }
        }
        for option in &self.security_opt {
            free_form.push(("security_opt", option));
        }
        if let Some(logging) = &self.logging {
            let valid = !logging.driver.is_empty()
                && logging.driver.len() <= 64
                && logging
                    .driver
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
            if !valid {
                out.push(format!(
                    "logging: {:?} is not a log driver name",
                    logging.driver
                ));
            }
            for (key, value) in &logging.options {
                free_form.push(("logging", key));
                free_form.push(("logging", value));
            }
        }
        if let Some(domain) = &self.domainname {
            out.extend(hostname_problem(domain).map(|p| format!("domainname: {p}")));
        }
        for domain in &self.dns_search {
            out.extend(hostname_problem(domain).map(|p| format!("dns_search: {p}")));
        }
        for item in self.dns_opt.iter().chain(&self.group_add) {
            free_form.push(("dns_opt", item));
        }
        if self.pids_limit.is_some_and(|p| p == 0 || p < -1) {
            out.push("pids_limit: a positive number, or -1 for none".to_owned());
        }
        if self.mem_reservation == Some(0) {
            out.push("mem_reservation: 0 bytes".to_owned());
        }
        if self.memswap_limit.is_some_and(|m| m == 0 || m < -1) {
            out.push("memswap_limit: a size, or -1 for unlimited swap".to_owned());
        }
        if self
            .oom_score_adj
            .is_some_and(|o| !(-1000..=1000).contains(&o))
        {
            out.push("oom_score_adj: between -1000 and 1000".to_owned());
        }
        if self.shm_size == Some(0) {
            out.push("shm_size: 0 bytes".to_owned());
        }
        for (what, value) in free_form {
            if value.contains('\0') {
                out.push(format!("{what}: values cannot contain NUL"));
            } else if value.len() > MAX_VALUE_BYTES {
                out.push(format!(
                    "{what}: a value of {} bytes is longer than {MAX_VALUE_BYTES}",
                    value.len()
                ));
            }
        }
        if let Some(dir) = &self.working_dir
            && !dir.starts_with('/')
        {
            out.push(format!(
                "working_dir: {dir:?} is not an absolute path inside the container"
            ));
        }
        if let Some(name) = &self.container_name {
            out.extend(container_name_problem(name).map(|p| format!("container_name: {p}")));
        }
        if let Some(host) = &self.hostname {
            out.extend(hostname_problem(host).map(|p| format!("hostname: {p}")));
        }
        if let Some(signal) = &self.stop_signal {
            out.extend(signal_problem(signal).map(|p| format!("stop_signal: {p}")));
        }
        if let Some(ms) = self.stop_grace_ms
            && ms > MAX_STOP_GRACE_MS
        {
            out.push(format!(
                "stop_grace_period: {ms} ms is longer than the hour a stop may take"
            ));
        }
        for cap in self.cap_add.iter().chain(&self.cap_drop) {
            out.extend(capability_problem(cap).map(|p| format!("capabilities: {p}")));
        }
        if self.expose.contains(&0) {
            out.push("expose: port 0 is not a port".to_owned());
        }
        if self.nano_cpus == Some(0) {
            out.push("cpus: a limit of 0 CPUs runs nothing".to_owned());
        }
        out
    }
}

/// Label keys: printable, no spaces, not Flocker's own.
pub fn label_key_problem(key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("a label needs a key".to_owned());
    }
    if key.starts_with(RESERVED_LABEL_PREFIX) {
        return Some(format!(
            "{key:?}: labels starting with {RESERVED_LABEL_PREFIX:?} are Flocker's own bookkeeping"
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("{key:?}: label keys cannot contain spaces"));
    }
    None
}

/// A container name as Docker accepts it: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128 bytes.
pub fn container_name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let valid = name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    (!valid).then(|| format!("{name:?} is not a valid container name"))
}

/// `HOST:ADDRESS` (or `HOST=ADDRESS`), as `/etc/hosts` takes it.
pub fn extra_host_problem(line: &str) -> Option<String> {
    let split = line.find([':', '=']);
    let valid = split.is_some_and(|at| {
        let (host, address) = (&line[..at], &line[at + 1..]);
        let address = address.trim_start_matches('[').trim_end_matches(']');
        hostname_problem(host).is_none()
            && (address.parse::<std::net::IpAddr>().is_ok() || address == "host-gateway")
    });
    (!valid).then(|| format!("{line:?} is not HOST:ADDRESS"))
}

/// A hostname as Docker accepts it: DNS labels of letters, digits and dashes.
pub fn hostname_problem(host: &str) -> Option<String> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then(|| format!("{host:?} is not a valid hostname"))
}

/// `SIGTERM`, `TERM` or a signal number 1..=64, as Docker accepts them.
pub fn signal_problem(signal: &str) -> Option<String> {
    if let Ok(n) = signal.parse::<u32>() {
        return (!(1..=64).contains(&n)).then(|| format!("{signal:?} is not a signal number"));
    }
    let name = signal.strip_prefix("SIG").unwrap_or(signal);
    let valid = !name.is_empty()
        && name.len() <= 12
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-');
    (!valid).then(|| format!("{signal:?} is not a signal name such as SIGTERM"))
}

/// Capability names: `NET_ADMIN`, `CAP_NET_ADMIN` or `ALL`.
pub fn capability_problem(cap: &str) -> Option<String> {
    let name = cap.strip_prefix("CAP_").unwrap_or(cap);
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    (!valid).then(|| format!("{cap:?} is not a capability name such as NET_ADMIN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_settings_are_absent_from_the_json() {
        let json = serde_json::to_string(&ContainerSettings::default()).expect("json");
        assert_eq!(json, "{}");
        assert!(ContainerSettings::default().is_empty());
    }

    #[test]
    fn good_settings_have_no_problems() {
        let settings = ContainerSettings {
            container_name: Some("my-redis".into()),
            command: Some(vec![
                "redis-server".into(),
                "--appendonly".into(),
                "yes".into(),
            ]),
            entrypoint: Some(vec![]),
            user: Some("999:999".into()),
            working_dir: Some("/data".into()),
            hostname: Some("cache-1".into()),
            labels: BTreeMap::from([("com.example.team".into(), "storage".into())]),
            stop_signal: Some("SIGQUIT".into()),
            stop_grace_ms: Some(1500),
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["ALL".into()],
            init: Some(true),
            tty: true,
            stdin_open: true,
            expose: vec![8080],
            nano_cpus: Some(500_000_000),
            tmpfs: BTreeMap::from([("/run".into(), "size=64m".into())]),
            extra_hosts: vec!["db.local:198.18.0.5".into()],
            dns: vec!["198.18.0.53".into()],
            ulimits: BTreeMap::from([(
                "nofile".into(),
                Ulimit {
                    soft: 1024,
                    hard: 4096,
                },
            )]),
            shm_size: Some(64 << 20),
            sysctls: BTreeMap::from([("net.core.somaxconn".into(), "1024".into())]),
            security_opt: vec!["no-new-privileges:true".into()],
            read_only: true,
            logging: Some(Logging {
                driver: "json-file".into(),
                options: BTreeMap::from([("max-size".into(), "10m".into())]),
            }),
            domainname: Some("example.com".into()),
            dns_search: vec!["svc.example.com".into()],
            dns_opt: vec!["ndots:2".into()],
            pids_limit: Some(100),
            mem_reservation: Some(1 << 20),
            memswap_limit: Some(-1),
            group_add: vec!["audio".into()],
            oom_score_adj: Some(-500),
            node_local_binds: BTreeMap::from([("/etc/ssl/certs".into(), "/certs".into())]),
        };
        assert_eq!(settings.problems(), Vec::<String>::new());
        assert_eq!(settings.stop_timeout_seconds(), Some(2));
    }

    #[test]
    fn hostile_settings_are_named() {
        let settings = ContainerSettings {
            command: Some(vec![]),
            container_name: Some("/bad".into()),
            working_dir: Some("data".into()),
            hostname: Some("-bad".into()),
            labels: BTreeMap::from([("flocker.application".into(), "{}".into())]),
            stop_signal: Some("SIG kill".into()),
            stop_grace_ms: Some(MAX_STOP_GRACE_MS + 1),
            cap_add: vec!["net_admin".into()],
            expose: vec![0],
            nano_cpus: Some(0),
            user: Some("a\0b".into()),
            extra_hosts: vec!["db".into()],
            dns: vec!["resolver".into()],
            ulimits: BTreeMap::from([("nofile".into(), Ulimit { soft: 9, hard: 1 })]),
            node_local_binds: BTreeMap::from([
                ("/var/run/docker.sock".into(), "/var/run/docker.sock".into()),
                ("/etc/../root".into(), "/x".into()),
            ]),
            ..ContainerSettings::default()
        };
        let problems = settings.problems().join("\n");
        for expected in [
            "gives the container control of its node",
            "without `..`",
            "empty command",
            "not a valid container name",
            "not an absolute path",
            "not a valid hostname",
            "Flocker's own bookkeeping",
            "not a signal name",
            "longer than the hour",
            "not a capability name",
            "port 0",
            "0 CPUs",
            "NUL",
            "not HOST:ADDRESS",
            "not an IP address",
            "above hard limit",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} not in {problems}"
            );
        }
    }
}
