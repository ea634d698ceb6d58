//! Measuring how long an application is unreachable: a thread polls a Redis port with
//! `PING` every 10 ms while an action (a deploy that moves it) runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

/// What one measured action took.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// The longest stretch from a failed poll to the next successful one: until the
    /// application really answered through its routed port.
    pub downtime: Duration,
    /// From the start of that stretch to the end of the action (the deploy returned, i.e.
    /// the routes were switched); zero when the stretch began after it. Reported beside
    /// `downtime` since readiness gating: before it, routes could switch to an application
    /// that did not answer yet, and this figure could be the smaller one.
    pub until_action_done: Duration,
    /// How long the action itself ran.
    pub wall: Duration,
}

/// Runs `action` while polling `addr`; keeps polling afterwards until the application
/// answers again (at most 30 s), so a slow recovery counts in full.
pub fn measure(addr: SocketAddr, action: impl FnOnce() -> Result<()>) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut longest_since: Option<Instant> = None;
            let mut down_since: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if redis_ping(addr) {
                    if let Some(since) = down_since.take()
                        && since.elapsed() > longest
                    {
                        longest = since.elapsed();
                        longest_since = Some(since);
                    }
                } else if down_since.is_none() {
                    down_since = Some(started);
                }
                thread::sleep(Duration::from_millis(10));
            }
            if let Some(since) = down_since
                && since.elapsed() > longest
            {
                longest = since.elapsed();
                longest_since = Some(since);
            }
            (longest, longest_since)
        })
    };
    let started = Instant::now();
    let result = action();
    let wall = started.elapsed();
    let settle = Instant::now();
    while !redis_ping(addr) && settle.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let (downtime, since) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller thread panicked"))?;
    result?;
    let done = started + wall;
    let until_action_done = since.map_or(Duration::ZERO, |s| done.saturating_duration_since(s));
    Ok(Measured {
        downtime,
        until_action_done,
        wall,
    })
}

/// One `PING` with 200 ms timeouts; true on `+PONG`.
pub fn redis_ping(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}
