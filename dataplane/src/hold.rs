//! Holding new connections to a moving application until it is ready here: "hold, don't
//! refuse" (issue 16).
//!
//! Before the old container of a move stops, every node routes the application's ports to
//! the node it moves to (`Action::SwitchRoutes`). On that node the route leads into a
//! container that does not run yet, so the routing backends leave it out of the kernel (as
//! they do for any local route without a container) and a connection to the port reaches
//! the node's own stack, where a [`HoldSet`] listener of the agent accepts it on the
//! external port itself. No routing backend changes for this: with nftables and with the
//! eBPF TC program alike, a port without a route is delivered locally, and a port with one
//! is translated before local delivery, so the listener sees only the connections that
//! arrive while the route is absent.
//!
//! When the start of the application here becomes ready, the agent programs the route into
//! the container (new connections go there directly, never through the agent again) and
//! then tells the hold: each held connection is connected to the container's address and
//! spliced both ways (`tokio::io::copy_bidirectional`) for its whole life; the listener
//! keeps accepting for [`DRAIN_GRACE`] (connections whose handshake raced the route) and
//! closes.
//!
//! Bounds: a held connection waits at most the hold timeout (`--hold-timeout`), then is
//! reset, as a refused connection would have been. The listener itself closes (the port
//! refuses again, as before this module) when the start fails, when the routes change so
//! that the port no longer leads here, or when the hold timeout passes without any start of
//! the application beginning here (a move that failed before its start). At most
//! [`MAX_HELD`] connections per application wait at once; more are reset at once.
//!
//! Held connections live in the agent: an agent that dies resets them (the kernel closes
//! its sockets), and a restarted agent holds nothing (the port refuses until the next
//! deploy). TCP over IPv4 and IPv6 (a second listener on `[::]`, IPv6 only, where the node
//! has IPv6; an IPv6 client is spliced to the container's IPv4 address). UDP has no
//! connection to hold.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// How long a hold waits by default (`--hold-timeout`).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a listener keeps accepting after the application became ready: a client whose
/// handshake the listener completed just before the route took over is still delivered.
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// At most this many connections per application wait at once.
pub const MAX_HELD: usize = 4096;

/// Pending handshakes the kernel keeps per hold listener.
const BACKLOG: u32 = 1024;

/// Errors of the hold.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("cannot listen on port {port} to hold connections for {application:?}: {source}")]
    Listen {
        application: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Where one application's hold is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// Routed here, not started yet.
    Holding,
    /// A start of the application here is under way: the hold lasts until it ends.
    Starting,
    /// Ready at this container address: held connections go there.
    Ready(Ipv4Addr),
    /// Given up (failed start, routes changed, timeout): held connections are reset.
    Released,
}

impl HoldState {
    fn is_final(self) -> bool {
        matches!(self, HoldState::Ready(_) | HoldState::Released)
    }
}

/// One held port: the external port listened on, the container port it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldPort {
    pub external: u16,
    pub internal: u16,
}

struct Hold {
    ports: Vec<HeldPort>,
    state: watch::Sender<HoldState>,
}

/// The applications whose ports this node holds, by name.
pub struct HoldSet {
    timeout: Duration,
    holds: std::sync::Mutex<HashMap<String, Hold>>,
}

impl HoldSet {
    pub fn new(timeout: Duration) -> Self {
        HoldSet {
            timeout,
            holds: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts holding `ports` of `application`: binds every port before returning, so a
    /// route taken away from the port afterwards never meets an empty port. Holding the
    /// same ports again changes nothing; other ports replace the earlier hold.
    pub fn hold(&self, application: &str, ports: &[HeldPort]) -> Result<(), HoldError> {
        let mut ports = ports.to_vec();
        ports.sort();
        let same = self.holds.lock().ok().and_then(|holds| {
            holds
                .get(application)
                .map(|h| h.ports == ports && !h.state.borrow().is_final())
        });
        match same {
            Some(true) => return Ok(()),
            // Its listeners go first: the new ones may bind the same ports.
            Some(false) => self.release(application),
            None => {}
        }
        let mut listeners = Vec::new();
        for port in &ports {
            let failed = |source| HoldError::Listen {
                application: application.to_string(),
                port: port.external,
                source,
            };
            listeners.push((listen(port.external).map_err(failed)?, *port));
            if let Some(v6) = listen_v6(port.external).map_err(failed)? {
                listeners.push((v6, *port));
            }
        }
        let (state, _) = watch::channel(HoldState::Holding);
        let held = Arc::new(AtomicUsize::new(0));
        for (listener, port) in listeners {
            tokio::spawn(accept_loop(
                listener,
                port,
                application.to_string(),
                state.subscribe(),
                self.timeout,
                held.clone(),
            ));
        }
        tokio::spawn(expire(state.subscribe(), state.clone(), self.timeout));
        tracing::info!(application, ports = ?ports, timeout_ms = self.timeout.as_millis() as u64, "holding new connections until the application is ready here");
        if let Ok(mut holds) = self.holds.lock() {
            holds.insert(application.to_string(), Hold { ports, state });
        }
        Ok(())
    }

    /// Whether `application`'s connections are held here and no start of it began.
    pub fn holding(&self, application: &str) -> bool {
        self.holds.lock().is_ok_and(|holds| {
            holds
                .get(application)
                .is_some_and(|h| *h.state.borrow() == HoldState::Holding)
        })
    }

    /// A start of `application` begins here: its hold lasts until [`HoldSet::ready`] or
    /// [`HoldSet::release`].
    pub fn starting(&self, application: &str) {
        if let Ok(holds) = self.holds.lock()
            && let Some(hold) = holds.get(application)
        {
            hold.state.send_if_modified(|s| {
                let holding = *s == HoldState::Holding;
                if holding {
                    *s = HoldState::Starting;
                }
                holding
            });
        }
    }

    /// `application` is ready at `container` and routed there: held connections go to it.
    pub fn ready(&self, application: &str, container: Ipv4Addr) {
        self.finish(application, HoldState::Ready(container));
    }

    /// Gives up holding `application`: held connections are reset, the port closes.
    pub fn release(&self, application: &str) {
        self.finish(application, HoldState::Released);
    }

    /// Releases every hold whose application `keep` says no longer leads here.
    pub fn release_unless(&self, keep: impl Fn(&str) -> bool) {
        let names: Vec<String> = self
            .holds
            .lock()
            .map(|h| h.keys().filter(|a| !keep(a)).cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.release(&name);
        }
    }

    /// The applications held now and their state.
    pub fn held(&self) -> Vec<(String, HoldState)> {
        self.holds
            .lock()
            .map(|h| {
                h.iter()
                    .map(|(a, hold)| (a.clone(), *hold.state.borrow()))
                    .filter(|(_, s)| !s.is_final())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn finish(&self, application: &str, end: HoldState) {
        let hold = self
            .holds
            .lock()
            .ok()
            .and_then(|mut h| h.remove(application));
        if let Some(hold) = hold {
            tracing::info!(application, state = ?end, "hold ends");
            hold.state.send_replace(end);
        }
    }
}

impl Default for HoldSet {
    fn default() -> Self {
        HoldSet::new(DEFAULT_HOLD_TIMEOUT)
    }
}

/// A listening socket on every IPv4 address of the node at `port` (address reuse: earlier
/// connections in TIME_WAIT must not keep the hold from starting).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    socket.listen(BACKLOG)
}

/// The same on every IPv6 address (IPv6 only: the IPv4 listener has the rest); `None` where
/// the node has no IPv6.
fn listen_v6(port: u16) -> std::io::Result<Option<TcpListener>> {
    let socket = match TcpSocket::new_v6() {
        Ok(s) => s,
        Err(e) if no_ipv6(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    socket.set_reuseaddr(true)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)
        .map_err(std::io::Error::from)?;
    match socket.bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(()) => socket.listen(BACKLOG).map(Some),
        Err(e) if no_ipv6(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// IPv6 is compiled out or disabled on this node.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EAFNOSUPPORT || code == nix::libc::EADDRNOTAVAIL
    )
}

/// Releases a hold that no start claimed within `timeout`.
async fn expire(
    mut state: watch::Receiver<HoldState>,
    sender: watch::Sender<HoldState>,
    timeout: Duration,
) {
    let claimed = tokio::time::timeout(timeout, state.wait_for(|s| *s != HoldState::Holding));
    if claimed.await.is_err() {
        let expired = sender.send_if_modified(|s| {
            let holding = *s == HoldState::Holding;
            if holding {
                *s = HoldState::Released;
            }
            holding
        });
        if expired {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "no start of the held application began in time: its port refuses again"
            );
        }
    }
}

/// Waits until the listener should close: the hold was released, or it became ready and
/// the drain grace passed (or the hold set went away).
async fn closing(mut state: watch::Receiver<HoldState>) {
    let end = state.wait_for(|s| s.is_final()).await.map(|s| *s);
    if let Ok(HoldState::Ready(_)) = end {
        tokio::time::sleep(DRAIN_GRACE).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: HeldPort,
    application: String,
    state: watch::Receiver<HoldState>,
    timeout: Duration,
    held: Arc<AtomicUsize>,
) {
    let closed = closing(state.clone());
    tokio::pin!(closed);
    loop {
        tokio::select! {
            () = &mut closed => break,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    if held.fetch_add(1, Ordering::SeqCst) >= MAX_HELD {
                        held.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(application, %peer, "too many held connections: reset");
                        reset(client);
                        continue;
                    }
                    let (state, held) = (state.clone(), held.clone());
                    tokio::spawn(async move {
                        deliver(client, port.internal, state, timeout).await;
                        held.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!(application, port = port.external, error = %e, "accept of a held connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::debug!(application, port = port.external, "hold listener closed");
}

/// Waits (at most `timeout`) for the application, then splices `client` to it; resets the
/// client when the wait ends any other way.
async fn deliver(
    mut client: TcpStream,
    internal_port: u16,
    mut state: watch::Receiver<HoldState>,
    timeout: Duration,
) {
    let started = tokio::time::Instant::now();
    let end = tokio::time::timeout(timeout, state.wait_for(|s| s.is_final()))
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| *s));
    let Some(HoldState::Ready(container)) = end else {
        return reset(client);
    };
    let left = timeout.saturating_sub(started.elapsed());
    let backend = SocketAddr::from((container, internal_port));
    let mut upstream = match tokio::time::timeout(left, TcpStream::connect(backend)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%backend, error = %e, "cannot reach the application for a held connection");
            return reset(client);
        }
        Err(_) => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%backend, error = %e, "held connection ended");
    }
}

/// Closes `client` with a reset, as a refused or dropped connection would end.
fn reset(client: TcpStream) {
    if let Err(e) = client.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set linger for a reset");
    }
    drop(client);
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A free port on 127.0.0.1 for the hold (the listener binds every address).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// An echo server on loopback standing for the started container; returns its port.
    pub(crate) async fn echo_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("hold test");
        let port = listener.local_addr().expect("hold test").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    async fn request(port: u16, body: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(body).await?;
        let mut reply = vec![0u8; body.len()];
        s.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn held_connections_reach_the_application_once_ready() {
        let (external, internal) = (free_port(), echo_server().await);
        let holds = HoldSet::new(Duration::from_secs(5));
        holds
            .hold("db", &[HeldPort { external, internal }])
            .expect("hold test");
        holds.starting("db");
        let client = tokio::spawn(async move { request(external, b"PING").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !client.is_finished(),
            "the connection waits while not ready"
        );
        holds.ready("db", Ipv4Addr::LOCALHOST);
        let reply = client.await.expect("hold test").expect("hold test");
        assert_eq!(reply, b"PING");
        assert!(holds.held().is_empty());
        // After the drain grace the port is no longer held (the route takes it over).
        tokio::time::sleep(DRAIN_GRACE + Duration::from_millis(200)).await;
        assert!(request(external, b"x").await.is_err());
    }

    /// An IPv6 client is held too, and spliced to the container's IPv4 address.
    #[tokio::test]
    async fn held_ipv6_connections_reach_the_application_once_ready() {
        let (external, internal) = (free_port(), echo_server().await);
        let holds = HoldSet::new(Duration::from_secs(5));
        holds
            .hold("db", &[HeldPort { external, internal }])
            .expect("hold test");
        holds.starting("db");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect((Ipv6Addr::LOCALHOST, external)).await?;
            s.write_all(b"PING6").await?;
            let mut reply = vec![0u8; 5];
            s.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!client.is_finished(), "the IPv6 connection waits");
        holds.ready("db", Ipv4Addr::LOCALHOST);
        let reply = client.await.expect("hold test").expect("hold test");
        assert_eq!(reply, b"PING6");
        tokio::time::sleep(DRAIN_GRACE + Duration::from_millis(200)).await;
        assert!(
            TcpStream::connect((Ipv6Addr::LOCALHOST, external))
                .await
                .is_err(),
            "the IPv6 port is no longer held"
        );
    }

    #[tokio::test]
    async fn a_held_connection_is_reset_after_the_timeout() {
        let external = free_port();
        let holds = HoldSet::new(Duration::from_millis(300));
        holds
            .hold(
                "db",
                &[HeldPort {
                    external,
                    internal: 1,
                }],
            )
            .expect("hold test");
        holds.starting("db");
        let started = std::time::Instant::now();
        let result = request(external, b"PING").await;
        assert!(result.is_err(), "never ready: the connection must fail");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "waited {waited:?}"
        );
        // A start under way keeps the listener: the next connection is held again.
        assert_eq!(holds.held(), vec![("db".to_string(), HoldState::Starting)]);
    }

    #[tokio::test]
    async fn release_resets_held_connections_at_once_and_closes_the_port() {
        let external = free_port();
        let holds = HoldSet::new(Duration::from_secs(10));
        holds
            .hold(
                "db",
                &[HeldPort {
                    external,
                    internal: 1,
                }],
            )
            .expect("hold test");
        let client = tokio::spawn(async move { request(external, b"PING").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        holds.release_unless(|app| app != "db");
        let result = client.await.expect("hold test");
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            request(external, b"x").await.is_err(),
            "the port refuses again"
        );
    }

    #[tokio::test]
    async fn a_hold_no_start_claims_expires() {
        let external = free_port();
        let holds = HoldSet::new(Duration::from_millis(200));
        holds
            .hold(
                "db",
                &[HeldPort {
                    external,
                    internal: 1,
                }],
            )
            .expect("hold test");
        assert_eq!(holds.held(), vec![("db".to_string(), HoldState::Holding)]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(holds.held().is_empty());
        let refused = TcpStream::connect(("127.0.0.1", external)).await;
        assert!(refused.is_err(), "an expired hold no longer listens");
    }

    #[tokio::test]
    async fn holding_the_same_ports_again_keeps_the_hold() {
        let external = free_port();
        let holds = HoldSet::new(Duration::from_secs(5));
        let ports = [HeldPort {
            external,
            internal: 1,
        }];
        holds.hold("db", &ports).expect("hold test");
        holds.starting("db");
        holds.hold("db", &ports).expect("hold test");
        assert_eq!(holds.held(), vec![("db".to_string(), HoldState::Starting)]);
        holds.release("db");
    }

    #[tokio::test]
    async fn a_taken_port_fails_the_hold() {
        let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("hold test");
        let port = taken.local_addr().expect("hold test").port();
        let holds = HoldSet::new(Duration::from_secs(5));
        let err = holds
            .hold(
                "db",
                &[HeldPort {
                    external: port,
                    internal: 1,
                }],
            )
            .expect_err("a taken port");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        assert!(holds.held().is_empty());
    }
}
