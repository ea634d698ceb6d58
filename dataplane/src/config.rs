//! The agent's configuration: command-line flags and/or a TOML file (flags win), resolved
//! into one checked [`AgentConfig`]. Every problem is reported, not just the first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::TlsFiles;

/// Default API port.
pub const DEFAULT_PORT: u16 = 4523;

/// Errors of configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Command-line flags of `flocker-agent`.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "flocker-agent", version, about = "The Flocker node agent")]
pub struct Flags {
    /// TOML file with the same keys as the flags (snake_case); flags override it.
    #[arg(long, env = "FLOCKER_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's address as the deployment file names it.
    #[arg(long)]
    pub node_address: Option<String>,
    /// Address to listen on [default: [::]:4523, IPv4 and IPv6 on one socket].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Port of the other agents [default: 4523].
    #[arg(long)]
    pub peer_port: Option<u16>,
    /// Docker socket, `unix:///run/docker.sock` or a path.
    #[arg(long)]
    pub docker_host: Option<String>,
    /// Volume backend: `zfs:POOL[/PARENT]`, `btrfs:PATH` or `dir:PATH`.
    #[arg(long)]
    pub volumes: Option<String>,
    /// Routing backend: `auto` (eBPF where possible, else nftables), `nftables`, `ebpf`,
    /// or `none` (routes are recorded but not programmed).
    #[arg(long)]
    pub routing: Option<String>,
    /// The cgroup v2 directory the eBPF connect4/getpeername4 programs attach to: only
    /// processes below it are redirected at connect() [default: the host's cgroup v2 root].
    #[arg(long)]
    pub bpf_cgroup: Option<PathBuf>,
    /// The cluster CA certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// This node's certificate.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This node's private key (mode 0600; the agent warns otherwise).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The cluster's revocation list (`cluster.crl` from `flockerctl ca`). Re-read when it
    /// changes, without a restart; while it is missing or unreadable every peer is refused.
    /// Without it, revoked certificates are accepted until they expire.
    #[arg(long)]
    pub crl: Option<PathBuf>,
    /// Where the agent keeps its route file [default: /var/lib/flocker].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Cap on replication pushes to standby nodes, bytes per second.
    #[arg(long)]
    pub replication_rate_limit: Option<u64>,
    /// Cap on the pushes of a move from this node, bytes per second [default: no cap]. A
    /// capped move takes longer before its application stops, not during the downtime
    /// itself unless the final push is large.
    #[arg(long)]
    pub move_rate_limit: Option<u64>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address, for example
    /// `127.0.0.1:9523` [default: not served]. Metrics reveal volume and application
    /// names: keep the address on localhost or a management network.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// How long a start waits for its application to be ready (its health check passes,
    /// or its first port accepts connections) before the converge step fails, in seconds
    /// [default: 120]. A health check that needs longer for its verdict gets that long.
    #[arg(long)]
    pub ready_timeout: Option<u64>,
    /// During a move here, how long a new connection to the application's port is held
    /// until the application is ready, before it is reset, in seconds [default: 5]. Also
    /// how long the port is held after the routes switched here if no start follows.
    #[arg(long)]
    pub hold_timeout: Option<u64>,
    /// With the eBPF backend, a UDP flow from outside is over after this many seconds
    /// without a datagram either way: its next datagram starts a new flow that follows the
    /// route as it is then [default: 120, conntrack's for UDP streams]. The nftables backend
    /// follows the kernel's conntrack timeouts instead.
    #[arg(long)]
    pub udp_idle_timeout: Option<u64>,
    /// Whether application containers join a network holder container, which owns their
    /// network namespace and is started ahead of a move's start (a shorter pause) [default:
    /// true on x86-64, the only architecture with a holder program; false elsewhere].
    #[arg(long)]
    pub netns_holders: Option<bool>,
}

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_address: Option<String>,
    listen: Option<SocketAddr>,
    peer_port: Option<u16>,
    docker_host: Option<String>,
    volumes: Option<String>,
    routing: Option<String>,
    bpf_cgroup: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    crl: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    log_format: Option<String>,
    replication_rate_limit: Option<u64>,
    move_rate_limit: Option<u64>,
    metrics_listen: Option<SocketAddr>,
    ready_timeout: Option<u64>,
    hold_timeout: Option<u64>,
    udp_idle_timeout: Option<u64>,
    netns_holders: Option<bool>,
}

/// Which volume backend, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    Zfs { dataset: String },
    Btrfs { path: PathBuf },
    Dir { path: PathBuf },
}

impl VolumeSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("zfs", d)) if !d.is_empty() => Ok(VolumeSpec::Zfs {
                dataset: d.to_string(),
            }),
            Some(("btrfs", p)) if p.starts_with('/') => Ok(VolumeSpec::Btrfs { path: p.into() }),
            Some(("dir", p)) if p.starts_with('/') => Ok(VolumeSpec::Dir { path: p.into() }),
            _ => Err(format!(
                "volumes: {s:?} is not zfs:POOL[/PARENT], btrfs:/PATH or dir:/PATH"
            )),
        }
    }
}

/// Which routing backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingChoice {
    None,
    Auto,
    Nftables,
    Ebpf,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub node_address: String,
    pub listen: SocketAddr,
    pub peer_port: u16,
    pub docker_socket: PathBuf,
    pub volumes: VolumeSpec,
    pub routing: RoutingChoice,
    /// Where the eBPF programs attach; the host's cgroup v2 root when `None`.
    pub bpf_cgroup: Option<PathBuf>,
    pub tls: TlsFiles,
    /// The revocation list, if any.
    pub crl: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub json_logs: bool,
    /// Bytes per second for replication pushes; `None` for no cap.
    pub replication_rate_limit: Option<u64>,
    /// Bytes per second for the pushes of a move; `None` for no cap.
    pub move_rate_limit: Option<u64>,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a start waits for readiness.
    pub ready_timeout: std::time::Duration,
    pub hold_timeout: std::time::Duration,
    /// How long a UDP flow the eBPF backend carries may be idle.
    pub udp_idle_timeout: std::time::Duration,
    /// Application containers join a network holder ([`crate::netns_holder`]).
    pub netns_holders: bool,
}

impl AgentConfig {
    /// Merges flags over the file (if any) and checks the result.
    pub fn resolve(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let mut errors = Vec::new();
        let mut required = |name: &str, v: Option<PathBuf>| {
            v.unwrap_or_else(|| {
                errors.push(format!(
                    "{name}: required (flag --{} or the file)",
                    name.replace('_', "-")
                ));
                PathBuf::new()
            })
        };
        let ca_cert = required("ca_cert", flags.ca_cert.or(file.ca_cert));
        let cert = required("cert", flags.cert.or(file.cert));
        let key = required("key", flags.key.or(file.key));
        let node_address = flags.node_address.or(file.node_address).unwrap_or_else(|| {
            errors.push("node_address: required (flag --node-address or the file)".into());
            String::new()
        });
        if !node_address.is_empty()
            && let Some(problem) = flocker_wire::checks::address_problem(&node_address)
        {
            errors.push(format!("node_address: {problem}"));
        }
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)));
        let docker = flags
            .docker_host
            .or(file.docker_host)
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let docker_socket = match docker.strip_prefix("unix://") {
            Some(p) => PathBuf::from(p),
            None if docker.starts_with('/') => PathBuf::from(&docker),
            None => {
                errors.push(format!(
                    "docker_host: {docker:?} is not a unix socket (unix:///PATH or /PATH)"
                ));
                PathBuf::new()
            }
        };
        let state_dir = flags
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/flocker"));
        let volumes_text = flags
            .volumes
            .or(file.volumes)
            .unwrap_or_else(|| format!("dir:{}", state_dir.join("volumes").display()));
        let volumes = VolumeSpec::parse(&volumes_text).unwrap_or_else(|e| {
            errors.push(e);
            VolumeSpec::Dir {
                path: PathBuf::new(),
            }
        });
        let routing = match flags
            .routing
            .or(file.routing)
            .unwrap_or_else(|| "auto".into())
            .as_str()
        {
            "none" => RoutingChoice::None,
            "auto" => RoutingChoice::Auto,
            "nftables" => RoutingChoice::Nftables,
            "ebpf" => RoutingChoice::Ebpf,
            other => {
                errors.push(format!(
                    "routing: {other:?} is not one of auto, nftables, ebpf, none"
                ));
                RoutingChoice::None
            }
        };
        let json_logs = match flags
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into())
            .as_str()
        {
            "text" => false,
            "json" => true,
            other => {
                errors.push(format!("log_format: {other:?} is not text or json"));
                false
            }
        };
        let replication_rate_limit = flags.replication_rate_limit.or(file.replication_rate_limit);
        if replication_rate_limit == Some(0) {
            errors.push(
                "replication_rate_limit: 0 would stop replication; leave it out for no cap".into(),
            );
        }
        let move_rate_limit = flags.move_rate_limit.or(file.move_rate_limit);
        if move_rate_limit == Some(0) {
            errors.push("move_rate_limit: 0 would stop every move; leave it out for no cap".into());
        }
        let ready_timeout = flags
            .ready_timeout
            .or(file.ready_timeout)
            .unwrap_or(crate::agent::DEFAULT_READY_TIMEOUT.as_secs());
        if !(1..=3600).contains(&ready_timeout) {
            errors.push(format!(
                "ready_timeout: {ready_timeout} s is outside 1 to 3600 seconds"
            ));
        }
        let hold_timeout = flags
            .hold_timeout
            .or(file.hold_timeout)
            .unwrap_or(crate::hold::DEFAULT_HOLD_TIMEOUT.as_secs());
        if !(1..=600).contains(&hold_timeout) {
            errors.push(format!(
                "hold_timeout: {hold_timeout} s is outside 1 to 600 seconds"
            ));
        }
        let udp_idle_timeout = flags
            .udp_idle_timeout
            .or(file.udp_idle_timeout)
            .unwrap_or(flocker_routing::ebpf::DEFAULT_UDP_IDLE.as_secs());
        if !(1..=86_400).contains(&udp_idle_timeout) {
            errors.push(format!(
                "udp_idle_timeout: {udp_idle_timeout} s is outside 1 to 86400 seconds"
            ));
        }
        let netns_holders = flags
            .netns_holders
            .or(file.netns_holders)
            .unwrap_or_else(crate::netns_holder::supported);
        if netns_holders && !crate::netns_holder::supported() {
            errors.push(format!(
                "netns_holders: there is no network holder program for {}; set it to false",
                std::env::consts::ARCH
            ));
        }
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(AgentConfig {
            node_address,
            listen,
            peer_port: flags.peer_port.or(file.peer_port).unwrap_or(DEFAULT_PORT),
            docker_socket,
            volumes,
            routing,
            bpf_cgroup: flags.bpf_cgroup.or(file.bpf_cgroup),
            tls: TlsFiles { ca_cert, cert, key },
            crl: flags.crl.or(file.crl),
            state_dir,
            json_logs,
            replication_rate_limit,
            move_rate_limit,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            ready_timeout: std::time::Duration::from_secs(ready_timeout),
            hold_timeout: std::time::Duration::from_secs(hold_timeout),
            udp_idle_timeout: std::time::Duration::from_secs(udp_idle_timeout),
            netns_holders,
        })
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "node_address = \"198.18.0.11\"\nvolumes = \"zfs:tank/flocker\"\nca_cert = \"/ca\"\ncert = \"/c\"\nkey = \"/k\"\nrouting = \"none\"\n",
        )
        .expect("write");
        let flags = Flags {
            config: Some(file),
            node_address: Some("198.18.0.12".into()),
            docker_host: Some("unix:///run/d.sock".into()),
            ..Flags::default()
        };
        let c = AgentConfig::resolve(flags).expect("resolve");
        assert_eq!(c.node_address, "198.18.0.12");
        assert_eq!(c.listen.to_string(), "[::]:4523");
        assert_eq!(c.docker_socket, PathBuf::from("/run/d.sock"));
        assert_eq!(
            c.volumes,
            VolumeSpec::Zfs {
                dataset: "tank/flocker".into()
            }
        );
        assert_eq!(c.routing, RoutingChoice::None);
    }

    #[test]
    fn reports_every_problem() {
        let flags = Flags {
            volumes: Some("nfs:/x".into()),
            routing: Some("magic".into()),
            ..Flags::default()
        };
        let err = AgentConfig::resolve(flags)
            .expect_err("invalid")
            .to_string();
        for needle in ["ca_cert", "cert", "key", "node_address", "nfs:/x", "magic"] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn an_ipv6_node_address_is_taken_in_its_canonical_spelling_only() {
        let flags = |address: &str| Flags {
            node_address: Some(address.into()),
            volumes: Some("dir:/var/lib/flocker".into()),
            ca_cert: Some("/ca".into()),
            cert: Some("/c".into()),
            key: Some("/k".into()),
            routing: Some("none".into()),
            listen: Some("[2001:db8::11]:4523".parse().expect("literal")),
            ..Flags::default()
        };
        let c = AgentConfig::resolve(flags("2001:db8::11")).expect("canonical");
        assert_eq!(c.node_address, "2001:db8::11");
        assert_eq!(c.listen.to_string(), "[2001:db8::11]:4523");
        let err = AgentConfig::resolve(flags("2001:DB8:0::11"))
            .expect_err("not canonical")
            .to_string();
        assert!(
            err.contains("node_address: \"2001:DB8:0::11\" is not written canonically; write it as 2001:db8::11"),
            "{err}"
        );
    }

    #[test]
    fn the_udp_idle_timeout_defaults_to_conntracks_and_is_bounded() {
        let flags = |idle: Option<u64>| Flags {
            node_address: Some("198.18.0.11".into()),
            volumes: Some("dir:/var/lib/flocker".into()),
            ca_cert: Some("/ca".into()),
            cert: Some("/c".into()),
            key: Some("/k".into()),
            udp_idle_timeout: idle,
            ..Flags::default()
        };
        let c = AgentConfig::resolve(flags(None)).expect("default");
        assert_eq!(c.udp_idle_timeout, std::time::Duration::from_secs(120));
        let c = AgentConfig::resolve(flags(Some(30))).expect("30 s");
        assert_eq!(c.udp_idle_timeout, std::time::Duration::from_secs(30));
        for bad in [0, 86_401] {
            let err = AgentConfig::resolve(flags(Some(bad)))
                .expect_err("out of range")
                .to_string();
            assert!(err.contains("udp_idle_timeout"), "{err}");
        }
    }

    #[test]
    fn network_holders_are_on_where_there_is_a_holder_program_unless_turned_off() {
        let flags = |holders: Option<bool>| Flags {
            node_address: Some("198.18.0.11".into()),
            volumes: Some("dir:/var/lib/flocker".into()),
            ca_cert: Some("/ca".into()),
            cert: Some("/c".into()),
            key: Some("/k".into()),
            netns_holders: holders,
            ..Flags::default()
        };
        let c = AgentConfig::resolve(flags(None)).expect("default");
        assert_eq!(c.netns_holders, crate::netns_holder::supported());
        let c = AgentConfig::resolve(flags(Some(false))).expect("off");
        assert!(!c.netns_holders);
        if crate::netns_holder::supported() {
            assert!(
                AgentConfig::resolve(flags(Some(true)))
                    .expect("on")
                    .netns_holders
            );
        } else {
            let err = AgentConfig::resolve(flags(Some(true)))
                .expect_err("no holder program")
                .to_string();
            assert!(err.contains("netns_holders"), "{err}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let flags = Flags {
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/agent.toml.example"
            ))),
            ..Flags::default()
        };
        let c = AgentConfig::resolve(flags).expect("example config");
        assert_eq!(c.routing, RoutingChoice::Auto);
        assert_eq!(c.peer_port, 4523);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "nodeaddress = \"x\"\n").expect("write");
        let flags = Flags {
            config: Some(file),
            ..Flags::default()
        };
        let err = AgentConfig::resolve(flags)
            .expect_err("invalid")
            .to_string();
        assert!(err.contains("nodeaddress"), "{err}");
    }
}
