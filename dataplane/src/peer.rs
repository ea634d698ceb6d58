//! The HTTP/1.1-over-mutual-TLS client agents use to talk to each other (volume queries,
//! pushes, ownership handoff), and that tests and tools can use to talk to an agent.
//!
//! Every stage has a bound ([`PeerTimeouts`]): connecting, the TLS handshake, and then
//! progress: a request fails once the peer has neither taken request bytes nor sent answer
//! bytes for `idle`, so a push of many gigabytes runs as long as it moves, and a silent peer
//! fails it (naming the peer) instead of holding the converge that called it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::idle::{Activity, Tracked};
pub use crate::limits::PeerTimeouts;

/// Request bodies: whole buffers or streams of volume data.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Errors talking to another agent.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connect to {node}: {source}")]
    Connect {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {node}: {stage} took longer than {after:?}")]
    Timeout {
        node: String,
        stage: &'static str,
        after: Duration,
    },
    #[error("invalid node name {0:?}")]
    BadName(String),
    #[error("http to {node}: {detail}")]
    Http { node: String, detail: String },
    #[error("{node} answered {status}: {message}")]
    Status {
        node: String,
        status: StatusCode,
        message: String,
    },
    #[error("{node} sent invalid JSON: {detail}")]
    Json { node: String, detail: String },
}

/// Wraps a buffer as a request body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A client for other agents at `node:port`.
#[derive(Clone)]
pub struct PeerClient {
    config: Arc<ClientConfig>,
    port: u16,
    timeouts: PeerTimeouts,
}

impl PeerClient {
    /// A client with the default [`PeerTimeouts`].
    pub fn new(config: Arc<ClientConfig>, port: u16) -> Self {
        PeerClient {
            config,
            port,
            timeouts: PeerTimeouts::default(),
        }
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, timeouts: PeerTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Sends one request on a fresh connection and returns status and whole body.
    pub async fn request(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let http = |detail: String| PeerError::Http {
            node: node.to_string(),
            detail,
        };
        let timeout = |stage: &'static str, after: Duration| PeerError::Timeout {
            node: node.to_string(),
            stage,
            after,
        };
        let t = self.timeouts;
        let tcp = tokio::time::timeout(t.connect, TcpStream::connect((node, self.port)))
            .await
            .map_err(|_| timeout("connect", t.connect))?
            .map_err(|source| PeerError::Connect {
                node: node.to_string(),
                source,
            })?;
        let name = ServerName::try_from(node.to_string())
            .map_err(|_| PeerError::BadName(node.to_string()))?;
        let tls = tokio::time::timeout(
            t.handshake,
            TlsConnector::from(self.config.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| timeout("TLS handshake", t.handshake))?
        .map_err(|source| PeerError::Connect {
            node: node.to_string(),
            source,
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(e.to_string()))?;
        // Ends with the request: dropping `sender` and the response closes the connection.
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "peer connection ended");
            }
        });
        let activity = Activity::default();
        let body = Tracked::new(body, activity.clone()).boxed();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, node)
            .body(body)
            .map_err(|e| http(e.to_string()))?;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = resp.status();
            let mut body = Tracked::new(resp.into_body(), activity.clone());
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| http(e.to_string()))?;
                if let Some(data) = frame.data_ref() {
                    bytes.extend_from_slice(data);
                }
            }
            Ok((status, Bytes::from(bytes)))
        };
        let result = activity.watch(t.idle, answer).await;
        if result.is_none() {
            conn.abort();
        }
        result.unwrap_or_else(|| Err(timeout("answer (no progress)", t.idle)))
    }

    /// Like [`PeerClient::request`], but a non-2xx status is an error and the body JSON.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<T, PeerError> {
        let (status, bytes) = self.request(node, method, path, body).await?;
        if !status.is_success() {
            return Err(PeerError::Status {
                node: node.to_string(),
                status,
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| PeerError::Json {
            node: node.to_string(),
            detail: e.to_string(),
        })
    }
}

/// The `error` field of an error answer, or the raw body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}
