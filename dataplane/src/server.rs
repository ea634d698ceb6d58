//! The agent's listener: accepts TCP connections, bounds what an unauthenticated peer can
//! hold, runs the mutual TLS handshake, reads who the peer is ([`Caller`]) and serves HTTP/1.1
//! on the connection with [`crate::api::handle`].
//!
//! Anyone who reaches the port can open connections, so everything before and during the
//! handshake is bounded ([`ServerLimits`]): at most `max_pending_handshakes` connections may
//! be in their handshake (a new one closes the oldest, so a flood of idle connections cannot
//! lock a real client out), each for at most `handshake_timeout`. Authenticated connections
//! are capped at `max_connections` and must send each request's headers within
//! `header_timeout`. Accept errors (out of descriptors) back off and are logged at most once
//! a second, with the count of those not logged.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::agent::Agent;
use crate::identity::Caller;
use crate::limits::ServerLimits;

/// Serves the API on `listener` until the task is dropped. Peers that fail the mutual TLS
/// handshake never reach [`crate::api::handle`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    agent: Arc<Agent>,
    limits: ServerLimits,
) {
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(tls),
        agent,
        limits,
        pending: Pending::new(limits.max_pending_handshakes),
        served: Arc::new(Semaphore::new(limits.max_connections)),
        refused_log: RateLimitedLog::new(Duration::from_secs(1)),
    });
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                backoff.reset();
                let ticket = shared.pending.admit();
                tokio::spawn(connection(shared.clone(), tcp, peer, ticket));
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

struct Shared {
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    limits: ServerLimits,
    pending: Arc<Pending>,
    served: Arc<Semaphore>,
    refused_log: RateLimitedLog,
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
    send_at_once(&tcp);
    let timeout = shared.limits.handshake_timeout;
    let handshake = tokio::time::timeout(timeout, shared.acceptor.accept(tcp));
    let refused = |why: String| {
        if let Some(unlogged) = shared.refused_log.allow() {
            tracing::warn!(%peer, unlogged, "refused connection: {why}");
        }
    };
    let tls = tokio::select! {
        () = ticket.evicted() => {
            refused("too many pending handshakes; closed the oldest".into());
            return;
        }
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refused(format!("TLS handshake: {e}")),
            Err(_) => return refused(format!("no TLS handshake within {timeout:?}")),
        },
    };
    drop(ticket);
    let Ok(_permit) = shared.served.clone().try_acquire_owned() else {
        return refused(format!(
            "{} connections already served",
            shared.limits.max_connections
        ));
    };
    let caller = Arc::new(
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(Caller::from_certificate)
            .unwrap_or_else(|| Caller::Unknown("no certificate".into())),
    );
    tracing::debug!(%peer, %caller, "connection");
    let (agent, limits) = (shared.agent.clone(), shared.limits);
    let service = service_fn(move |req| {
        let (agent, caller) = (agent.clone(), caller.clone());
        async move { Ok::<_, Infallible>(crate::api::handle(agent, caller, limits, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

/// Answers go out as several small writes (TLS records of the headers, the body, each event
/// of a converge): with Nagle's algorithm a write waits for the ACK of the one before, which
/// the peer delays by up to 40 ms. That was 40 ms more on every volume query of a move, inside
/// the clients' pause, and on every converge phase's last event.
fn send_at_once(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// The connections still in their handshake, oldest first.
struct Pending {
    max: usize,
    next_id: AtomicU64,
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

/// A connection's place among the pending ones; leaves the queue when dropped.
struct Ticket {
    id: u64,
    evict: Arc<Notify>,
    pending: Arc<Pending>,
}

impl Pending {
    fn new(max: usize) -> Arc<Pending> {
        Arc::new(Pending {
            max: max.max(1),
            next_id: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        })
    }

    /// Adds a connection; if the queue is full, tells the oldest one to close.
    fn admit(self: &Arc<Self>) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        if let Ok(mut queue) = self.queue.lock() {
            while queue.len() >= self.max {
                if let Some((_, oldest)) = queue.pop_front() {
                    // Stores a permit if the task is not waiting yet.
                    oldest.notify_one();
                }
            }
            queue.push_back((id, evict.clone()));
        }
        Ticket {
            id,
            evict,
            pending: self.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }
}

impl Ticket {
    async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut queue) = self.pending.queue.lock() {
            queue.retain(|(id, _)| *id != self.id);
        }
    }
}

/// Allows one log line per interval and counts the ones it suppressed.
struct RateLimitedLog {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(number suppressed since the last line)` if a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let unlogged = state.1;
                *state = (Some(now), 0);
                Some(unlogged)
            }
        }
    }
}

/// After a failed accept (typically EMFILE: out of descriptors, which a retry cannot fix at
/// once), wait before the next, doubling up to a second.
struct AcceptBackoff {
    delay: Duration,
    log: RateLimitedLog,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: FIRST_BACKOFF,
            log: RateLimitedLog::new(Duration::from_secs(1)),
        }
    }
}

impl AcceptBackoff {
    fn reset(&mut self) {
        self.delay = FIRST_BACKOFF;
    }

    async fn failed(&mut self, e: &std::io::Error) {
        if let Some(unlogged) = self.log.allow() {
            tracing::warn!(error = %e, unlogged, retry_in = ?self.delay, "accept failed");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }
}

/// Errors of the server itself (not of single requests).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the listen address. The unspecified IPv6 address (`[::]`, the default) takes IPv4
/// connections too: the socket is made dual-stack explicitly rather than by the host's
/// `net.ipv6.bindv6only`. On a kernel without IPv6 it falls back to `0.0.0.0` on the same
/// port, with a warning.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind_error = |addr| move |source| ServerError::Bind { addr, source };
    if addr.ip() != std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        return TcpListener::bind(addr).await.map_err(bind_error(addr));
    }
    match dual_stack(addr) {
        Ok(listener) => Ok(listener),
        Err(error) if error.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::warn!(%addr, fallback = %v4, "no IPv6 on this host: listening on IPv4 only");
            TcpListener::bind(v4).await.map_err(bind_error(v4))
        }
        Err(source) => Err(ServerError::Bind { addr, source }),
    }
}

/// A listening socket on `[::]:PORT` with `IPV6_V6ONLY` off.
fn dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)
        .map_err(std::io::Error::from)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_default_listen_address_takes_ipv4_and_ipv6() {
        let listener = bind("[::]:0".parse().expect("literal"))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("local address").port();
        for client in ["127.0.0.1", "::1"] {
            let target = SocketAddr::new(client.parse().expect("literal"), port);
            let (connected, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(target), listener.accept());
            connected.expect("connect");
            let (_, peer) = accepted.expect("accept");
            // An IPv4 client shows as an IPv4-mapped address on the dual-stack socket.
            assert_eq!(peer.ip().to_canonical().to_string(), client);
        }
    }

    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once() {
        let listener = bind("127.0.0.1:0".parse().expect("literal"))
            .await
            .expect("bind");
        let target = listener.local_addr().expect("local address");
        let (connected, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(target), listener.accept());
        connected.expect("connect");
        let (tcp, _) = accepted.expect("accept");
        assert!(
            !tcp.nodelay().expect("read TCP_NODELAY"),
            "the kernel's default"
        );
        send_at_once(&tcp);
        assert!(tcp.nodelay().expect("read TCP_NODELAY"));
    }

    #[tokio::test]
    async fn a_full_pending_queue_closes_its_oldest() {
        let pending = Pending::new(2);
        let first = pending.admit();
        let second = pending.admit();
        let third = pending.admit();
        assert_eq!(pending.len(), 2);
        // The first was told to close; the others were not.
        tokio::time::timeout(Duration::from_secs(5), first.evicted())
            .await
            .expect("oldest evicted");
        let not_yet = tokio::time::timeout(Duration::from_millis(20), second.evicted()).await;
        assert!(not_yet.is_err());
        drop(third);
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn logs_once_per_interval_and_counts_the_rest() {
        let log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        let log = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), Some(0));
    }

    #[tokio::test]
    async fn accept_failures_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff {
            delay: Duration::from_millis(1),
            log: RateLimitedLog::new(Duration::from_secs(1)),
        };
        let e = std::io::Error::from_raw_os_error(24);
        let mut delays = vec![];
        for _ in 0..4 {
            backoff.failed(&e).await;
            delays.push(backoff.delay.as_millis());
        }
        assert_eq!(delays, [2, 4, 8, 16]);
        backoff.delay = Duration::from_millis(800);
        backoff.failed(&e).await;
        assert_eq!(backoff.delay, MAX_BACKOFF);
        backoff.reset();
        assert_eq!(backoff.delay, FIRST_BACKOFF);
    }
}
