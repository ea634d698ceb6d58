//! A stream over a duplex connection: a handshake with fresh nonces from both peers, the stream,
//! then the receiver's acknowledgement, so the sender learns whether the sink committed.
//!
//! ```text
//! client -> server  hello:   "FLKHELLO" version:u16 mode:u8 0:u8 client_nonce[32]
//! server -> client  reply:   "FLKHELLO" version:u16 mode:u8 status:u8 server_nonce[32] confirm[32]
//! client -> server  confirm: confirm[32]
//! client -> server  the stream (format.rs), keyed with K (sealed with a pre-shared key)
//! server -> client  ack:     "FLKACK\0\0" status:u8 0[3] len:u32 message[len] tag[16 or 32]
//! ```
//! With a pre-shared key, `K = BLAKE3-derive_key("flocker-stream v1 session frame key",
//! psk || client_nonce || server_nonce)`, so a recorded stream cannot be replayed into another
//! connection. Each confirm is a keyed hash under K proving the peer holds the same key, so a
//! wrong key is reported by both ends before any data moves. Without a key (TLS or
//! `--insecure`), K is the public integrity key. The acknowledgement is protected as the frames
//! are ([`crate::seal`]): sealed with a pre-shared key (its own nonce direction), checksummed
//! without.

use std::io::{Read, Write};

use crate::auth::{Auth, SESSION_CONTEXT, SessionKey, fresh_nonce, integrity_key};
use crate::backend::{Sink, Source};
use crate::error::StreamError;
use crate::format::VERSION;
use crate::options::{ReceiveOptions, SendOptions, Summary};
use crate::seal::{Direction, MAX_TAG_LEN, Protection};

const HELLO_MAGIC: [u8; 8] = *b"FLKHELLO";
const ACK_MAGIC: [u8; 8] = *b"FLKACK\0\0";
const HELLO_LEN: usize = 8 + 2 + 1 + 1 + 32;
const REPLY_LEN: usize = HELLO_LEN + 32;
const MAX_ACK_MESSAGE: usize = 4096;

const STATUS_OK: u8 = 0;
const STATUS_VERSION: u8 = 1;
const STATUS_MODE: u8 = 2;

fn mode_byte(auth: &Auth) -> Result<u8, StreamError> {
    match auth {
        Auth::None => Ok(0),
        Auth::PresharedKey(_) => Ok(1),
        Auth::Session(_) => Err(StreamError::Options(
            "a session key cannot start another session".into(),
        )),
    }
}

fn mode_name(b: u8) -> &'static str {
    match b {
        0 => "no key (TLS or --insecure)",
        1 => "a pre-shared key",
        _ => "an unknown mode",
    }
}

fn session_key(auth: &Auth, client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> [u8; 32] {
    match auth {
        Auth::PresharedKey(psk) => {
            let mut m = [0u8; 96];
            m[..32].copy_from_slice(psk);
            m[32..64].copy_from_slice(client_nonce);
            m[64..].copy_from_slice(server_nonce);
            blake3::derive_key(SESSION_CONTEXT, &m)
        }
        _ => integrity_key(),
    }
}

fn confirm(key: &[u8; 32], role: &[u8], hello: &[u8], server_nonce: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(hello);
    h.update(server_nonce);
    h.finalize()
}

fn hs_io(stage: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |e| StreamError::Handshake(format!("{stage}: {e}"))
}

/// The connecting side's handshake; returns the auth to stream with.
pub fn client_handshake<S: Read + Write>(conn: &mut S, auth: &Auth) -> Result<Auth, StreamError> {
    let mode = mode_byte(auth)?;
    let client_nonce = fresh_nonce().map_err(hs_io("generating a nonce"))?;
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&HELLO_MAGIC);
    hello[8..10].copy_from_slice(&VERSION.to_le_bytes());
    hello[10] = mode;
    hello[12..].copy_from_slice(&client_nonce);
    conn.write_all(&hello)
        .and_then(|()| conn.flush())
        .map_err(hs_io("sending hello"))?;
    let mut reply = [0u8; REPLY_LEN];
    conn.read_exact(&mut reply).map_err(hs_io(
        "reading the receiver's reply (is it a flocker-stream receiver?)",
    ))?;
    if reply[..8] != HELLO_MAGIC {
        return Err(StreamError::Handshake(
            "the peer is not a flocker-stream receiver".into(),
        ));
    }
    let version = u16::from_le_bytes([reply[8], reply[9]]);
    match reply[11] {
        STATUS_OK => {}
        STATUS_VERSION => {
            return Err(StreamError::Handshake(format!(
                "wire format version mismatch: receiver speaks v{version}, this sender v{VERSION}"
            )));
        }
        STATUS_MODE => {
            return Err(StreamError::AuthMismatch {
                sender: mode_name(mode),
                receiver: mode_name(reply[10]),
            });
        }
        s => {
            return Err(StreamError::Handshake(format!(
                "receiver refused with unknown status {s}"
            )));
        }
    }
    let mut server_nonce = [0u8; 32];
    server_nonce.copy_from_slice(&reply[12..44]);
    let key = session_key(auth, &client_nonce, &server_nonce);
    let mine = confirm(&key, b"client", &hello, &server_nonce);
    conn.write_all(mine.as_bytes())
        .and_then(|()| conn.flush())
        .map_err(hs_io("sending confirm"))?;
    let theirs = blake3::Hash::from_bytes(reply[44..76].try_into().unwrap_or([0; 32]));
    if confirm(&key, b"server", &hello, &server_nonce) != theirs {
        return Err(StreamError::Handshake(
            "authentication failed: the receiver holds a different pre-shared key".into(),
        ));
    }
    Ok(match auth {
        Auth::PresharedKey(_) => Auth::Session(SessionKey { key, client_nonce }),
        _ => Auth::None,
    })
}

/// The listening side's handshake; returns the auth to receive with.
pub fn server_handshake<S: Read + Write>(conn: &mut S, auth: &Auth) -> Result<Auth, StreamError> {
    let mode = mode_byte(auth)?;
    let mut hello = [0u8; HELLO_LEN];
    conn.read_exact(&mut hello)
        .map_err(hs_io("reading the sender's hello"))?;
    if hello[..8] != HELLO_MAGIC {
        return Err(StreamError::Handshake(
            "the peer is not a flocker-stream sender".into(),
        ));
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    let server_nonce = fresh_nonce().map_err(hs_io("generating a nonce"))?;
    let mut reply = [0u8; REPLY_LEN];
    reply[..8].copy_from_slice(&HELLO_MAGIC);
    reply[8..10].copy_from_slice(&VERSION.to_le_bytes());
    reply[10] = mode;
    reply[12..44].copy_from_slice(&server_nonce);
    let refuse = |conn: &mut S, mut reply: [u8; REPLY_LEN], status: u8| {
        reply[11] = status;
        let _ = conn.write_all(&reply).and_then(|()| conn.flush());
    };
    if version != VERSION {
        refuse(conn, reply, STATUS_VERSION);
        return Err(StreamError::Handshake(format!(
            "wire format version mismatch: sender speaks v{version}, this receiver v{VERSION}"
        )));
    }
    if hello[10] != mode {
        refuse(conn, reply, STATUS_MODE);
        return Err(StreamError::AuthMismatch {
            sender: mode_name(hello[10]),
            receiver: mode_name(mode),
        });
    }
    let mut client_nonce = [0u8; 32];
    client_nonce.copy_from_slice(&hello[12..44]);
    let key = session_key(auth, &client_nonce, &server_nonce);
    reply[44..].copy_from_slice(confirm(&key, b"server", &hello, &server_nonce).as_bytes());
    conn.write_all(&reply)
        .and_then(|()| conn.flush())
        .map_err(hs_io("sending reply"))?;
    let mut theirs = [0u8; 32];
    conn.read_exact(&mut theirs).map_err(hs_io(
        "reading the sender's confirm (wrong key on the sender?)",
    ))?;
    if confirm(&key, b"client", &hello, &server_nonce) != blake3::Hash::from_bytes(theirs) {
        return Err(StreamError::Handshake(
            "authentication failed: the sender holds a different pre-shared key".into(),
        ));
    }
    Ok(match auth {
        Auth::PresharedKey(_) => Auth::Session(SessionKey { key, client_nonce }),
        _ => Auth::None,
    })
}

/// How the acknowledgement is protected: as the session's frames are.
fn ack_protection(auth: &Auth) -> Result<Protection, StreamError> {
    let (mode, key) = match auth {
        Auth::Session(s) => (auth.mode(), s.key),
        _ => (crate::format::AuthMode::None, integrity_key()),
    };
    Protection::new(mode, &key).map_err(|_| StreamError::Seal)
}

/// Sends the receiver's verdict.
fn write_ack<S: Write>(
    conn: &mut S,
    auth: &Auth,
    result: &Result<Summary, StreamError>,
) -> Result<(), StreamError> {
    let (status, mut msg) = match result {
        Ok(s) => (STATUS_OK, s.stream_hash_hex()),
        Err(e) => (1, e.to_string()),
    };
    if msg.len() > MAX_ACK_MESSAGE {
        let mut cut = MAX_ACK_MESSAGE;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&ACK_MAGIC);
    head[8] = status;
    head[12..].copy_from_slice(&(msg.len() as u32).to_le_bytes());
    let mut body = msg.into_bytes();
    let tag = ack_protection(auth)?
        .seal_message(Direction::Ack, 0, &head, &mut body)
        .map_err(|_| StreamError::Seal)?;
    let mut write = || -> std::io::Result<()> {
        conn.write_all(&head)?;
        conn.write_all(&body)?;
        conn.write_all(tag.as_slice())?;
        conn.flush()
    };
    write().map_err(StreamError::transport("sending the acknowledgement"))
}

/// Reads the receiver's verdict: `Ok(())` if it committed the same stream.
fn read_ack<S: Read>(conn: &mut S, auth: &Auth, summary: &Summary) -> Result<(), StreamError> {
    let mut head = [0u8; 16];
    conn.read_exact(&mut head).map_err(|e| StreamError::Transport {
        stage: "waiting for the receiver's acknowledgement (receiver killed or connection cut?)",
        source: e,
    })?;
    if head[..8] != ACK_MAGIC {
        return Err(StreamError::Peer("malformed acknowledgement".into()));
    }
    let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as usize;
    if len > MAX_ACK_MESSAGE {
        return Err(StreamError::Peer("malformed acknowledgement".into()));
    }
    let protection = ack_protection(auth)?;
    let mut body = vec![0u8; len];
    let mut tag = [0u8; MAX_TAG_LEN];
    let tag = &mut tag[..protection.tag_len()];
    conn.read_exact(&mut body)
        .and_then(|()| conn.read_exact(tag))
        .map_err(|e| StreamError::Peer(format!("acknowledgement cut short ({e})")))?;
    protection
        .open_message(Direction::Ack, 0, &head, &mut body, tag)
        .map_err(|_| StreamError::Peer("acknowledgement failed authentication".into()))?;
    let msg = String::from_utf8_lossy(&body).into_owned();
    if head[8] != STATUS_OK {
        return Err(StreamError::Peer(msg));
    }
    if msg != summary.stream_hash_hex() {
        return Err(StreamError::Peer(format!(
            "receiver committed stream hash {msg}, sender sent {}",
            summary.stream_hash_hex()
        )));
    }
    Ok(())
}

/// Sends `source` over a duplex connection: handshake, stream, then waits for the receiver to
/// report that its sink committed. Errors name the failing end.
pub fn send_over<S: Read + Write + Send>(
    source: &mut dyn Source,
    conn: &mut S,
    opts: &SendOptions,
) -> Result<Summary, StreamError> {
    let auth = client_handshake(conn, &opts.auth)?;
    let session_opts = SendOptions {
        auth: auth.clone(),
        ..opts.clone()
    };
    let sent = {
        let reader = source.open()?;
        crate::send::send_stream(reader, &mut *conn, &session_opts)
    };
    let summary = match sent {
        Err(e @ StreamError::Transport { .. }) => {
            // The receiver may have said why it stopped; that is the better message.
            if let Err(StreamError::Peer(why)) = read_ack(conn, &auth, &empty_summary()) {
                return Err(StreamError::Peer(why));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
        Ok(s) => s,
    };
    read_ack(conn, &auth, &summary)?;
    Ok(summary)
}

fn empty_summary() -> Summary {
    Summary {
        bytes_in: 0,
        bytes_on_wire: 0,
        stream_hash: [0; 32],
        elapsed: std::time::Duration::ZERO,
        chunks: 0,
        compressed_chunks: 0,
        modes: Vec::new(),
    }
}

/// Receives one stream from a duplex connection into `sink`: handshake, stream, commit (or abort
/// on any failure), then tells the sender the outcome.
pub fn receive_over<S: Read + Write + Send>(
    conn: &mut S,
    sink: &mut dyn Sink,
    opts: &ReceiveOptions,
) -> Result<Summary, StreamError> {
    let session = server_handshake(conn, &opts.auth)?;
    receive_authenticated(conn, sink, opts, &session)
}

/// The part of [`receive_over`] after the handshake: receives the stream keyed by `session`
/// (what [`server_handshake`] or [`crate::listener::accept_authenticated`] returned) into
/// `sink`, commits or aborts it, and tells the sender the outcome.
pub fn receive_authenticated<S: Read + Write + Send>(
    conn: &mut S,
    sink: &mut dyn Sink,
    opts: &ReceiveOptions,
    session: &Auth,
) -> Result<Summary, StreamError> {
    let session_opts = ReceiveOptions {
        auth: session.clone(),
        ..opts.clone()
    };
    let result = receive_into(&mut *conn, sink, &session_opts);
    if let Err(e) = write_ack(conn, session, &result) {
        tracing::warn!(error = %e, "could not send the acknowledgement");
    }
    result
}

/// Receives a stream into `sink` and commits it, or aborts the sink on any failure.
pub fn receive_into<R: Read + Send>(
    transport: R,
    sink: &mut dyn Sink,
    opts: &ReceiveOptions,
) -> Result<Summary, StreamError> {
    let writer = sink.open()?;
    let result = crate::receive::receive_stream(transport, writer, opts);
    match result {
        Ok(summary) => match sink.commit() {
            Ok(()) => Ok(summary),
            Err(e) => {
                if let Err(abort) = sink.abort() {
                    tracing::error!(error = %abort, "aborting the sink after a failed commit also failed");
                }
                Err(StreamError::Backend(e))
            }
        },
        Err(e) => match sink.abort() {
            Err(abort) => {
                tracing::error!(error = %abort, "aborting the sink failed");
                Err(e)
            }
            // The consumer's own words ("out of space") explain a broken pipe better.
            Ok(Some(said)) => match e {
                StreamError::SinkWrite(io) => Err(StreamError::SinkWrite(std::io::Error::new(
                    io.kind(),
                    format!("{io}; the sink said: {said}"),
                ))),
                other => Err(other),
            },
            Ok(None) => Err(e),
        },
    }
}

/// Sends `source` over a one-way transport and reaps the source.
pub fn send_from<W: Write + Send>(
    source: &mut dyn Source,
    transport: W,
    opts: &SendOptions,
) -> Result<Summary, StreamError> {
    let reader = source.open()?;
    crate::send::send_stream(reader, transport, opts)
}
