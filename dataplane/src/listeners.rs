//! The TCP ports this node's own services listen on, from `/proc/net/tcp` and
//! `/proc/net/tcp6` of the agent's network namespace. Routing such a port to an application
//! would take it from the service (ssh on 22, a database on the host) for every connection
//! from outside, so the agent refuses it.

use std::collections::BTreeSet;

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// The local ports of listening sockets in one `/proc/net/tcp*` table.
pub fn parse_listening(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != LISTEN {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The listening TCP ports of this network namespace (IPv4 and IPv6); a table that cannot
/// be read (no IPv6) counts as empty.
pub fn listening_ports() -> BTreeSet<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_listening(&t))
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
    }
}
