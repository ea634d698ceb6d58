//! The kernel settings routing needs, written through `/proc/sys` of the current network
//! namespace: IPv4 forwarding (to send a port's traffic on to the hosting node), loose
//! reverse-path filtering (a DNAT'd reply may leave by another interface than it came in on),
//! and the source ports the eBPF TC program translates to, reserved so that no local socket
//! picks one.

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

/// Reads `key`, and writes what `change` makes of its (trimmed) value unless that is `None`.
fn update(key: &str, change: impl FnOnce(&str) -> Option<String>) -> Result<(), SysctlError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let error = |source| SysctlError {
        key: key.to_owned(),
        source,
    };
    let current = fs::read_to_string(&path).map_err(error)?;
    let current = current.trim();
    let Some(value) = change(current) else {
        return Ok(());
    };
    fs::write(&path, &value).map_err(error)?;
    info!(key, from = current, to = %value, "sysctl set");
    Ok(())
}

/// Sets `key` to `value`, when it is `only_if` (if given).
fn set(key: &str, value: &str, only_if: Option<&str>) -> Result<(), SysctlError> {
    update(key, |current| {
        let wanted = current != value && only_if.is_none_or(|want| want == current);
        wanted.then(|| value.to_owned())
    })
}

/// Turns on forwarding and relaxes strict (1) reverse-path filtering to loose (2); a disabled
/// filter (0) is left alone.
pub fn enable_forwarding() -> Result<(), SysctlError> {
    set("net.ipv4.ip_forward", "1", None)?;
    set("net.ipv4.conf.all.rp_filter", "2", Some("1"))?;
    set("net.ipv4.conf.default.rp_filter", "2", Some("1"))?;
    Ok(())
}

/// Adds `first..=last` to `net.ipv4.ip_local_reserved_ports` unless a listed range covers it
/// already; the ports listed before stay reserved.
pub fn reserve_local_ports(first: u16, last: u16) -> Result<(), SysctlError> {
    update("net.ipv4.ip_local_reserved_ports", |current| {
        with_reserved(current, first, last)
    })
}

/// The reserved-ports list `current` with `first..=last` added, or `None` when one of its
/// entries already covers that range.
fn with_reserved(current: &str, first: u16, last: u16) -> Option<String> {
    let covered = current.split(',').any(|entry| {
        let (low, high) = entry.trim().split_once('-').unwrap_or((entry.trim(), entry.trim()));
        matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if l <= first && h >= last)
    });
    if covered {
        return None;
    }
    let range = format!("{first}-{last}");
    Some(if current.is_empty() {
        range
    } else {
        format!("{current},{range}")
    })
}

#[cfg(test)]
mod tests {
    use super::with_reserved;

    #[test]
    fn reserved_range_is_added_once_and_others_kept() {
        assert_eq!(
            with_reserved("", 61000, 65535).as_deref(),
            Some("61000-65535")
        );
        assert_eq!(
            with_reserved("8080,9000-9100", 61000, 65535).as_deref(),
            Some("8080,9000-9100,61000-65535")
        );
        assert_eq!(with_reserved("8080,61000-65535", 61000, 65535), None);
        assert_eq!(with_reserved("60000-65535", 61000, 65535), None);
        assert_eq!(
            with_reserved("61000-62000", 61000, 65535).as_deref(),
            Some("61000-62000,61000-65535")
        );
    }
}
