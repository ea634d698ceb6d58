//! Node addresses as text: how a node named by an IP address (v4 or v6) or a hostname is
//! written next to a port, and which spelling of an IPv6 address the cluster accepts.
//!
//! Node names are compared as strings everywhere (deployment keys, certificate role URIs
//! `spiffe://flocker/node/ADDR`, the `from` of a push), so an IPv6 address has exactly one
//! accepted spelling: the one Rust's `Ipv6Addr` prints (RFC 5952: lower case, the longest run
//! of zero groups shortened), without brackets.

use std::net::{IpAddr, Ipv6Addr};

/// `host:port` for a host name or IPv4 address, `[host]:port` for an IPv6 address: the form
/// URLs, `Host` headers and `ToSocketAddrs` take.
pub fn authority(host: &str, port: u16) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The `Host` header value for a request to `host` on its default port: an IPv6 address in
/// brackets, anything else as it is.
pub fn host_header(host: &str) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Why an IP address literal is not spelled the one way the cluster compares it, with the
/// spelling to use instead; `None` for a canonical literal or anything that is no IP address.
pub fn spelling_problem(address: &str) -> Option<String> {
    if let Some(inner) = address
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .filter(|a| a.parse::<Ipv6Addr>().is_ok())
    {
        return Some(format!(
            "{address:?} is an IPv6 address in brackets; write it without them, as {}",
            canonical(inner)
        ));
    }
    let ip = address.parse::<IpAddr>().ok()?;
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Some(format!(
            "{address:?} is an IPv4-mapped IPv6 address; name the node by its IPv4 address {v4}"
        ));
    }
    let written = ip.to_string();
    (written != address).then(|| {
        format!(
            "{address:?} is not written canonically; write it as {written} (node names are compared as text, in certificates too)"
        )
    })
}

fn canonical(address: &str) -> String {
    address
        .parse::<Ipv6Addr>()
        .map_or_else(|_| address.to_owned(), |ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed_next_to_a_port() {
        assert_eq!(authority("198.18.0.1", 4523), "198.18.0.1:4523");
        assert_eq!(authority("node-a.example", 4523), "node-a.example:4523");
        assert_eq!(authority("2001:db8::1", 4523), "[2001:db8::1]:4523");
        assert_eq!(authority("fd00::1:2", 80), "[fd00::1:2]:80");
        assert_eq!(host_header("2001:db8::1"), "[2001:db8::1]");
        assert_eq!(host_header("198.18.0.1"), "198.18.0.1");
        // What the authority gives is what the socket layer parses back.
        let parsed: std::net::SocketAddr = authority("2001:db8::1", 4523).parse().expect("parses");
        assert_eq!(parsed.ip().to_string(), "2001:db8::1");
        assert_eq!(parsed.port(), 4523);
    }

    #[test]
    fn only_canonical_ip_literals_pass() {
        for good in [
            "198.18.0.1",
            "2001:db8::1",
            "fd00::",
            "::1",
            "node-a",
            "a.example",
        ] {
            assert_eq!(spelling_problem(good), None, "{good}");
        }
        let problem = |a: &str| spelling_problem(a).unwrap_or_default();
        assert_eq!(
            problem("2001:DB8::1"),
            "\"2001:DB8::1\" is not written canonically; write it as 2001:db8::1 (node names are compared as text, in certificates too)"
        );
        assert!(problem("2001:db8:0:0:0:0:0:1").contains("write it as 2001:db8::1"));
        assert_eq!(
            problem("[2001:db8::1]"),
            "\"[2001:db8::1]\" is an IPv6 address in brackets; write it without them, as 2001:db8::1"
        );
        assert_eq!(
            problem("::ffff:198.18.0.1"),
            "\"::ffff:198.18.0.1\" is an IPv4-mapped IPv6 address; name the node by its IPv4 address 198.18.0.1"
        );
    }
}
