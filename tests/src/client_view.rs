//! What a client sees of a move: a new connection every `interval` through one node's routed
//! Redis port, each sending `SET` of a key of its own and reading the reply. Attempts run
//! side by side (a held connection does not delay the next attempt), each bounded by a
//! timeout; the report says which failed, how long each took from connect to reply, and
//! which keys Redis acknowledged, so a test can read every one of them back.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// At most this many attempts in flight at once; an attempt that would exceed it counts as
/// failed (the client, not the cluster, was overwhelmed, and the report says so).
pub const MAX_IN_FLIGHT: usize = 1000;

/// One connection attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub key: String,
    /// When it began, from the start of the client.
    pub at: Duration,
    /// From the connect to the reply (or to the failure).
    pub latency: Duration,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Every attempt of one client run, in the order they began.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    pub attempts: Vec<Attempt>,
}

impl ClientReport {
    pub fn failed(&self) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.error.is_some()).collect()
    }

    /// The keys Redis acknowledged (`+OK`).
    pub fn acknowledged(&self) -> Vec<&str> {
        self.attempts
            .iter()
            .filter(|a| a.error.is_none())
            .map(|a| a.key.as_str())
            .collect()
    }

    /// The longest connect-to-reply time of a successful attempt.
    pub fn worst_latency(&self) -> Duration {
        self.attempts
            .iter()
            .filter(|a| a.error.is_none())
            .map(|a| a.latency)
            .max()
            .unwrap_or_default()
    }

    /// The longest any attempt took, failed or not.
    pub fn longest_attempt(&self) -> Duration {
        self.attempts
            .iter()
            .map(|a| a.latency)
            .max()
            .unwrap_or_default()
    }
}

/// A running client; [`ClientView::finish`] stops it and waits for its attempts.
pub struct ClientView {
    stop: Arc<AtomicBool>,
    scheduler: Option<thread::JoinHandle<Vec<Attempt>>>,
}

impl ClientView {
    /// Starts a new attempt at `addr` every `interval`, keys `PREFIX:N`, each bounded by
    /// `timeout` (connect, write and read).
    pub fn start(addr: SocketAddr, interval: Duration, prefix: &str, timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let prefix = prefix.to_string();
        let scheduler = thread::spawn(move || {
            let (tx, rx) = mpsc::channel();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let begun = Instant::now();
            let mut n = 0u64;
            let mut next = begun;
            while !flag.load(Ordering::Relaxed) {
                let key = format!("{prefix}:{n}");
                n += 1;
                let at = begun.elapsed();
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(Attempt {
                        key,
                        at,
                        latency: Duration::ZERO,
                        error: Some("client: too many attempts in flight".into()),
                    });
                } else {
                    let (tx, in_flight) = (tx.clone(), in_flight.clone());
                    thread::spawn(move || {
                        let started = Instant::now();
                        let error = set_key(addr, &key, timeout).err();
                        let _ = tx.send(Attempt {
                            key,
                            at,
                            latency: started.elapsed(),
                            error,
                        });
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                next += interval;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            drop(tx);
            // Every attempt ends within its timeout (three bounded steps).
            let mut attempts: Vec<Attempt> = rx.iter().collect();
            attempts.sort_by_key(|a| a.at);
            attempts
        });
        ClientView {
            stop,
            scheduler: Some(scheduler),
        }
    }

    /// Stops starting attempts and waits for those in flight.
    pub fn finish(mut self) -> ClientReport {
        self.stop.store(true, Ordering::Relaxed);
        let attempts = self
            .scheduler
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        ClientReport { attempts }
    }
}

impl Drop for ClientView {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `SET key key` on a new connection; `+OK` or an error naming what failed.
fn set_key(addr: SocketAddr, key: &str, timeout: Duration) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    let request = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{key}\r\n",
        key.len(),
        key.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reply: {e}"))?;
    match reply.trim_end() {
        "+OK" => Ok(()),
        "" => Err("reply: connection closed".into()),
        other => Err(format!("reply: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A fake Redis that answers `+OK` to each connection's first line, after `delay`.
    fn fake_redis(delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("client test");
        let addr = listener.local_addr().expect("client test");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    thread::sleep(delay);
                    let _ = (&stream).write_all(b"+OK\r\n");
                });
            }
        });
        addr
    }

    #[test]
    fn attempts_overlap_and_are_acknowledged() {
        let addr = fake_redis(Duration::from_millis(100));
        let client =
            ClientView::start(addr, Duration::from_millis(10), "k", Duration::from_secs(2));
        thread::sleep(Duration::from_millis(300));
        let report = client.finish();
        assert!(report.attempts.len() >= 20, "{}", report.attempts.len());
        assert!(report.failed().is_empty(), "{:?}", report.failed());
        assert_eq!(report.acknowledged().len(), report.attempts.len());
        assert!(report.worst_latency() >= Duration::from_millis(100));
    }

    #[test]
    fn a_refused_port_fails_every_attempt() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("client test");
            l.local_addr().expect("client test")
        };
        let client =
            ClientView::start(addr, Duration::from_millis(10), "k", Duration::from_secs(1));
        thread::sleep(Duration::from_millis(100));
        let report = client.finish();
        assert!(!report.attempts.is_empty());
        assert_eq!(report.failed().len(), report.attempts.len());
        assert!(report.acknowledged().is_empty());
    }
}
