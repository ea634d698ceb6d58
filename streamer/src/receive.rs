//! The receiving pipeline: framed reads -> parallel open + decompress + verify -> in-order sink
//! writes.
//!
//! The calling thread reads frames into pooled buffers; workers open sealed payloads (before
//! anything is decompressed), decompress (bounded by the frame's declared length, itself
//! bounded by the chunk size), take each chunk's digest ([`chunk_digest`]: BLAKE3 of the chunk,
//! or for a raw sealed chunk the GCM tag that just authenticated it) and check the checksum of
//! the no-key mode; one
//! writer thread puts verified chunks into the sink in order, the chunks that are ready together
//! in one vectored write (up to [`MAX_BATCH`]). A chunk reaches the sink only after
//! its tag matched, so the sink never sees an unverified byte. The pool of `2 * threads + 2`
//! buffers bounds memory as on the sending side.

use std::collections::BTreeMap;
use std::io::{IoSlice, Read, Write};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::aligned::AlignedBuf;
use crate::error::StreamError;
use crate::format::{
    AuthMode, ChunkDigest, END_PAYLOAD_LEN, EndPayload, FLAG_ZSTD, FRAME_HEADER_LEN, FrameHeader,
    FrameKind, STREAM_HEADER_LEN, StreamHasher, TAG_LEN, chunk_digest, parse_frame_header,
    parse_stream_header, read_exact_or_eof,
};
use crate::options::{Progress, ReceiveOptions, Summary, slots};
use crate::seal::{Direction, MAX_TAG_LEN, Protection};

/// Buffers that circulate reader -> worker -> writer -> reader. Page-aligned, so a sink
/// writing with `O_DIRECT` takes a chunk as it is (see [`crate::aligned`]).
struct Buffers {
    payload: AlignedBuf,
    raw: AlignedBuf,
}

struct Frame {
    header: FrameHeader,
    header_bytes: [u8; FRAME_HEADER_LEN],
    /// The tag, `Protection::tag_len` bytes of it.
    tag: [u8; MAX_TAG_LEN],
    bufs: Buffers,
}

struct Verified {
    seq: u64,
    len: usize,
    digest: ChunkDigest,
    compressed: bool,
    bufs: Buffers,
}

/// Receives one stream from `transport` into `sink`.
///
/// Every byte handed to `sink` belongs to a chunk whose tag verified, in stream order. The
/// stream as a whole is complete and authentic only if this returns `Ok`: on `Err` the sink
/// holds a verified prefix and the caller must discard it (the [`crate::backend::Sink`]
/// implementations do). Reads stop right after the end frame, so a duplex transport can carry an
/// acknowledgement afterwards.
pub fn receive_stream<R: Read + Send, W: Write + Send>(
    mut transport: R,
    mut sink: W,
    opts: &ReceiveOptions,
) -> Result<Summary, StreamError> {
    let start = Instant::now();
    let mut hb = [0u8; STREAM_HEADER_LEN];
    match read_exact_or_eof(&mut transport, &mut hb) {
        Ok(true) => {}
        Ok(false) => {
            return Err(StreamError::Truncated {
                chunks: 0,
                bytes: 0,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StreamError::Truncated {
                chunks: 0,
                bytes: 0,
            });
        }
        Err(e) => {
            return Err(StreamError::Transport {
                stage: "reading the stream header",
                source: e,
            });
        }
    }
    let mut body = [0u8; STREAM_HEADER_LEN - TAG_LEN];
    body.copy_from_slice(&hb[..STREAM_HEADER_LEN - TAG_LEN]);
    let header = parse_stream_header(&body)?;
    let expected = opts.auth.mode();
    if header.auth != expected {
        return Err(StreamError::AuthMismatch {
            sender: header.auth.name(),
            receiver: expected.name(),
        });
    }
    let key = opts
        .auth
        .receiver_key(&header.nonce)
        .ok_or(StreamError::HeaderTag)?;
    let tag = blake3::keyed_hash(&key, &body);
    if tag != blake3::Hash::from_bytes(tail(&hb)) {
        return Err(StreamError::HeaderTag);
    }
    let protection = Protection::new(header.auth, &key).map_err(|_| StreamError::Seal)?;
    let chunk_size = header.chunk_size;
    let threads = opts.threads.max(1);
    let n_slots = slots(threads);
    let (pool_tx, pool_rx) = bounded::<Buffers>(n_slots);
    for _ in 0..n_slots {
        let _ = pool_tx.send(Buffers {
            payload: AlignedBuf::new(),
            raw: AlignedBuf::new(),
        });
    }
    let (work_tx, work_rx) = bounded::<Frame>(n_slots);
    let (done_tx, done_rx) = bounded::<Result<Verified, StreamError>>(n_slots);
    let wire_start = STREAM_HEADER_LEN as u64;
    let tag_len = protection.tag_len();

    std::thread::scope(|s| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let protection = &protection;
            let mode = header.auth;
            s.spawn(move || verify_chunks(protection, mode, &work_rx, &done_tx));
        }
        drop(work_rx);
        drop(done_tx);
        let progress = opts.progress.clone();
        let writer = s.spawn(move || {
            write_chunks(
                &mut sink, done_rx, pool_tx, progress, start, wire_start, tag_len,
            )
        });
        let read = read_frames(&mut transport, chunk_size, &protection, &pool_rx, work_tx);
        drop(pool_rx);
        let written = writer.join().map_err(|_| StreamError::Panic)?;
        // A sink or verification error is the root cause; the reader then only saw the pipeline
        // stop, so report the writer's error first.
        let (hasher, compressed_chunks, _) = written?;
        let got = hasher.finish();
        let (end, wire) = match read {
            Ok(v) => v,
            Err(ReadError::Stream(e)) => return Err(e),
            Err(ReadError::PipelineStopped) => return Err(StreamError::Panic),
            Err(ReadError::Truncated) => {
                return Err(StreamError::Truncated {
                    chunks: got.chunks,
                    bytes: got.total_bytes,
                });
            }
        };
        if got != end {
            return Err(StreamError::EndMismatch {
                sent_chunks: end.chunks,
                sent_bytes: end.total_bytes,
                got_chunks: got.chunks,
                got_bytes: got.total_bytes,
            });
        }
        let summary = Summary {
            bytes_in: got.total_bytes,
            bytes_on_wire: wire,
            stream_hash: got.stream_hash,
            elapsed: start.elapsed(),
            chunks: got.chunks,
            compressed_chunks,
            modes: Vec::new(),
        };
        tracing::debug!(
            bytes = summary.bytes_in,
            wire = summary.bytes_on_wire,
            "stream received"
        );
        Ok(summary)
    })
}

fn tail(hb: &[u8; STREAM_HEADER_LEN]) -> [u8; 32] {
    let mut t = [0u8; 32];
    t.copy_from_slice(&hb[STREAM_HEADER_LEN - TAG_LEN..]);
    t
}

enum ReadError {
    Stream(StreamError),
    Truncated,
    PipelineStopped,
}

/// Reads frames until the end frame; returns its (verified) payload and the wire bytes read.
fn read_frames<R: Read>(
    transport: &mut R,
    chunk_size: u32,
    protection: &Protection,
    pool: &Receiver<Buffers>,
    work: Sender<Frame>,
) -> Result<(EndPayload, u64), ReadError> {
    let tag_len = protection.tag_len();
    let mut wire = STREAM_HEADER_LEN as u64;
    let mut seq = 0u64;
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ReadError::Truncated
        } else {
            ReadError::Stream(StreamError::Transport {
                stage: "receiving frames",
                source: e,
            })
        }
    };
    loop {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        if !read_exact_or_eof(transport, &mut hb).map_err(io)? {
            return Err(ReadError::Truncated);
        }
        let header = parse_frame_header(&hb, chunk_size)
            .map_err(|source| ReadError::Stream(StreamError::Frame { seq, source }))?;
        if header.seq != seq {
            return Err(ReadError::Stream(StreamError::OutOfOrder {
                expected: seq,
                got: header.seq,
            }));
        }
        wire += (FRAME_HEADER_LEN + header.payload_len as usize + tag_len) as u64;
        match header.kind {
            FrameKind::End => {
                let mut payload = [0u8; END_PAYLOAD_LEN];
                let mut tag = [0u8; MAX_TAG_LEN];
                read_all(transport, &mut payload).map_err(io)?;
                read_all(transport, &mut tag[..tag_len]).map_err(io)?;
                protection
                    .open_message(Direction::Frames, seq, &hb, &mut payload, &tag[..tag_len])
                    .map_err(|_| ReadError::Stream(StreamError::EndTag))?;
                return Ok((EndPayload::decode(&payload), wire));
            }
            FrameKind::Data => {
                let Ok(mut bufs) = pool.recv() else {
                    return Err(ReadError::PipelineStopped);
                };
                bufs.payload.resize(header.payload_len as usize);
                read_all(transport, &mut bufs.payload).map_err(io)?;
                let mut tag = [0u8; MAX_TAG_LEN];
                read_all(transport, &mut tag[..tag_len]).map_err(io)?;
                if work
                    .send(Frame {
                        header,
                        header_bytes: hb,
                        tag,
                        bufs,
                    })
                    .is_err()
                {
                    return Err(ReadError::PipelineStopped);
                }
                seq += 1;
            }
        }
    }
}

fn read_all<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if read_exact_or_eof(r, buf)? {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stream ended mid-frame",
        ))
    }
}

fn verify_chunks(
    protection: &Protection,
    auth: AuthMode,
    work: &Receiver<Frame>,
    done: &Sender<Result<Verified, StreamError>>,
) {
    let mut decompressor = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => {
            let _ = done.send(Err(StreamError::Decompress {
                seq: 0,
                reason: e.to_string(),
            }));
            return;
        }
    };
    while let Ok(frame) = work.recv() {
        let result = verify_one(protection, auth, &mut decompressor, frame);
        let stop = result.is_err();
        if done.send(result).is_err() || stop {
            return;
        }
    }
}

fn verify_one(
    protection: &Protection,
    auth: AuthMode,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    frame: Frame,
) -> Result<Verified, StreamError> {
    let Frame {
        header,
        header_bytes,
        tag,
        mut bufs,
    } = frame;
    let seq = header.seq;
    let len = header.raw_len as usize;
    let compressed = header.flags & FLAG_ZSTD != 0;
    let tag = &tag[..protection.tag_len()];
    // A sealed payload is authenticated before zstd ever sees it.
    protection
        .open_data(&header_bytes, seq, &mut bufs.payload, tag)
        .map_err(|_| StreamError::DataTag { seq })?;
    if compressed {
        bufs.raw.resize(len);
        // The length bound stops a crafted frame from inflating past the declared length.
        let n = decompressor
            .decompress_to_buffer(&bufs.payload, &mut *bufs.raw)
            .map_err(|e| StreamError::Decompress {
                seq,
                reason: e.to_string(),
            })?;
        if n != len {
            return Err(StreamError::Decompress {
                seq,
                reason: format!("got {n} bytes, frame declares {len}"),
            });
        }
    }
    let data: &[u8] = if compressed {
        &bufs.raw[..len]
    } else {
        &bufs.payload[..len]
    };
    // A raw sealed chunk was authenticated byte for byte by opening its seal; its digest is
    // that tag. Any other chunk is hashed: a compressed one's hash checks the decompressor's
    // output against the sender's chunk (through the stream hash when encrypting, through the
    // checksum below without a key).
    let digest = chunk_digest(auth, compressed, data, tag).ok_or(StreamError::DataTag { seq })?;
    protection
        .check_data(&header_bytes, digest.blake3(), tag)
        .map_err(|_| StreamError::DataTag { seq })?;
    Ok(Verified {
        seq,
        len,
        digest,
        compressed,
        bufs,
    })
}

type Written = (StreamHasher, u64, u64);

/// Most chunks the writer hands the sink in one vectored write: chunks that are ready together
/// go in one system call (one disk write for the `file:` sink), while the rest of the pool
/// stays free for the reader and the workers.
const MAX_BATCH: usize = 4;

impl Verified {
    /// The chunk's verified bytes.
    fn data(&self) -> &[u8] {
        if self.compressed {
            &self.bufs.raw[..self.len]
        } else {
            &self.bufs.payload[..self.len]
        }
    }
}

/// Writes the chunks of `batch`, in order, with as few vectored writes as the sink takes.
fn write_batch<W: Write>(sink: &mut W, batch: &[Verified]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|v| IoSlice::new(v.data())).collect();
    write_all_vectored(sink, &mut slices)
}

/// `Write::write_all_vectored` (not stable yet): every byte of `slices`, in order (the
/// receiver's batches into the sink, the sender's frames onto the transport).
pub(crate) fn write_all_vectored<W: Write>(
    sink: &mut W,
    slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    let mut rest = slices;
    // Drops leading empty slices: a write of nothing but empty slices would return 0.
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match sink.write_vectored(rest) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the writer took no bytes",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_chunks<W: Write>(
    sink: &mut W,
    done: Receiver<Result<Verified, StreamError>>,
    pool: Sender<Buffers>,
    progress: Option<crate::options::ProgressFn>,
    start: Instant,
    wire_start: u64,
    tag_len: usize,
) -> Result<Written, StreamError> {
    let mut hasher = StreamHasher::new();
    let mut compressed_chunks = 0u64;
    let mut wire = wire_start;
    let mut pending: BTreeMap<u64, Verified> = BTreeMap::new();
    let mut next = 0u64;
    let mut batch: Vec<Verified> = Vec::with_capacity(MAX_BATCH);
    for msg in done.iter() {
        let v = msg?;
        pending.insert(v.seq, v);
        // Whatever else the workers finished meanwhile (at most the pool's buffers).
        while let Ok(msg) = done.try_recv() {
            let v = msg?;
            pending.insert(v.seq, v);
        }
        // Every chunk that is next in order, up to MAX_BATCH per write.
        loop {
            while batch.len() < MAX_BATCH
                && let Some(v) = pending.remove(&next)
            {
                batch.push(v);
                next += 1;
            }
            if batch.is_empty() {
                break;
            }
            write_batch(sink, &batch).map_err(StreamError::SinkWrite)?;
            for v in batch.drain(..) {
                hasher.push(v.len, &v.digest);
                compressed_chunks += u64::from(v.compressed);
                wire += (FRAME_HEADER_LEN + v.bufs.payload.len() + tag_len) as u64;
                let _ = pool.send(v.bufs);
            }
            if let Some(p) = &progress {
                p(&Progress {
                    bytes_in: hasher.total_bytes(),
                    bytes_on_wire: wire,
                    elapsed: start.elapsed(),
                    mode: None,
                });
            }
        }
    }
    sink.flush().map_err(StreamError::SinkWrite)?;
    Ok((hasher, compressed_chunks, wire))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `max` bytes per call, from the first non-empty slice only (the default
    /// `write_vectored`), or nothing at all when `max` is 0.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_keep_every_byte_in_order_across_short_writes_and_empty_slices() {
        let parts: [&[u8]; 6] = [b"", b"abcdefg", b"", b"h", b"ijklmnopq", b""];
        let expected: Vec<u8> = parts.concat();
        for max in [1, 3, 100] {
            let mut sink = Trickle {
                out: Vec::new(),
                max,
            };
            let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            write_all_vectored(&mut sink, &mut slices).expect("write");
            assert_eq!(sink.out, expected, "max {max}");
        }
        // A sink that takes nothing is an error, not a loop; nothing but empty slices is no write.
        let mut stuck = Trickle {
            out: Vec::new(),
            max: 0,
        };
        let mut slices = [IoSlice::new(b"x")];
        let err = write_all_vectored(&mut stuck, &mut slices).expect_err("stuck sink");
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
        let mut empty = [IoSlice::new(b""), IoSlice::new(b"")];
        write_all_vectored(&mut stuck, &mut empty).expect("nothing to write");
    }
}
