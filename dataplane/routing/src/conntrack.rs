//! Forgets the connection-tracking entries of routes that moved or went away, over ctnetlink:
//! without this, an established (or TIME_WAIT) entry keeps DNAT'ing packets of an existing
//! 5-tuple to the old backend. The dump is filtered here rather than by the kernel, whose
//! flush filters differ between versions.
//!
//! Only entries that were DNAT'd (`IPS_DST_NAT`), are TCP and whose original destination port
//! is one of the given ports are deleted.

use std::{
    collections::BTreeSet,
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
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
const IPS_DST_NAT: u32 = 1 << 5;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
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

/// If one ctnetlink entry (the payload after `nfgenmsg`) should be forgotten, the bytes of its
/// `CTA_TUPLE_ORIG` attribute, which identify it in a delete request.
pub fn entry_to_forget<'a>(
    entry: &'a [u8],
    ports: &BTreeSet<u16>,
) -> Result<Option<&'a [u8]>, ConntrackError> {
    let mut tuple = None;
    let mut status = 0u32;
    for Attr {
        kind,
        payload,
        whole,
    } in attrs(entry)?
    {
        match kind {
            CTA_TUPLE_ORIG => tuple = Some((payload, whole)),
            CTA_STATUS => {
                status = u32::from_be(u32_at(payload, 0).ok_or(ConntrackError::Malformed)?)
            }
            _ => {}
        }
    }
    let Some((tuple, whole)) = tuple else {
        return Ok(None);
    };
    if status & IPS_DST_NAT == 0 {
        return Ok(None);
    }
    let mut proto = None;
    let mut dport = None;
    for outer in attrs(tuple)? {
        if outer.kind == CTA_TUPLE_PROTO {
            for Attr {
                kind, payload: p, ..
            } in attrs(outer.payload)?
            {
                match kind {
                    CTA_PROTO_NUM => proto = p.first().copied(),
                    CTA_PROTO_DST_PORT => {
                        dport = Some(u16::from_be(u16_at(p, 0).ok_or(ConntrackError::Malformed)?))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok((proto == Some(IPPROTO_TCP) && dport.is_some_and(|p| ports.contains(&p))).then_some(whole))
}

fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, res_id 0.
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
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

/// Deletes the DNAT'd TCP conntrack entries whose original destination port is in `ports`,
/// in the caller's network namespace. Returns how many were deleted.
pub fn forget_ports(ports: &BTreeSet<u16>) -> Result<usize, ConntrackError> {
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
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        &[],
    ))?;
    let mut doomed: Vec<Vec<u8>> = Vec::new();
    read_until(&fd, |kind, _, payload| match kind {
        NLMSG_DONE => Ok(true),
        NLMSG_ERROR => {
            let errno = -(u32_at(payload, 0).ok_or(ConntrackError::Malformed)? as i32);
            Err(ConntrackError::Rejected { seq: 1, errno })
        }
        _ => {
            if let Some(tuple) = entry_to_forget(payload.get(4..).unwrap_or_default(), ports)? {
                // Re-mark the copy as nested, as the kernel expects in requests.
                let mut attr = tuple.to_vec();
                let kind = u16::from_ne_bytes([attr[2], attr[3]]) | NLA_F_NESTED;
                attr[2..4].copy_from_slice(&kind.to_ne_bytes());
                doomed.push(attr);
            }
            Ok(false)
        }
    })?;
    let mut deleted = 0;
    for (i, tuple) in doomed.iter().enumerate() {
        let seq = 2 + i as u32;
        send_all(&message(
            IPCTNL_MSG_CT_DELETE,
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
    queue: Option<mpsc::Sender<BTreeSet<u16>>>,
    worker: Option<JoinHandle<()>>,
}

impl Janitor {
    pub fn spawn() -> Janitor {
        let (queue, pending) = mpsc::channel::<BTreeSet<u16>>();
        let worker = std::thread::Builder::new()
            .name("conntrack-janitor".into())
            .spawn(move || {
                while let Ok(mut ports) = pending.recv() {
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

    /// Queues `ports` for forgetting (or forgets them now if there is no worker).
    pub fn forget(&self, ports: BTreeSet<u16>) {
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
fn forget_logged(ports: &BTreeSet<u16>) {
    if let Err(error) = forget_ports(ports) {
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

    fn entry(proto: u8, dport: u16, status: u32) -> Vec<u8> {
        let proto_attrs = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(2, &1234u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            attr(1 | NLA_F_NESTED, &attr(1, &[198, 18, 0, 100])),
            attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto_attrs),
        ]
        .concat();
        [
            attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple),
            attr(CTA_STATUS, &status.to_be_bytes()),
        ]
        .concat()
    }

    #[test]
    fn only_dnated_tcp_entries_of_the_ports_are_forgotten() {
        let ports = BTreeSet::from([7000]);
        let dnat = IPS_DST_NAT | 0x8;
        let cases = [
            (entry(IPPROTO_TCP, 7000, dnat), true),
            (entry(IPPROTO_TCP, 7001, dnat), false),
            (entry(17, 7000, dnat), false),
            (entry(IPPROTO_TCP, 7000, 0x8), false),
        ];
        for (bytes, forget) in cases {
            let got = entry_to_forget(&bytes, &ports).expect("well-formed");
            assert_eq!(got.is_some(), forget);
            if let Some(tuple) = got {
                assert_eq!(
                    u16_at(tuple, 2).map(|k| k & NLA_TYPE_MASK),
                    Some(CTA_TUPLE_ORIG)
                );
            }
        }
    }

    #[test]
    fn truncated_entry_is_malformed() {
        let bytes = entry(IPPROTO_TCP, 7000, IPS_DST_NAT);
        assert!(entry_to_forget(&bytes[..10], &BTreeSet::from([7000])).is_err());
    }
}
