//! Forgets the connection-tracking entries of routes that moved or went away, over ctnetlink:
//! without this, an established (or TIME_WAIT) entry keeps DNAT'ing packets of an existing
//! 5-tuple to the old backend. The dump is filtered here rather than by the kernel, whose
//! flush filters differ between versions.
//!
//! Only entries that were DNAT'd (`IPS_DST_NAT`), are TCP or UDP, whose original protocol and
//! destination port are one of the given routes and whose DNAT target (the source of the
//! reply tuple) is not the route's current backend are deleted: connections made after the
//! change stay untouched. For UDP this matters even more than for TCP: a client that keeps
//! sending from one socket keeps its conntrack entry alive forever, and with it the old
//! backend. IPv4 and IPv6 entries come in one dump and are judged by their own family's
//! routes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};
use tracing::{debug, warn};

use crate::table::{IpFamily, Protocol, RouteKey};

/// A failure talking ctnetlink.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("ctnetlink socket call {call} failed")]
    Socket {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("ctnetlink answered message {seq} with error {errno}")]
    Rejected { seq: u32, errno: i32 },
    #[error("ctnetlink sent a malformed message")]
    Malformed,
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
const IPS_DST_NAT: u32 = 1 << 5;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ENOENT: i32 = 2;

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_ne_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_ne_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
        *b.get(i + 2)?,
        *b.get(i + 3)?,
    ]))
}

/// One netlink attribute: its type, its payload, and its bytes including the header.
struct Attr<'a> {
    kind: u16,
    payload: &'a [u8],
    whole: &'a [u8],
}

/// The netlink attributes of a buffer.
fn attrs(mut b: &[u8]) -> Result<Vec<Attr<'_>>, ConntrackError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16_at(b, 0).ok_or(ConntrackError::Malformed)?);
        let kind = u16_at(b, 2).ok_or(ConntrackError::Malformed)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return Err(ConntrackError::Malformed);
        }
        out.push(Attr {
            kind,
            payload: &b[4..len],
            whole: &b[..len],
        });
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(out)
}

/// Which backend each changed route of each family routes to now: `None` when it is no
/// longer routed. Entries of these routes that DNAT to any other backend are stale.
pub type CurrentBackends = BTreeMap<(IpFamily, RouteKey), Option<SocketAddr>>;

/// Protocol, source and destination port of a `CTA_TUPLE_PROTO` payload.
#[derive(Default)]
struct ProtoFields {
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

fn proto_fields(payload: &[u8]) -> Result<ProtoFields, ConntrackError> {
    let mut fields = ProtoFields::default();
    for Attr { kind, payload, .. } in attrs(payload)? {
        let port = || {
            u16_at(payload, 0)
                .map(u16::from_be)
                .ok_or(ConntrackError::Malformed)
        };
        match kind {
            CTA_PROTO_NUM => fields.proto = payload.first().copied(),
            CTA_PROTO_SRC_PORT => fields.sport = Some(port()?),
            CTA_PROTO_DST_PORT => fields.dport = Some(port()?),
            _ => {}
        }
    }
    Ok(fields)
}

/// The source address and port of a reply tuple: where the connection was DNAT'd to.
fn reply_source(tuple: &[u8]) -> Result<Option<SocketAddr>, ConntrackError> {
    let (mut ip, mut port) = (None, None);
    for outer in attrs(tuple)? {
        match outer.kind {
            CTA_TUPLE_IP => {
                for inner in attrs(outer.payload)? {
                    match inner.kind {
                        CTA_IP_V4_SRC => {
                            let octets: [u8; 4] = inner
                                .payload
                                .try_into()
                                .map_err(|_| ConntrackError::Malformed)?;
                            ip = Some(IpAddr::V4(Ipv4Addr::from(octets)));
                        }
                        CTA_IP_V6_SRC => {
                            let octets: [u8; 16] = inner
                                .payload
                                .try_into()
                                .map_err(|_| ConntrackError::Malformed)?;
                            ip = Some(IpAddr::V6(Ipv6Addr::from(octets)));
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => port = proto_fields(outer.payload)?.sport,
            _ => {}
        }
    }
    Ok(ip.zip(port).map(|(ip, port)| SocketAddr::new(ip, port)))
}

/// If one ctnetlink entry of `family` (the payload after `nfgenmsg`) should be forgotten, the
/// bytes of its `CTA_TUPLE_ORIG` attribute, which identify it in a delete request.
pub fn entry_to_forget<'a>(
    family: IpFamily,
    entry: &'a [u8],
    current: &CurrentBackends,
) -> Result<Option<&'a [u8]>, ConntrackError> {
    let mut original = None;
    let mut reply = None;
    let mut status = 0u32;
    for Attr {
        kind,
        payload,
        whole,
    } in attrs(entry)?
    {
        match kind {
            CTA_TUPLE_ORIG => original = Some((payload, whole)),
            CTA_TUPLE_REPLY => reply = Some(payload),
            CTA_STATUS => {
                status = u32::from_be(u32_at(payload, 0).ok_or(ConntrackError::Malformed)?)
            }
            _ => {}
        }
    }
    let Some((tuple, whole)) = original else {
        return Ok(None);
    };
    if status & IPS_DST_NAT == 0 {
        return Ok(None);
    }
    let mut fields = ProtoFields::default();
    for outer in attrs(tuple)? {
        if outer.kind == CTA_TUPLE_PROTO {
            fields = proto_fields(outer.payload)?;
        }
    }
    let protocol = match fields.proto {
        Some(IPPROTO_TCP) => Protocol::Tcp,
        Some(IPPROTO_UDP) => Protocol::Udp,
        _ => return Ok(None),
    };
    let Some(backend) = fields
        .dport
        .and_then(|port| current.get(&(family, RouteKey { protocol, port })))
    else {
        return Ok(None);
    };
    let target = match reply {
        Some(reply) => reply_source(reply)?,
        None => None,
    };
    Ok((backend.is_none() || target != *backend).then_some(whole))
}

/// A ctnetlink request; `family` is `nfgenmsg`'s (`AF_UNSPEC` dumps every family, a delete
/// names the family of its tuple).
fn message(kind: u16, family: u8, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, res_id 0.
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(payload);
    while m.len() % 4 != 0 {
        m.push(0);
    }
    m
}

fn open() -> Result<OwnedFd, ConntrackError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|source| ConntrackError::Socket {
        call: "socket",
        source,
    })?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|source| ConntrackError::Socket {
        call: "bind",
        source,
    })?;
    Ok(fd)
}

/// Reads netlink messages until `done` says stop; yields `(type, seq, payload)`.
fn read_until(
    fd: &OwnedFd,
    mut on_message: impl FnMut(u16, u32, &[u8]) -> Result<bool, ConntrackError>,
) -> Result<(), ConntrackError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|source| {
            ConntrackError::Socket {
                call: "recv",
                source,
            }
        })?;
        let mut data = &buf[..n];
        while data.len() >= 16 {
            let len = u32_at(data, 0).ok_or(ConntrackError::Malformed)? as usize;
            if len < 16 || len > data.len() {
                return Err(ConntrackError::Malformed);
            }
            let kind = u16_at(data, 4).ok_or(ConntrackError::Malformed)?;
            let seq = u32_at(data, 8).ok_or(ConntrackError::Malformed)?;
            if on_message(kind, seq, &data[16..len])? {
                return Ok(());
            }
            data = &data[((len + 3) & !3).min(data.len())..];
        }
    }
}

/// Deletes the DNAT'd TCP and UDP conntrack entries of the changed routes that point at a backend
/// other than the port's current one, in the caller's network namespace. Returns how many
/// were deleted.
pub fn forget_stale(ports: &CurrentBackends) -> Result<usize, ConntrackError> {
    if ports.is_empty() {
        return Ok(0);
    }
    let fd = open()?;
    let send_all = |m: &[u8]| {
        send(fd.as_raw_fd(), m, MsgFlags::empty()).map_err(|source| ConntrackError::Socket {
            call: "send",
            source,
        })
    };
    send_all(&message(
        IPCTNL_MSG_CT_GET,
        AF_UNSPEC,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        &[],
    ))?;
    let mut doomed: Vec<(u8, Vec<u8>)> = Vec::new();
    read_until(&fd, |kind, _, payload| match kind {
        NLMSG_DONE => Ok(true),
        NLMSG_ERROR => {
            let errno = -(u32_at(payload, 0).ok_or(ConntrackError::Malformed)? as i32);
            Err(ConntrackError::Rejected { seq: 1, errno })
        }
        _ => {
            let (af, family) = match payload.first() {
                Some(&AF_INET) => (AF_INET, IpFamily::Ipv4),
                Some(&AF_INET6) => (AF_INET6, IpFamily::Ipv6),
                _ => return Ok(false),
            };
            if let Some(tuple) =
                entry_to_forget(family, payload.get(4..).unwrap_or_default(), ports)?
            {
                // Re-mark the copy as nested, as the kernel expects in requests.
                let mut attr = tuple.to_vec();
                let kind = u16::from_ne_bytes([attr[2], attr[3]]) | NLA_F_NESTED;
                attr[2..4].copy_from_slice(&kind.to_ne_bytes());
                doomed.push((af, attr));
            }
            Ok(false)
        }
    })?;
    let mut deleted = 0;
    for (i, (af, tuple)) in doomed.iter().enumerate() {
        let seq = 2 + i as u32;
        send_all(&message(
            IPCTNL_MSG_CT_DELETE,
            *af,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            tuple,
        ))?;
        read_until(&fd, |kind, _, payload| {
            if kind != NLMSG_ERROR {
                return Ok(false);
            }
            let errno = -(u32_at(payload, 0).ok_or(ConntrackError::Malformed)? as i32);
            match errno {
                0 => deleted += 1,
                // Expired between the dump and the delete.
                ENOENT => {}
                errno => return Err(ConntrackError::Rejected { seq, errno }),
            }
            Ok(true)
        })?;
    }
    debug!(
        ?ports,
        deleted, "conntrack entries of moved routes forgotten"
    );
    Ok(deleted)
}

/// How long the routes must stay unchanged before the janitor dumps the conntrack table.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Forgets the entries of moved ports on a worker thread, once the routes have settled.
///
/// The conntrack dump walks every bucket of the table with bottom halves disabled: about 10 ms
/// at the default 262,144 buckets, even with no entries at all, and while it runs no RCU grace
/// period (not even an expedited one) can end. A route change that deletes a map element
/// waits for one, so a dump on the apply path, or overlapping it, costs a move 10 ms. The
/// janitor therefore waits until no change has come for [`SETTLE`], then forgets all ports
/// queued since in one dump. Dropping the janitor forgets what is queued at once.
///
/// The worker is created in the network namespace of the thread that spawns the janitor, and
/// stays there.
pub struct Janitor {
    queue: Option<mpsc::Sender<CurrentBackends>>,
    worker: Option<JoinHandle<()>>,
}

impl Janitor {
    pub fn spawn() -> Janitor {
        let (queue, pending) = mpsc::channel::<CurrentBackends>();
        let worker = std::thread::Builder::new()
            .name("conntrack-janitor".into())
            .spawn(move || {
                while let Ok(mut ports) = pending.recv() {
                    // A later change of the same port supersedes the earlier one.
                    while let Ok(more) = pending.recv_timeout(SETTLE) {
                        ports.extend(more);
                    }
                    forget_logged(&ports);
                }
            });
        match worker {
            Ok(worker) => Janitor {
                queue: Some(queue),
                worker: Some(worker),
            },
            Err(error) => {
                warn!(%error, "cannot start the conntrack janitor; forgetting entries inline");
                Janitor {
                    queue: None,
                    worker: None,
                }
            }
        }
    }

    /// Queues the changed ports (or forgets their stale entries now if there is no worker).
    pub fn forget(&self, ports: CurrentBackends) {
        if ports.is_empty() {
            return;
        }
        let unsent = match &self.queue {
            Some(queue) => queue.send(ports).err().map(|e| e.0),
            None => Some(ports),
        };
        if let Some(ports) = unsent {
            forget_logged(&ports);
        }
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            warn!("the conntrack janitor panicked");
        }
    }
}

/// The routes are already changed; a stale entry only affects existing 5-tuples, so failing
/// to forget it is worth a warning, not a failed apply.
fn forget_logged(ports: &CurrentBackends) {
    if let Err(error) = forget_stale(ports) {
        warn!(error = %crate::error_chain(&error), "cannot forget conntrack entries of moved routes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn ip_attr(kind_v4: u16, ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(v4) => attr(kind_v4, &v4.octets()),
            IpAddr::V6(v6) => attr(kind_v4 + 2, &v6.octets()),
        }
    }

    /// A tuple from `source` to the node's address (198.18.0.1 or 2001:db8::1).
    fn tuple(source: SocketAddr, dport: u16, proto: u8) -> Vec<u8> {
        let proto_attrs = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(CTA_PROTO_SRC_PORT, &source.port().to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let node: IpAddr = if source.is_ipv4() {
            Ipv4Addr::new(198, 18, 0, 1).into()
        } else {
            "2001:db8::1".parse::<Ipv6Addr>().expect("literal").into()
        };
        [
            attr(
                CTA_TUPLE_IP | NLA_F_NESTED,
                &[ip_attr(CTA_IP_V4_SRC, source.ip()), ip_attr(2, node)].concat(),
            ),
            attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto_attrs),
        ]
        .concat()
    }

    /// A client (198.18.0.100:1234, or [2001:db8::100]:1234 for an IPv6 backend) -> node port
    /// `dport`, DNAT'd to `backend`.
    fn entry(proto: u8, dport: u16, status: u32, backend: SocketAddr) -> Vec<u8> {
        let client: SocketAddr = if backend.is_ipv4() {
            "198.18.0.100:1234".parse().expect("literal")
        } else {
            "[2001:db8::100]:1234".parse().expect("literal")
        };
        [
            attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple(client, dport, proto)),
            attr(CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple(backend, 1234, proto)),
            attr(CTA_STATUS, &status.to_be_bytes()),
        ]
        .concat()
    }

    fn v4(key: RouteKey, now: Option<SocketAddr>) -> CurrentBackends {
        CurrentBackends::from([((IpFamily::Ipv4, key), now)])
    }

    #[test]
    fn only_stale_dnated_entries_of_the_routes_are_forgotten() {
        let old: SocketAddr = "172.17.0.2:6379".parse().expect("literal");
        let new: SocketAddr = "198.18.0.2:7000".parse().expect("literal");
        let moved = v4(RouteKey::tcp(7000), Some(new));
        let removed = v4(RouteKey::tcp(7000), None);
        let udp_moved = v4(RouteKey::udp(7000), Some(new));
        let dnat = IPS_DST_NAT | 0x8;
        let cases = [
            (entry(IPPROTO_TCP, 7000, dnat, old), &moved, true),
            (entry(IPPROTO_TCP, 7000, dnat, new), &moved, false),
            (entry(IPPROTO_TCP, 7000, dnat, new), &removed, true),
            (entry(IPPROTO_TCP, 7001, dnat, old), &moved, false),
            (entry(IPPROTO_UDP, 7000, dnat, old), &moved, false),
            (entry(IPPROTO_UDP, 7000, dnat, old), &udp_moved, true),
            (entry(IPPROTO_UDP, 7000, dnat, new), &udp_moved, false),
            (entry(IPPROTO_TCP, 7000, dnat, old), &udp_moved, false),
            (entry(1, 7000, dnat, old), &moved, false),
            (entry(IPPROTO_TCP, 7000, 0x8, old), &moved, false),
        ];
        for (i, (bytes, current, forget)) in cases.into_iter().enumerate() {
            let got = entry_to_forget(IpFamily::Ipv4, &bytes, current).expect("well-formed");
            assert_eq!(got.is_some(), forget, "case {i}");
            if let Some(tuple) = got {
                assert_eq!(
                    u16_at(tuple, 2).map(|k| k & NLA_TYPE_MASK),
                    Some(CTA_TUPLE_ORIG)
                );
            }
        }
    }

    #[test]
    fn ipv6_entries_are_judged_by_the_ipv6_routes() {
        let old: SocketAddr = "[fd00:17::2]:6379".parse().expect("literal");
        let new: SocketAddr = "[2001:db8::2]:7000".parse().expect("literal");
        let key = RouteKey::tcp(7000);
        let moved6 = CurrentBackends::from([((IpFamily::Ipv6, key), Some(new))]);
        let dnat = IPS_DST_NAT | 0x8;
        let stale = entry(IPPROTO_TCP, 7000, dnat, old);
        let current = entry(IPPROTO_TCP, 7000, dnat, new);
        let judge = |family, bytes: &[u8], ports: &CurrentBackends| {
            entry_to_forget(family, bytes, ports)
                .expect("well-formed")
                .is_some()
        };
        assert!(judge(IpFamily::Ipv6, &stale, &moved6), "stale IPv6 entry");
        assert!(
            !judge(IpFamily::Ipv6, &current, &moved6),
            "current IPv6 entry"
        );
        // An IPv4 move says nothing about IPv6 connections of the same port, nor the other
        // way round.
        assert!(!judge(IpFamily::Ipv6, &stale, &v4(key, None)));
        let old4: SocketAddr = "172.17.0.2:6379".parse().expect("literal");
        assert!(!judge(
            IpFamily::Ipv4,
            &entry(IPPROTO_TCP, 7000, dnat, old4),
            &moved6
        ));
    }

    #[test]
    fn truncated_entry_is_malformed() {
        let backend: SocketAddr = "172.17.0.2:6379".parse().expect("literal");
        let bytes = entry(IPPROTO_TCP, 7000, IPS_DST_NAT, backend);
        let current = v4(RouteKey::tcp(7000), None);
        assert!(entry_to_forget(IpFamily::Ipv4, &bytes[..10], &current).is_err());
    }
}
