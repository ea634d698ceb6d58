//! Small helpers the end-to-end scenarios share: config files in a temporary directory,
//! reading command output, an HTTP GET and a Redis connection through a node's routed port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::cluster::ClusterNode;
use crate::redis::Redis;

/// Runs `scenario` once per routing backend, one after the other (a cluster's namespace
/// and pool names are fixed, so two clusters cannot run at once); an error names the backend.
pub fn for_each_backend(mut scenario: impl FnMut(&str) -> Result<()>) -> Result<()> {
    for routing in ["nftables", "ebpf"] {
        eprintln!("=== routing backend: {routing}");
        scenario(routing).with_context(|| format!("with {routing} routing"))?;
    }
    Ok(())
}

/// Config files written for one scenario, removed with it.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Result<Files> {
        Ok(Files {
            dir: tempfile::tempdir()?,
        })
    }

    /// Writes `text` to `name` in the scenario's directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// Command output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Redis through `node`'s routed port 6379, retried for about 10 s while routes and
/// containers settle.
pub fn redis_at(node: &ClusterNode) -> Result<Redis> {
    redis_at_port(node, 6379)
}

/// [`redis_at`] on another external port.
pub fn redis_at_port(node: &ClusterNode, port: u16) -> Result<Redis> {
    let addr = format!("{}:{port}", node.address);
    let mut last = None;
    for _ in 0..50 {
        match Redis::connect(&addr, Duration::from_secs(2)).and_then(|mut r| {
            r.command(&["PING"])?;
            Ok(r)
        }) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        .with_context(|| format!("redis through {addr}"))
}

/// `GET /` through `node`'s routed `port`: the whole response, headers and body.
pub fn http_get(node: &ClusterNode, port: u16) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(
        &format!("{}:{port}", node.address).parse()?,
        Duration::from_secs(2),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// Runs `docker ARGS` against `node`'s dockerd: its trimmed stdout, or an error with stderr.
pub fn docker(node: &ClusterNode, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(["-H", &node.docker_host])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "docker {args:?} on {}: {}",
        node.name,
        text(&out.stderr)
    );
    Ok(text(&out.stdout).trim().to_string())
}
