//! Encodes the plain-data ruleset of `plan.rs` into nf_tables netlink messages with libnftnl and
//! sends each batch as one transaction. nftnl's safe API has no maps, map lookups, `fib` or
//! `ct original`, so those are built here over `nftnl-sys`; this module holds all of the
//! crate's netlink-related `unsafe`. It also reads: chain and rule dumps (`list_chains`,
//! `list_rules`, for `docker_user`), and nf_tables change notifications (`Events`); and it
//! inserts and deletes single rules by handle in a chain of another table (only
//! `docker_user`'s one rule is ever written there).

use std::{
    ffi::{CString, c_char, c_void},
    io::IoSlice,
    net::SocketAddrV6,
    ops::Range,
    os::fd::{AsRawFd, OwnedFd},
    ptr::NonNull,
};

use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook as NftHook, MsgType, NlMsg, ProtoFamily, Rule,
    Table, expr::Expression,
};
use nftnl_sys::{self as sys, libc};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendmsg,
    setsockopt, socket, sockopt,
};

use super::plan::{
    CmpOp, ELEMENTS_PER_MESSAGE, Expr, Hook, MapBackend, MapElement, ROUTES_MAP, ROUTES6_MAP,
    Ruleset, TABLE, TableDiff,
};
use super::services::{self, SetDiff, SetElement};

/// A failure talking nf_tables.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket call {call} failed")]
    Socket {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("nf_tables rejected message {seq} of the batch: {source}")]
    Rejected {
        seq: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables sent a truncated or malformed reply")]
    Malformed,
    #[error("cannot allocate a libnftnl object")]
    Alloc,
}

/// Type id of `inet_proto`, `inet_service`, `ipv4_addr` and `ipv6_addr` in nftables' type
/// registry; a concatenation's type is the ids shifted in 6 bits at a time.
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
/// The family of our table: `inet`, IPv4 and IPv6 in one ruleset.
const FAMILY: ProtoFamily = ProtoFamily::Inet;

/// The transaction-local id a lookup names its map by while both are created in one batch.
fn set_id(name: &str) -> u32 {
    if name == ROUTES6_MAP {
        2
    } else {
        // The service sets' own ids; 1 for `routes`.
        services::set_id(name)
    }
}
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const IP_CT_DIR_ORIGINAL: u8 = 0;

fn table_name() -> CString {
    CString::new(TABLE).unwrap_or_default()
}

/// A batch ready to send, with the sequence numbers the kernel acknowledges.
pub struct Encoded {
    batch: FinalizedBatch,
    seqs: Range<u32>,
    /// The batch deletes something, so its commit waits for an RCU grace period.
    deletes: bool,
}

/// Deletes the table if present and recreates it with every chain, rule and element, all in one
/// transaction: the nft idiom "add table; delete table; add table" makes the delete safe when
/// the table does not exist yet. The `ip flocker` table of an agent from before IPv6 goes in
/// the same transaction.
pub fn encode_rebuild(
    ruleset: &Ruleset,
    elements: &[MapElement],
    elements6: &[MapElement<SocketAddrV6>],
    service_elements: &[SetElement],
) -> Result<Encoded, NetlinkError> {
    let mut batch = Batch::new();
    delete_legacy_table(&mut batch);
    let table = Table::new(table_name(), FAMILY);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let map = RawSet::routes_map()?;
    batch.add(&map, MsgType::Add);
    let map6 = RawSet::routes6_map()?;
    batch.add(&map6, MsgType::Add);
    let service_sets = services::SETS
        .iter()
        .map(RawSet::service_set)
        .collect::<Result<Vec<_>, _>>()?;
    for set in &service_sets {
        batch.add(set, MsgType::Add);
    }
    for spec in &ruleset.chains {
        let name = CString::new(spec.name).map_err(|_| NetlinkError::Alloc)?;
        let mut chain = Chain::new(&name, &table);
        let hook = match spec.hook {
            Hook::Prerouting => NftHook::PreRouting,
            Hook::Output => NftHook::Out,
            Hook::Postrouting => NftHook::PostRouting,
        };
        chain.set_hook(hook, spec.priority);
        chain.set_type(ChainType::Nat);
        batch.add(&chain, MsgType::Add);
        for rule_spec in ruleset.rules.iter().filter(|r| r.chain == spec.name) {
            let mut rule = Rule::new(&chain);
            for expr in &rule_spec.exprs {
                rule.add_expr(&RawExpr(expr));
            }
            batch.add(&rule, MsgType::Add);
        }
    }
    add_elements(&mut batch, elements, MsgType::Add)?;
    add_elements(&mut batch, elements6, MsgType::Add)?;
    add_set_elements(&mut batch, service_elements, MsgType::Add)?;
    // The old table goes first.
    Ok(finalize(batch, true))
}

/// Only the element messages of a diff: deletes first, then adds, in one transaction.
pub fn encode_diff(diff: &TableDiff, services: &SetDiff) -> Result<Encoded, NetlinkError> {
    let mut batch = Batch::new();
    add_elements(&mut batch, &diff.v4.delete, MsgType::Del)?;
    add_elements(&mut batch, &diff.v6.delete, MsgType::Del)?;
    add_set_elements(&mut batch, &services.delete, MsgType::Del)?;
    add_elements(&mut batch, &diff.v4.add, MsgType::Add)?;
    add_elements(&mut batch, &diff.v6.add, MsgType::Add)?;
    add_set_elements(&mut batch, &services.add, MsgType::Add)?;
    Ok(finalize(
        batch,
        diff.deletes() || !services.delete.is_empty(),
    ))
}

/// Elements of the service sets, one message per set and chunk.
fn add_set_elements(
    batch: &mut Batch,
    elements: &[SetElement],
    msg_type: MsgType,
) -> Result<(), NetlinkError> {
    for spec in services::SETS {
        let of_set: Vec<&SetElement> = elements.iter().filter(|e| e.set == spec.name).collect();
        for chunk in of_set.chunks(ELEMENTS_PER_MESSAGE) {
            let mut set = RawSet::named(spec.name)?;
            for element in chunk {
                set.add_raw_element(&element.key, &element.value)?;
            }
            batch.add(&ElementsMsg(&set), msg_type);
        }
    }
    Ok(())
}

/// Removes the table, and with it everything the agent installed; a no-op if it is absent.
pub fn encode_delete_table() -> Encoded {
    let mut batch = Batch::new();
    delete_legacy_table(&mut batch);
    let table = Table::new(table_name(), FAMILY);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    finalize(batch, true)
}

/// Deletes `ip flocker`, the IPv4-only table agents made before IPv6, if present.
fn delete_legacy_table(batch: &mut Batch) {
    let legacy = Table::new(table_name(), ProtoFamily::Ipv4);
    batch.add(&legacy, MsgType::Add);
    batch.add(&legacy, MsgType::Del);
}

fn finalize(batch: Batch, deletes: bool) -> Encoded {
    let batch = batch.finalize();
    let seqs = batch.sequence_numbers();
    Encoded {
        batch,
        seqs,
        deletes,
    }
}

fn add_elements<A: MapBackend>(
    batch: &mut Batch,
    elements: &[MapElement<A>],
    msg_type: MsgType,
) -> Result<(), NetlinkError> {
    for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
        let mut set = RawSet::named(A::MAP)?;
        for element in chunk {
            set.add_element(element)?;
        }
        batch.add(&ElementsMsg(&set), msg_type);
    }
    Ok(())
}

/// Sends one batch in a single `sendmsg` (the kernel treats a batch split over several sends
/// as several transactions) and waits for every acknowledgement. A batch that deletes
/// anything is committed with expedited RCU grace periods (see `crate::rcu`).
pub fn send(encoded: &Encoded) -> Result<(), NetlinkError> {
    let _expedited = encoded.deletes.then(crate::rcu::Expedited::start);
    let fd = open_socket()?;
    let pages: Vec<IoSlice<'_>> = encoded.batch.iter().map(IoSlice::new).collect();
    let total: usize = pages.iter().map(|p| p.len()).sum();
    // A rebuild with 10,000 routes is ~400 KiB; the default socket buffer is ~200 KiB.
    let wanted = total.saturating_mul(2).max(1 << 20);
    setsockopt(&fd, sockopt::SndBufForce, &wanted).map_err(|source| NetlinkError::Socket {
        call: "setsockopt(SO_SNDBUFFORCE)",
        source,
    })?;
    setsockopt(&fd, sockopt::RcvBufForce, &(1usize << 20)).map_err(|source| {
        NetlinkError::Socket {
            call: "setsockopt(SO_RCVBUFFORCE)",
            source,
        }
    })?;
    let kernel = NetlinkAddr::new(0, 0);
    let sent = sendmsg(
        fd.as_raw_fd(),
        &pages,
        &[],
        MsgFlags::empty(),
        Some(&kernel),
    )
    .map_err(|source| NetlinkError::Socket {
        call: "sendmsg",
        source,
    })?;
    if sent != total {
        return Err(NetlinkError::Malformed);
    }
    let mut pending: Vec<u32> = encoded.seqs.clone().collect();
    let mut buf = vec![0u8; 1 << 16];
    while !pending.is_empty() {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|source| {
            NetlinkError::Socket {
                call: "recv",
                source,
            }
        })?;
        for (seq, errno) in parse_acks(&buf[..n])? {
            if errno != 0 {
                return Err(NetlinkError::Rejected {
                    seq,
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            pending.retain(|s| *s != seq);
        }
    }
    Ok(())
}

fn open_socket() -> Result<OwnedFd, NetlinkError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|source| NetlinkError::Socket {
        call: "socket(AF_NETLINK, NETLINK_NETFILTER)",
        source,
    })?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|source| NetlinkError::Socket {
        call: "bind",
        source,
    })?;
    Ok(fd)
}

/// Reads `(seq, errno)` from every `NLMSG_ERROR` in a datagram (errno 0 is an ACK).
/// Pure, so the framing is unit-tested.
pub fn parse_acks(mut data: &[u8]) -> Result<Vec<(u32, i32)>, NetlinkError> {
    const NLMSG_ERROR: u16 = 2;
    const HEADER: usize = 16;
    let mut acks = Vec::new();
    while data.len() >= HEADER {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < HEADER || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if kind == NLMSG_ERROR {
            let body = &data[HEADER..len];
            // struct nlmsgerr { int error; struct nlmsghdr msg; }: the seq we sent is in the
            // echoed header, the outer header's seq is the same.
            if body.len() < 4 + HEADER {
                return Err(NetlinkError::Malformed);
            }
            let error = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            let seq = u32::from_ne_bytes([body[12], body[13], body[14], body[15]]);
            acks.push((seq, -error));
        }
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    Ok(acks)
}

/// A libnftnl set object: either the full `routes` map definition or a carrier for elements.
struct RawSet(NonNull<sys::nftnl_set>);

impl RawSet {
    fn named(name: &str) -> Result<RawSet, NetlinkError> {
        let name = CString::new(name).map_err(|_| NetlinkError::Alloc)?;
        let table = table_name();
        // SAFETY: nftnl_set_alloc returns an owned object or null; the string setters copy.
        unsafe {
            let set = NonNull::new(sys::nftnl_set_alloc()).ok_or(NetlinkError::Alloc)?;
            sys::nftnl_set_set_u32(set.as_ptr(), sys::NFTNL_SET_FAMILY as u16, FAMILY as u32);
            sys::nftnl_set_set_str(set.as_ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(set.as_ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
            Ok(RawSet(set))
        }
    }

    /// `map routes { type inet_proto . inet_service : ipv4_addr . inet_service }`.
    fn routes_map() -> Result<RawSet, NetlinkError> {
        RawSet::port_map(ROUTES_MAP, TYPE_IPV4_ADDR, 4)
    }

    /// `map routes6 { type inet_proto . inet_service : ipv6_addr . inet_service }`.
    fn routes6_map() -> Result<RawSet, NetlinkError> {
        RawSet::port_map(ROUTES6_MAP, TYPE_IPV6_ADDR, 16)
    }

    /// A map from `inet_proto . inet_service` to an address of type `address_type`
    /// (`address_len` bytes) and an `inet_service`.
    fn port_map(name: &str, address_type: u32, address_len: u32) -> Result<RawSet, NetlinkError> {
        let set = RawSet::named(name)?;
        let p = set.0.as_ptr();
        // SAFETY: p is a live set owned by `set`.
        unsafe {
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, set_id(name));
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, libc::NFT_SET_MAP as u32);
            sys::nftnl_set_set_u32(
                p,
                sys::NFTNL_SET_KEY_TYPE as u16,
                (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
            );
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, 8);
            sys::nftnl_set_set_u32(
                p,
                sys::NFTNL_SET_DATA_TYPE as u16,
                (address_type << 6) | TYPE_INET_SERVICE,
            );
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_LEN as u16, address_len + 4);
        }
        Ok(set)
    }

    /// A service set or map (`services::SETS`).
    fn service_set(spec: &services::SetSpec) -> Result<RawSet, NetlinkError> {
        let set = RawSet::named(spec.name)?;
        let p = set.0.as_ptr();
        let type_id = |t: &services::SetType| match t {
            services::SetType::Ipv4Addr => TYPE_IPV4_ADDR,
            services::SetType::InetProto => TYPE_INET_PROTO,
            services::SetType::InetService => TYPE_INET_SERVICE,
        };
        let concat = |fields: &[services::SetType]| {
            fields.iter().fold(0u32, |acc, t| (acc << 6) | type_id(t))
        };
        // Every field takes one 4-byte register.
        let len = |fields: &[services::SetType]| 4 * fields.len() as u32;
        // SAFETY: p is a live set owned by `set`.
        unsafe {
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, spec.id);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, concat(spec.key));
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, len(spec.key));
            if !spec.value.is_empty() {
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, libc::NFT_SET_MAP as u32);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_TYPE as u16, concat(spec.value));
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_LEN as u16, len(spec.value));
            }
        }
        Ok(set)
    }

    /// An element of any key and value (no value for a plain set).
    fn add_raw_element(&mut self, key: &[u8], value: &[u8]) -> Result<(), NetlinkError> {
        // SAFETY: as in `add_element`: the element goes to the set, the setters copy.
        unsafe {
            let elem = NonNull::new(sys::nftnl_set_elem_alloc()).ok_or(NetlinkError::Alloc)?;
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            if !value.is_empty() {
                sys::nftnl_set_elem_set(
                    elem.as_ptr(),
                    sys::NFTNL_SET_ELEM_DATA as u16,
                    value.as_ptr().cast::<c_void>(),
                    value.len() as u32,
                );
            }
            sys::nftnl_set_elem_add(self.0.as_ptr(), elem.as_ptr());
        }
        Ok(())
    }

    fn add_element<A: MapBackend>(&mut self, element: &MapElement<A>) -> Result<(), NetlinkError> {
        let key = element.key();
        let value = element.value();
        // SAFETY: the element is allocated here and handed to the set, which frees it; the
        // setters copy the key and value bytes.
        unsafe {
            let elem = NonNull::new(sys::nftnl_set_elem_alloc()).ok_or(NetlinkError::Alloc)?;
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_DATA as u16,
                value.as_ptr().cast::<c_void>(),
                value.len() as u32,
            );
            sys::nftnl_set_elem_add(self.0.as_ptr(), elem.as_ptr());
        }
        Ok(())
    }
}

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: the set was allocated by nftnl_set_alloc and is freed exactly once.
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) };
    }
}

// SAFETY: a set definition is a few hundred bytes, far below nft_nlmsg_maxsize().
unsafe impl NlMsg for RawSet {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let kind = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWSET,
            MsgType::Del => libc::NFT_MSG_DELSET,
        };
        // SAFETY: the caller provides a buffer of nft_nlmsg_maxsize() bytes.
        unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                kind as u16,
                FAMILY as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(header, self.0.as_ptr());
        }
    }
}

/// The elements of a `RawSet` as one NEWSETELEM / DELSETELEM message.
struct ElementsMsg<'a>(&'a RawSet);

// SAFETY: add_elements puts at most ELEMENTS_PER_MESSAGE (~40 bytes each) in one set, which
// stays below nft_nlmsg_maxsize().
unsafe impl NlMsg for ElementsMsg<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (kind, flags) = match msg_type {
            MsgType::Add => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        // SAFETY: the caller provides a buffer of nft_nlmsg_maxsize() bytes.
        unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                kind as u16,
                FAMILY as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(header, self.0.0.as_ptr());
        }
    }
}

/// A rule in a chain of someone else's table, built over `nftnl-sys` so that it can be
/// inserted at the head of its chain (nftnl's `Rule` always appends) and deleted by handle.
struct RawRule(NonNull<sys::nftnl_rule>);

impl RawRule {
    fn new(family: u32, table: &str, chain: &str) -> Result<RawRule, NetlinkError> {
        let table = CString::new(table).map_err(|_| NetlinkError::Alloc)?;
        let chain = CString::new(chain).map_err(|_| NetlinkError::Alloc)?;
        // SAFETY: nftnl_rule_alloc returns an owned object or null; the string setters copy.
        unsafe {
            let rule = NonNull::new(sys::nftnl_rule_alloc()).ok_or(NetlinkError::Alloc)?;
            sys::nftnl_rule_set_u32(rule.as_ptr(), sys::NFTNL_RULE_FAMILY as u16, family);
            sys::nftnl_rule_set_str(rule.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(rule.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            Ok(RawRule(rule))
        }
    }

    fn add_expr(&mut self, expr: &Expr) {
        // SAFETY: the rule takes ownership of the freshly built expression.
        unsafe { sys::nftnl_rule_add_expr(self.0.as_ptr(), build_expr(expr).as_ptr()) }
    }

    /// The comment as nft and iptables store it: a NUL-terminated string in the rule's
    /// userdata, type `NFTNL_UDATA_RULE_COMMENT`.
    fn set_comment(&mut self, comment: &str) -> Result<(), NetlinkError> {
        let data = comment_udata(comment).ok_or(NetlinkError::Alloc)?;
        // SAFETY: the setter copies `data`.
        let result = unsafe {
            sys::nftnl_rule_set_data(
                self.0.as_ptr(),
                sys::NFTNL_RULE_USERDATA as u16,
                data.as_ptr().cast::<c_void>(),
                data.len() as u32,
            )
        };
        if result < 0 {
            return Err(NetlinkError::Alloc);
        }
        Ok(())
    }

    fn set_handle(&mut self, handle: u64) {
        // SAFETY: the rule is live.
        unsafe { sys::nftnl_rule_set_u64(self.0.as_ptr(), sys::NFTNL_RULE_HANDLE as u16, handle) }
    }
}

impl Drop for RawRule {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_rule_alloc, freed exactly once.
        unsafe { sys::nftnl_rule_free(self.0.as_ptr()) };
    }
}

/// The userdata TLV of a rule comment: type, length (with the NUL), the bytes, NUL.
pub fn comment_udata(comment: &str) -> Option<Vec<u8>> {
    let len = u8::try_from(comment.len() + 1).ok()?;
    if comment.contains('\0') {
        return None;
    }
    let mut data = vec![sys::NFTNL_UDATA_RULE_COMMENT as u8, len];
    data.extend_from_slice(comment.as_bytes());
    data.push(0);
    Some(data)
}

/// The comment in a rule's userdata, if it has one.
pub fn udata_comment(mut data: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = data {
        let len = usize::from(*len);
        let value = rest.get(..len)?;
        if u32::from(*kind) == sys::NFTNL_UDATA_RULE_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        data = &rest[len..];
    }
    None
}

/// Where a new rule goes.
enum RulePlacement {
    /// Before every other rule of its chain.
    Head,
    Delete,
}

/// A NEWRULE (at the head: no `NLM_F_APPEND`) or DELRULE message.
struct RuleMsg<'a>(&'a RawRule, RulePlacement);

// SAFETY: a rule of a few expressions stays far below nft_nlmsg_maxsize().
unsafe impl NlMsg for RuleMsg<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        let (kind, flags) = match self.1 {
            RulePlacement::Head => (libc::NFT_MSG_NEWRULE, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            RulePlacement::Delete => (libc::NFT_MSG_DELRULE, libc::NLM_F_ACK),
        };
        // SAFETY: the caller provides a buffer of nft_nlmsg_maxsize() bytes.
        unsafe {
            let family = sys::nftnl_rule_get_u32(self.0.0.as_ptr(), sys::NFTNL_RULE_FAMILY as u16);
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                kind as u16,
                family as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_rule_nlmsg_build_payload(header, self.0.0.as_ptr());
        }
    }
}

/// A rule for a chain of another table, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRule {
    /// `ProtoFamily::Ipv4` (ip) or `ProtoFamily::Ipv6` (ip6).
    pub family: ProtoFamily,
    pub table: &'static str,
    pub chain: &'static str,
    pub exprs: Vec<Expr>,
    pub comment: &'static str,
}

/// Inserts `rule` before every other rule of its chain.
pub fn encode_insert_at_head(rule: &ForeignRule) -> Result<Encoded, NetlinkError> {
    let mut raw = RawRule::new(rule.family as u32, rule.table, rule.chain)?;
    for expr in &rule.exprs {
        raw.add_expr(expr);
    }
    raw.set_comment(rule.comment)?;
    let mut batch = Batch::new();
    batch.add(&RuleMsg(&raw, RulePlacement::Head), MsgType::Add);
    Ok(finalize(batch, false))
}

/// Deletes the rules with these handles from `table`'s (of `family`) `chain`.
pub fn encode_delete_rules(
    family: ProtoFamily,
    table: &str,
    chain: &str,
    handles: &[u64],
) -> Result<Encoded, NetlinkError> {
    let mut batch = Batch::new();
    for handle in handles {
        let mut raw = RawRule::new(family as u32, table, chain)?;
        raw.set_handle(*handle);
        batch.add(&RuleMsg(&raw, RulePlacement::Delete), MsgType::Del);
    }
    Ok(finalize(batch, true))
}

/// Whether a datagram of nf_tables notifications adds or deletes a table, chain or rule
/// (a truncated one counts as a change). Pure.
pub fn touches_rules(mut data: &[u8]) -> bool {
    const HEADER: usize = 16;
    let subsys = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;
    let kinds = [
        libc::NFT_MSG_NEWTABLE,
        libc::NFT_MSG_DELTABLE,
        libc::NFT_MSG_NEWCHAIN,
        libc::NFT_MSG_DELCHAIN,
        libc::NFT_MSG_NEWRULE,
        libc::NFT_MSG_DELRULE,
    ]
    .map(|k| subsys | k as u16);
    while data.len() >= HEADER {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < HEADER || len > data.len() {
            return true;
        }
        if kinds.contains(&u16::from_ne_bytes([data[4], data[5]])) {
            return true;
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    !data.is_empty()
}

/// A chain as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    /// `NFPROTO_*`: 2 ip, 1 inet, 10 ip6, ...
    pub family: u8,
    pub table: String,
    pub name: String,
    /// The hook of a base chain (`NF_INET_*`), `None` for a regular chain.
    pub hook: Option<u32>,
    /// The policy of a base chain (`NF_DROP` 0, `NF_ACCEPT` 1).
    pub policy: Option<u32>,
}

/// A rule as the kernel lists it: only what we identify our own rules by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub handle: u64,
    pub comment: Option<String>,
}

/// A netlink buffer aligned for `nlmsghdr`.
fn aligned_buffer(bytes: usize) -> Vec<u32> {
    vec![0u32; bytes / 4]
}

/// Sends a dump request built by `build` (into an aligned buffer) and hands every reply
/// message of type `reply_type` to `each`.
fn dump(
    build: impl FnOnce(*mut c_char) -> u32,
    reply_type: u16,
    mut each: impl FnMut(*const libc::nlmsghdr),
) -> Result<(), NetlinkError> {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const HEADER: usize = 16;
    let fd = open_socket()?;
    let mut request = aligned_buffer(4096);
    let len = build(request.as_mut_ptr().cast::<c_char>()) as usize;
    // SAFETY: `request` holds at least `len` initialised bytes (the message just built).
    let bytes = unsafe { std::slice::from_raw_parts(request.as_ptr().cast::<u8>(), len) };
    let kernel = NetlinkAddr::new(0, 0);
    sendmsg(
        fd.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[],
        MsgFlags::empty(),
        Some(&kernel),
    )
    .map_err(|source| NetlinkError::Socket {
        call: "sendmsg",
        source,
    })?;
    let mut buf = aligned_buffer(1 << 16);
    let wanted = (u16::try_from(libc::NFNL_SUBSYS_NFTABLES).unwrap_or(10) << 8) | reply_type;
    loop {
        // SAFETY: the byte view covers exactly the u32 buffer.
        let view =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 4) };
        let n = recv(fd.as_raw_fd(), view, MsgFlags::empty()).map_err(|source| {
            NetlinkError::Socket {
                call: "recv",
                source,
            }
        })?;
        let mut offset = 0;
        while offset + HEADER <= n {
            let data = &view[offset..n];
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < HEADER || len > data.len() {
                return Err(NetlinkError::Malformed);
            }
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = data
                        .get(HEADER..HEADER + 4)
                        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(NetlinkError::Malformed)?;
                    if errno != 0 {
                        return Err(NetlinkError::Rejected {
                            seq: 0,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                }
                // Messages start 4-byte aligned in the datagram, and the buffer is aligned.
                k if k == wanted => each(data.as_ptr().cast::<libc::nlmsghdr>()),
                _ => {}
            }
            offset += (len + 3) & !3;
        }
    }
}

/// Every chain of every table in this network namespace (all families).
pub fn list_chains() -> Result<Vec<ChainInfo>, NetlinkError> {
    let mut chains = Vec::new();
    dump(
        // SAFETY: the buffer is 4 KiB, a header with no payload needs 20 bytes.
        |buf| unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf,
                libc::NFT_MSG_GETCHAIN as u16,
                libc::NFPROTO_UNSPEC as u16,
                (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
                1,
            );
            (*header).nlmsg_len
        },
        libc::NFT_MSG_NEWCHAIN as u16,
        |header| {
            // SAFETY: `header` points at one complete, aligned message of the reply; the
            // chain is freed before returning and the strings are copied out.
            unsafe {
                let Some(chain) = NonNull::new(sys::nftnl_chain_alloc()) else {
                    return;
                };
                let c = chain.as_ptr();
                if sys::nftnl_chain_nlmsg_parse(header, c) >= 0 {
                    let text = |attr: u32| {
                        let p = sys::nftnl_chain_get_str(c, attr as u16);
                        if p.is_null() {
                            String::new()
                        } else {
                            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
                        }
                    };
                    let u32_if_set = |attr: u32| {
                        sys::nftnl_chain_is_set(c, attr as u16)
                            .then(|| sys::nftnl_chain_get_u32(c, attr as u16))
                    };
                    chains.push(ChainInfo {
                        family: sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_FAMILY as u16) as u8,
                        table: text(sys::NFTNL_CHAIN_TABLE),
                        name: text(sys::NFTNL_CHAIN_NAME),
                        hook: u32_if_set(sys::NFTNL_CHAIN_HOOKNUM),
                        policy: u32_if_set(sys::NFTNL_CHAIN_POLICY),
                    });
                }
                sys::nftnl_chain_free(c);
            }
        },
    )?;
    Ok(chains)
}

/// The rules of `table`'s (of `family`) `chain`, in order.
pub fn list_rules(
    family: ProtoFamily,
    table: &str,
    chain: &str,
) -> Result<Vec<RuleInfo>, NetlinkError> {
    let filter = RawRule::new(family as u32, table, chain)?;
    let mut rules = Vec::new();
    dump(
        // SAFETY: the buffer is 4 KiB; a header with a table and a chain name fits easily.
        |buf| unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf,
                libc::NFT_MSG_GETRULE as u16,
                family as u16,
                (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
                1,
            );
            sys::nftnl_rule_nlmsg_build_payload(header, filter.0.as_ptr());
            (*header).nlmsg_len
        },
        libc::NFT_MSG_NEWRULE as u16,
        |header| {
            // SAFETY: as in list_chains; the userdata is copied out before the rule is freed.
            unsafe {
                let Some(rule) = NonNull::new(sys::nftnl_rule_alloc()) else {
                    return;
                };
                let r = rule.as_ptr();
                if sys::nftnl_rule_nlmsg_parse(header, r) >= 0 {
                    let mut len = 0u32;
                    let data =
                        sys::nftnl_rule_get_data(r, sys::NFTNL_RULE_USERDATA as u16, &mut len);
                    let comment = if data.is_null() {
                        None
                    } else {
                        udata_comment(std::slice::from_raw_parts(data.cast::<u8>(), len as usize))
                    };
                    rules.push(RuleInfo {
                        handle: sys::nftnl_rule_get_u64(r, sys::NFTNL_RULE_HANDLE as u16),
                        comment,
                    });
                }
                sys::nftnl_rule_free(r);
            }
        },
    )?;
    Ok(rules)
}

/// A socket subscribed to nf_tables change notifications of this network namespace.
pub struct Events(OwnedFd);

impl Events {
    /// Subscribes; `wait` returns after at most `timeout`.
    pub fn subscribe(timeout: std::time::Duration) -> Result<Events, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|source| NetlinkError::Socket {
            call: "socket(AF_NETLINK, NETLINK_NETFILTER)",
            source,
        })?;
        let groups = 1u32 << (libc::NFNLGRP_NFTABLES - 1);
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(|source| {
            NetlinkError::Socket {
                call: "bind(NFNLGRP_NFTABLES)",
                source,
            }
        })?;
        let timeout = nix::sys::time::TimeVal::new(
            timeout.as_secs() as libc::time_t,
            timeout.subsec_micros() as libc::suseconds_t,
        );
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(|source| {
            NetlinkError::Socket {
                call: "setsockopt(SO_RCVTIMEO)",
                source,
            }
        })?;
        Ok(Events(fd))
    }

    /// Waits for the next notification: `true` when a table, chain or rule changed (or
    /// notifications were lost, which may hide such a change), `false` on timeout or when
    /// only set elements or generations changed (every route change of ours does that).
    pub fn wait(&self) -> Result<bool, NetlinkError> {
        let mut buf = [0u8; 8192];
        match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => Ok(touches_rules(&buf[..n.min(buf.len())])),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(false),
            Err(nix::errno::Errno::ENOBUFS) => Ok(true),
            Err(source) => Err(NetlinkError::Socket {
                call: "recv(NFNLGRP_NFTABLES)",
                source,
            }),
        }
    }

    /// Reads and drops every notification already queued, without waiting.
    pub fn drain(&self) {
        let mut buf = [0u8; 8192];
        while recv(self.0.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
    }
}

/// One plan expression as a libnftnl expression.
struct RawExpr<'a>(&'a Expr);

fn alloc_expr(name: &std::ffi::CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: nftnl_expr_alloc returns an owned expression or null on allocation failure,
    // which nftnl itself treats as fatal too.
    match NonNull::new(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) }) {
        Some(e) => e,
        None => std::process::abort(),
    }
}

impl Expression for RawExpr<'_> {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        build_expr(self.0)
    }
}

/// One plan expression as a freshly allocated libnftnl expression, owned by the caller.
fn build_expr(expr: &Expr) -> NonNull<sys::nftnl_expr> {
    let reg1 = libc::NFT_REG_1 as u32;
    let reg2 = libc::NFT_REG_2 as u32;
    let reg3 = libc::NFT_REG_3 as u32;
    // The 32-bit register right after the first word of register 1: the second field of a
    // concatenated key that starts in register 1.
    let reg9 = libc::NFT_REG32_01 as u32;
    // SAFETY: every expression is freshly allocated and only given attributes its type
    // defines; data setters copy their input.
    unsafe {
        let set_u32 = |e: NonNull<sys::nftnl_expr>, attr: u32, v: u32| {
            sys::nftnl_expr_set_u32(e.as_ptr(), attr as u16, v)
        };
        let set_data = |e: NonNull<sys::nftnl_expr>, attr: u32, d: &[u8]| {
            sys::nftnl_expr_set(
                e.as_ptr(),
                attr as u16,
                d.as_ptr().cast::<c_void>(),
                d.len() as u32,
            )
        };
        match expr {
            Expr::FibDaddrType => {
                let e = alloc_expr(c"fib");
                set_u32(e, sys::NFTNL_EXPR_FIB_FLAGS, NFTA_FIB_F_DADDR);
                set_u32(e, sys::NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
                set_u32(e, sys::NFTNL_EXPR_FIB_DREG, reg1);
                e
            }
            Expr::MetaL4Proto => {
                let e = alloc_expr(c"meta");
                set_u32(e, sys::NFTNL_EXPR_META_KEY, libc::NFT_META_L4PROTO as u32);
                set_u32(e, sys::NFTNL_EXPR_META_DREG, reg1);
                e
            }
            Expr::TransportDport => {
                let e = alloc_expr(c"payload");
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, reg9);
                set_u32(
                    e,
                    sys::NFTNL_EXPR_PAYLOAD_BASE,
                    libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
                );
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, 2);
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, 2);
                e
            }
            Expr::CtStatus => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_STATUS as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg1);
                e
            }
            Expr::CtOriginalProtocol => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_PROTOCOL as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg1);
                sys::nftnl_expr_set_u8(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_CT_DIR as u16,
                    IP_CT_DIR_ORIGINAL,
                );
                e
            }
            Expr::CtOriginalProtoDst => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_PROTO_DST as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg9);
                sys::nftnl_expr_set_u8(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_CT_DIR as u16,
                    IP_CT_DIR_ORIGINAL,
                );
                e
            }
            Expr::Bitwise { mask, xor } => {
                let e = alloc_expr(c"bitwise");
                set_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, reg1);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, reg1);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
                set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, mask);
                set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, xor);
                e
            }
            Expr::Cmp { op, data } => {
                let e = alloc_expr(c"cmp");
                set_u32(e, sys::NFTNL_EXPR_CMP_SREG, reg1);
                let op = match op {
                    CmpOp::Eq => libc::NFT_CMP_EQ,
                    CmpOp::Neq => libc::NFT_CMP_NEQ,
                };
                set_u32(e, sys::NFTNL_EXPR_CMP_OP, op as u32);
                set_data(e, sys::NFTNL_EXPR_CMP_DATA, data);
                e
            }
            Expr::Lookup { set, to_register } => {
                let e = alloc_expr(c"lookup");
                set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, reg1);
                let name = CString::new(*set).unwrap_or_default();
                sys::nftnl_expr_set_str(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_LOOKUP_SET as u16,
                    name.as_ptr(),
                );
                set_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, set_id(set));
                if *to_register {
                    set_u32(e, sys::NFTNL_EXPR_LOOKUP_DREG, reg1);
                }
                e
            }
            Expr::DnatFromRegisters => {
                let e = alloc_expr(c"nat");
                set_u32(e, sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
                set_u32(e, sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV4 as u32);
                set_u32(e, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, reg1);
                set_u32(
                    e,
                    sys::NFTNL_EXPR_NAT_REG_PROTO_MIN,
                    libc::NFT_REG32_01 as u32,
                );
                e
            }
            Expr::Masquerade => alloc_expr(c"masq"),
            Expr::Counter => alloc_expr(c"counter"),
            Expr::CtMarkToReg2 => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg2);
                e
            }
            Expr::SetBitReg2(bit) => {
                let e = alloc_expr(c"bitwise");
                set_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, reg2);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, reg2);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, 4);
                set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, &(!bit).to_ne_bytes());
                set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, &bit.to_ne_bytes());
                e
            }
            Expr::CtMarkFromReg2 => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_SREG, reg2);
                e
            }
            Expr::XtMatch { name, rev, info } => {
                let e = alloc_expr(c"match");
                let name = CString::new(*name).unwrap_or_default();
                sys::nftnl_expr_set_str(e.as_ptr(), sys::NFTNL_EXPR_MT_NAME as u16, name.as_ptr());
                set_u32(e, sys::NFTNL_EXPR_MT_REV, *rev);
                // Unlike every other attribute we set, libnftnl keeps this pointer and frees it
                // with the expression: it must be a malloc'd copy.
                let copy = libc::malloc(info.len().max(1));
                if copy.is_null() {
                    std::process::abort();
                }
                std::ptr::copy_nonoverlapping(info.as_ptr(), copy.cast::<u8>(), info.len());
                sys::nftnl_expr_set(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_MT_INFO as u16,
                    copy,
                    info.len() as u32,
                );
                e
            }
            Expr::Accept => {
                let e = alloc_expr(c"immediate");
                set_u32(e, sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32);
                set_u32(e, sys::NFTNL_EXPR_IMM_VERDICT, libc::NF_ACCEPT as u32);
                e
            }
            Expr::MetaNfproto => {
                let e = alloc_expr(c"meta");
                set_u32(e, sys::NFTNL_EXPR_META_KEY, libc::NFT_META_NFPROTO as u32);
                set_u32(e, sys::NFTNL_EXPR_META_DREG, reg1);
                e
            }
            Expr::Dnat6FromRegisters => {
                let e = alloc_expr(c"nat");
                set_u32(e, sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
                set_u32(e, sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV6 as u32);
                set_u32(e, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, reg1);
                set_u32(
                    e,
                    sys::NFTNL_EXPR_NAT_REG_PROTO_MIN,
                    libc::NFT_REG32_04 as u32,
                );
                e
            }
            Expr::CtMarkToReg3 => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg3);
                e
            }
            Expr::SetBitReg3(bit) => {
                let e = alloc_expr(c"bitwise");
                set_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, reg3);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, reg3);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, 4);
                set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, &(!bit).to_ne_bytes());
                set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, &bit.to_ne_bytes());
                e
            }
            Expr::CtMarkFromReg3 => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_SREG, reg3);
                e
            }
            Expr::NetworkSaddr | Expr::NetworkDaddrReg10 => {
                let (offset, dreg) = match expr {
                    Expr::NetworkSaddr => (12, reg1),
                    _ => (16, libc::NFT_REG32_02 as u32),
                };
                let e = alloc_expr(c"payload");
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, dreg);
                set_u32(
                    e,
                    sys::NFTNL_EXPR_PAYLOAD_BASE,
                    libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
                );
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset);
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, 4);
                e
            }
            Expr::CtOriginalDaddr => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_DST as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, reg1);
                sys::nftnl_expr_set_u8(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_CT_DIR as u16,
                    IP_CT_DIR_ORIGINAL,
                );
                e
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsgerr(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        // echoed header: len, type, flags, seq, pid
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    #[test]
    fn acks_and_errors_are_read_from_one_datagram() {
        let mut data = nlmsgerr(7, 0);
        data.extend(nlmsgerr(8, -libc::EEXIST));
        let acks = parse_acks(&data).expect("well-formed");
        assert_eq!(acks, vec![(7, 0), (8, libc::EEXIST)]);
    }

    fn notification(kind: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&((10u16 << 8) | kind as u16).to_ne_bytes());
        m.extend_from_slice(&[0; 14]);
        m
    }

    #[test]
    fn only_table_chain_and_rule_notifications_count_as_changes() {
        let mut elements = notification(libc::NFT_MSG_NEWSETELEM);
        elements.extend(notification(libc::NFT_MSG_DELSETELEM));
        elements.extend(notification(libc::NFT_MSG_NEWGEN));
        assert!(!touches_rules(&elements), "our route changes");
        let mut flushed = elements.clone();
        flushed.extend(notification(libc::NFT_MSG_DELRULE));
        assert!(touches_rules(&flushed), "a rule deleted");
        assert!(touches_rules(&notification(libc::NFT_MSG_NEWCHAIN)));
        assert!(
            touches_rules(&elements[..30]),
            "truncated: may hide a change"
        );
    }

    #[test]
    fn truncated_reply_is_an_error() {
        let data = nlmsgerr(7, 0);
        assert!(parse_acks(&data[..30]).is_err());
    }
}
