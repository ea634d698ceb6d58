//! Adaptive compression: picks, for every chunk, raw or a zstd level so that the stream delivers
//! as many uncompressed bytes per second as the slowest of CPU and network allows.
//!
//! The sender's writer thread measures, for every chunk it writes, how long it waited for the
//! compressor (the next chunk was not ready: the network waits on the CPU) and how long the
//! write blocked (the send queue was full: the CPU waits on the network). After every
//! [`WINDOW`] chunks encoded at the current level it decides:
//!
//! - mostly waiting on the network: step one level up the [`LADDER`] (more compression), but
//!   only if the workers are predicted to keep up at that level (their measured or extrapolated
//!   cost) and it is predicted to shrink the data noticeably more;
//! - mostly waiting on the compressor: step one level down (towards raw);
//! - the current level saves less than [`MIN_SAVINGS`]: go straight to raw (incompressible
//!   data); while raw and network-bound, one chunk in [`PROBE_EVERY`] is compressed at the
//!   fastest level (unless the step up from raw is blocked, see below) to notice when the data
//!   becomes compressible again (a probe of an
//!   incompressible chunk costs one 64 KiB trial compression, see `send::compress`). Raw and
//!   compressor-bound, compression cannot help, so nothing is probed.
//!
//! A step up is a trial: if the first window at the new level delivers less than the window
//! before it, the controller steps back and does not try that step again for a backoff that
//! doubles with every failed trial (from [`MIN_BACKOFF`] to [`MAX_BACKOFF`] windows), unless the
//! throughput changes by more than [`CHANGED`]x meanwhile (the link changed). This catches what
//! the model cannot see, e.g. on loopback, where the sender's compression takes CPU from the
//! receiver on the same cores.
//!
//! Levels next to each other give throughputs close to each other, so around the balance point
//! the controller alternates between two neighbours, which approximates the best mix. The
//! controller is pure: time arrives as measured durations, so tests drive it with a model.

use std::time::Duration;

/// How one chunk is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChunkMode {
    /// Sent as is.
    Raw,
    /// zstd at this level (negative levels are zstd's fast levels).
    Zstd(i32),
}

impl ChunkMode {
    /// The mode a fixed `level` means: 0 is raw.
    pub fn from_level(level: i32) -> Self {
        if level == 0 {
            Self::Raw
        } else {
            Self::Zstd(level)
        }
    }

    /// A short name: `raw` or `zstd:N`.
    pub fn name(self) -> String {
        match self {
            Self::Raw => "raw".into(),
            Self::Zstd(l) => format!("zstd:{l}"),
        }
    }
}

/// The levels the controller moves between, cheapest first.
pub const LADDER: [ChunkMode; 6] = [
    ChunkMode::Raw,
    ChunkMode::Zstd(-5),
    ChunkMode::Zstd(-1),
    ChunkMode::Zstd(1),
    ChunkMode::Zstd(3),
    ChunkMode::Zstd(6),
];

/// Where the controller starts: raw, the cheapest; a slow link makes it climb one level per
/// window.
const START: usize = 0;
/// Chunks at the current level per decision.
pub const WINDOW: u32 = 4;
/// While raw, one chunk in this many is compressed at the fastest level.
pub const PROBE_EVERY: u64 = 16;
/// A level that saves less than this fraction of the bytes is not worth its CPU.
pub const MIN_SAVINGS: f64 = 0.05;
/// The writer waited on the network for at least this share of its time: network-bound.
const NET_BOUND: f64 = 0.6;
/// ... at most this share: compressor-bound.
const CPU_BOUND: f64 = 0.35;
/// A step up must be predicted to keep this much headroom over today's throughput.
const HEADROOM: f64 = 1.1;
/// A step up must shrink the wire bytes by at least this factor more.
const RATIO_GAIN: f64 = 1.03;
/// A trial step up that delivers less than this share of the throughput before it failed.
const TRIAL_SLACK: f64 = 0.97;
/// Windows a failed step up is not retried for, first and at most.
pub const MIN_BACKOFF: u64 = 8;
/// See [`MIN_BACKOFF`].
pub const MAX_BACKOFF: u64 = 256;
/// A throughput this many times higher or lower than when a step was blocked lifts the block.
pub const CHANGED: f64 = 1.5;
/// Weight of a new measurement in the per-level averages.
const ALPHA: f64 = 0.3;

/// Priors for levels not measured yet, from zstd's documented speed and ratio curves (relative
/// values matter, not absolute ones): encode seconds per GB on one core (BLAKE3 and sealing
/// included) and the fraction of a typical file-system stream saved.
const PRIOR_COST: [f64; 6] = [0.4, 1.4, 2.0, 2.6, 4.5, 10.0];
const PRIOR_SAVINGS: [f64; 6] = [0.0, 0.40, 0.47, 0.53, 0.57, 0.60];

/// What the pipeline measured for one written chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// How the chunk was sent (raw if compression did not shrink it).
    pub mode: ChunkMode,
    /// How the controller asked for it to be encoded.
    pub chosen: ChunkMode,
    /// Uncompressed bytes.
    pub raw_len: u64,
    /// Payload bytes on the wire.
    pub payload_len: u64,
    /// Worker wall time to hash, compress and seal it.
    pub encode: Duration,
    /// Writer time waiting for this chunk to be ready.
    pub wait: Duration,
    /// Writer time blocked writing it.
    pub write: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Encode seconds per byte on one worker.
    cost: Option<f64>,
    /// Fraction of bytes saved.
    savings: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    chunks: u32,
    raw: u64,
    wait: f64,
    write: f64,
}

/// Why the controller changed level (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Kept the level.
    Stay,
    /// Network-bound and the compressor can afford more.
    Up,
    /// Compressor-bound.
    Down,
    /// The data does not compress at this level.
    Incompressible,
    /// The last step up delivered less: back to where it came from.
    Revert,
}

/// A step up under test.
#[derive(Debug, Clone, Copy)]
struct Trial {
    from: usize,
    goodput: f64,
}

/// A step up from a level that failed its trial.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// Windows to wait after the next failure.
    backoff: u64,
    /// Blocked until this window.
    until: u64,
    /// The throughput when it was blocked.
    goodput: f64,
}

/// The per-chunk level chooser. Not thread-safe by itself; the sender wraps it in a mutex.
#[derive(Debug, Clone)]
pub struct Controller {
    threads: f64,
    current: usize,
    est: [Estimate; LADDER.len()],
    window: Window,
    /// Chunks handed out since the last probe.
    since_probe: u64,
    /// The last window waited mostly on the network.
    net_bound: bool,
    /// Windows decided so far.
    windows: u64,
    trial: Option<Trial>,
    blocked: [Block; LADDER.len()],
}

impl Controller {
    /// A controller for `threads` compression workers.
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1) as f64,
            current: START,
            est: [Estimate::default(); LADDER.len()],
            window: Window::default(),
            since_probe: 0,
            net_bound: false,
            windows: 0,
            trial: None,
            blocked: [Block::default(); LADDER.len()],
        }
    }

    /// The level chunks are encoded at now.
    pub fn current(&self) -> ChunkMode {
        LADDER[self.current]
    }

    /// The mode for the next chunk read from the source: the current level, or a probe.
    pub fn next_mode(&mut self) -> ChunkMode {
        // Probing only informs a step up, pointless while that step is blocked.
        if self.current == 0 && self.net_bound && self.windows >= self.blocked[0].until {
            self.since_probe += 1;
            if self.since_probe >= PROBE_EVERY {
                self.since_probe = 0;
                return LADDER[1];
            }
        }
        self.current()
    }

    /// Takes in one written chunk; every [`WINDOW`] chunks at the current level it may change
    /// the level.
    pub fn observe(&mut self, o: &Observation) -> Decision {
        let Some(idx) = LADDER.iter().position(|m| *m == o.chosen) else {
            return Decision::Stay;
        };
        if o.raw_len > 0 {
            let e = &mut self.est[idx];
            e.cost = Some(ewma(e.cost, o.encode.as_secs_f64() / o.raw_len as f64));
            let saved = 1.0 - o.payload_len as f64 / o.raw_len as f64;
            if idx > 0 {
                e.savings = Some(ewma(e.savings, saved.max(0.0)));
            }
        }
        // Chunks still in flight from an earlier level, and probes, inform the estimates only.
        if idx != self.current {
            return Decision::Stay;
        }
        let w = &mut self.window;
        w.chunks += 1;
        w.raw += o.raw_len;
        w.wait += o.wait.as_secs_f64();
        w.write += o.write.as_secs_f64();
        if w.chunks < WINDOW {
            return Decision::Stay;
        }
        let w = std::mem::take(&mut self.window);
        let busy = w.wait + w.write;
        self.net_bound = busy > 0.0 && w.write / busy >= NET_BOUND;
        self.windows += 1;
        let goodput = if busy > 0.0 { w.raw as f64 / busy } else { 0.0 };
        let decision = match self.judge_trial(goodput) {
            Some(d) => d,
            None => self.decide(&w),
        };
        match decision {
            Decision::Up => {
                self.trial = Some(Trial {
                    from: self.current,
                    goodput,
                });
                self.current += 1;
            }
            Decision::Down => self.current -= 1,
            Decision::Incompressible => self.current = 0,
            Decision::Revert | Decision::Stay => {}
        }
        if decision != Decision::Stay {
            self.since_probe = 0;
            tracing::debug!(?decision, level = %self.current().name(), "compression level changed");
        }
        decision
    }

    /// After a step up: keep it if it delivered at least about as much as before, otherwise
    /// go back and block that step for a while.
    fn judge_trial(&mut self, goodput: f64) -> Option<Decision> {
        let t = self.trial.take()?;
        let b = &mut self.blocked[t.from];
        if goodput >= t.goodput * TRIAL_SLACK {
            b.backoff = 0;
            return None;
        }
        b.backoff = (b.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        b.until = self.windows + b.backoff + 1;
        b.goodput = t.goodput;
        self.current = t.from;
        Some(Decision::Revert)
    }

    fn decide(&self, w: &Window) -> Decision {
        let busy = w.wait + w.write;
        if busy <= 0.0 {
            return Decision::Stay;
        }
        if self.current > 0 && self.savings(self.current) < MIN_SAVINGS {
            return Decision::Incompressible;
        }
        let net_share = w.write / busy;
        let goodput = w.raw as f64 / busy;
        if net_share >= NET_BOUND {
            if self.worth_up(goodput) {
                return Decision::Up;
            }
        } else if net_share <= CPU_BOUND && self.current > 0 {
            return Decision::Down;
        }
        Decision::Stay
    }

    /// Network-bound at `goodput` bytes/s: would the next level up deliver more?
    fn worth_up(&self, goodput: f64) -> bool {
        let up = self.current + 1;
        if up >= LADDER.len() {
            return false;
        }
        let b = &self.blocked[self.current];
        let changed = goodput > b.goodput * CHANGED || goodput * CHANGED < b.goodput;
        if self.windows < b.until && !changed {
            return false;
        }
        let ratio = |i: usize| 1.0 / (1.0 - self.savings(i).min(0.99));
        if self.savings(up) < MIN_SAVINGS || ratio(up) < ratio(self.current) * RATIO_GAIN {
            return false;
        }
        // Network-bound now, so one level up delivers up to goodput * ratio gain, if the
        // workers keep up.
        let capacity = self.threads / self.cost(up);
        capacity >= goodput * HEADROOM
    }

    /// Measured savings of level `i`, or extrapolated from the nearest measured level.
    fn savings(&self, i: usize) -> f64 {
        if i == 0 {
            return 0.0;
        }
        if let Some(s) = self.est[i].savings {
            return s;
        }
        match self.nearest(i, |e| e.savings.is_some()) {
            Some(j) => self.est[j].savings.unwrap_or(0.0) * PRIOR_SAVINGS[i] / PRIOR_SAVINGS[j],
            None => PRIOR_SAVINGS[i],
        }
    }

    /// Measured encode cost of level `i` (seconds per byte), or extrapolated.
    fn cost(&self, i: usize) -> f64 {
        if let Some(c) = self.est[i].cost {
            return c.max(1e-12);
        }
        match self.nearest(i, |e| e.cost.is_some()) {
            Some(j) => self.est[j].cost.unwrap_or(0.0).max(1e-12) * PRIOR_COST[i] / PRIOR_COST[j],
            None => PRIOR_COST[i] * 1e-9,
        }
    }

    /// The measured level closest to `i` (compressing levels only, for savings).
    fn nearest(&self, i: usize, known: impl Fn(&Estimate) -> bool) -> Option<usize> {
        (0..LADDER.len())
            .filter(|&j| j != i && known(&self.est[j]) && (j > 0 || PRIOR_SAVINGS[i] == 0.0))
            .min_by_key(|&j| j.abs_diff(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MIB: u64 = 1 << 20;

    /// A fake pipeline: `threads` workers with a per-level cost and savings, a link of `link`
    /// bytes/s, and `in_flight` chunks between the controller's choice and the writer.
    struct Model {
        link: f64,
        threads: f64,
        /// Seconds per byte on one worker, per ladder index.
        cost: [f64; 6],
        savings: [f64; 6],
        in_flight: VecDeque<ChunkMode>,
    }

    impl Model {
        fn filesystem(link: f64) -> Self {
            // zstd on a slow shared core: level 1 at 250 MB/s, raw hashing+sealing at 2 GB/s.
            Self {
                link,
                threads: 2.0,
                cost: [0.5e-9, 1.6e-9, 2.6e-9, 4.0e-9, 7.0e-9, 16e-9],
                savings: [0.0, 0.40, 0.47, 0.53, 0.57, 0.60],
                in_flight: VecDeque::new(),
            }
        }

        fn random(link: f64) -> Self {
            Self {
                savings: [0.0; 6],
                // Incompressible chunks cost one probe compression on top of hashing.
                cost: [0.5e-9, 0.6e-9, 0.6e-9, 0.7e-9, 0.8e-9, 0.9e-9],
                ..Self::filesystem(link)
            }
        }

        fn idx(m: ChunkMode) -> usize {
            LADDER.iter().position(|x| *x == m).unwrap_or(0)
        }

        /// Delivered uncompressed bytes per second at a fixed level.
        fn throughput(&self, i: usize) -> f64 {
            let cpu = self.threads / self.cost[i];
            let net = self.link / (1.0 - self.savings[i]);
            cpu.min(net)
        }

        /// Steps one chunk through the pipeline; returns the observation the writer makes.
        fn step(&mut self, c: &mut Controller) -> Observation {
            self.in_flight.push_back(c.next_mode());
            let chosen = if self.in_flight.len() > 6 {
                self.in_flight.pop_front().unwrap_or(ChunkMode::Raw)
            } else {
                c.current()
            };
            let i = Self::idx(chosen);
            let raw = MIB as f64;
            let payload = raw * (1.0 - self.savings[i]);
            let cpu = self.cost[i] * raw / self.threads;
            let net = payload / self.link;
            let (wait, write) = if cpu > net {
                (cpu - net, net)
            } else {
                (0.0, net)
            };
            let mode = if self.savings[i] > 0.0 {
                chosen
            } else {
                ChunkMode::Raw
            };
            Observation {
                mode,
                chosen,
                raw_len: MIB,
                payload_len: payload as u64,
                encode: Duration::from_secs_f64(self.cost[i] * raw),
                wait: Duration::from_secs_f64(wait),
                write: Duration::from_secs_f64(write),
            }
        }

        /// Runs `n` chunks; returns the mean throughput the model delivered over the last half.
        fn run(&mut self, c: &mut Controller, n: usize) -> f64 {
            let (mut bytes, mut secs) = (0.0, 0.0);
            for k in 0..n {
                let o = self.step(c);
                c.observe(&o);
                if k >= n / 2 {
                    bytes += o.raw_len as f64;
                    secs += (o.wait + o.write).as_secs_f64();
                }
            }
            bytes / secs
        }

        fn best(&self) -> f64 {
            (0..LADDER.len())
                .map(|i| self.throughput(i))
                .fold(0.0, f64::max)
        }
    }

    #[test]
    fn fast_network_goes_raw() {
        let mut m = Model::filesystem(20e9);
        let mut c = Controller::new(2);
        let got = m.run(&mut c, 200);
        assert_eq!(c.current(), ChunkMode::Raw);
        assert!(got >= 0.9 * m.best(), "{got} vs best {}", m.best());
    }

    #[test]
    fn slow_link_compresses_near_the_best_level() {
        let mut m = Model::filesystem(125e6);
        let mut c = Controller::new(2);
        let got = m.run(&mut c, 300);
        assert!(c.current() != ChunkMode::Raw, "stayed {:?}", c.current());
        assert!(got >= 0.85 * m.best(), "{got} vs best {}", m.best());
        assert!(got >= 2.0 * 125e6, "{got}");
    }

    #[test]
    fn ten_gigabit_beats_raw_and_fixed_level_one() {
        let mut m = Model::filesystem(1.25e9);
        let mut c = Controller::new(2);
        let got = m.run(&mut c, 300);
        let raw = m.throughput(0);
        let fixed = m.throughput(3);
        assert!(
            got >= 0.9 * raw.max(fixed),
            "{got} vs raw {raw}, fixed {fixed}"
        );
    }

    #[test]
    fn incompressible_data_goes_raw_and_only_probes() {
        let mut m = Model::random(125e6);
        let mut c = Controller::new(2);
        let mut compressed = 0;
        for k in 0..200 {
            let o = m.step(&mut c);
            c.observe(&o);
            if k >= 40 && o.chosen != ChunkMode::Raw {
                compressed += 1;
            }
        }
        assert_eq!(c.current(), ChunkMode::Raw);
        // Only the probes: one in PROBE_EVERY.
        assert!(compressed <= 160 / PROBE_EVERY as usize + 1, "{compressed}");
    }

    #[test]
    fn switches_within_a_few_chunks_when_the_link_changes() {
        let mut m = Model::filesystem(10e9);
        let mut c = Controller::new(2);
        m.run(&mut c, 100);
        assert_eq!(c.current(), ChunkMode::Raw);
        // The link drops to 1 Gbit/s: compression must start within a few windows.
        m.link = 125e6;
        let mut switched_after = None;
        for k in 0..100 {
            let o = m.step(&mut c);
            c.observe(&o);
            if c.current() != ChunkMode::Raw {
                switched_after = Some(k);
                break;
            }
        }
        let k = switched_after.expect("never left raw on a slow link");
        assert!(k <= 3 * WINDOW as usize + 6, "switched after {k} chunks");
        m.run(&mut c, 200);
        // Back to a fast link: back to raw within a few windows.
        m.link = 10e9;
        let mut back_after = None;
        for k in 0..200 {
            let o = m.step(&mut c);
            c.observe(&o);
            if c.current() == ChunkMode::Raw {
                back_after = Some(k);
                break;
            }
        }
        let k = back_after.expect("never went back to raw");
        // One window per level step, plus the chunks in flight.
        assert!(k <= LADDER.len() * (WINDOW as usize + 6), "back after {k}");
    }

    #[test]
    fn data_turning_compressible_is_noticed_by_probes() {
        let mut m = Model::random(125e6);
        let mut c = Controller::new(2);
        m.run(&mut c, 100);
        assert_eq!(c.current(), ChunkMode::Raw);
        let fs = Model::filesystem(125e6);
        m.savings = fs.savings;
        m.cost = fs.cost;
        m.run(&mut c, 3 * PROBE_EVERY as usize);
        assert!(c.current() != ChunkMode::Raw);
    }

    #[test]
    fn network_bound_steps_up_compressor_bound_steps_down() {
        let mut c = Controller::new(2);
        let obs = |wait_ms: u64, write_ms: u64, chosen, payload| Observation {
            mode: chosen,
            chosen,
            raw_len: MIB,
            payload_len: payload,
            encode: Duration::from_millis(2),
            wait: Duration::from_millis(wait_ms),
            write: Duration::from_millis(write_ms),
        };
        assert_eq!(c.current(), ChunkMode::Raw);
        let mut last = Decision::Stay;
        for _ in 0..WINDOW {
            last = c.observe(&obs(0, 10, ChunkMode::Raw, MIB));
        }
        assert_eq!(last, Decision::Up);
        let up = c.current();
        assert_eq!(up, LADDER[1]);
        // As fast as before (the trial holds) but now waiting on the compressor.
        for _ in 0..WINDOW {
            last = c.observe(&obs(9, 1, up, MIB / 2));
        }
        assert_eq!(last, Decision::Down);
        assert_eq!(c.current(), ChunkMode::Raw);
    }

    #[test]
    fn a_step_up_that_delivers_less_is_reverted_and_backed_off() {
        let mut c = Controller::new(2);
        let at = |c: &Controller, write_ms: u64, wait_ms: u64, payload: u64| Observation {
            mode: c.current(),
            chosen: c.current(),
            raw_len: MIB,
            payload_len: payload,
            encode: Duration::from_micros(500),
            wait: Duration::from_millis(wait_ms),
            write: Duration::from_millis(write_ms),
        };
        // Get to raw: compressor-bound.
        while c.current() != ChunkMode::Raw {
            c.observe(&at(&c, 0, 5, MIB / 2));
        }
        // Raw and the receiver is slow (writes block, 1 ms per MiB): step up.
        let mut d = Decision::Stay;
        for _ in 0..WINDOW {
            d = c.observe(&at(&c, 1, 0, MIB));
        }
        assert_eq!(d, Decision::Up);
        // The compressed level delivers less (2 ms per MiB): revert.
        for _ in 0..WINDOW {
            d = c.observe(&at(&c, 2, 0, MIB / 2));
        }
        assert_eq!(d, Decision::Revert);
        assert_eq!(c.current(), ChunkMode::Raw);
        // Blocked for MIN_BACKOFF windows at the same throughput.
        for _ in 0..MIN_BACKOFF * WINDOW as u64 {
            assert_eq!(c.observe(&at(&c, 1, 0, MIB)), Decision::Stay);
        }
        // Then tried again, failing again, now blocked twice as long.
        for _ in 0..WINDOW {
            d = c.observe(&at(&c, 1, 0, MIB));
        }
        assert_eq!(d, Decision::Up);
        for _ in 0..WINDOW {
            d = c.observe(&at(&c, 2, 0, MIB / 2));
        }
        assert_eq!(d, Decision::Revert);
        for _ in 0..2 * MIN_BACKOFF * WINDOW as u64 {
            assert_eq!(c.observe(&at(&c, 1, 0, MIB)), Decision::Stay);
        }
        // A much slower link (10 ms per MiB) lifts the block at once.
        for _ in 0..WINDOW - 1 {
            c.observe(&at(&c, 10, 0, MIB));
        }
        assert_eq!(c.observe(&at(&c, 10, 0, MIB)), Decision::Up);
    }

    #[test]
    fn chunks_from_an_old_level_do_not_count_towards_a_decision() {
        let mut c = Controller::new(2);
        let other = LADDER[2];
        for _ in 0..10 * WINDOW {
            let d = c.observe(&Observation {
                mode: other,
                chosen: other,
                raw_len: MIB,
                payload_len: MIB / 2,
                encode: Duration::from_millis(2),
                wait: Duration::from_millis(10),
                write: Duration::ZERO,
            });
            assert_eq!(d, Decision::Stay);
        }
        assert_eq!(c.current(), LADDER[START]);
        assert_ne!(other, LADDER[START]);
    }
}
