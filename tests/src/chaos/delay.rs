//! Added delay without netem (this kernel has neither `sch_netem` nor `sch_fq`, which a BPF
//! program setting departure times would need): an iptables rule in a node's namespace sends
//! every packet arriving from the peer to an NFQUEUE, and a thread in that namespace gives
//! each packet its verdict (accept) a fixed time after it arrived, in arrival order. The
//! packets themselves never leave the kernel; only their ids travel over the netfilter
//! netlink socket (copy mode "meta").
//!
//! Packets are held where they arrive, not where they leave: a packet held in its sender's
//! own stack still counts against the sending socket (TCP small queues), which then sends
//! only a couple of packets per delay, far slower than the delay alone would make it.
//!
//! The queue holds at most the kernel's default of 1024 packets; more are dropped, as a full
//! router queue would.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

/// Errors of the delayer.
#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("entering the namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netfilter queue socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("the kernel refused the queue's configuration: errno {0}")]
    Refused(i32),
    #[error("the kernel sent a malformed netlink message")]
    Malformed,
    #[error("`{command}` failed: {stderr}")]
    Rule { command: String, stderr: String },
    #[error("running iptables: {0}")]
    Iptables(std::io::Error),
    #[error("the delaying thread panicked")]
    Panicked,
    #[error("the delaying thread ended before it was ready")]
    NotReady,
}

/// Netfilter netlink: the queue subsystem's messages and attributes (linux/netfilter/
/// nfnetlink_queue.h).
const SUBSYS_QUEUE: u16 = 3;
const MSG_PACKET: u16 = SUBSYS_QUEUE << 8;
const MSG_VERDICT: u16 = (SUBSYS_QUEUE << 8) | 1;
const MSG_CONFIG: u16 = (SUBSYS_QUEUE << 8) | 2;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const ATTR_PACKET_HDR: u16 = 1;
const ATTR_VERDICT_HDR: u16 = 2;
const ATTR_CFG_CMD: u16 = 1;
const ATTR_CFG_PARAMS: u16 = 2;
const CFG_CMD_BIND: u8 = 1;
const COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const AF_INET: u16 = 2;
/// How often the thread looks at the clock while no packet arrives.
const TICK: Duration = Duration::from_millis(2);

/// Packets from one namespace to one peer, delayed until [`Delayer::stop`].
pub struct Delayer {
    stop: Arc<AtomicBool>,
    /// `None` once stopped.
    handle: Option<JoinHandle<Result<u64, DelayError>>>,
    netns: PathBuf,
    rule: Vec<String>,
}

impl Delayer {
    /// Delays every packet the namespace at `netns` receives from `peer` (an IPv4 address)
    /// by `delay`, through NFQUEUE number `queue`.
    pub fn start(
        netns: &Path,
        peer: &str,
        queue: u16,
        delay: Duration,
    ) -> Result<Delayer, DelayError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let file = File::open(netns).map_err(|source| DelayError::Namespace {
            path: netns.to_path_buf(),
            source,
        })?;
        let stopping = stop.clone();
        let file_path = netns.to_path_buf();
        let handle = std::thread::spawn(move || {
            let path = file_path;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                DelayError::Namespace {
                    path,
                    source: e.into(),
                }
            })?;
            let socket = bound_queue(queue)?;
            let _ = ready_tx.send(());
            delay_until_stopped(&socket, queue, delay, &stopping)
        });
        if ready.recv().is_err() {
            return Err(match handle.join() {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => DelayError::NotReady,
                Err(_) => DelayError::Panicked,
            });
        }
        // The queue has its reader: only now may packets be sent to it (a queue without a
        // reader drops them).
        let rule: Vec<String> = [
            "PREROUTING",
            "-s",
            peer,
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let delayer = Delayer {
            stop,
            handle: Some(handle),
            netns: netns.to_path_buf(),
            rule,
        };
        if let Err(e) = delayer.iptables("-A") {
            let _ = delayer.stop();
            return Err(e);
        }
        Ok(delayer)
    }

    fn iptables(&self, action: &str) -> Result<(), DelayError> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args(["iptables", "-t", "mangle", action])
            .args(&self.rule)
            .stdin(Stdio::null());
        let out = cmd.output().map_err(DelayError::Iptables)?;
        if !out.status.success() {
            return Err(DelayError::Rule {
                command: format!("{cmd:?}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Removes the rule, lets every packet still held go at once, and returns how many
    /// packets were delayed.
    pub fn stop(mut self) -> Result<u64, DelayError> {
        let removed = self.iptables("-D");
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().ok_or(DelayError::NotReady)?;
        let delayed = handle.join().map_err(|_| DelayError::Panicked)?;
        removed?;
        delayed
    }
}

impl Drop for Delayer {
    /// A delayer not stopped (a fault that failed half-way in) still takes its rule away.
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.iptables("-D");
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// A netfilter netlink socket bound to queue `queue`, copying packet metadata only.
fn bound_queue(queue: u16) -> Result<OwnedFd, DelayError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(0, TICK.as_micros() as _),
    )?;
    let mut cmd = vec![CFG_CMD_BIND, 0];
    cmd.extend(AF_INET.to_be_bytes());
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(COPY_META);
    let config = message(
        MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        AF_INET as u8,
        queue,
        &[(ATTR_CFG_CMD, &cmd), (ATTR_CFG_PARAMS, &params)],
    );
    send(fd.as_raw_fd(), &config, MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => {
                for parsed in parse(&buf[..n])? {
                    if let Parsed::Error(code) = parsed {
                        return if code == 0 {
                            Ok(fd)
                        } else {
                            Err(DelayError::Refused(code))
                        };
                    }
                }
            }
            Err(nix::Error::EAGAIN) if Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives packet ids and accepts each `delay` after it arrived, until `stop`; then accepts
/// the rest at once. Returns how many packets went through.
fn delay_until_stopped(
    socket: &OwnedFd,
    queue: u16,
    delay: Duration,
    stop: &AtomicBool,
) -> Result<u64, DelayError> {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    let mut count = 0u64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let now = Instant::now();
        while let Some(&(due, id)) = held.front() {
            if due > now && !stopping {
                break;
            }
            accept(socket, queue, id)?;
            held.pop_front();
            count += 1;
        }
        if stopping {
            return Ok(count);
        }
        match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => {
                let arrived = Instant::now();
                for parsed in parse(&buf[..n])? {
                    if let Parsed::Packet(id) = parsed {
                        held.push_back((arrived + delay, id));
                    }
                }
            }
            // Nothing within the tick; ENOBUFS: the kernel dropped notifications (those
            // packets are lost, as on a congested link).
            Err(nix::Error::EAGAIN | nix::Error::ENOBUFS | nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn accept(socket: &OwnedFd, queue: u16, id: u32) -> Result<(), DelayError> {
    let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
    verdict.extend(id.to_be_bytes());
    let msg = message(
        MSG_VERDICT,
        NLM_F_REQUEST,
        0,
        queue,
        &[(ATTR_VERDICT_HDR, &verdict)],
    );
    send(socket.as_raw_fd(), &msg, MsgFlags::empty())?;
    Ok(())
}

/// A netfilter netlink message: header, `nfgenmsg` (family, version 0, the queue as
/// resource id) and attributes, each padded to 4 bytes.
fn message(kind: u16, flags: u16, family: u8, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![family, 0];
    body.extend(queue.to_be_bytes());
    for (kind, payload) in attrs {
        body.extend(((4 + payload.len()) as u16).to_ne_bytes());
        body.extend(kind.to_ne_bytes());
        body.extend(*payload);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend(((16 + body.len()) as u32).to_ne_bytes());
    msg.extend(kind.to_ne_bytes());
    msg.extend(flags.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

/// What a received datagram held.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A queued packet's id.
    Packet(u32),
    /// An acknowledgement (0) or an error (a negative errno).
    Error(i32),
    Other,
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The messages of one datagram; every length is checked against the buffer.
fn parse(buf: &[u8]) -> Result<Vec<Parsed>, DelayError> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32_at(buf, at).ok_or(DelayError::Malformed)? as usize;
        let kind = u16_at(buf, at + 4).ok_or(DelayError::Malformed)?;
        if len < 16 || at + len > buf.len() {
            return Err(DelayError::Malformed);
        }
        let msg = &buf[at..at + len];
        found.push(match kind {
            NLMSG_ERROR => {
                let code = u32_at(msg, 16).ok_or(DelayError::Malformed)?;
                Parsed::Error(code as i32)
            }
            MSG_PACKET => packet_id(&msg[16..]).map_or(Parsed::Other, Parsed::Packet),
            _ => Parsed::Other,
        });
        at += len.next_multiple_of(4);
    }
    Ok(found)
}

/// The packet id from a packet message's attributes (after the 4-byte `nfgenmsg`).
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut at = 4;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)? & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == ATTR_PACKET_HDR {
            if len < 8 {
                return None;
            }
            return Some(u32::from_be_bytes(
                body.get(at + 4..at + 8)?.try_into().ok()?,
            ));
        }
        at += len.next_multiple_of(4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_message_is_laid_out_as_the_kernel_reads_it() {
        let msg = message(
            MSG_VERDICT,
            NLM_F_REQUEST,
            0,
            7,
            &[(ATTR_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 9])],
        );
        assert_eq!(msg.len(), 16 + 4 + 12);
        assert_eq!(u32_at(&msg, 0), Some(32));
        assert_eq!(u16_at(&msg, 4), Some(0x0301));
        assert_eq!(
            &msg[16..20],
            &[0, 0, 0, 7],
            "family, version, queue 7 big-endian"
        );
        assert_eq!(u16_at(&msg, 20), Some(12));
        assert_eq!(u16_at(&msg, 22), Some(ATTR_VERDICT_HDR));
    }

    #[test]
    fn packet_ids_and_acks_are_read_and_bad_lengths_refused() {
        // A packet message whose header attribute carries id 0x01020304, then an ack.
        let mut datagram = message(
            MSG_PACKET,
            0,
            2,
            7,
            &[(9, &[1, 2, 3]), (ATTR_PACKET_HDR, &[1, 2, 3, 4, 8, 0, 3])],
        );
        let mut ack = message(NLMSG_ERROR, 0, 0, 0, &[]);
        ack.truncate(16);
        ack.extend(0u32.to_ne_bytes());
        ack[..4].copy_from_slice(&20u32.to_ne_bytes());
        datagram.extend(&ack);
        assert_eq!(
            parse(&datagram).ok(),
            Some(vec![Parsed::Packet(0x0102_0304), Parsed::Error(0)])
        );
        let mut lying = datagram.clone();
        lying[..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(parse(&lying).is_err(), "a length past the buffer");
        let short_attr = message(MSG_PACKET, 0, 2, 7, &[(ATTR_PACKET_HDR, &[1, 2])]);
        assert_eq!(
            parse(&short_attr).ok(),
            Some(vec![Parsed::Other]),
            "a header too short for an id"
        );
    }
}
