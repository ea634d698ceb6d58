//! How a deploy shows what the agents report: plain lines, a bar per node on a terminal, or
//! JSON lines on stderr for scripts (`--output json`, where stdout keeps the one answer).
//!
//! A push's rate and ETA are computed here from the agent's `bytes_done` and its estimate
//! `bytes_total` (ZFS: `zfs send -nP`, or the snapshot's size where zfs-fuse lacks it).

use std::time::{Duration, Instant};

use flocker_wire::ConvergeEvent;
use serde_json::json;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// One line per step on stderr.
    Lines,
    /// A bar per node with bytes, total, rate and ETA (stderr is a terminal).
    Bar,
    /// One JSON object per event on stderr.
    Json,
}

/// The rate of one push, measured from its first progress event.
#[derive(Debug, Clone)]
pub struct PushRate {
    step: String,
    started: Instant,
    start_bytes: u64,
}

/// A push's figures at one progress event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushFigures {
    pub bytes_per_second: Option<u64>,
    pub eta_seconds: Option<u64>,
}

impl PushRate {
    pub fn new(step: &str, bytes_done: u64, now: Instant) -> Self {
        PushRate {
            step: step.to_string(),
            started: now,
            start_bytes: bytes_done,
        }
    }

    pub fn step(&self) -> &str {
        &self.step
    }

    /// Rate since the first event, and the time left at that rate when the total is known.
    pub fn figures(&self, bytes_done: u64, bytes_total: Option<u64>, now: Instant) -> PushFigures {
        figures(
            bytes_done.saturating_sub(self.start_bytes),
            now.saturating_duration_since(self.started),
            bytes_done,
            bytes_total,
        )
    }
}

/// Pure arithmetic of [`PushRate::figures`].
pub fn figures(moved: u64, over: Duration, done: u64, total: Option<u64>) -> PushFigures {
    let seconds = over.as_secs_f64();
    let rate = (seconds >= 0.5 && moved > 0).then(|| (moved as f64 / seconds) as u64);
    let eta = match (rate, total) {
        (_, Some(total)) if done >= total => Some(0),
        (Some(rate), Some(total)) if rate > 0 => Some((total - done).div_ceil(rate)),
        _ => None,
    };
    PushFigures {
        bytes_per_second: rate,
        eta_seconds: eta,
    }
}

/// One event as a JSON line: the agent's event with the node, plus rate and ETA for
/// progress events.
pub fn event_json(node: &str, event: &ConvergeEvent, push: Option<PushFigures>) -> String {
    let mut value = serde_json::to_value(event).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.insert("node".into(), json!(node));
        if let Some(f) = push {
            map.insert("bytes_per_second".into(), json!(f.bytes_per_second));
            map.insert("eta_seconds".into(), json!(f.eta_seconds));
        }
    }
    value.to_string()
}

/// A phase boundary as a JSON line.
pub fn phase_json(event: &str, index: usize, count: usize, name: &str) -> String {
    json!({"event": event, "phase": name, "index": index + 1, "of": count}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_the_bytes() {
        let f = figures(50 << 20, Duration::from_secs(5), 50 << 20, Some(150 << 20));
        assert_eq!(f.bytes_per_second, Some(10 << 20));
        assert_eq!(f.eta_seconds, Some(10));
        // Too early for a rate; no total, no ETA; done is done.
        assert_eq!(
            figures(1, Duration::from_millis(10), 1, Some(10)).bytes_per_second,
            None
        );
        assert_eq!(
            figures(100, Duration::from_secs(1), 100, None).eta_seconds,
            None
        );
        assert_eq!(
            figures(100, Duration::from_secs(1), 120, Some(100)).eta_seconds,
            Some(0)
        );
    }

    #[test]
    fn json_lines_carry_the_node_and_figures() {
        let event = ConvergeEvent::Progress {
            step: "push-volume db to 198.18.0.2".into(),
            bytes_done: 10,
            bytes_total: Some(20),
        };
        let line = event_json(
            "198.18.0.1",
            &event,
            Some(PushFigures {
                bytes_per_second: Some(5),
                eta_seconds: Some(2),
            }),
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["event"], "progress");
        assert_eq!(v["node"], "198.18.0.1");
        assert_eq!(v["bytes_total"], 20);
        assert_eq!(v["eta_seconds"], 2);
        assert!(!line.contains('\n'));
    }
}
