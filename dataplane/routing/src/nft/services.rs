//! The service part of the `flocker` table as plain data: three sets of its own and three
//! chains of its own, beside (never inside) the port routes' `routes` map and chains.
//!
//! ```text
//! map services  inet_proto . inet_service . ipv4_addr -> ipv4_addr . inet_service
//! map relays    inet_proto . inet_service -> ipv4_addr . inet_service
//! set peers     ipv4_addr
//! chain svc_prerouting  nat prerouting -99:
//!   meta l4proto . th dport . ip daddr @services: ct mark |= ROUTED_MARK, dnat
//!   ip saddr @peers, fib daddr type local, meta l4proto . th dport @relays: mark, dnat
//! chain svc_output      nat output -99 (Scope::All only): the services rule
//! chain svc_postrouting nat postrouting 101:
//!   ct status dnat, ct original ip daddr in the service range: masquerade
//! ```
//!
//! A connection to a service address is DNAT'd to the local container, or to the hosting
//! node's address and relay port; the hosting node accepts a relay port only from a cluster
//! node's address (a peer) and DNATs it into the container. Connections to a service address
//! are masqueraded on the client's node: one that left for another node must come back
//! through it, and a client next to the server on the same bridge (hairpin) must not get
//! replies straight from the server's address. The hosting node does not masquerade relayed
//! connections: the server sees the client's node address, and its replies go back through
//! the hosting node (the container's gateway) anyway. The mark is the one every DNAT of the
//! table sets, so Docker's `FORWARD` policy `DROP` lets relayed connections through too.

use std::{collections::BTreeSet, net::SocketAddrV4};

use flocker_wire::services::SERVICE_RANGE;

use super::plan::{ChainSpec, CmpOp, Expr, Hook, ROUTED_MARK, RTN_LOCAL, RuleSpec, Scope};
use crate::{ServiceTable, table::RouteKey};

pub const SERVICES_MAP: &str = "services";
pub const RELAYS_MAP: &str = "relays";
pub const PEERS_SET: &str = "peers";

/// One set of the table: its name, the id a lookup in the same batch refers to it by, and
/// its key and value types (nftables type ids, concatenated) and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetSpec {
    pub name: &'static str,
    pub id: u32,
    /// Type ids of the key's fields, in order.
    pub key: &'static [SetType],
    /// Type ids of the value's fields; empty for a plain set.
    pub value: &'static [SetType],
}

/// The nftables data types the service sets use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    Ipv4Addr,
    InetProto,
    InetService,
}

/// The service sets, created with the table (the `routes` map has id 1, `routes6` id 2).
pub const SETS: [SetSpec; 3] = [
    SetSpec {
        name: SERVICES_MAP,
        id: 3,
        key: &[SetType::InetProto, SetType::InetService, SetType::Ipv4Addr],
        value: &[SetType::Ipv4Addr, SetType::InetService],
    },
    SetSpec {
        name: RELAYS_MAP,
        id: 4,
        key: &[SetType::InetProto, SetType::InetService],
        value: &[SetType::Ipv4Addr, SetType::InetService],
    },
    SetSpec {
        name: PEERS_SET,
        id: 5,
        key: &[SetType::Ipv4Addr],
        value: &[],
    },
];

/// The id a lookup of `set` carries: the service sets' own, else the `routes` map's.
pub fn set_id(set: &str) -> u32 {
    SETS.iter().find(|s| s.name == set).map_or(1, |s| s.id)
}

/// A priority one after the port routes' chains, so the order of the two is fixed.
const PRIORITY_DSTNAT: i32 = -99;
const PRIORITY_SRCNAT: i32 = 101;

fn mark_and_dnat() -> [Expr; 5] {
    [
        Expr::CtMarkToReg2,
        Expr::SetBitReg2(ROUTED_MARK),
        Expr::CtMarkFromReg2,
        Expr::Counter,
        Expr::DnatFromRegisters,
    ]
}

fn service_rule(chain: &'static str) -> RuleSpec {
    let mut exprs = vec![
        Expr::MetaL4Proto,
        Expr::TransportDport,
        Expr::NetworkDaddrReg10,
        Expr::Lookup {
            set: SERVICES_MAP,
            to_register: true,
        },
    ];
    exprs.extend(mark_and_dnat());
    RuleSpec { chain, exprs }
}

fn relay_rule() -> RuleSpec {
    let mut exprs = vec![
        Expr::NetworkSaddr,
        Expr::Lookup {
            set: PEERS_SET,
            to_register: false,
        },
        Expr::FibDaddrType,
        Expr::Cmp {
            op: CmpOp::Eq,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
        Expr::MetaL4Proto,
        Expr::TransportDport,
        Expr::Lookup {
            set: RELAYS_MAP,
            to_register: true,
        },
    ];
    exprs.extend(mark_and_dnat());
    RuleSpec {
        chain: "svc_prerouting",
        exprs,
    }
}

fn masquerade_rule() -> RuleSpec {
    let (base, bits) = SERVICE_RANGE;
    let mask = u32::MAX << (32 - u32::from(bits));
    RuleSpec {
        chain: "svc_postrouting",
        exprs: super::plan::dnat_done()
            .into_iter()
            .chain([
                Expr::CtOriginalDaddr,
                Expr::Bitwise {
                    mask: mask.to_be_bytes().to_vec(),
                    xor: vec![0; 4],
                },
                Expr::Cmp {
                    op: CmpOp::Eq,
                    data: base.octets().to_vec(),
                },
                Expr::Counter,
                Expr::Masquerade,
            ])
            .collect(),
    }
}

/// The service chains and their rules for a scope.
pub fn chains_and_rules(scope: Scope) -> (Vec<ChainSpec>, Vec<RuleSpec>) {
    let mut chains = vec![ChainSpec {
        name: "svc_prerouting",
        hook: Hook::Prerouting,
        priority: PRIORITY_DSTNAT,
    }];
    let mut rules = vec![service_rule("svc_prerouting"), relay_rule()];
    if scope == Scope::All {
        chains.push(ChainSpec {
            name: "svc_output",
            hook: Hook::Output,
            priority: PRIORITY_DSTNAT,
        });
        rules.push(service_rule("svc_output"));
    }
    chains.push(ChainSpec {
        name: "svc_postrouting",
        hook: Hook::Postrouting,
        priority: PRIORITY_SRCNAT,
    });
    rules.push(masquerade_rule());
    (chains, rules)
}

/// One element of a service set: key and value bytes as the kernel stores them (each field
/// padded to 4 bytes), value empty in a plain set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetElement {
    pub set: &'static str,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

fn proto_port(key: RouteKey) -> [u8; 8] {
    let [p, q] = key.port.to_be_bytes();
    [key.protocol.number(), 0, 0, 0, p, q, 0, 0]
}

fn addr_port(backend: SocketAddrV4) -> Vec<u8> {
    let [a, b, c, d] = backend.ip().octets();
    let [p, q] = backend.port().to_be_bytes();
    vec![a, b, c, d, p, q, 0, 0]
}

/// Every element the service sets hold for `table`.
pub fn elements(table: &ServiceTable) -> BTreeSet<SetElement> {
    let mut out = BTreeSet::new();
    for (key, entry) in &table.services {
        let mut bytes = proto_port(RouteKey {
            protocol: key.protocol,
            port: key.port,
        })
        .to_vec();
        bytes.extend(key.address.octets());
        out.insert(SetElement {
            set: SERVICES_MAP,
            key: bytes,
            value: addr_port(entry.backend()),
        });
    }
    for (relay, container) in &table.relays {
        out.insert(SetElement {
            set: RELAYS_MAP,
            key: proto_port(*relay).to_vec(),
            value: addr_port(*container),
        });
    }
    for peer in &table.peers {
        out.insert(SetElement {
            set: PEERS_SET,
            key: peer.octets().to_vec(),
            value: Vec::new(),
        });
    }
    out
}

/// The element messages that turn the service sets of `from` into those of `to`: a changed
/// value is a delete and an add, sent in that order in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetDiff {
    pub delete: Vec<SetElement>,
    pub add: Vec<SetElement>,
}

impl SetDiff {
    pub fn between(from: &ServiceTable, to: &ServiceTable) -> SetDiff {
        if from == to {
            return SetDiff::default();
        }
        let old = elements(from);
        let new = elements(to);
        SetDiff {
            delete: old.difference(&new).cloned().collect(),
            add: new.difference(&old).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{RouteEntry, ServiceKey, table::Protocol};

    fn table(backend: &str) -> ServiceTable {
        let mut t = ServiceTable::default();
        t.services.insert(
            ServiceKey {
                address: Ipv4Addr::new(198, 19, 128, 7),
                protocol: Protocol::Tcp,
                port: 6379,
            },
            RouteEntry::Remote {
                node: backend.parse().expect("addr"),
            },
        );
        t.relays
            .insert(RouteKey::tcp(30001), "172.17.0.2:80".parse().expect("addr"));
        t.peers.insert(Ipv4Addr::new(198, 18, 0, 1));
        t
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn elements_use_the_kernels_padded_layout() {
        let rendered: Vec<String> = elements(&table("198.18.0.2:30005"))
            .iter()
            .map(|e| format!("{} {} -> {}", e.set, hex(&e.key), hex(&e.value)))
            .collect();
        assert_eq!(
            rendered,
            vec![
                "peers c6120001 -> ".to_string(),
                "relays 0600000075310000 -> ac11000200500000".to_string(),
                "services 0600000018eb0000c6138007 -> c612000275350000".to_string(),
            ]
        );
    }

    #[test]
    fn a_moved_service_is_one_delete_and_one_add() {
        let diff = SetDiff::between(&table("198.18.0.2:30005"), &table("198.18.0.3:30005"));
        assert_eq!(diff.delete.len(), 1);
        assert_eq!(diff.add.len(), 1);
        assert_eq!(diff.add[0].set, SERVICES_MAP);
        assert!(SetDiff::between(&table("198.18.0.2:1"), &table("198.18.0.2:1")).is_empty());
    }

    #[test]
    fn only_the_full_scope_has_an_output_chain() {
        let (all, _) = chains_and_rules(Scope::All);
        let (outside, rules) = chains_and_rules(Scope::FromOutside);
        assert!(all.iter().any(|c| c.name == "svc_output"));
        assert!(!outside.iter().any(|c| c.name == "svc_output"));
        assert!(rules.iter().all(|r| r.chain != "svc_output"));
    }
}
