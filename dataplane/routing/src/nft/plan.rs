//! The nftables ruleset and map contents as plain data: what the `flocker` table holds and which
//! element changes turn one route table into another. Nothing here talks to the kernel;
//! `netlink.rs` encodes these values.
//!
//! The rules never change with the routes: every routed port lives in one verdict-free map
//! per family, `routes: inet_proto . inet_service -> ipv4_addr . inet_service` and `routes6:
//! inet_proto . inet_service -> ipv6_addr . inet_service`, keyed by protocol and port (TCP
//! and UDP alike), so any change is a handful of element messages in one transaction and the
//! rule count stays constant. The table is of family `inet`, so one ruleset sees IPv4 and
//! IPv6; each rule starts with `meta nfproto` and looks up its family's map.

use std::{
    cmp::Ordering,
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
};

use crate::{
    conntrack::CurrentBackends,
    table::{IpFamily, RouteEntry, RouteKey, RouteTable},
};

/// The one table the agent owns (family `inet`; agents before IPv6 made it family `ip`, and
/// a rebuild removes that one too).
pub const TABLE: &str = "flocker";
/// The port map the IPv4 rules look up.
pub const ROUTES_MAP: &str = "routes";
/// The port map the IPv6 rules look up.
pub const ROUTES6_MAP: &str = "routes6";

/// Hooks the agent's chains attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
    Postrouting,
}

/// A base NAT chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

/// Comparison operators used by the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
}

/// The handful of nftables expressions the ruleset needs, each reading or writing register 1
/// (the 16-byte register, which the kernel also addresses as 32-bit registers 8..11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `fib daddr type` into register 1 (a host-order u32 `RTN_*`).
    FibDaddrType,
    /// `meta l4proto` into register 1 (one byte, zero-padded to 4).
    MetaL4Proto,
    /// The TCP/UDP destination port (2 bytes at offset 2 of the transport header) into
    /// 32-bit register 9, right after the protocol: the `inet_proto . inet_service` key.
    TransportDport,
    /// `ct original protocol` into register 1 (one byte, zero-padded to 4).
    CtOriginalProtocol,
    /// `ct status` into register 1 (host-order u32).
    CtStatus,
    /// `ct original proto-dst` into 32-bit register 9 (2 bytes, network order), right after
    /// the protocol: the `inet_proto . inet_service` key.
    CtOriginalProtoDst,
    /// Register 1 = (register 1 & mask) ^ xor over `mask.len()` bytes.
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Compare register 1 with `data`; the rule stops on mismatch.
    Cmp {
        op: CmpOp,
        data: Vec<u8>,
    },
    /// Look register 1 up in a set or map; the rule stops on a miss. With `to_register`, the
    /// map's value is loaded into register 1 (and on, for values longer than 4 bytes).
    Lookup {
        set: &'static str,
        to_register: bool,
    },
    /// `dnat ip to` address from 32-bit register 8 and port from 32-bit register 9: the value
    /// layout of the `routes` map after a lookup into register 1.
    DnatFromRegisters,
    Masquerade,
    Counter,
    /// `ct mark` into register 2 (host-order u32); register 1 holds the route's backend.
    CtMarkToReg2,
    /// Register 2 = register 2 with `bit` set.
    SetBitReg2(u32),
    /// `ct mark set` from register 2.
    CtMarkFromReg2,
    /// An xtables match through nft_compat, as iptables-nft encodes the matches it has no
    /// native form for (so iptables can still list and check a chain holding the rule).
    XtMatch {
        name: &'static str,
        rev: u32,
        info: Vec<u8>,
    },
    /// Verdict `accept`.
    Accept,
    /// `meta nfproto` into register 1 (one byte, zero-padded to 4): the family of the packet
    /// in the `inet` table.
    MetaNfproto,
    /// `dnat ip6 to` address from register 1 (16 bytes) and port from 32-bit register 12:
    /// the value layout of the `routes6` map after a lookup into register 1.
    Dnat6FromRegisters,
    /// `ct mark` into register 3 (host-order u32), for rules whose map value fills register
    /// 1 and the first word of register 2 (`routes6`).
    CtMarkToReg3,
    /// Register 3 = register 3 with `bit` set.
    SetBitReg3(u32),
    /// `ct mark set` from register 3.
    CtMarkFromReg3,
    /// `ip saddr` into register 1 (4 bytes, network order).
    NetworkSaddr,
    /// `ip daddr` into 32-bit register 10: the third field of a key that starts in register
    /// 1 (`inet_proto . inet_service . ipv4_addr`, the `services` map's key).
    NetworkDaddrReg10,
    /// `ct original ip daddr` into register 1.
    CtOriginalDaddr,
}

/// One rule of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub chain: &'static str,
    pub exprs: Vec<Expr>,
}

/// The whole `flocker` table minus the map's elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: Vec<ChainSpec>,
    pub rules: Vec<RuleSpec>,
}

/// The conntrack mark bit set on every connection the table DNATs. One bit of the 32, so
/// that other users of connection marks keep theirs; high enough to stay clear of the low
/// bits most tools use for small mark values.
pub const ROUTED_MARK: u32 = 0x0080_0000;

/// The kernel's `RTN_LOCAL`, as `fib ... type` stores it.
pub(crate) const RTN_LOCAL: u32 = 2;
/// `NFPROTO_IPV4` and `NFPROTO_IPV6`, as `meta nfproto` loads them.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `IPS_DST_NAT` of the conntrack status bits.
const IPS_DST_NAT: u32 = 1 << 5;
/// nftables' `dstnat` and `srcnat` priorities.
const PRIORITY_DSTNAT: i32 = -100;
const PRIORITY_SRCNAT: i32 = 100;

/// Which traffic the table handles. The eBPF backend redirects the node's own connections at
/// the socket, so it only needs the table for traffic arriving from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Outside traffic (prerouting), the node's own traffic (output), masquerade.
    All,
    /// Outside traffic and masquerade only.
    FromOutside,
}

fn dnat_rule(chain: &'static str) -> RuleSpec {
    RuleSpec {
        chain,
        exprs: vec![
            Expr::FibDaddrType,
            Expr::Cmp {
                op: CmpOp::Eq,
                data: RTN_LOCAL.to_ne_bytes().to_vec(),
            },
            Expr::MetaL4Proto,
            Expr::TransportDport,
            Expr::Lookup {
                set: ROUTES_MAP,
                to_register: true,
            },
            // Marks the connection as ours, so that a forward filter that drops by policy
            // (Docker's) lets it through on our one rule in DOCKER-USER (`docker_user`).
            Expr::CtMarkToReg2,
            Expr::SetBitReg2(ROUTED_MARK),
            Expr::CtMarkFromReg2,
            Expr::Counter,
            Expr::DnatFromRegisters,
        ],
    }
}

impl Ruleset {
    /// The fixed ruleset. DNAT applies only to TCP and UDP to one of the node's own addresses
    /// (`fib daddr type local`) on a routed (protocol, port); everything else passes untouched.
    /// Connections we DNAT are masqueraded: forwarded ones must come back through this node,
    /// and a container reaching its own published port (hairpin) must not get replies
    /// straight from itself. The cost is that a local container sees the node's address
    /// rather than the outside client's.
    pub fn new(scope: Scope) -> Ruleset {
        let mut chains = vec![ChainSpec {
            name: "prerouting",
            hook: Hook::Prerouting,
            priority: PRIORITY_DSTNAT,
        }];
        let mut rules = vec![
            only(IpFamily::Ipv4, dnat_rule("prerouting")),
            dnat_rule6("prerouting"),
        ];
        if scope == Scope::All {
            chains.push(ChainSpec {
                name: "output",
                hook: Hook::Output,
                priority: PRIORITY_DSTNAT,
            });
            rules.push(only(IpFamily::Ipv4, dnat_rule("output")));
            rules.push(dnat_rule6("output"));
        }
        chains.push(ChainSpec {
            name: "postrouting",
            hook: Hook::Postrouting,
            priority: PRIORITY_SRCNAT,
        });
        rules.push(masquerade_rule(IpFamily::Ipv4));
        rules.push(masquerade_rule(IpFamily::Ipv6));
        // Service addresses are IPv4: in the inet table their rules see IPv4 packets only.
        let (service_chains, service_rules) = super::services::chains_and_rules(scope);
        chains.extend(service_chains);
        rules.extend(
            service_rules
                .into_iter()
                .map(|rule| only(IpFamily::Ipv4, rule)),
        );
        Ruleset { chains, rules }
    }
}

/// `rule` for packets of `family` only: `meta nfproto` first.
fn only(family: IpFamily, mut rule: RuleSpec) -> RuleSpec {
    let nfproto = match family {
        IpFamily::Ipv4 => NFPROTO_IPV4,
        IpFamily::Ipv6 => NFPROTO_IPV6,
    };
    rule.exprs.splice(
        0..0,
        [
            Expr::MetaNfproto,
            Expr::Cmp {
                op: CmpOp::Eq,
                data: vec![nfproto],
            },
        ],
    );
    rule
}

/// The IPv6 twin of `dnat_rule`: the `routes6` map's value is 20 bytes (address, port), so
/// the port lands in 32-bit register 12 and the conntrack mark is built in register 3.
fn dnat_rule6(chain: &'static str) -> RuleSpec {
    only(
        IpFamily::Ipv6,
        RuleSpec {
            chain,
            exprs: vec![
                Expr::FibDaddrType,
                Expr::Cmp {
                    op: CmpOp::Eq,
                    data: RTN_LOCAL.to_ne_bytes().to_vec(),
                },
                Expr::MetaL4Proto,
                Expr::TransportDport,
                Expr::Lookup {
                    set: ROUTES6_MAP,
                    to_register: true,
                },
                Expr::CtMarkToReg3,
                Expr::SetBitReg3(ROUTED_MARK),
                Expr::CtMarkFromReg3,
                Expr::Counter,
                Expr::Dnat6FromRegisters,
            ],
        },
    )
}

/// Masquerades the connections the `family` half DNAT'd: to a port of `routes` or `routes6`.
fn masquerade_rule(family: IpFamily) -> RuleSpec {
    let set = match family {
        IpFamily::Ipv4 => ROUTES_MAP,
        IpFamily::Ipv6 => ROUTES6_MAP,
    };
    let mut exprs = dnat_done().to_vec();
    exprs.extend([
        Expr::CtOriginalProtocol,
        Expr::CtOriginalProtoDst,
        Expr::Lookup {
            set,
            to_register: false,
        },
        Expr::Counter,
        Expr::Masquerade,
    ]);
    only(
        family,
        RuleSpec {
            chain: "postrouting",
            exprs,
        },
    )
}

/// The connection was DNAT'd: `ct status & dnat != 0`.
pub(crate) fn dnat_done() -> [Expr; 3] {
    [
        Expr::CtStatus,
        Expr::Bitwise {
            mask: IPS_DST_NAT.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            op: CmpOp::Neq,
            data: vec![0; 4],
        },
    ]
}

/// A backend address as a routes map holds it: IPv4 in `routes`, IPv6 in `routes6`.
pub trait MapBackend: Copy + Ord + fmt::Debug + fmt::Display {
    /// The map holding backends of this family.
    const MAP: &'static str;
    /// The value bytes: the address, then the port in network order padded to 4 bytes.
    fn value(&self) -> Vec<u8>;
    /// As the conntrack janitor compares it.
    fn socket_addr(&self) -> SocketAddr;
}

impl MapBackend for SocketAddrV4 {
    const MAP: &'static str = ROUTES_MAP;

    /// `ipv4_addr . inet_service`: each field padded to 4 bytes.
    fn value(&self) -> Vec<u8> {
        let [p, q] = self.port().to_be_bytes();
        [&self.ip().octets()[..], &[p, q, 0, 0]].concat()
    }

    fn socket_addr(&self) -> SocketAddr {
        SocketAddr::V4(*self)
    }
}

impl MapBackend for SocketAddrV6 {
    const MAP: &'static str = ROUTES6_MAP;

    /// `ipv6_addr . inet_service`: 16 bytes of address, the port padded to 4.
    fn value(&self) -> Vec<u8> {
        let [p, q] = self.port().to_be_bytes();
        [&self.ip().octets()[..], &[p, q, 0, 0]].concat()
    }

    fn socket_addr(&self) -> SocketAddr {
        SocketAddr::V6(*self)
    }
}

/// One element of a routes map (`routes` unless `A` is IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapElement<A = SocketAddrV4> {
    pub port: RouteKey,
    pub backend: A,
}

impl<A: MapBackend> MapElement<A> {
    /// The key bytes of `inet_proto . inet_service`: the protocol number, then the port in
    /// network order, each field padded to 4 bytes.
    pub fn key(&self) -> [u8; 8] {
        let [p, q] = self.port.port.to_be_bytes();
        [self.port.protocol.number(), 0, 0, 0, p, q, 0, 0]
    }

    /// The value bytes (see [`MapBackend::value`]).
    pub fn value(&self) -> Vec<u8> {
        self.backend.value()
    }
}

/// The map contents a table implies.
pub fn map_elements(table: &RouteTable) -> BTreeMap<RouteKey, SocketAddrV4> {
    table
        .entries
        .iter()
        .map(|(port, entry)| (*port, entry.backend()))
        .collect()
}

/// Every element of one family's map, in key order.
pub fn elements_of<A: MapBackend>(
    entries: &BTreeMap<RouteKey, RouteEntry<A>>,
) -> Vec<MapElement<A>> {
    entries
        .iter()
        .map(|(port, entry)| MapElement {
            port: *port,
            backend: entry.backend(),
        })
        .collect()
}

/// The element messages that turn map contents `from` into `to`. A changed port is deleted and
/// re-added in the same transaction, since the kernel refuses to overwrite a map value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementDiff<A = SocketAddrV4> {
    pub delete: Vec<MapElement<A>>,
    pub add: Vec<MapElement<A>>,
}

impl<A> Default for ElementDiff<A> {
    fn default() -> Self {
        ElementDiff {
            delete: Vec::new(),
            add: Vec::new(),
        }
    }
}

impl<A: MapBackend> ElementDiff<A> {
    pub fn between(from: &BTreeMap<RouteKey, A>, to: &BTreeMap<RouteKey, A>) -> ElementDiff<A> {
        let mut diff = ElementDiff::default();
        for (port, backend) in from {
            if to.get(port) != Some(backend) {
                diff.delete.push(MapElement {
                    port: *port,
                    backend: *backend,
                });
            }
        }
        for (port, backend) in to {
            if from.get(port) != Some(backend) {
                diff.add.push(MapElement {
                    port: *port,
                    backend: *backend,
                });
            }
        }
        diff
    }

    /// The diff between two families' entries, without building the maps first: one merge
    /// walk over the two sorted maps, so a route change at 10,000 routes costs tens of
    /// microseconds here (a lookup per entry costs about ten times that).
    pub fn between_entries(
        from: &BTreeMap<RouteKey, RouteEntry<A>>,
        to: &BTreeMap<RouteKey, RouteEntry<A>>,
    ) -> ElementDiff<A> {
        let mut diff = ElementDiff::default();
        let element = |(port, entry): (&RouteKey, &RouteEntry<A>)| MapElement {
            port: *port,
            backend: entry.backend(),
        };
        let mut old = from.iter().map(element).peekable();
        let mut new = to.iter().map(element).peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => diff.delete.extend(old.by_ref()),
                (None, Some(_)) => diff.add.extend(new.by_ref()),
                (Some(a), Some(b)) => match a.port.cmp(&b.port) {
                    Ordering::Less => diff.delete.extend(old.next()),
                    Ordering::Greater => diff.add.extend(new.next()),
                    Ordering::Equal => {
                        if a.backend != b.backend {
                            diff.delete.push(*a);
                            diff.add.push(*b);
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        diff
    }

    /// Brings `installed` (the entries this diff was computed from) up to `wanted` by touching
    /// only the changed ports: cheaper than cloning `wanted` when one route of 10,000 moved.
    pub fn patch_entries(
        &self,
        installed: &mut BTreeMap<RouteKey, RouteEntry<A>>,
        wanted: &BTreeMap<RouteKey, RouteEntry<A>>,
    ) {
        for element in &self.delete {
            installed.remove(&element.port);
        }
        for element in &self.add {
            if let Some(entry) = wanted.get(&element.port) {
                installed.insert(element.port, *entry);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty()
    }

    /// The ports whose existing connections may point at a backend that is no longer theirs,
    /// each with the backend it routes to now (`None`: no longer routed), for `family`.
    fn changed_ports_into(&self, family: IpFamily, changed: &mut CurrentBackends) {
        for element in &self.delete {
            changed.insert((family, element.port), None);
        }
        for element in &self.add {
            if let Some(now) = changed.get_mut(&(family, element.port)) {
                *now = Some(element.backend.socket_addr());
            }
        }
    }
}

impl ElementDiff<SocketAddrV4> {
    /// The IPv4 diff straight from two route tables (see [`ElementDiff::between_entries`]).
    pub fn between_tables(from: &RouteTable, to: &RouteTable) -> ElementDiff {
        ElementDiff::between_entries(&from.entries, &to.entries)
    }

    /// Brings the IPv4 half of `installed` up to `wanted`.
    pub fn patch(&self, installed: &mut RouteTable, wanted: &RouteTable) {
        self.patch_entries(&mut installed.entries, &wanted.entries);
    }
}

/// The element messages of both maps that turn one route table into another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub v4: ElementDiff<SocketAddrV4>,
    pub v6: ElementDiff<SocketAddrV6>,
}

impl TableDiff {
    pub fn between(from: &RouteTable, to: &RouteTable) -> TableDiff {
        TableDiff {
            v4: ElementDiff::between_entries(&from.entries, &to.entries),
            v6: ElementDiff::between_entries(&from.entries6, &to.entries6),
        }
    }

    /// Brings `installed` (the table this diff was computed from) up to `wanted`.
    pub fn patch(&self, installed: &mut RouteTable, wanted: &RouteTable) {
        self.v4
            .patch_entries(&mut installed.entries, &wanted.entries);
        self.v6
            .patch_entries(&mut installed.entries6, &wanted.entries6);
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether committing this diff deletes anything (and so waits for an RCU grace period).
    pub fn deletes(&self) -> bool {
        !self.v4.delete.is_empty() || !self.v6.delete.is_empty()
    }

    /// The ports, per family, whose existing connections may point at a backend that is no
    /// longer theirs, each with the backend it routes to now (`None`: no longer routed).
    pub fn changed_ports(&self) -> CurrentBackends {
        let mut changed = CurrentBackends::new();
        self.v4.changed_ports_into(IpFamily::Ipv4, &mut changed);
        self.v6.changed_ports_into(IpFamily::Ipv6, &mut changed);
        changed
    }
}

/// Elements per netlink message: about 40 bytes each, so 1,000 stay well under the 64 KiB a
/// single netlink message (and nftnl's per-message buffer) can hold.
pub const ELEMENTS_PER_MESSAGE: usize = 1000;

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::FibDaddrType => write!(f, "fib daddr type => reg 1"),
            Expr::MetaL4Proto => write!(f, "meta l4proto => reg 1"),
            Expr::TransportDport => write!(f, "payload transport +2 len 2 => reg 9"),
            Expr::CtStatus => write!(f, "ct status => reg 1"),
            Expr::CtOriginalProtocol => write!(f, "ct original protocol => reg 1"),
            Expr::CtOriginalProtoDst => write!(f, "ct original proto-dst => reg 9"),
            Expr::Bitwise { mask, xor } => {
                write!(f, "bitwise reg 1 & {} ^ {}", hex(mask), hex(xor))
            }
            Expr::Cmp { op, data } => {
                let op = match op {
                    CmpOp::Eq => "eq",
                    CmpOp::Neq => "neq",
                };
                write!(f, "cmp {op} reg 1 {}", hex(data))
            }
            Expr::Lookup { set, to_register } => {
                write!(f, "lookup reg 1 @{set}")?;
                if *to_register {
                    write!(f, " => reg 1")?;
                }
                Ok(())
            }
            Expr::DnatFromRegisters => write!(f, "nat dnat ip addr reg 1 proto reg 9"),
            Expr::Masquerade => write!(f, "masq"),
            Expr::Counter => write!(f, "counter"),
            Expr::CtMarkToReg2 => write!(f, "ct mark => reg 2"),
            Expr::SetBitReg2(bit) => write!(f, "bitwise reg 2 | {bit:#x}"),
            Expr::CtMarkFromReg2 => write!(f, "ct mark set reg 2"),
            Expr::XtMatch { name, rev, info } => {
                write!(f, "match name {name} rev {rev} info {}", hex(info))
            }
            Expr::Accept => write!(f, "immediate accept"),
            Expr::MetaNfproto => write!(f, "meta nfproto => reg 1"),
            Expr::Dnat6FromRegisters => write!(f, "nat dnat ip6 addr reg 1 proto reg 12"),
            Expr::CtMarkToReg3 => write!(f, "ct mark => reg 3"),
            Expr::SetBitReg3(bit) => write!(f, "bitwise reg 3 | {bit:#x}"),
            Expr::CtMarkFromReg3 => write!(f, "ct mark set reg 3"),
            Expr::NetworkSaddr => write!(f, "payload network +12 len 4 => reg 1"),
            Expr::NetworkDaddrReg10 => write!(f, "payload network +16 len 4 => reg 10"),
            Expr::CtOriginalDaddr => write!(f, "ct original ip daddr => reg 1"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "table inet {TABLE}\nmap {ROUTES_MAP} inet_proto . inet_service -> ipv4_addr . inet_service\nmap {ROUTES6_MAP} inet_proto . inet_service -> ipv6_addr . inet_service"
        )?;
        for set in super::services::SETS {
            let types = |fields: &[super::services::SetType]| {
                fields
                    .iter()
                    .map(|t| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(" . ")
            };
            if set.value.is_empty() {
                writeln!(f, "set {} {}", set.name, types(set.key))?;
            } else {
                writeln!(
                    f,
                    "map {} {} -> {}",
                    set.name,
                    types(set.key),
                    types(set.value)
                )?;
            }
        }
        for chain in &self.chains {
            writeln!(
                f,
                "chain {} nat hook {:?} priority {}",
                chain.name, chain.hook, chain.priority
            )?;
            for rule in self.rules.iter().filter(|r| r.chain == chain.name) {
                let exprs: Vec<String> = rule.exprs.iter().map(|e| format!("[ {e} ]")).collect();
                writeln!(f, "  {}", exprs.join(" "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::RouteEntry;
    use expect_test::{Expect, expect};

    fn check_ruleset(scope: Scope, expect: Expect) {
        expect.assert_eq(&Ruleset::new(scope).to_string());
    }

    #[test]
    fn full_ruleset() {
        check_ruleset(
            Scope::All,
            expect![[r#"
                table inet flocker
                map routes inet_proto . inet_service -> ipv4_addr . inet_service
                map routes6 inet_proto . inet_service -> ipv6_addr . inet_service
                map services InetProto . InetService . Ipv4Addr -> Ipv4Addr . InetService
                map relays InetProto . InetService -> Ipv4Addr . InetService
                set peers Ipv4Addr
                chain prerouting nat hook Prerouting priority -100
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ fib daddr type => reg 1 ] [ cmp eq reg 1 0x02000000 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ lookup reg 1 @routes => reg 1 ] [ ct mark => reg 2 ] [ bitwise reg 2 | 0x800000 ] [ ct mark set reg 2 ] [ counter ] [ nat dnat ip addr reg 1 proto reg 9 ]
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x0a ] [ fib daddr type => reg 1 ] [ cmp eq reg 1 0x02000000 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ lookup reg 1 @routes6 => reg 1 ] [ ct mark => reg 3 ] [ bitwise reg 3 | 0x800000 ] [ ct mark set reg 3 ] [ counter ] [ nat dnat ip6 addr reg 1 proto reg 12 ]
                chain output nat hook Output priority -100
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ fib daddr type => reg 1 ] [ cmp eq reg 1 0x02000000 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ lookup reg 1 @routes => reg 1 ] [ ct mark => reg 2 ] [ bitwise reg 2 | 0x800000 ] [ ct mark set reg 2 ] [ counter ] [ nat dnat ip addr reg 1 proto reg 9 ]
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x0a ] [ fib daddr type => reg 1 ] [ cmp eq reg 1 0x02000000 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ lookup reg 1 @routes6 => reg 1 ] [ ct mark => reg 3 ] [ bitwise reg 3 | 0x800000 ] [ ct mark set reg 3 ] [ counter ] [ nat dnat ip6 addr reg 1 proto reg 12 ]
                chain postrouting nat hook Postrouting priority 100
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ ct status => reg 1 ] [ bitwise reg 1 & 0x20000000 ^ 0x00000000 ] [ cmp neq reg 1 0x00000000 ] [ ct original protocol => reg 1 ] [ ct original proto-dst => reg 9 ] [ lookup reg 1 @routes ] [ counter ] [ masq ]
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x0a ] [ ct status => reg 1 ] [ bitwise reg 1 & 0x20000000 ^ 0x00000000 ] [ cmp neq reg 1 0x00000000 ] [ ct original protocol => reg 1 ] [ ct original proto-dst => reg 9 ] [ lookup reg 1 @routes6 ] [ counter ] [ masq ]
                chain svc_prerouting nat hook Prerouting priority -99
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ payload network +16 len 4 => reg 10 ] [ lookup reg 1 @services => reg 1 ] [ ct mark => reg 2 ] [ bitwise reg 2 | 0x800000 ] [ ct mark set reg 2 ] [ counter ] [ nat dnat ip addr reg 1 proto reg 9 ]
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ payload network +12 len 4 => reg 1 ] [ lookup reg 1 @peers ] [ fib daddr type => reg 1 ] [ cmp eq reg 1 0x02000000 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ lookup reg 1 @relays => reg 1 ] [ ct mark => reg 2 ] [ bitwise reg 2 | 0x800000 ] [ ct mark set reg 2 ] [ counter ] [ nat dnat ip addr reg 1 proto reg 9 ]
                chain svc_output nat hook Output priority -99
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ meta l4proto => reg 1 ] [ payload transport +2 len 2 => reg 9 ] [ payload network +16 len 4 => reg 10 ] [ lookup reg 1 @services => reg 1 ] [ ct mark => reg 2 ] [ bitwise reg 2 | 0x800000 ] [ ct mark set reg 2 ] [ counter ] [ nat dnat ip addr reg 1 proto reg 9 ]
                chain svc_postrouting nat hook Postrouting priority 101
                  [ meta nfproto => reg 1 ] [ cmp eq reg 1 0x02 ] [ ct status => reg 1 ] [ bitwise reg 1 & 0x20000000 ^ 0x00000000 ] [ cmp neq reg 1 0x00000000 ] [ ct original ip daddr => reg 1 ] [ bitwise reg 1 & 0xffff8000 ^ 0x00000000 ] [ cmp eq reg 1 0xc6138000 ] [ counter ] [ masq ]
            "#]],
        );
    }

    #[test]
    fn outside_only_ruleset_has_no_output_chain() {
        let text = Ruleset::new(Scope::FromOutside).to_string();
        assert!(!text.contains("output"));
        assert!(text.contains("chain prerouting"));
        assert!(text.contains("chain postrouting"));
        // Both families come in from outside.
        assert!(text.contains("nat dnat ip addr"));
        assert!(text.contains("nat dnat ip6 addr"));
    }

    fn tcp_entries(entries: &[(u16, RouteEntry)]) -> BTreeMap<RouteKey, RouteEntry> {
        entries
            .iter()
            .map(|(port, entry)| (RouteKey::tcp(*port), *entry))
            .collect()
    }

    fn table(entries: &[(u16, RouteEntry)]) -> BTreeMap<RouteKey, SocketAddrV4> {
        map_elements(&RouteTable {
            entries: tcp_entries(entries),
            ..RouteTable::default()
        })
    }

    fn local(ip: [u8; 4], port: u16) -> RouteEntry {
        RouteEntry::Local {
            container: SocketAddrV4::new(ip.into(), port),
        }
    }

    fn remote(ip: [u8; 4], port: u16) -> RouteEntry {
        RouteEntry::Remote {
            node: SocketAddrV4::new(ip.into(), port),
        }
    }

    fn check_diff(from: &[(u16, RouteEntry)], to: &[(u16, RouteEntry)], expect: Expect) {
        let diff = ElementDiff::between(&table(from), &table(to));
        let tables = |e: &[(u16, RouteEntry)]| RouteTable {
            entries: tcp_entries(e),
            ..RouteTable::default()
        };
        assert_eq!(
            diff,
            ElementDiff::between_tables(&tables(from), &tables(to)),
            "both diffs agree"
        );
        let mut out = String::new();
        for e in &diff.delete {
            let _ = writeln!(out, "- {} => {}", e.port, e.backend);
        }
        for e in &diff.add {
            let _ = writeln!(
                out,
                "+ {} => {} key {} value {}",
                e.port,
                e.backend,
                hex(&e.key()),
                hex(&e.value())
            );
        }
        expect.assert_eq(&out);
    }

    #[test]
    fn diff_from_empty_adds_everything() {
        check_diff(
            &[],
            &[
                (6379, local([172, 17, 0, 2], 6379)),
                (80, remote([198, 18, 0, 2], 80)),
            ],
            expect![[r#"
                + 80 => 198.18.0.2:80 key 0x0600000000500000 value 0xc612000200500000
                + 6379 => 172.17.0.2:6379 key 0x0600000018eb0000 value 0xac11000218eb0000
            "#]],
        );
    }

    #[test]
    fn moving_a_route_deletes_and_readds_only_that_port() {
        check_diff(
            &[
                (80, local([172, 17, 0, 2], 8080)),
                (443, remote([198, 18, 0, 3], 443)),
            ],
            &[
                (80, remote([198, 18, 0, 2], 80)),
                (443, remote([198, 18, 0, 3], 443)),
            ],
            expect![[r#"
                - 80 => 172.17.0.2:8080
                + 80 => 198.18.0.2:80 key 0x0600000000500000 value 0xc612000200500000
            "#]],
        );
    }

    #[test]
    fn tcp_and_udp_of_one_port_are_two_keys() {
        let tcp = MapElement {
            port: RouteKey::tcp(53),
            backend: SocketAddrV4::new([172, 17, 0, 2].into(), 5353),
        };
        let udp = MapElement {
            port: RouteKey::udp(53),
            ..tcp
        };
        assert_eq!(hex(&tcp.key()), "0x0600000000350000");
        assert_eq!(hex(&udp.key()), "0x1100000000350000");
        let both = RouteTable {
            entries: [
                (tcp.port, local([172, 17, 0, 2], 5353)),
                (udp.port, remote([198, 18, 0, 2], 53)),
            ]
            .into(),
            ..RouteTable::default()
        };
        let only_tcp = RouteTable {
            entries: [(tcp.port, local([172, 17, 0, 2], 5353))].into(),
            ..RouteTable::default()
        };
        let diff = ElementDiff::between_tables(&only_tcp, &both);
        assert!(diff.delete.is_empty());
        assert_eq!(diff.add.len(), 1);
        assert_eq!(diff.add[0].port, RouteKey::udp(53));
    }

    #[test]
    fn ipv6_routes_go_to_their_own_map_and_diff() {
        let key = RouteKey::tcp(80);
        let v6 = |ip: &str, port| RouteEntry::Local {
            container: SocketAddrV6::new(ip.parse().expect("literal"), port, 0, 0),
        };
        let v4 = local([172, 17, 0, 2], 8080);
        let from = RouteTable {
            entries: [(key, v4)].into(),
            entries6: [(key, v6("fd00:17::2", 8080))].into(),
            ..RouteTable::default()
        };
        let to = RouteTable {
            entries: [(key, v4)].into(),
            entries6: [(key, v6("2001:db8::2", 80))].into(),
            ..RouteTable::default()
        };
        let diff = TableDiff::between(&from, &to);
        assert!(diff.v4.is_empty(), "the IPv4 route stays");
        assert_eq!(diff.v6.delete.len(), 1);
        assert!(diff.deletes());
        let added = &diff.v6.add[..];
        assert_eq!(added.len(), 1);
        assert_eq!(hex(&added[0].key()), "0x0600000000500000");
        // 16 bytes of address, then the port padded to 4: `ipv6_addr . inet_service`.
        assert_eq!(
            hex(&added[0].value()),
            "0x20010db800000000000000000000000200500000"
        );
        let changed: Vec<String> = diff
            .changed_ports()
            .iter()
            .map(|((family, port), now)| format!("{family:?} {port} -> {now:?}"))
            .collect();
        assert_eq!(changed, ["Ipv6 80 -> Some([2001:db8::2]:80)"]);
        let mut patched = from.clone();
        diff.patch(&mut patched, &to);
        assert_eq!(patched, to);
    }

    #[test]
    fn same_table_is_no_change() {
        let t = [(80, local([172, 17, 0, 2], 8080))];
        assert!(ElementDiff::between(&table(&t), &table(&t)).is_empty());
    }

    #[test]
    fn removing_a_route_only_deletes() {
        check_diff(
            &[
                (80, local([172, 17, 0, 2], 8080)),
                (81, local([172, 17, 0, 2], 8081)),
            ],
            &[(81, local([172, 17, 0, 2], 8081))],
            expect![[r#"
                - 80 => 172.17.0.2:8080
            "#]],
        );
    }

    #[test]
    fn patch_brings_the_old_table_to_the_new_one() {
        let tables = |e: &[(u16, RouteEntry)]| RouteTable {
            entries: tcp_entries(e),
            ..RouteTable::default()
        };
        let from = tables(&[
            (80, local([172, 17, 0, 2], 8080)),
            (81, local([172, 17, 0, 2], 8081)),
            (443, remote([198, 18, 0, 3], 443)),
        ]);
        let to = tables(&[
            (80, remote([198, 18, 0, 2], 80)),
            (443, remote([198, 18, 0, 3], 443)),
            (8000, local([172, 17, 0, 3], 8000)),
        ]);
        let diff = ElementDiff::between_tables(&from, &to);
        let mut patched = from.clone();
        diff.patch(&mut patched, &to);
        assert_eq!(patched, to);
    }
}
