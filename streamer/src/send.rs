//! The sending pipeline: source -> chunks -> parallel zstd + digest + seal -> in-order framed
//! writes.
//!
//! A chunk's digest for the stream hash ([`chunk_digest`]) is BLAKE3 of the chunk, except for a
//! raw chunk in an encrypting mode, whose digest is its frame's GCM tag: it is not hashed.
//!
//! Three stages joined by bounded channels. A fixed pool of `2 * threads + 2` chunk buffers
//! circulates reader -> workers -> writer -> reader, so at most that many chunks exist at once
//! whatever the stream's length; the writer's reorder map can hold no more than the pool.
//!
//! A worker asks for the mode to encode a chunk in when it starts on it (a fixed level, or the
//! adaptive controller's current choice, see [`crate::adapt`]); the writer tells the controller how long
//! it waited for each chunk and how long writing it blocked. Now and then the controller asks a
//! worker to also compress a chunk at a neighbouring level, only to compare the two levels on
//! identical data; the second result is measured and dropped.

use std::collections::BTreeMap;
use std::io::{IoSlice, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::adapt::{ChunkMode, Controller, Observation, Pair, Plan};
use crate::error::StreamError;
use crate::format::{
    AuthMode, ChunkDigest, FLAG_ZSTD, FRAME_HEADER_LEN, FrameHeader, FrameKind, StreamHasher,
    StreamHeader, VERSION, chunk_digest,
};
use crate::options::{Compression, ModeStats, Progress, SendOptions, Summary, slots};
use crate::seal::{Direction, Protection, WireTag};

/// A chunk as read from the source.
struct RawChunk {
    seq: u64,
    buf: Vec<u8>,
    len: usize,
}

/// A chunk framed and sealed, ready to write.
struct EncodedChunk {
    seq: u64,
    raw: Vec<u8>,
    len: usize,
    /// The compressed payload, when it is smaller than the raw chunk.
    compressed: Option<Vec<u8>>,
    /// What the stream hash takes of the chunk.
    digest: ChunkDigest,
    header: [u8; FRAME_HEADER_LEN],
    tag: WireTag,
    /// The mode the chunk was meant to go in.
    chosen: ChunkMode,
    /// Worker wall time spent on it (the paired compression not included).
    encode: Duration,
    /// The chunk measured at a second level, when the controller asked for it.
    pair: Option<Pair>,
}

impl EncodedChunk {
    /// The mode it actually goes in.
    fn sent_mode(&self) -> ChunkMode {
        if self.compressed.is_some() {
            self.chosen
        } else {
            ChunkMode::Raw
        }
    }
}

/// Who decides each chunk's mode.
enum Policy {
    Fixed(ChunkMode),
    Adaptive(Box<Mutex<Controller>>),
}

impl Policy {
    fn new(opts: &SendOptions, threads: usize) -> Self {
        match opts.compression {
            Compression::Fixed(level) => Self::Fixed(ChunkMode::from_level(level)),
            Compression::Adaptive => Self::Adaptive(Box::new(Mutex::new(Controller::new(threads)))),
        }
    }

    fn next_plan(&self) -> Plan {
        match self {
            Self::Fixed(m) => Plan {
                mode: *m,
                pair: None,
            },
            // A panic elsewhere cannot leave the controller's plain numbers inconsistent.
            Self::Adaptive(c) => c.lock().unwrap_or_else(|p| p.into_inner()).next_plan(),
        }
    }

    fn observe(&self, o: &Observation) {
        if let Self::Adaptive(c) = self {
            c.lock().unwrap_or_else(|p| p.into_inner()).observe(o);
        }
    }

    fn current(&self) -> ChunkMode {
        match self {
            Self::Fixed(m) => *m,
            Self::Adaptive(c) => c.lock().unwrap_or_else(|p| p.into_inner()).current(),
        }
    }
}

impl EncodedChunk {
    /// What goes on the wire after the header (sealed in place when encrypting).
    fn payload(&self) -> &[u8] {
        match &self.compressed {
            Some(c) => c,
            None => &self.raw[..self.len],
        }
    }
}

/// Below this, compressing a probe first costs more than it saves.
const PROBE_MIN: usize = 256 * 1024;
const PROBE_LEN: usize = 64 * 1024;

/// Sends `source` over `transport` until the source's EOF, then writes the end frame.
///
/// Returns once every frame has been written and flushed; it does not wait for the receiver to
/// acknowledge (see [`crate::session`] for a duplex connection that does).
pub fn send_stream<R: Read + Send, W: Write + Send>(
    mut source: R,
    mut transport: W,
    opts: &SendOptions,
) -> Result<Summary, StreamError> {
    opts.validate()?;
    let start = Instant::now();
    let chunk_size = opts.chunk_size as usize;
    let threads = opts.threads.max(1);
    let (nonce, key) = opts
        .auth
        .sender_key()
        .map_err(StreamError::transport("generating a nonce"))?;
    let header = StreamHeader {
        version: VERSION,
        auth: opts.auth.mode(),
        chunk_size: opts.chunk_size,
        nonce,
    };
    let protection = Protection::new(header.auth, &key).map_err(|_| StreamError::Seal)?;
    header
        .write_to(&mut transport, &key)
        .map_err(StreamError::transport("writing the stream header"))?;

    let n_slots = slots(threads);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(n_slots);
    for _ in 0..n_slots {
        // Cannot fail: the channel holds exactly n_slots and its receiver is alive.
        let _ = pool_tx.send(Vec::new());
    }
    let (work_tx, work_rx) = bounded::<RawChunk>(n_slots);
    let (done_tx, done_rx) = bounded::<Result<EncodedChunk, StreamError>>(n_slots);
    let policy = Policy::new(opts, threads);

    std::thread::scope(|s| {
        let reader_done = done_tx.clone();
        let policy = &policy;
        let reader =
            s.spawn(move || read_chunks(&mut source, chunk_size, &pool_rx, &work_tx, &reader_done));
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let protection = &protection;
            let mode = header.auth;
            s.spawn(move || encode_chunks(protection, mode, policy, &work_rx, &done_tx));
        }
        drop(done_tx);
        drop(work_rx);
        let written = write_frames(&mut transport, opts, policy, start, done_rx, pool_tx);
        let read = reader.join().map_err(|_| StreamError::Panic)?;
        let Written {
            hasher,
            wire,
            compressed_chunks,
            modes,
        } = written?;
        // A source error must never turn into a valid end frame.
        read?;
        let end = hasher.finish();
        let mut payload = end.encode();
        let fh = FrameHeader {
            kind: FrameKind::End,
            flags: 0,
            payload_len: payload.len() as u32,
            raw_len: 0,
            seq: end.chunks,
        };
        let h = fh.encode();
        let tag = protection
            .seal_message(Direction::Frames, fh.seq, &h, &mut payload)
            .map_err(|_| StreamError::Seal)?;
        let write_end = |t: &mut W| -> std::io::Result<()> {
            t.write_all(&h)?;
            t.write_all(&payload)?;
            t.write_all(tag.as_slice())?;
            t.flush()
        };
        write_end(&mut transport).map_err(StreamError::transport("writing the end frame"))?;
        let bytes_on_wire = wire + (h.len() + payload.len() + tag.as_slice().len()) as u64;
        let summary = Summary {
            bytes_in: end.total_bytes,
            bytes_on_wire,
            stream_hash: end.stream_hash,
            elapsed: start.elapsed(),
            chunks: end.chunks,
            compressed_chunks,
            modes,
        };
        tracing::debug!(
            bytes = summary.bytes_in,
            wire = summary.bytes_on_wire,
            "stream sent"
        );
        Ok(summary)
    })
}

/// Fills pooled buffers from the source, in order; stops at EOF or when the writer is gone.
fn read_chunks<R: Read>(
    source: &mut R,
    chunk_size: usize,
    pool: &Receiver<Vec<u8>>,
    work: &Sender<RawChunk>,
    done: &Sender<Result<EncodedChunk, StreamError>>,
) -> Result<(), StreamError> {
    let mut seq = 0;
    loop {
        let Ok(mut buf) = pool.recv() else {
            return Ok(()); // the writer stopped; it reports why
        };
        if buf.len() != chunk_size {
            buf.resize(chunk_size, 0);
        }
        let len = match read_full(source, &mut buf) {
            Ok(len) => len,
            Err(e) => {
                // The writer must stop too; it gets a copy, the caller the original.
                let copy = std::io::Error::new(e.kind(), e.to_string());
                let _ = done.send(Err(StreamError::SourceRead(copy)));
                return Err(StreamError::SourceRead(e));
            }
        };
        if len == 0 {
            return Ok(());
        }
        if work.send(RawChunk { seq, buf, len }).is_err() {
            return Ok(());
        }
        seq += 1;
        if len < chunk_size {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn encode_chunks(
    protection: &Protection,
    auth: AuthMode,
    policy: &Policy,
    work: &Receiver<RawChunk>,
    done: &Sender<Result<EncodedChunk, StreamError>>,
) {
    let mut compressor: Option<(zstd::bulk::Compressor<'static>, i32)> = None;
    // A second one for paired measurements, so the main one keeps its level.
    let mut pair_compressor: Option<(zstd::bulk::Compressor<'static>, i32)> = None;
    while let Ok(RawChunk { seq, buf, len }) = work.recv() {
        // Asked as late as possible, so a new choice applies to the very next chunk encoded.
        let plan = policy.next_plan();
        let mode = plan.mode;
        let began = Instant::now();
        let data = &buf[..len];
        let compressing = Instant::now();
        let compressed = match mode {
            ChunkMode::Raw => Ok(None),
            ChunkMode::Zstd(level) => {
                compressor_at(&mut compressor, level).map(|c| compress(c, data))
            }
        };
        let compress_time = compressing.elapsed();
        let pair = match plan.pair {
            Some(other) => measure_pair(&mut pair_compressor, other, data).map(Some),
            None => Ok(None),
        };
        let chunk = compressed.and_then(|compressed| {
            let pair = pair?;
            let pair_time = pair.map(|p| p.encode).unwrap_or_default();
            seal_chunk(protection, auth, seq, buf, len, compressed).map(|mut c| {
                c.chosen = mode;
                c.encode = began.elapsed().saturating_sub(pair_time);
                // The chunk encoded at the other level instead: same digest and sealing. (A raw
                // chunk in an encrypting mode is not hashed, so the estimate for a compressed
                // alternative lacks its BLAKE3 time.)
                c.pair = pair.map(|p: Pair| Pair {
                    encode: c.encode.saturating_sub(compress_time) + p.encode,
                    ..p
                });
                c
            })
        });
        let stop = chunk.is_err();
        if done.send(chunk).is_err() || stop {
            return;
        }
    }
}

/// Compresses `data` at `mode` only to measure it: the payload size it would have had and the
/// compression's wall time.
fn measure_pair(
    slot: &mut Option<(zstd::bulk::Compressor<'static>, i32)>,
    mode: ChunkMode,
    data: &[u8],
) -> Result<Pair, StreamError> {
    let began = Instant::now();
    let payload_len = match mode {
        ChunkMode::Raw => data.len(),
        ChunkMode::Zstd(level) => {
            let c = compressor_at(slot, level)?;
            compress(c, data).map_or(data.len(), |out| out.len())
        }
    };
    Ok(Pair {
        mode,
        payload_len: payload_len as u64,
        encode: began.elapsed(),
    })
}

/// The worker's compressor, created on first use and switched to `level` when it differs.
fn compressor_at<'a>(
    slot: &'a mut Option<(zstd::bulk::Compressor<'static>, i32)>,
    level: i32,
) -> Result<&'a mut zstd::bulk::Compressor<'static>, StreamError> {
    let bad = |e: std::io::Error| StreamError::Options(format!("zstd level {level}: {e}"));
    match slot {
        Some((c, current)) => {
            if *current != level {
                c.set_compression_level(level).map_err(bad)?;
                *current = level;
            }
        }
        None => {
            *slot = Some((zstd::bulk::Compressor::new(level).map_err(bad)?, level));
        }
    }
    match slot {
        Some((c, _)) => Ok(c),
        None => Err(StreamError::Panic),
    }
}

/// Frames a chunk, seals it and takes its digest: the header, then the payload encrypted in
/// place (or left as is) and its tag. Runs on the workers, so sealing and hashing are as
/// parallel as compression.
fn seal_chunk(
    protection: &Protection,
    auth: AuthMode,
    seq: u64,
    mut raw: Vec<u8>,
    len: usize,
    mut compressed: Option<Vec<u8>>,
) -> Result<EncodedChunk, StreamError> {
    let is_compressed = compressed.is_some();
    // Without a key the checksum covers the digest (BLAKE3 of the chunk), so it comes first.
    // Encrypting, the seal needs no digest and a raw chunk's digest is the seal's tag, so it
    // comes after; the raw buffer then holds ciphertext, which the digest of a raw chunk does
    // not read (a compressed chunk's raw buffer is untouched).
    let digest_first = if auth.encrypts() {
        None
    } else {
        Some(chunk_digest(auth, is_compressed, &raw[..len], &[]).ok_or(StreamError::Seal)?)
    };
    let (flags, payload): (u8, &mut [u8]) = match &mut compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, &mut raw[..len]),
    };
    let header = FrameHeader {
        kind: FrameKind::Data,
        flags,
        payload_len: payload.len() as u32,
        raw_len: len as u32,
        seq,
    }
    .encode();
    let chunk_hash = digest_first.as_ref().and_then(ChunkDigest::blake3);
    let tag = protection
        .seal_data(&header, seq, payload, chunk_hash)
        .map_err(|_| StreamError::Seal)?;
    let digest = match digest_first {
        Some(d) => d,
        None => chunk_digest(auth, is_compressed, &raw[..len], tag.as_slice())
            .ok_or(StreamError::Seal)?,
    };
    Ok(EncodedChunk {
        seq,
        raw,
        len,
        compressed,
        digest,
        header,
        tag,
        chosen: ChunkMode::Raw,
        encode: Duration::ZERO,
        pair: None,
    })
}

/// Compresses `data` if that makes it smaller. Large chunks are probed first so incompressible
/// data (random bytes, already-compressed files) costs one small compression, not a full one.
fn compress(c: &mut zstd::bulk::Compressor<'_>, data: &[u8]) -> Option<Vec<u8>> {
    if data.len() >= PROBE_MIN {
        let probe = &data[..PROBE_LEN];
        let mut out = Vec::with_capacity(PROBE_LEN);
        match c.compress_to_buffer(probe, &mut out) {
            // Less than ~3% saved on the probe: not worth the CPU on the whole chunk.
            Ok(n) if n * 100 < PROBE_LEN * 97 => {}
            _ => return None,
        }
    }
    // Only keep output strictly smaller than the input; zstd errors out when it does not fit.
    let mut out = Vec::with_capacity(data.len().saturating_sub(1));
    match c.compress_to_buffer(data, &mut out) {
        Ok(n) if n < data.len() => Some(out),
        _ => None,
    }
}

/// What the writer reports back.
struct Written {
    hasher: StreamHasher,
    /// Bytes written, stream header included.
    wire: u64,
    compressed_chunks: u64,
    modes: Vec<ModeStats>,
}

/// Writes frames in sequence order, and tells the policy how long it waited for each chunk and
/// how long writing it blocked.
fn write_frames<W: Write>(
    transport: &mut W,
    opts: &SendOptions,
    policy: &Policy,
    start: Instant,
    done: Receiver<Result<EncodedChunk, StreamError>>,
    pool: Sender<Vec<u8>>,
) -> Result<Written, StreamError> {
    let mut hasher = StreamHasher::new();
    let mut wire = crate::format::STREAM_HEADER_LEN as u64;
    let mut compressed_chunks = 0u64;
    let mut modes: BTreeMap<ChunkMode, ModeStats> = BTreeMap::new();
    let mut pending: BTreeMap<u64, EncodedChunk> = BTreeMap::new();
    let mut next = 0u64;
    // When the writer last became ready for the next chunk.
    let mut ready_since = Instant::now();
    for msg in done.iter() {
        let chunk = msg?;
        pending.insert(chunk.seq, chunk);
        while let Some(chunk) = pending.remove(&next) {
            let payload = chunk.payload();
            let writing = Instant::now();
            let wait = writing.duration_since(ready_since);
            write_frame(transport, &chunk.header, payload, chunk.tag.as_slice())
                .map_err(StreamError::transport("sending a data frame"))?;
            let frame_len = chunk.header.len() + payload.len() + chunk.tag.as_slice().len();
            wire += frame_len as u64;
            compressed_chunks += u64::from(chunk.compressed.is_some());
            let mode = chunk.sent_mode();
            let stats = modes.entry(mode).or_insert(ModeStats {
                mode,
                chunks: 0,
                bytes_in: 0,
                payload_bytes: 0,
            });
            stats.chunks += 1;
            stats.bytes_in += chunk.len as u64;
            stats.payload_bytes += payload.len() as u64;
            hasher.push(chunk.len, &chunk.digest);
            next += 1;
            if let Some(rate) = opts.limit_rate {
                throttle(rate, wire, start);
            }
            // A rate limit is the network as far as the choice of level goes.
            ready_since = Instant::now();
            policy.observe(&Observation {
                mode,
                chosen: chunk.chosen,
                raw_len: chunk.len as u64,
                payload_len: payload.len() as u64,
                encode: chunk.encode,
                wait,
                write: ready_since.duration_since(writing),
                pair: chunk.pair,
            });
            let _ = pool.send(chunk.raw);
            if let Some(progress) = &opts.progress {
                progress(&Progress {
                    bytes_in: hasher.total_bytes(),
                    bytes_on_wire: wire,
                    elapsed: start.elapsed(),
                    mode: Some(policy.current()),
                });
            }
        }
    }
    if !pending.is_empty() {
        // Workers only stop early on an error they already reported; reaching here is a bug.
        return Err(StreamError::Panic);
    }
    Ok(Written {
        hasher,
        wire,
        compressed_chunks,
        modes: modes.into_values().collect(),
    })
}

/// Writes one frame with as few system calls as the transport allows (one `writev` on a
/// socket, instead of a 24-byte write that TCP_NODELAY would send as its own packet).
fn write_frame<W: Write>(
    transport: &mut W,
    header: &[u8],
    payload: &[u8],
    tag: &[u8],
) -> std::io::Result<()> {
    let mut slices = [
        IoSlice::new(header),
        IoSlice::new(payload),
        IoSlice::new(tag),
    ];
    crate::receive::write_all_vectored(transport, &mut slices)
}

/// Sleeps until `wire` bytes are within `rate` bytes/second of `start`.
fn throttle(rate: u64, wire: u64, start: Instant) {
    let due = Duration::from_secs_f64(wire as f64 / rate as f64);
    let elapsed = start.elapsed();
    if due > elapsed {
        std::thread::sleep(due - elapsed);
    }
}
