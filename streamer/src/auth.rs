//! How frames are keyed: [`Auth`] as the caller chooses it, and the frame keys derived from it.
//!
//! Without a secret ([`Auth::None`]) the frame key is a public constant and frames carry keyed
//! BLAKE3 checksums in the clear, which only catch corruption; the transport must provide
//! authenticity and confidentiality (mutual TLS) or the user chose `--insecure`. With a
//! pre-shared key, the frame key is derived from the key and fresh nonces, and frames are
//! sealed under it ([`crate::seal`]), so they are secret and cannot be forged or replayed into
//! another stream.

use crate::format::AuthMode;

/// How the stream is authenticated.
#[derive(Clone, Default)]
pub enum Auth {
    /// No secret: the transport is already authenticated (the agent uses mutual TLS) or the
    /// user passed `--insecure`. Tags still detect corruption.
    #[default]
    None,
    /// A 32-byte pre-shared key on a one-way transport: the frame key is derived from the key
    /// and the sender's fresh nonce. Frames cannot be forged or moved between streams, but a
    /// whole recorded stream could be replayed, since the receiver contributes no nonce. Over a
    /// duplex connection use [`crate::session`], which derives [`Auth::Session`] from both
    /// peers' nonces.
    PresharedKey([u8; 32]),
    /// A key agreed by [`crate::session`]'s handshake (pre-shared key + both peers' nonces).
    Session(SessionKey),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        match self {
            Self::None => f.write_str("Auth::None"),
            Self::PresharedKey(_) => f.write_str("Auth::PresharedKey(..)"),
            Self::Session(_) => f.write_str("Auth::Session(..)"),
        }
    }
}

/// The outcome of a session handshake: a per-connection frame key and the sender's nonce the
/// stream header must carry.
#[derive(Clone)]
pub struct SessionKey {
    pub(crate) key: [u8; 32],
    pub(crate) client_nonce: [u8; 32],
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

const INTEGRITY_CONTEXT: &str = "flocker-stream v1 integrity-only frame key";
const ONE_WAY_CONTEXT: &str = "flocker-stream v1 one-way frame key";
pub(crate) const SESSION_CONTEXT: &str = "flocker-stream v1 session frame key";

/// The public key used when there is no secret.
pub(crate) fn integrity_key() -> [u8; 32] {
    blake3::derive_key(INTEGRITY_CONTEXT, b"")
}

pub(crate) fn one_way_key(psk: &[u8; 32], nonce: &[u8; 32]) -> [u8; 32] {
    let mut material = [0u8; 64];
    material[..32].copy_from_slice(psk);
    material[32..].copy_from_slice(nonce);
    blake3::derive_key(ONE_WAY_CONTEXT, &material)
}

/// A fresh random nonce from the OS.
pub(crate) fn fresh_nonce() -> Result<[u8; 32], std::io::Error> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

impl Auth {
    /// The mode announced in the header.
    pub(crate) fn mode(&self) -> AuthMode {
        match self {
            Self::None => AuthMode::None,
            Self::PresharedKey(_) => AuthMode::PresharedOneWay,
            Self::Session(_) => AuthMode::Session,
        }
    }

    /// The sender's nonce and frame key.
    pub(crate) fn sender_key(&self) -> Result<([u8; 32], [u8; 32]), std::io::Error> {
        Ok(match self {
            Self::None => (fresh_nonce()?, integrity_key()),
            Self::PresharedKey(psk) => {
                let nonce = fresh_nonce()?;
                (nonce, one_way_key(psk, &nonce))
            }
            Self::Session(s) => (s.client_nonce, s.key),
        })
    }

    /// The receiver's frame key for a header carrying `nonce`; `None` if the header's nonce is
    /// not the one this session agreed on.
    pub(crate) fn receiver_key(&self, nonce: &[u8; 32]) -> Option<[u8; 32]> {
        match self {
            Self::None => Some(integrity_key()),
            Self::PresharedKey(psk) => Some(one_way_key(psk, nonce)),
            Self::Session(s) => (s.client_nonce == *nonce).then_some(s.key),
        }
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("key file {path} must hold 32 raw bytes or 64 hex digits")]
    Format {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// Reads a pre-shared key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
/// `head -c32 /dev/urandom > key` or `openssl rand -hex 32 > key` both make one.
pub fn read_key_file(path: &std::path::Path) -> Result<[u8; 32], KeyError> {
    warn_if_exposed(path, "pre-shared key");
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_key(&bytes).ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
    })
}

/// Warns when a secret file (`what`: a pre-shared or private key) can be read by group or
/// others: whoever can read it can authenticate as us.
pub fn warn_if_exposed(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} {} is readable by group or others (mode {mode:o}); `chmod 600` it",
                path.display()
            );
        }
    }
}

fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    if bytes.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(bytes);
        return Some(k);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, byte) in k.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_and_hex_keys() {
        assert_eq!(parse_key(&[9u8; 32]), Some([9u8; 32]));
        let hex = format!("{}\n", "ab".repeat(32));
        assert_eq!(parse_key(hex.as_bytes()), Some([0xab; 32]));
        assert_eq!(parse_key(b"short"), None);
    }

    #[test]
    fn one_way_keys_depend_on_nonce() {
        assert_ne!(
            one_way_key(&[1; 32], &[2; 32]),
            one_way_key(&[1; 32], &[3; 32])
        );
    }
}
