//! The wire format (see `streamer/FORMAT.md`): the stream header, data and end frames, and the
//! keyed BLAKE3 checksums of the no-key mode (the encrypting modes' seals are in
//! [`crate::seal`]).
//!
//! Everything here is pure: encoding, decoding and tag computation, no I/O beyond `Read`/`Write`.

use std::io::{self, Read, Write};

use crate::seal::AEAD_TAG_LEN;

/// Bytes every stream starts with.
pub const MAGIC: [u8; 8] = *b"FLKSTRM\0";
/// The only version this build speaks; a receiver refuses any other.
pub const VERSION: u16 = 3;
/// Length of the stream header on the wire, tag included.
pub const STREAM_HEADER_LEN: usize = 8 + 2 + 1 + 1 + 4 + 32 + 32;
/// Length of a frame header on the wire.
pub const FRAME_HEADER_LEN: usize = 24;
/// Length of the stream header's tag and of a checksum tag (keyed BLAKE3 output); sealed
/// frames carry shorter tags ([`crate::seal::AEAD_TAG_LEN`]).
pub const TAG_LEN: usize = 32;
/// Smallest chunk size a sender may announce.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size a sender may announce; bounds what a receiver allocates per frame.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Length of the end frame's payload.
pub const END_PAYLOAD_LEN: usize = 8 + 8 + 32;

/// How frames are keyed, as announced in the stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No secret: tags are a checksum against corruption only (TLS or `--insecure`).
    None = 0,
    /// Key derived from a pre-shared key and the sender's nonce only (one-way transports).
    PresharedOneWay = 1,
    /// Key derived from a pre-shared key and both peers' nonces (see `session`).
    Session = 2,
}

impl AuthMode {
    /// Decodes the header byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::None),
            1 => Some(Self::PresharedOneWay),
            2 => Some(Self::Session),
            _ => None,
        }
    }

    /// Whether frames are encrypted (every mode with a pre-shared key).
    pub fn encrypts(self) -> bool {
        !matches!(self, Self::None)
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none (unauthenticated)",
            Self::PresharedOneWay => "pre-shared key (one-way)",
            Self::Session => "pre-shared key (session handshake)",
        }
    }
}

/// The first bytes of every stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Protocol version.
    pub version: u16,
    /// How the frame key is derived.
    pub auth: AuthMode,
    /// Largest uncompressed chunk that follows.
    pub chunk_size: u32,
    /// The sender's fresh nonce.
    pub nonce: [u8; 32],
}

impl StreamHeader {
    /// The header bytes the tag covers.
    pub fn body(&self) -> [u8; STREAM_HEADER_LEN - TAG_LEN] {
        let mut b = [0u8; STREAM_HEADER_LEN - TAG_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.auth as u8;
        b[11] = 0;
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..48].copy_from_slice(&self.nonce);
        b
    }

    /// Writes the header and its tag under `key`.
    pub fn write_to(&self, w: &mut impl Write, key: &[u8; 32]) -> io::Result<()> {
        let body = self.body();
        let tag = blake3::keyed_hash(key, &body);
        w.write_all(&body)?;
        w.write_all(tag.as_bytes())
    }
}

/// Why a stream header was refused, before any key is involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The first bytes are not the magic.
    #[error("not a flocker-stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The sender speaks another version.
    #[error("wire format version mismatch: sender speaks v{got}, this receiver speaks v{VERSION}")]
    Version {
        /// The sender's version.
        got: u16,
    },
    /// The auth byte is unknown.
    #[error("unknown auth mode {0} in stream header")]
    AuthMode(u8),
    /// The chunk size is out of bounds.
    #[error("chunk size {0} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
}

/// Parses a header body (without its tag); the caller verifies the tag once it knows the key.
pub fn parse_stream_header(
    b: &[u8; STREAM_HEADER_LEN - TAG_LEN],
) -> Result<StreamHeader, HeaderError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[0..8]);
    if magic != MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(HeaderError::Version { got: version });
    }
    let auth = AuthMode::from_byte(b[10]).ok_or(HeaderError::AuthMode(b[10]))?;
    let chunk_size = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(HeaderError::ChunkSize(chunk_size));
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&b[16..48]);
    Ok(StreamHeader {
        version,
        auth,
        chunk_size,
        nonce,
    })
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A chunk of the stream.
    Data = 1,
    /// The last frame: totals and the whole-stream hash.
    End = 2,
}

/// Flag bit: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;

/// A frame header as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Data or end.
    pub kind: FrameKind,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
    /// Uncompressed length of a data chunk (0 for the end frame).
    pub raw_len: u32,
    /// Position in the stream: data frames count from 0, the end frame takes the next number.
    pub seq: u64,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b
    }
}

/// Why a frame header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Unknown flag bits or non-zero reserved bytes.
    #[error("frame has unknown flags {0:#04x} or non-zero reserved bytes")]
    Reserved(u8),
    /// A length exceeds what the header allows.
    #[error(
        "frame lengths out of bounds (payload {payload_len}, raw {raw_len}, chunk size {chunk_size})"
    )]
    Length {
        /// Payload length claimed.
        payload_len: u32,
        /// Raw length claimed.
        raw_len: u32,
        /// The stream's chunk size.
        chunk_size: u32,
    },
}

/// Largest payload a data frame may carry for `chunk_size` (a compressed chunk is only sent if
/// smaller than the raw one, so the raw size bounds both).
pub fn max_payload(chunk_size: u32) -> u32 {
    chunk_size
}

/// Parses and bounds-checks a frame header.
pub fn parse_frame_header(
    b: &[u8; FRAME_HEADER_LEN],
    chunk_size: u32,
) -> Result<FrameHeader, FrameError> {
    let kind = match b[0] {
        1 => FrameKind::Data,
        2 => FrameKind::End,
        k => return Err(FrameError::Kind(k)),
    };
    let flags = b[1];
    if flags & !FLAG_ZSTD != 0 || b[2..4] != [0, 0] || b[12..16] != [0; 4] {
        return Err(FrameError::Reserved(flags));
    }
    let payload_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let raw_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[16..24]);
    let seq = u64::from_le_bytes(seq);
    let ok = match kind {
        FrameKind::Data => {
            raw_len > 0
                && raw_len <= chunk_size
                && payload_len <= max_payload(chunk_size)
                && (flags & FLAG_ZSTD != 0 || payload_len == raw_len)
        }
        FrameKind::End => flags == 0 && raw_len == 0 && payload_len as usize == END_PAYLOAD_LEN,
    };
    if !ok {
        return Err(FrameError::Length {
            payload_len,
            raw_len,
            chunk_size,
        });
    }
    Ok(FrameHeader {
        kind,
        flags,
        payload_len,
        raw_len,
        seq,
    })
}

/// Tag of a data frame: binds the header (kind, flags, lengths, sequence number) to the
/// BLAKE3 hash of the chunk's uncompressed bytes.
pub fn data_tag(
    key: &[u8; 32],
    header: &[u8; FRAME_HEADER_LEN],
    chunk_hash: &blake3::Hash,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header);
    h.update(chunk_hash.as_bytes());
    h.finalize()
}

/// Checksum of the end frame (and of the acknowledgement): `H(key, header ‖ payload)`.
pub fn end_tag(key: &[u8; 32], header: &[u8], payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header);
    h.update(payload);
    h.finalize()
}

/// The end frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndPayload {
    /// Uncompressed bytes in the stream.
    pub total_bytes: u64,
    /// Data frames in the stream.
    pub chunks: u64,
    /// The whole-stream hash (see [`StreamHasher`]).
    pub stream_hash: [u8; 32],
}

impl EndPayload {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; END_PAYLOAD_LEN] {
        let mut b = [0u8; END_PAYLOAD_LEN];
        b[0..8].copy_from_slice(&self.total_bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.chunks.to_le_bytes());
        b[16..48].copy_from_slice(&self.stream_hash);
        b
    }

    /// Decodes the payload.
    pub fn decode(b: &[u8; END_PAYLOAD_LEN]) -> Self {
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[0..8]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[8..16]);
        let mut stream_hash = [0u8; 32];
        stream_hash.copy_from_slice(&b[16..48]);
        Self {
            total_bytes: u64::from_le_bytes(t),
            chunks: u64::from_le_bytes(c),
            stream_hash,
        }
    }
}

/// What the stream hash takes of one chunk (see [`chunk_digest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkDigest {
    /// BLAKE3 of the uncompressed chunk: every chunk without a key, compressed chunks with one.
    Blake3(blake3::Hash),
    /// The GCM tag of the frame that carried the chunk raw in an encrypting mode; the seal
    /// authenticates exactly the chunk's bytes, so the chunk is not hashed.
    SealTag([u8; AEAD_TAG_LEN]),
}

impl ChunkDigest {
    /// The BLAKE3 of the chunk, when that is the digest (what a mode-0 checksum covers).
    pub fn blake3(&self) -> Option<&blake3::Hash> {
        match self {
            Self::Blake3(h) => Some(h),
            Self::SealTag(_) => None,
        }
    }

    /// The kind byte and the digest bytes, as the stream hash takes them.
    fn kind_and_bytes(&self) -> (u8, &[u8]) {
        match self {
            Self::Blake3(h) => (1, h.as_bytes()),
            Self::SealTag(t) => (2, t),
        }
    }
}

/// A chunk's digest, the one rule both ends apply (FORMAT.md, "Stream hash"): the GCM `tag` of
/// its frame when `mode` encrypts and the chunk went raw, otherwise BLAKE3 of `data`, the
/// uncompressed chunk. Only what the rule picks is read: `data` is not hashed for a raw sealed
/// chunk, and `tag` is not read otherwise (a mode-0 sender computes the digest before the
/// checksum that covers it, with an empty `tag`).
///
/// `None` when a raw sealed chunk's tag is not an AES-GCM tag's length.
pub fn chunk_digest(
    mode: AuthMode,
    compressed: bool,
    data: &[u8],
    tag: &[u8],
) -> Option<ChunkDigest> {
    if mode.encrypts() && !compressed {
        tag.try_into().ok().map(ChunkDigest::SealTag)
    } else {
        Some(ChunkDigest::Blake3(blake3::hash(data)))
    }
}

/// Domain separation of the version-3 stream hash.
const STREAM_HASH_CONTEXT: &[u8] = b"flocker-stream v3 stream hash";

/// The whole-stream hash: BLAKE3 over the in-order list of (chunk length, digest kind, chunk
/// digest), closed with the totals. Both ends compute it from what they sent and what they
/// verified. Without a key it depends only on the chunks (and the chunk size; it is not `b3sum`
/// of the stream); with a key a raw chunk's digest is its GCM tag, so it also depends on the
/// stream's key and differs between two streams of the same data.
#[derive(Debug, Clone, Default)]
pub struct StreamHasher {
    hasher: blake3::Hasher,
    total_bytes: u64,
    chunks: u64,
}

impl StreamHasher {
    /// Starts an empty hash.
    pub fn new() -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(STREAM_HASH_CONTEXT);
        Self {
            hasher,
            total_bytes: 0,
            chunks: 0,
        }
    }

    /// Folds in the next chunk: its uncompressed length and its digest.
    pub fn push(&mut self, len: usize, digest: &ChunkDigest) {
        let (kind, bytes) = digest.kind_and_bytes();
        self.hasher.update(&(len as u64).to_le_bytes());
        self.hasher.update(&[kind]);
        self.hasher.update(bytes);
        self.total_bytes += len as u64;
        self.chunks += 1;
    }

    /// Bytes folded so far.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Closes the hash and returns the end payload.
    pub fn finish(&self) -> EndPayload {
        let mut h = self.hasher.clone();
        h.update(&self.total_bytes.to_le_bytes());
        h.update(&self.chunks.to_le_bytes());
        EndPayload {
            total_bytes: self.total_bytes,
            chunks: self.chunks,
            stream_hash: *h.finalize().as_bytes(),
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
pub fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended mid-frame",
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = StreamHeader {
            version: VERSION,
            auth: AuthMode::Session,
            chunk_size: 1 << 20,
            nonce: [7; 32],
        };
        assert_eq!(parse_stream_header(&h.body()), Ok(h));
    }

    #[test]
    fn header_rejects_other_versions_naming_both() {
        for got in [1, 2, 4] {
            let h = StreamHeader {
                version: got,
                auth: AuthMode::None,
                chunk_size: 1 << 20,
                nonce: [0; 32],
            };
            let e = parse_stream_header(&h.body()).expect_err("other version");
            assert_eq!(e, HeaderError::Version { got });
            assert_eq!(
                e.to_string(),
                format!(
                    "wire format version mismatch: sender speaks v{got}, this receiver speaks v3"
                )
            );
        }
    }

    #[test]
    fn a_raw_sealed_chunk_is_digested_by_its_tag_only() {
        let tag = [9u8; AEAD_TAG_LEN];
        for mode in [AuthMode::PresharedOneWay, AuthMode::Session] {
            let a = chunk_digest(mode, false, b"one chunk", &tag);
            // The data is not read: another chunk under the same tag gives the same digest.
            assert_eq!(a, chunk_digest(mode, false, b"another", &tag));
            assert_eq!(a, Some(ChunkDigest::SealTag(tag)));
            assert_eq!(chunk_digest(mode, false, b"x", &[9u8; 32]), None);
            // A compressed chunk keeps its BLAKE3, which checks the decompressor's output.
            assert_eq!(
                chunk_digest(mode, true, b"one chunk", &tag),
                Some(ChunkDigest::Blake3(blake3::hash(b"one chunk")))
            );
        }
        // Without a key every chunk is hashed and the tag is never read.
        for compressed in [false, true] {
            assert_eq!(
                chunk_digest(AuthMode::None, compressed, b"one chunk", &[]),
                Some(ChunkDigest::Blake3(blake3::hash(b"one chunk")))
            );
        }
    }

    #[test]
    fn the_stream_hash_tells_digest_kinds_apart() {
        // A BLAKE3 digest whose first 16 bytes equal a seal tag must not collide with it.
        let hash = blake3::hash(b"chunk");
        let mut tag = [0u8; AEAD_TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..AEAD_TAG_LEN]);
        let mut a = StreamHasher::new();
        a.push(5, &ChunkDigest::Blake3(hash));
        let mut b = StreamHasher::new();
        b.push(5, &ChunkDigest::SealTag(tag));
        assert_ne!(a.finish().stream_hash, b.finish().stream_hash);
        // Same chunks, same digests: the same hash; the length counts.
        let mut c = StreamHasher::new();
        c.push(5, &ChunkDigest::Blake3(hash));
        assert_eq!(a.finish(), c.finish());
        let mut d = StreamHasher::new();
        d.push(6, &ChunkDigest::Blake3(hash));
        assert_ne!(a.finish().stream_hash, d.finish().stream_hash);
    }

    #[test]
    fn frame_header_round_trip_and_bounds() {
        let f = FrameHeader {
            kind: FrameKind::Data,
            flags: FLAG_ZSTD,
            payload_len: 10,
            raw_len: 100,
            seq: 42,
        };
        assert_eq!(parse_frame_header(&f.encode(), 4096), Ok(f));
        let big = FrameHeader { raw_len: 5000, ..f };
        assert!(matches!(
            parse_frame_header(&big.encode(), 4096),
            Err(FrameError::Length { .. })
        ));
        let raw_mismatch = FrameHeader { flags: 0, ..f };
        assert!(matches!(
            parse_frame_header(&raw_mismatch.encode(), 4096),
            Err(FrameError::Length { .. })
        ));
    }
}
