//! The workload: a writer that keeps setting keys in Redis through a bystander node while a
//! move runs, and the ledger of every write Redis acknowledged. Redis runs with
//! `appendfsync always`, so an acknowledged write is on disk in the volume.
//!
//! Each value is derived from its key (a checksum of it, repeated), so reading a key back
//! checks its content, not only that something is there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::redis::Redis;

/// Pause between two writes: about 20 writes a second, a bounded load.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Keys read per MGET when checking the ledger.
const BATCH: usize = 200;

/// FNV-1a, 64 bits: a stable checksum of the key (std's hasher may change between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The value written under `key`: its checksum and the key, so a value read back under
/// another key, truncated or changed does not match.
pub fn value_for(key: &str) -> String {
    let sum = fnv1a(key.as_bytes());
    format!("{sum:016x}:{key}:{:016x}", sum.rotate_left(17))
}

/// Every write Redis acknowledged, across all cells.
#[derive(Debug, Default)]
pub struct Ledger {
    keys: Vec<String>,
}

impl Ledger {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn extend(&mut self, keys: Vec<String>) {
        self.keys.extend(keys);
    }

    /// Reads every acknowledged key back through `addr`; the keys missing or wrong, by name
    /// (at most a few named, with the counts).
    pub fn check(&self, addr: &str) -> Result<Vec<String>> {
        let mut redis = connect(addr)?;
        let mut missing = 0usize;
        let mut wrong = 0usize;
        let mut examples = Vec::new();
        for batch in self.keys.chunks(BATCH) {
            let keys: Vec<&str> = batch.iter().map(String::as_str).collect();
            let values = redis.mget(&keys)?;
            for (key, value) in batch.iter().zip(values) {
                match value {
                    None => missing += 1,
                    Some(v) if v != value_for(key) => wrong += 1,
                    Some(_) => continue,
                }
                if examples.len() < 3 {
                    examples.push(key.clone());
                }
            }
        }
        if missing + wrong == 0 {
            return Ok(vec![]);
        }
        Ok(vec![format!(
            "through {addr}: {missing} acknowledged keys missing, {wrong} with a wrong value (of {}; e.g. {})",
            self.keys.len(),
            examples.join(", ")
        )])
    }
}

/// Connects and answers PING, retried for about 10 s while routes settle.
pub fn connect(addr: &str) -> Result<Redis> {
    let mut last = None;
    for _ in 0..50 {
        match Redis::connect(addr, Duration::from_secs(2)).and_then(|mut r| {
            r.command(&["PING"])?;
            Ok(r)
        }) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match last {
        Some(e) => Err(e.context(format!("redis through {addr}"))),
        None => bail!("redis through {addr}: no attempt"),
    }
}

/// A writer running in the background until [`Writer::stop`].
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<String>>,
}

impl Writer {
    /// Starts writing keys `PREFIX:0`, `PREFIX:1`, ... through `addr`, reconnecting after
    /// every failure; only keys Redis answered `OK` to are recorded.
    pub fn start(addr: String, prefix: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut redis: Option<Redis> = None;
            let mut next = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(WRITE_EVERY);
                let conn = match redis.as_mut() {
                    Some(r) => r,
                    None => match Redis::connect(&addr, Duration::from_secs(1)) {
                        Ok(r) => redis.insert(r),
                        Err(_) => continue,
                    },
                };
                let key = format!("{prefix}:{next}");
                next += 1;
                match conn.command(&["SET", &key, &value_for(&key)]) {
                    Ok(Some(reply)) if reply == "OK" => acked.push(key),
                    _ => redis = None,
                }
            }
            acked
        });
        Writer { stop, handle }
    }

    /// Stops and returns the acknowledged keys.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_depend_on_the_whole_key() {
        assert_eq!(value_for("c:1"), value_for("c:1"));
        assert_ne!(value_for("c:1"), value_for("c:2"));
        assert_ne!(value_for("c:12")[..16], value_for("c:21")[..16]);
        assert!(value_for("c:1").contains(":c:1:"));
    }
}
