//! TCP connections, optionally wrapped in mutual TLS with certificates from the cluster CA.
//!
//! [`Conn`] is a blocking duplex byte stream ready for [`crate::send_over`] /
//! [`crate::receive_over`]. With TLS both ends present a certificate signed by the CA: the
//! client checks the server's name, the server checks the client's chain.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file could not be read or parsed.
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Connecting, listening or accepting failed.
    #[error("{stage} {addr}: {source}")]
    Io {
        /// What was attempted.
        stage: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster CA certificate(s).
    pub ca: PathBuf,
    /// This end's certificate chain.
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustls::pki_types::pem::Error) -> TransportError + 'a {
    move |e| TransportError::Pem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn load(
    files: &TlsFiles,
) -> Result<
    (
        RootCertStore,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ),
    TransportError,
> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&files.ca).map_err(pem_err("CA certificate", &files.ca))?
    {
        let cert = cert.map_err(pem_err("CA certificate", &files.ca))?;
        roots.add(cert).map_err(|e| TransportError::Pem {
            what: "CA certificate",
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TransportError::Pem {
            what: "CA certificate",
            path: files.ca.clone(),
            reason: "no certificate".into(),
        });
    }
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(pem_err("certificate", &files.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificate", &files.cert))?;
    if chain.is_empty() {
        return Err(TransportError::Pem {
            what: "certificate",
            path: files.cert.clone(),
            reason: "no certificate".into(),
        });
    }
    crate::auth::warn_if_exposed(&files.key, "private key");
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(pem_err("private key", &files.key))?;
    Ok((roots, chain, key))
}

/// Client side of mutual TLS.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TransportError> {
    let (roots, chain, key) = load(files)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Server side of mutual TLS: clients must present a certificate signed by the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TransportError> {
    let (roots, chain, key) = load(files)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TransportError::Config(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// A connected stream, plain or TLS.
pub enum Conn {
    /// Plain TCP (authenticated by the pre-shared key handshake, or `--insecure`).
    Plain(TcpStream),
    /// TLS, connecting side.
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// TLS, accepting side.
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, tcp) = match self {
            Self::Plain(s) => ("plain", s),
            Self::TlsClient(s) => ("tls-client", &s.sock),
            Self::TlsServer(s) => ("tls-server", &s.sock),
        };
        write!(f, "Conn({kind}, {:?})", tcp.peer_addr().ok())
    }
}

impl Conn {
    /// The underlying socket.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::TlsClient(s) => &s.sock,
            Self::TlsServer(s) => &s.sock,
        }
    }

    /// Ends the conversation cleanly: TLS close_notify, then a TCP half-close.
    pub fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(_) => {}
            Self::TlsClient(s) => {
                s.conn.send_close_notify();
                s.flush()?;
            }
            Self::TlsServer(s) => {
                s.conn.send_close_notify();
                s.flush()?;
            }
        }
        match self.tcp().shutdown(Shutdown::Write) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Conn {
    /// A socket timeout shows up as `WouldBlock` ("resource temporarily unavailable"); say
    /// what it is instead.
    fn explain_timeout(
        &self,
        e: std::io::Error,
        what: &str,
        timeout: Option<Duration>,
    ) -> std::io::Error {
        match (e.kind(), timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer {what} nothing for {t:?} (timeout)"),
                )
            }
            _ => e,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = match self {
            Self::Plain(s) => s.read(buf),
            Self::TlsClient(s) => s.read(buf),
            Self::TlsServer(s) => s.read(buf),
        };
        r.map_err(|e| {
            let t = self.tcp().read_timeout().ok().flatten();
            self.explain_timeout(e, "sent", t)
        })
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = match self {
            Self::Plain(s) => s.write(buf),
            Self::TlsClient(s) => s.write(buf),
            Self::TlsServer(s) => s.write(buf),
        };
        r.map_err(|e| {
            let t = self.tcp().write_timeout().ok().flatten();
            self.explain_timeout(e, "accepted", t)
        })
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let r = match self {
            Self::Plain(s) => s.write_vectored(bufs),
            Self::TlsClient(s) => s.write_vectored(bufs),
            Self::TlsServer(s) => s.write_vectored(bufs),
        };
        r.map_err(|e| {
            let t = self.tcp().write_timeout().ok().flatten();
            self.explain_timeout(e, "accepted", t)
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::TlsClient(s) => s.flush(),
            Self::TlsServer(s) => s.flush(),
        }
    }
}

/// Connects to `addr` (`host:port`), with TLS if `tls` is given; `server_name` defaults to the
/// host part of `addr`.
pub fn connect(
    addr: &str,
    tls: Option<(Arc<ClientConfig>, Option<String>)>,
) -> Result<Conn, TransportError> {
    let io = |stage| {
        move |source| TransportError::Io {
            stage,
            addr: addr.to_owned(),
            source,
        }
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(io("resolve"))?.collect();
    let tcp = TcpStream::connect(&addrs[..]).map_err(io("connect to"))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Conn::Plain(tcp)),
        Some((cfg, name)) => {
            let host = name.unwrap_or_else(|| host_part(addr).to_owned());
            let server_name =
                ServerName::try_from(host.clone()).map_err(|_| TransportError::ServerName(host))?;
            let conn = ClientConnection::new(cfg, server_name)
                .map_err(|e| TransportError::Config(e.to_string()))?;
            Ok(Conn::TlsClient(Box::new(StreamOwned::new(conn, tcp))))
        }
    }
}

fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Binds a listener.
pub fn listen(addr: &str) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr).map_err(|source| TransportError::Io {
        stage: "listen on",
        addr: addr.to_owned(),
        source,
    })
}

/// Accepts one connection, with TLS if `tls` is given.
pub fn accept(
    listener: &TcpListener,
    tls: Option<Arc<ServerConfig>>,
) -> Result<Conn, TransportError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (tcp, peer) = listener.accept().map_err(|source| TransportError::Io {
        stage: "accept on",
        addr,
        source,
    })?;
    tracing::info!(%peer, "accepted");
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Conn::Plain(tcp)),
        Some(cfg) => {
            let conn =
                ServerConnection::new(cfg).map_err(|e| TransportError::Config(e.to_string()))?;
            Ok(Conn::TlsServer(Box::new(StreamOwned::new(conn, tcp))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_part;

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("node-a:7000"), "node-a");
        assert_eq!(host_part("[::1]:7000"), "::1");
        assert_eq!(host_part("198.18.0.1:1"), "198.18.0.1");
    }
}
