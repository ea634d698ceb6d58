//! A client for one node agent's API over mutual TLS: `GET /v1/state` and
//! `POST /v1/converge` (whose answer is a stream of newline-delimited [`ConvergeEvent`]s).
//!
//! The agent's certificate must chain to the cluster CA, name the node's address and not be
//! on the CA directory's revocation list; ours is a user certificate issued by
//! `flockerctl ca user`.
//!
//! Every wait is bounded: connecting, the handshake and the answer's headers together by the
//! client's timeout, and a converge's event stream by [`EVENT_IDLE_TIMEOUT`] between two
//! events (agents report progress every second while they push volumes).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flocker_wire::{ConvergeEvent, ConvergeRequest, NodeState};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long a converge's event stream may stay silent. Longer than an agent's own bound on
/// a silent peer (60 s), so that its failure event, naming the peer, arrives first.
pub const EVENT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors talking to one agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid node address {0:?}")]
    Address(String),
    #[error("cannot connect to {node}: {source}")]
    Connect {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{node}: {source}")]
    Http {
        node: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{node}: {status}: {message}")]
    Refused {
        node: String,
        status: StatusCode,
        message: String,
    },
    #[error("{node}: unreadable answer: {reason}")]
    Protocol { node: String, reason: String },
    #[error("{node}: no answer within {0:?}", .timeout)]
    Timeout { node: String, timeout: Duration },
    #[error("{node}: converge sent nothing for {0:?}; it may still be running there", .after)]
    Stalled { node: String, after: Duration },
}

/// Where the credentials of a user live: a CA directory as `flockerctl ca` writes it.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The revocation list agents' certificates are checked against, if any.
    pub crl: Option<PathBuf>,
}

impl Credentials {
    /// `DIR/cluster.crt`, `DIR/users/USER.crt`, `DIR/users/USER.key`, and `DIR/cluster.crl`
    /// if it exists (CA directories made before revocation existed have none).
    pub fn from_ca_dir(dir: &Path, user: &str) -> Credentials {
        let crl = dir.join("cluster.crl");
        Credentials {
            ca_cert: dir.join("cluster.crt"),
            cert: dir.join("users").join(format!("{user}.crt")),
            key: dir.join("users").join(format!("{user}.key")),
            crl: crl.exists().then_some(crl),
        }
    }
}

/// The `error` field of an agent's error answer, or the raw body.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Warns when a private key can be read by group or others.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "private key {} is readable by group or others (mode {mode:o}); `chmod 600` it",
                path.display()
            );
        }
    }
}

/// Connection settings shared by every request to every agent.
#[derive(Clone)]
pub struct AgentClient {
    connector: TlsConnector,
    port: u16,
    timeout: Duration,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Credentials {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl AgentClient {
    pub fn new(
        credentials: &Credentials,
        port: u16,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let bad = |path: &Path, reason: String| ClientError::Credentials {
            path: path.to_path_buf(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        let ca_pem = read_pem(&credentials.ca_cert)?;
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| bad(&credentials.ca_cert, e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| bad(&credentials.ca_cert, e.to_string()))?;
        }
        let cert_pem = read_pem(&credentials.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&credentials.cert, e.to_string()))?;
        warn_if_exposed(&credentials.key);
        let key = PrivateKeyDer::from_pem_slice(&read_pem(&credentials.key)?)
            .map_err(|e| bad(&credentials.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if let Some(crl) = &credentials.crl {
            let crls = CertificateRevocationListDer::pem_slice_iter(&read_pem(crl)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(crl, e.to_string()))?;
            verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
        }
        let verifier = verifier
            .build()
            .map_err(|e| bad(&credentials.ca_cert, e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)?;
        Ok(AgentClient {
            connector: TlsConnector::from(Arc::new(config)),
            port,
            timeout,
        })
    }

    /// The node's state, as `GET /v1/state` reports it.
    pub async fn state(&self, node: &str) -> Result<NodeState, ClientError> {
        let body = self
            .with_timeout(node, self.request(node, Method::GET, "/v1/state", None))
            .await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            node: node.to_string(),
            reason: e.to_string(),
        })
    }

    /// Sends one phase's actions and returns the events the agent streamed back.
    /// `on_event` sees each event as it arrives (progress bars).
    pub async fn converge(
        &self,
        node: &str,
        request: &ConvergeRequest,
        mut on_event: impl FnMut(&ConvergeEvent),
    ) -> Result<Vec<ConvergeEvent>, ClientError> {
        let json = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            node: node.to_string(),
            reason: e.to_string(),
        })?;
        let mut response = self
            .with_timeout(
                node,
                self.send(node, Method::POST, "/v1/converge", Some(json)),
            )
            .await?;
        let mut events = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let http = |source| ClientError::Http {
            node: node.to_string(),
            source,
        };
        loop {
            let Ok(frame) = tokio::time::timeout(EVENT_IDLE_TIMEOUT, response.frame()).await else {
                return Err(ClientError::Stalled {
                    node: node.to_string(),
                    after: EVENT_IDLE_TIMEOUT,
                });
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(http)?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let event: ConvergeEvent =
                    serde_json::from_slice(line).map_err(|e| ClientError::Protocol {
                        node: node.to_string(),
                        reason: format!("bad event line: {e}"),
                    })?;
                on_event(&event);
                events.push(event);
            }
        }
        Ok(events)
    }

    async fn with_timeout<T>(
        &self,
        node: &str,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                node: node.to_string(),
                timeout: self.timeout,
            })?
    }

    async fn request(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let response = self.send(node, method, path, body).await?;
        let bytes = response
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                node: node.to_string(),
                source,
            })?
            .to_bytes();
        Ok(bytes)
    }

    /// Connects, sends one request, and returns the response body once the status is 2xx.
    async fn send(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::body::Incoming, ClientError> {
        let server_name = match node.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(node.to_string())
                .map_err(|_| ClientError::Address(node.to_string()))?,
        };
        let connect = |source| ClientError::Connect {
            node: node.to_string(),
            source,
        };
        let tcp = TcpStream::connect((node, self.port))
            .await
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(server_name, tcp)
            .await
            .map_err(connect)?;
        let http = |source| ClientError::Http {
            node: node.to_string(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", node)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol {
                node: node.to_string(),
                reason: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.into_body());
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(ClientError::Refused {
            node: node.to_string(),
            status,
            message: error_message(&body),
        })
    }
}
