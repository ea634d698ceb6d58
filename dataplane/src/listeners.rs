//! The TCP and UDP ports this node's own services listen on, from `/proc/net/{tcp,udp}{,6}`
//! of the agent's network namespace. Routing such a port to an application would take it
//! from the service (ssh on 22, a DNS server on 53) for every connection from outside, so
//! the agent refuses it.

use std::collections::BTreeSet;

use flocker_wire::Protocol;

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: &str = "0A";
/// `st` of a bound, unconnected UDP socket in `/proc/net/udp` (`TCP_CLOSE`): one that
/// receives from anyone, which is what a UDP server is.
const UDP_UNCONNECTED: &str = "07";

/// The local ports of listening sockets in one `/proc/net/tcp*` table.
pub fn parse_listening(table: &str) -> BTreeSet<u16> {
    parse_state(table, LISTEN)
}

/// The local ports of sockets in `state` in one `/proc/net/{tcp,udp}*` table.
fn parse_state(table: &str, wanted: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != wanted {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The listening TCP ports and bound UDP ports of this network namespace (IPv4 and IPv6); a
/// table that cannot be read (no IPv6) counts as empty.
pub fn listening_ports() -> BTreeSet<(Protocol, u16)> {
    let tables = [
        ("/proc/net/tcp", Protocol::Tcp, LISTEN),
        ("/proc/net/tcp6", Protocol::Tcp, LISTEN),
        ("/proc/net/udp", Protocol::Udp, UDP_UNCONNECTED),
        ("/proc/net/udp6", Protocol::Udp, UDP_UNCONNECTED),
    ];
    tables
        .iter()
        .filter_map(|(path, protocol, state)| {
            let text = std::fs::read_to_string(path).ok()?;
            Some(
                parse_state(&text, state)
                    .into_iter()
                    .map(|port| (*protocol, port))
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listening_sockets_count() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:11AB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0B0012C6:C350 0B0012C6:18EB 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(parse_listening(table), BTreeSet::from([22, 4523]));
        assert!(parse_listening("garbage\nmore garbage").is_empty());
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  2: 0B0012C6:A000 0C0012C6:0035 01 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0
";
        assert_eq!(parse_state(udp, UDP_UNCONNECTED), BTreeSet::from([53]));
    }
}
