//! The version-3 stream hash: both ends compute the same value in every mode; a raw chunk in an
//! encrypting mode enters it by its GCM tag (it is not hashed), every other chunk by its BLAKE3;
//! and a compressed chunk whose decompressed bytes differ from the sender's is refused.

mod common;

use flocker_stream::backend::{ReaderSource, WriterSink};
use flocker_stream::format::{
    AuthMode, ChunkDigest, END_PAYLOAD_LEN, FLAG_ZSTD, FRAME_HEADER_LEN, FrameHeader, FrameKind,
    STREAM_HEADER_LEN, StreamHasher, StreamHeader, VERSION,
};
use flocker_stream::seal::{AEAD_TAG_LEN, CHECKSUM_TAG_LEN, Direction, Protection};
use flocker_stream::{
    Auth, Compression, ReceiveOptions, SendOptions, StreamError, Summary, receive_stream,
    send_stream,
};

const CHUNK: usize = 64 * 1024;
const PSK: [u8; 32] = [0x5a; 32];

/// Compressible chunks, then incompressible ones, then compressible again with a short tail:
/// a fixed level sends both kinds of frame.
fn mixed() -> Vec<u8> {
    let mut d = common::text_bytes(3 * CHUNK);
    d.extend_from_slice(&common::random_bytes(3 * CHUNK, 11));
    d.extend_from_slice(&common::text_bytes(CHUNK + 777));
    d
}

fn opts(auth: Auth) -> (SendOptions, ReceiveOptions) {
    (
        SendOptions {
            auth: auth.clone(),
            chunk_size: CHUNK as u32,
            compression: Compression::Fixed(3),
            threads: 2,
            ..Default::default()
        },
        ReceiveOptions {
            auth,
            threads: 2,
            ..Default::default()
        },
    )
}

fn one_way(auth: Auth, data: &[u8]) -> (Summary, Summary, Vec<u8>) {
    let (so, ro) = opts(auth);
    let mut wire = Vec::new();
    let sent = send_stream(data, &mut wire, &so).expect("send");
    let mut out = Vec::new();
    let got = receive_stream(&wire[..], &mut out, &ro).expect("receive");
    assert_eq!(out, data);
    (sent, got, wire)
}

/// The stream hash recomputed from the wire by the rule of FORMAT.md, independently of the
/// pipeline: per data frame, BLAKE3 of the uncompressed chunk, except a raw frame's GCM tag
/// when the stream encrypts (a sealed compressed payload is opened to get at its chunk).
fn stream_hash_from_wire(wire: &[u8], frame_key: Option<[u8; 32]>) -> [u8; 32] {
    let mode = if frame_key.is_some() {
        AuthMode::PresharedOneWay
    } else {
        AuthMode::None
    };
    let opener = frame_key.map(|k| Protection::new(mode, &k).expect("key"));
    let tag_len = if mode.encrypts() {
        AEAD_TAG_LEN
    } else {
        CHECKSUM_TAG_LEN
    };
    let mut hasher = StreamHasher::new();
    let mut at = STREAM_HEADER_LEN;
    loop {
        let h = &wire[at..at + FRAME_HEADER_LEN];
        if h[0] == FrameKind::End as u8 {
            return hasher.finish().stream_hash;
        }
        let payload_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let raw_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let seq = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        let body = at + FRAME_HEADER_LEN;
        let mut payload = wire[body..body + payload_len].to_vec();
        let tag = &wire[body + payload_len..body + payload_len + tag_len];
        if let Some(p) = &opener {
            let header: [u8; FRAME_HEADER_LEN] = h.try_into().expect("header");
            p.open_data(&header, seq, &mut payload, tag).expect("open");
        }
        let digest = if h[1] & FLAG_ZSTD != 0 {
            let chunk = zstd::bulk::decompress(&payload, raw_len).expect("zstd");
            ChunkDigest::Blake3(blake3::hash(&chunk))
        } else if mode.encrypts() {
            ChunkDigest::SealTag(tag.try_into().expect("16 bytes"))
        } else {
            ChunkDigest::Blake3(blake3::hash(&payload))
        };
        hasher.push(raw_len, &digest);
        at = body + payload_len + tag_len;
    }
}

#[test]
fn both_ends_compute_the_same_stream_hash_in_every_mode() {
    let data = mixed();

    // Mode 0 (no key) and mode 1 (pre-shared key, one-way).
    for auth in [Auth::None, Auth::PresharedKey(PSK)] {
        let keyed = matches!(auth, Auth::PresharedKey(_));
        let (sent, got, wire) = one_way(auth.clone(), &data);
        assert_eq!(sent.stream_hash, got.stream_hash, "keyed {keyed}");
        assert!(
            sent.compressed_chunks > 0 && sent.compressed_chunks < sent.chunks,
            "both kinds of frame: {} of {} compressed",
            sent.compressed_chunks,
            sent.chunks
        );
        let frame_key = keyed.then(|| {
            let nonce: [u8; 32] = wire[16..48].try_into().expect("nonce");
            let mut material = [0u8; 64];
            material[..32].copy_from_slice(&PSK);
            material[32..].copy_from_slice(&nonce);
            blake3::derive_key("flocker-stream v1 one-way frame key", &material)
        });
        assert_eq!(
            stream_hash_from_wire(&wire, frame_key),
            sent.stream_hash,
            "keyed {keyed}: the hash follows FORMAT.md's rule"
        );

        // A second stream of the same data: without a key the same hash; with one, raw chunks
        // enter by their tags under a fresh key, so the hash differs.
        let (again, _, _) = one_way(auth, &data);
        if keyed {
            assert_ne!(again.stream_hash, sent.stream_hash);
        } else {
            assert_eq!(again.stream_hash, sent.stream_hash);
        }
    }

    // Mode 2 (session handshake) and mode 0 over a duplex connection, where the sender also
    // checks the hash the receiver acknowledges.
    for auth in [Auth::PresharedKey(PSK), Auth::None] {
        let (so, ro) = opts(auth);
        let mut out = Vec::new();
        let (sent, got) = common::over_tcp(
            &mut ReaderSource(Some(&data[..])),
            &mut WriterSink(&mut out),
            &so,
            &ro,
        );
        let (sent, got) = (sent.expect("send"), got.expect("receive"));
        assert_eq!(sent.stream_hash, got.stream_hash);
        assert!(sent.compressed_chunks > 0 && sent.compressed_chunks < sent.chunks);
        assert_eq!(out, data);
    }
}

/// A hand-made one-way PSK stream of one compressed data frame carrying `sent_chunk`, whose
/// end frame carries the totals and hash of `claimed_chunk`: what a sender whose chunk and
/// compressed payload disagree (or a receiver whose decompressor is wrong) would produce.
fn crafted_stream(sent_chunk: &[u8], claimed_chunk: &[u8]) -> Vec<u8> {
    let nonce = [3u8; 32];
    let mut material = [0u8; 64];
    material[..32].copy_from_slice(&PSK);
    material[32..].copy_from_slice(&nonce);
    let key = blake3::derive_key("flocker-stream v1 one-way frame key", &material);
    let protection = Protection::new(AuthMode::PresharedOneWay, &key).expect("key");
    let mut wire = Vec::new();
    StreamHeader {
        version: VERSION,
        auth: AuthMode::PresharedOneWay,
        chunk_size: CHUNK as u32,
        nonce,
    }
    .write_to(&mut wire, &key)
    .expect("header");

    let mut payload = zstd::bulk::compress(sent_chunk, 3).expect("zstd");
    assert!(payload.len() < sent_chunk.len(), "the chunk compresses");
    let header = FrameHeader {
        kind: FrameKind::Data,
        flags: FLAG_ZSTD,
        payload_len: payload.len() as u32,
        raw_len: sent_chunk.len() as u32,
        seq: 0,
    }
    .encode();
    let tag = protection
        .seal_data(&header, 0, &mut payload, None)
        .expect("seal");
    wire.extend_from_slice(&header);
    wire.extend_from_slice(&payload);
    wire.extend_from_slice(tag.as_slice());

    let mut hasher = StreamHasher::new();
    hasher.push(
        claimed_chunk.len(),
        &ChunkDigest::Blake3(blake3::hash(claimed_chunk)),
    );
    let mut end = hasher.finish().encode();
    let end_header = FrameHeader {
        kind: FrameKind::End,
        flags: 0,
        payload_len: END_PAYLOAD_LEN as u32,
        raw_len: 0,
        seq: 1,
    }
    .encode();
    let tag = protection
        .seal_message(Direction::Frames, 1, &end_header, &mut end)
        .expect("seal end");
    wire.extend_from_slice(&end_header);
    wire.extend_from_slice(&end);
    wire.extend_from_slice(tag.as_slice());
    wire
}

#[test]
fn a_compressed_chunk_whose_decompressed_bytes_differ_is_refused() {
    let chunk = common::text_bytes(CHUNK);
    let mut other = chunk.clone();
    other[CHUNK / 2] ^= 0x20;
    let (_, ro) = opts(Auth::PresharedKey(PSK));

    // The control: the hand-made stream is well-formed when chunk and hash agree.
    let mut out = Vec::new();
    let got = receive_stream(&crafted_stream(&chunk, &chunk)[..], &mut out, &ro)
        .expect("a consistent crafted stream");
    assert_eq!(out, chunk);
    assert_eq!(got.compressed_chunks, 1);

    // Every seal opens, but the decompressed chunk's BLAKE3 is not the sender's: refused.
    let e = receive_stream(&crafted_stream(&chunk, &other)[..], Vec::new(), &ro)
        .expect_err("decompressed bytes differ");
    assert!(matches!(e, StreamError::EndMismatch { .. }), "{e}");
}

#[test]
fn a_tampered_raw_sealed_frame_is_refused_before_the_sink() {
    let data = common::random_bytes(4 * CHUNK, 5);
    let (sent, _, wire) = one_way(Auth::PresharedKey(PSK), &data);
    assert_eq!(sent.compressed_chunks, 0, "random data goes raw");
    let (_, ro) = opts(Auth::PresharedKey(PSK));
    let frame = FRAME_HEADER_LEN + CHUNK + AEAD_TAG_LEN;
    // A bit of frame 2's ciphertext, of its tag, and frame 2's tag put on frame 1's bytes.
    let second = STREAM_HEADER_LEN + 2 * frame;
    let mut flipped = wire.clone();
    flipped[second + FRAME_HEADER_LEN + 1000] ^= 1;
    let mut bad_tag = wire.clone();
    bad_tag[second + frame - 1] ^= 0x80;
    let mut swapped_tag = wire.clone();
    let first_tag = STREAM_HEADER_LEN + 2 * frame - AEAD_TAG_LEN;
    let second_tag = second + frame - AEAD_TAG_LEN;
    let t = wire[second_tag..second_tag + AEAD_TAG_LEN].to_vec();
    swapped_tag[first_tag..first_tag + AEAD_TAG_LEN].copy_from_slice(&t);
    for (w, what, seq) in [
        (flipped, "ciphertext", 2),
        (bad_tag, "tag", 2),
        (swapped_tag, "another frame's tag", 1),
    ] {
        let mut out = Vec::new();
        let e = receive_stream(&w[..], &mut out, &ro).expect_err(what);
        assert!(
            matches!(e, StreamError::DataTag { seq: s } if s == seq),
            "{what}: {e}"
        );
        assert!(out.len() <= seq as usize * CHUNK, "{what}");
        assert_eq!(&out[..], &data[..out.len()], "{what}: only verified bytes");
    }
}
