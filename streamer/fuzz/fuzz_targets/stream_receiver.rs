//! Fuzz target: the stream receiver on arbitrary bytes.
//!
//! The first byte picks how the rest is fed:
//! - 0, 1: as the raw stream to `receive_stream` (no key; a pre-shared key);
//! - 2, 3: as what a peer sends over a duplex connection to `receive_over` (session
//!   handshake first; no key; a pre-shared key), the replies going nowhere;
//! - 4, 5: as a stream header and frames whose tags (and, for 5, the end frame's totals) the
//!   harness recomputes under the public no-key key, so inputs get past verification and
//!   reach decompression, sequencing, the end frame checks and the sink.
//!
//! Keyed BLAKE3 tags cannot be guessed by a fuzzer, so without modes 4 and 5 everything past
//! the header tag would stay unexplored. Any panic, hang or unbounded allocation is a bug.
#![no_main]

use std::io::{Read, Write};

use flocker_stream::format::{
    self, END_PAYLOAD_LEN, FLAG_ZSTD, FRAME_HEADER_LEN, STREAM_HEADER_LEN, StreamHasher, TAG_LEN,
};
use flocker_stream::{Auth, ReceiveOptions};
use libfuzzer_sys::fuzz_target;

const PSK: [u8; 32] = [0x42; 32];

fn opts(auth: Auth) -> ReceiveOptions {
    ReceiveOptions {
        threads: 1,
        auth,
        ..Default::default()
    }
}

/// A duplex connection whose reads come from the input and whose writes vanish.
struct Duplex<'a>(&'a [u8]);

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The frame key of a stream without a secret (public by design, see FORMAT.md).
fn integrity_key() -> [u8; 32] {
    blake3::derive_key("flocker-stream v1 integrity-only frame key", b"")
}

/// Rewrites `input` (stream header, then frames) with valid tags; with `fix_end`, the end
/// frame's payload also carries the totals and hash of the data frames before it.
fn with_valid_tags(input: &[u8], fix_end: bool) -> Vec<u8> {
    let key = integrity_key();
    let mut out = Vec::with_capacity(input.len() + 64);
    let body_len = STREAM_HEADER_LEN - TAG_LEN;
    if input.len() < body_len {
        return input.to_vec();
    }
    let (body, mut rest) = input.split_at(body_len);
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::keyed_hash(&key, body).as_bytes());
    let mut hasher = StreamHasher::new();
    let mut decompressor = zstd::bulk::Decompressor::new().ok();
    while rest.len() >= FRAME_HEADER_LEN {
        let (h, tail) = rest.split_at(FRAME_HEADER_LEN);
        let mut header = [0u8; FRAME_HEADER_LEN];
        header.copy_from_slice(h);
        let declared = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let take = declared.min(tail.len());
        let (payload, tail) = tail.split_at(take);
        rest = tail;
        out.extend_from_slice(&header);
        if header[0] == 2 {
            let mut end = [0u8; END_PAYLOAD_LEN];
            let n = payload.len().min(END_PAYLOAD_LEN);
            end[..n].copy_from_slice(&payload[..n]);
            if fix_end {
                end = hasher.finish().encode();
            }
            let p = if declared == END_PAYLOAD_LEN {
                &end[..]
            } else {
                payload
            };
            out.extend_from_slice(p);
            out.extend_from_slice(format::end_tag(&key, &header, p).as_bytes());
            break;
        }
        out.extend_from_slice(payload);
        let raw_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let chunk = if header[1] & FLAG_ZSTD != 0 {
            decompressor
                .as_mut()
                .and_then(|d| d.decompress(payload, raw_len.min(1 << 24)).ok())
                .unwrap_or_default()
        } else {
            payload.to_vec()
        };
        // Mode 0: every chunk's digest is its BLAKE3 (FORMAT.md, "Stream hash").
        let hash = blake3::hash(&chunk);
        hasher.push(chunk.len(), &format::ChunkDigest::Blake3(hash));
        out.extend_from_slice(format::data_tag(&key, &header, &hash).as_bytes());
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut sink = std::io::sink();
    match mode % 6 {
        0 => {
            let _ = flocker_stream::receive_stream(rest, &mut sink, &opts(Auth::None));
        }
        1 => {
            let _ = flocker_stream::receive_stream(rest, &mut sink, &opts(Auth::PresharedKey(PSK)));
        }
        2 | 3 => {
            let auth = if mode % 6 == 2 {
                Auth::None
            } else {
                Auth::PresharedKey(PSK)
            };
            let mut conn = Duplex(rest);
            let mut out = flocker_stream::backend::WriterSink(std::io::sink());
            let _ = flocker_stream::receive_over(&mut conn, &mut out, &opts(auth));
        }
        m => {
            let wire = with_valid_tags(rest, m == 5);
            let _ = flocker_stream::receive_stream(&wire[..], &mut sink, &opts(Auth::None));
        }
    }
});
