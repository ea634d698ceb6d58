//! Interfaces and addresses, watched through rtnetlink rather than rescanned: a thread of its
//! own subscribes to the kernel's link and address notifications of the network namespace it
//! was started in, and calls back once a burst of changes has settled. A re-created `docker0`
//! or a new node address is then covered at once, not at the next route change.
//!
//! The callback is told only *that* something changed; it reads the current interfaces and
//! addresses itself, so a lost notification (the socket's buffer overflowing) costs nothing
//! but the callback being run once more.

use std::{sync::mpsc, thread::JoinHandle, time::Duration};

use futures_util::StreamExt;
use rtnetlink::{MulticastGroup, packet_core::NetlinkPayload, packet_route::RouteNetlinkMessage};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How long a burst of notifications may keep coming before the callback runs: deleting and
/// re-creating a bridge, giving it its address and bringing it up are a handful of
/// notifications within a few milliseconds, and one pass covers them all.
pub const SETTLE: Duration = Duration::from_millis(20);

/// How long starting the watcher may take before it is given up.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the interface watcher thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot build the interface watcher's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot subscribe to rtnetlink link and address notifications")]
    Subscribe(#[source] std::io::Error),
    #[error("the interface watcher did not start within {0:?}")]
    Timeout(Duration),
}

/// A running watch. Dropping it stops the thread and waits for it (so never drop it while
/// holding something its callback takes).
pub struct InterfaceWatcher {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InterfaceWatcher {
    /// Subscribes in the calling thread's network namespace (the watcher thread inherits it)
    /// and returns once subscribed: a change made after this returns is seen.
    pub fn spawn(on_change: impl FnMut() + Send + 'static) -> Result<InterfaceWatcher, WatchError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("flocker-ifwatch".to_owned())
            .spawn(move || run(on_change, stop_rx, ready_tx))
            .map_err(WatchError::Thread)?;
        let mut watcher = InterfaceWatcher {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(watcher),
            Ok(Err(error)) => Err(error),
            Err(_) => {
                // The thread ends on its own once the stop sender is gone.
                watcher.thread = None;
                Err(WatchError::Timeout(START_TIMEOUT))
            }
        }
    }
}

impl Drop for InterfaceWatcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the interface watcher thread panicked");
        }
    }
}

/// Whether a notification is about a link or an address appearing, changing or going.
fn is_interface_change(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    matches!(
        payload,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_)
        )
    )
}

fn run(
    mut on_change: impl FnMut(),
    mut stop: oneshot::Receiver<()>,
    ready: mpsc::Sender<Result<(), WatchError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(WatchError::Runtime(error)));
            return;
        }
    };
    runtime.block_on(async move {
        let groups = [
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ];
        let (connection, _handle, mut messages) = match rtnetlink::new_multicast_connection(&groups)
        {
            Ok(parts) => parts,
            Err(error) => {
                let _ = ready.send(Err(WatchError::Subscribe(error)));
                return;
            }
        };
        let connection = tokio::spawn(connection);
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                message = messages.next() => {
                    let Some((message, _)) = message else {
                        warn!("rtnetlink notifications ended: interface changes are covered at the next route change only");
                        break;
                    };
                    if !is_interface_change(&message.payload) {
                        continue;
                    }
                    // Let the burst settle, taking what else arrives meanwhile.
                    let settled = tokio::time::sleep(SETTLE);
                    tokio::pin!(settled);
                    loop {
                        tokio::select! {
                            _ = &mut settled => break,
                            more = messages.next() => if more.is_none() { break },
                        }
                    }
                    debug!("interfaces or addresses changed");
                    on_change();
                }
            }
        }
        connection.abort();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::{
        address::AddressMessage, link::LinkMessage, route::RouteMessage,
    };

    #[test]
    fn links_and_addresses_count_routes_and_errors_do_not() {
        let inner = |m| NetlinkPayload::InnerMessage(m);
        assert!(is_interface_change(&inner(RouteNetlinkMessage::NewLink(
            LinkMessage::default()
        ))));
        assert!(is_interface_change(&inner(RouteNetlinkMessage::DelLink(
            LinkMessage::default()
        ))));
        assert!(is_interface_change(&inner(
            RouteNetlinkMessage::NewAddress(AddressMessage::default())
        )));
        assert!(is_interface_change(&inner(
            RouteNetlinkMessage::DelAddress(AddressMessage::default())
        )));
        assert!(!is_interface_change(&inner(RouteNetlinkMessage::NewRoute(
            RouteMessage::default()
        ))));
        assert!(!is_interface_change(&NetlinkPayload::Noop));
    }
}
