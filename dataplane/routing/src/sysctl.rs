//! The kernel settings routing needs, written through `/proc/sys` of the current network
//! namespace: IPv4 forwarding (to send a port's traffic on to the hosting node) and loose
//! reverse-path filtering (a DNAT'd reply may leave by another interface than it came in on).

use std::{fs, io, path::Path};

use tracing::info;

/// A `/proc/sys` entry that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {key}")]
pub struct SysctlError {
    key: String,
    #[source]
    source: io::Error,
}

fn set(key: &str, value: &str, only_if: Option<&str>) -> Result<(), SysctlError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let error = |source| SysctlError {
        key: key.to_owned(),
        source,
    };
    let current = fs::read_to_string(&path).map_err(error)?;
    let current = current.trim();
    if current == value || only_if.is_some_and(|want| want != current) {
        return Ok(());
    }
    fs::write(&path, value).map_err(error)?;
    info!(key, from = current, to = value, "sysctl set");
    Ok(())
}

/// Turns on forwarding and relaxes strict (1) reverse-path filtering to loose (2); a disabled
/// filter (0) is left alone.
pub fn enable_forwarding() -> Result<(), SysctlError> {
    set("net.ipv4.ip_forward", "1", None)?;
    set("net.ipv4.conf.all.rp_filter", "2", Some("1"))?;
    set("net.ipv4.conf.default.rp_filter", "2", Some("1"))?;
    Ok(())
}
