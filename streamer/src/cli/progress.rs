//! Progress on stderr: a one-line bar (rate, ratio, ETA when the size is known) or JSON lines,
//! throttled, and the final summary.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flocker_stream::{Progress, Summary};

pub struct Reporter {
    json: bool,
    total: Option<u64>,
    last: Mutex<Option<Instant>>,
}

const BAR_EVERY: Duration = Duration::from_millis(250);
const JSON_EVERY: Duration = Duration::from_secs(1);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Reporter {
    pub fn new(json: bool, total: Option<u64>) -> Self {
        Self {
            json,
            total,
            last: Mutex::new(None),
        }
    }

    pub fn update(&self, p: &Progress) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let every = if self.json { JSON_EVERY } else { BAR_EVERY };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < every) {
            return;
        }
        *last = Some(now);
        let secs = p.elapsed.as_secs_f64().max(1e-6);
        let rate = p.bytes_in as f64 / secs;
        let eta = self
            .total
            .filter(|_| rate > 0.0)
            .map(|t| t.saturating_sub(p.bytes_in) as f64 / rate);
        let mut err = std::io::stderr().lock();
        if self.json {
            let v = serde_json::json!({
                "event": "progress",
                "bytes_in": p.bytes_in,
                "bytes_on_wire": p.bytes_on_wire,
                "elapsed_s": secs,
                "rate_bytes_per_s": rate as u64,
                "total_bytes": self.total,
                "eta_s": eta,
                "mode": p.mode.map(|m| m.name()),
            });
            let _ = writeln!(err, "{v}");
        } else {
            let ratio = if p.bytes_on_wire > 0 {
                p.bytes_in as f64 / p.bytes_on_wire as f64
            } else {
                1.0
            };
            let pct = self
                .total
                .map(|t| format!(" {:5.1}%", 100.0 * p.bytes_in as f64 / t.max(1) as f64))
                .unwrap_or_default();
            let eta = eta
                .map(|e| format!("  ETA {}:{:02}", e as u64 / 60, e as u64 % 60))
                .unwrap_or_default();
            let _ = write!(
                err,
                "\r\x1b[K{:10.1} MiB{pct}  {:8.1} MiB/s  ratio {ratio:4.2}{eta}",
                mib(p.bytes_in),
                rate / (1024.0 * 1024.0)
            );
            let _ = err.flush();
        }
    }

    pub fn clear(&self) {
        if !self.json && self.last.lock().is_ok_and(|l| l.is_some()) {
            eprint!("\r\x1b[K");
        }
    }

    pub fn listening(&self, addr: &str) {
        if self.json {
            eprintln!(
                "{}",
                serde_json::json!({"event": "listening", "addr": addr})
            );
        } else {
            eprintln!("listening on {addr}");
        }
    }

    pub fn summary(&self, verb: &str, s: &Summary) {
        if self.json {
            let v = serde_json::json!({
                "event": "summary",
                "direction": verb,
                "bytes_in": s.bytes_in,
                "bytes_on_wire": s.bytes_on_wire,
                "ratio": s.ratio(),
                "elapsed_s": s.elapsed.as_secs_f64(),
                "throughput_bytes_per_s": s.throughput() as u64,
                "chunks": s.chunks,
                "compressed_chunks": s.compressed_chunks,
                "modes": s.modes.iter().map(|m| serde_json::json!({
                    "mode": m.mode.name(),
                    "chunks": m.chunks,
                    "bytes_in": m.bytes_in,
                    "payload_bytes": m.payload_bytes,
                })).collect::<Vec<_>>(),
                "blake3": s.stream_hash_hex(),
            });
            eprintln!("{v}");
        } else {
            eprintln!(
                "{verb} {:.1} MiB ({} bytes), {:.1} MiB on the wire (ratio {:.2}) in {:.2} s: {:.1} MiB/s; stream BLAKE3 {}",
                mib(s.bytes_in),
                s.bytes_in,
                mib(s.bytes_on_wire),
                s.ratio(),
                s.elapsed.as_secs_f64(),
                s.throughput() / (1024.0 * 1024.0),
                s.stream_hash_hex()
            );
            if !s.modes.is_empty() {
                let parts: Vec<String> = s
                    .modes
                    .iter()
                    .map(|m| format!("{} {:.1} MiB", m.mode.name(), mib(m.bytes_in)))
                    .collect();
                eprintln!("  by mode: {}", parts.join(", "));
            }
        }
    }
}
