//! Waiting for the one real sender on a listening socket: [`accept_authenticated`].
//!
//! A receiver that served only the first connection could be stopped by anyone who can reach
//! its port: a silent client held it forever, a port scan (connect and close, or a few garbage
//! bytes) ended it. Here every accepted connection runs its handshake (TLS, then the session
//! hello and key confirmation) on its own thread, bounded in time by [`ListenLimits`]:
//!
//! - a connection whose handshake has not finished after `handshake_timeout` is cut;
//! - at most `max_pending` handshakes run at once; a newer connection evicts the oldest, so a
//!   burst of stray connections delays the real sender by no more than one handshake;
//! - a failed handshake is logged and the listener keeps listening;
//! - the first connection that completes its handshake is returned, with its socket's read
//!   and write timeouts set to `idle_timeout` for the transfer; the others are cut;
//! - with `deadline` set, giving up after that long without an authenticated peer.
//!
//! What happens once a peer authenticated (the transfer, its success or failure) is the
//! caller's business ([`crate::session::receive_authenticated`]): an authenticated sender that
//! fails mid-stream is a real failure, not a stray connection.

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, unbounded};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::auth::Auth;
use crate::session::server_handshake;
use crate::transport::Conn;

/// Time and number bounds on the connections a receiver waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    /// Longest a connection may take from accept to a completed handshake (TLS included).
    pub handshake_timeout: Duration,
    /// Longest an authenticated transfer may go without the socket making progress (a read or
    /// write that moves no byte for this long fails the transfer).
    pub idle_timeout: Duration,
    /// Give up when no peer has authenticated after this long (`None`: wait forever).
    pub deadline: Option<Duration>,
    /// Handshakes in progress at once; a new connection beyond it evicts the oldest.
    pub max_pending: usize,
}

/// Default [`ListenLimits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ListenLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`ListenLimits::max_pending`].
pub const DEFAULT_MAX_PENDING: usize = 16;

impl Default for ListenLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            deadline: None,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

/// Why no authenticated peer was found.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The overall deadline passed.
    #[error(
        "no sender authenticated within {waited:?} ({refused} connection(s) failed their handshake{last})"
    )]
    Deadline {
        /// How long we waited.
        waited: Duration,
        /// Connections whose handshake failed or timed out.
        refused: u64,
        /// The last handshake failure, formatted as `; last: ...`, or empty.
        last: String,
    },
    /// The listening socket itself failed (not a single connection).
    #[error("listening socket {addr}: {source}")]
    Listener {
        /// The listening address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The limits are unusable.
    #[error("invalid listen limits: {0}")]
    Limits(String),
}

/// How often the accept loop looks at its listener, deadlines and finished handshakes when
/// nothing happens; a finished handshake wakes it at once.
const POLL: Duration = Duration::from_millis(20);

/// A handshake running on its own thread.
struct Pending {
    id: u64,
    peer: SocketAddr,
    started: Instant,
    /// A second handle on the socket, to cut it when the handshake overstays or loses.
    socket: TcpStream,
}

/// What a handshake thread reports.
struct Outcome {
    id: u64,
    peer: SocketAddr,
    result: Result<(Conn, Auth), crate::StreamError>,
}

/// Accepts connections on `listener` until one completes the handshake for `auth` (and TLS
/// when `tls` is given); returns that connection, its peer and the session auth to receive
/// with. Failed or slow handshakes are logged and do not end the wait.
pub fn accept_authenticated(
    listener: &TcpListener,
    tls: Option<Arc<ServerConfig>>,
    auth: &Auth,
    limits: &ListenLimits,
) -> Result<(Conn, SocketAddr, Auth), ListenError> {
    if limits.max_pending == 0 {
        return Err(ListenError::Limits("max_pending must be at least 1".into()));
    }
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let listener_err = |source| ListenError::Listener {
        addr: addr.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(listener_err)?;
    let start = Instant::now();
    let (done_tx, done_rx) = unbounded::<Outcome>();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next_id = 0u64;
    let mut refused = 0u64;
    let mut last = String::new();
    let result = loop {
        if let Some(deadline) = limits.deadline
            && start.elapsed() >= deadline
        {
            break Err(ListenError::Deadline {
                waited: start.elapsed(),
                refused,
                last: if last.is_empty() {
                    String::new()
                } else {
                    format!("; last: {last}")
                },
            });
        }
        if let Err(e) = accept_new(
            listener,
            &tls,
            auth,
            limits,
            &mut pending,
            &mut next_id,
            &done_tx,
        ) {
            break Err(listener_err(e));
        }
        cut_overdue(&mut pending, limits.handshake_timeout);
        match done_rx.recv_timeout(POLL) {
            Ok(Outcome { id, peer, result }) => {
                // A handshake cut (overdue or evicted) may still finish just as its socket is
                // shut down; that connection is dead, so it cannot win.
                let cut = !pending.iter().any(|p| p.id == id);
                pending.retain(|p| p.id != id);
                match result {
                    Ok((conn, session)) if !cut => break Ok((conn, peer, session)),
                    Ok(_) => {
                        refused += 1;
                        tracing::warn!(%peer, "handshake finished after it was cut; still listening");
                        last = format!("{peer}: handshake cut");
                    }
                    Err(e) => {
                        refused += 1;
                        tracing::warn!(%peer, error = %e, "handshake failed; still listening");
                        last = format!("{peer}: {e}");
                    }
                }
            }
            Err(_) => continue,
        }
    };
    // The losers: cut them so their threads end now rather than at their timeout.
    for p in pending {
        let _ = p.socket.shutdown(Shutdown::Both);
    }
    let _ = listener.set_nonblocking(false);
    let (conn, peer, session) = result?;
    set_timeouts(conn.tcp(), Some(limits.idle_timeout));
    tracing::info!(%peer, "sender authenticated");
    Ok((conn, peer, session))
}

/// Accepts every connection waiting on the (non-blocking) listener and starts its handshake.
/// Only a failure of the listener itself is an error.
fn accept_new(
    listener: &TcpListener,
    tls: &Option<Arc<ServerConfig>>,
    auth: &Auth,
    limits: &ListenLimits,
    pending: &mut VecDeque<Pending>,
    next_id: &mut u64,
    done: &Sender<Outcome>,
) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if per_connection(&e) => {
                tracing::warn!(error = %e, "accept failed; still listening");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        tracing::info!(%peer, "accepted");
        let Ok(socket) = tcp.try_clone() else {
            tracing::warn!(%peer, "cannot duplicate the socket; dropping the connection");
            continue;
        };
        if tcp.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = tcp.set_nodelay(true);
        // Each read or write is bounded too, so a thread never outlives its cut by much.
        set_timeouts(&tcp, Some(limits.handshake_timeout));
        while pending.len() >= limits.max_pending {
            if let Some(oldest) = pending.pop_front() {
                tracing::warn!(peer = %oldest.peer, "too many handshakes at once; cutting the oldest");
                let _ = oldest.socket.shutdown(Shutdown::Both);
            }
        }
        let id = *next_id;
        *next_id += 1;
        pending.push_back(Pending {
            id,
            peer,
            started: Instant::now(),
            socket,
        });
        let tls = tls.clone();
        let auth = auth.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let result = handshake(tcp, tls, &auth);
            // The accept loop may be gone (another peer won); then this connection just closes.
            let _ = done.send(Outcome { id, peer, result });
        });
    }
}

/// Accept errors that concern one connection (it was reset before we took it, or we are
/// briefly out of descriptors), not the listener.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, TimedOut};
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const EPROTO: i32 = 71;
    const ENOBUFS: i32 = 105;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | TimedOut
    ) || matches!(
        e.raw_os_error(),
        Some(ENOMEM | ENFILE | EMFILE | EPROTO | ENOBUFS)
    )
}

fn handshake(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    auth: &Auth,
) -> Result<(Conn, Auth), crate::StreamError> {
    let mut conn = match tls {
        None => Conn::Plain(tcp),
        Some(cfg) => {
            let server = ServerConnection::new(cfg)
                .map_err(|e| crate::StreamError::Handshake(format!("TLS setup: {e}")))?;
            Conn::TlsServer(Box::new(StreamOwned::new(server, tcp)))
        }
    };
    let session = server_handshake(&mut conn, auth)?;
    Ok((conn, session))
}

fn cut_overdue(pending: &mut VecDeque<Pending>, timeout: Duration) {
    pending.retain(|p| {
        if p.started.elapsed() < timeout {
            return true;
        }
        tracing::warn!(peer = %p.peer, ?timeout, "handshake timed out; cutting the connection");
        let _ = p.socket.shutdown(Shutdown::Both);
        // Its thread still reports the failure, which is counted then.
        false
    });
}

/// Bounds every read and write on `tcp` (`None`: unbounded).
pub fn set_timeouts(tcp: &TcpStream, timeout: Option<Duration>) {
    // std refuses a zero timeout (the OS would read it as "unbounded"): round up instead.
    let t = timeout.map(|t| t.max(Duration::from_millis(1)));
    let _ = tcp.set_read_timeout(t);
    let _ = tcp.set_write_timeout(t);
}
