//! [`AgentClient`]: one request per connection, HTTP/1.1 over mutual TLS, every stage
//! bounded by [`Timeouts`], and error answers read one way ([`ClientError::Refused`]: the
//! status and the agent's `{"error": "..."}`).
//!
//! What TLS trusts is the caller's [`rustls::ClientConfig`]: agents pass theirs, which
//! checks peers against the revocation list as it is on disk at every handshake;
//! `flockerctl` passes one built from a user certificate and the CA directory's list.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flocker_wire::transfer::{ReceiveParams, ReceiveReport, TakeOverRequest};
use flocker_wire::{ConvergeEvent, ConvergeRequest, NodeState, VolumeState};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::converge_body::ConvergeBody;
use crate::paths;
use crate::progress::{Activity, Tracked};

/// How long a converge's event stream may stay silent. Longer than an agent's own bound on
/// a silent peer (60 s), so that its failure event, naming the peer, arrives first.
pub const EVENT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whole answers (state, volume records, reports) beyond this are refused; only a
/// converge's event stream is read as it comes.
const MAX_ANSWER: usize = 64 << 20;

/// Request bodies: whole buffers or streams of volume data.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Wraps a buffer as a request body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request body streamed from `reader` (a volume push), so callers need no HTTP types.
pub fn body_from_reader(reader: impl tokio::io::AsyncRead + Send + Sync + 'static) -> Body {
    use futures_util::TryStreamExt;
    http_body_util::StreamBody::new(
        tokio_util::io::ReaderStream::new(reader).map_ok(hyper::body::Frame::data),
    )
    .boxed()
}

/// An empty request body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Errors talking to an agent. Each names the node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid node address {0:?}")]
    BadName(String),
    #[error("cannot connect to {node}: {source}")]
    Connect {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{node}: {stage} took longer than {after:?}")]
    Timeout {
        node: String,
        stage: &'static str,
        after: Duration,
    },
    #[error("{node}: http: {detail}")]
    Http { node: String, detail: String },
    /// The agent answered with an error status; `message` is its `error` field.
    #[error("{node} answered {status}: {message}")]
    Refused {
        node: String,
        status: StatusCode,
        message: String,
    },
    #[error("{node}: unreadable answer: {detail}")]
    Protocol { node: String, detail: String },
    #[error("{node}: converge sent nothing for {after:?}; it may still be running there")]
    Stalled { node: String, after: Duration },
}

impl ClientError {
    /// The HTTP status the agent refused with, if it answered at all.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The `error` field of an agent's error answer, or the raw body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// The bound of every stage of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the TCP connection to be established.
    pub connect: Duration,
    /// For the TLS handshake.
    pub handshake: Duration,
    /// For progress once connected: the agent taking request bytes, or sending answer
    /// bytes. A push of many gigabytes is fine as long as it keeps moving.
    pub idle: Duration,
    /// If set, for everything from the start of connecting to the answer's headers
    /// (`flockerctl --timeout`). Agents leave it unset: a push is answered only after its
    /// whole stream.
    pub answer: Option<Duration>,
    /// Between two events of a converge's event stream (agents report progress every second
    /// while they push volumes).
    pub events: Duration,
}

impl Default for Timeouts {
    /// The bounds of agents talking to each other.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            answer: None,
            events: EVENT_IDLE_TIMEOUT,
        }
    }
}

impl Timeouts {
    /// `flockerctl`'s bounds: connecting, the handshake and the answer's headers together
    /// within `timeout`, a silence of `timeout` while reading an answer, and
    /// [`EVENT_IDLE_TIMEOUT`] between two converge events.
    pub fn within(timeout: Duration) -> Self {
        Timeouts {
            connect: timeout,
            handshake: timeout,
            idle: timeout,
            answer: Some(timeout),
            events: EVENT_IDLE_TIMEOUT,
        }
    }
}

/// A connection's first step, for callers that cannot just connect: tests reach agents
/// inside network namespaces. Called with the node and port.
pub type Dialer = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// The client of the agent API at `NODE:port`, for every node.
#[derive(Clone)]
pub struct AgentClient {
    connector: TlsConnector,
    port: u16,
    timeouts: Timeouts,
    dialer: Option<Dialer>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("port", &self.port)
            .field("timeouts", &self.timeouts)
            .field("dialer", &self.dialer.is_some())
            .finish()
    }
}

/// Aborts the connection's task when the request is over or abandoned (a timeout), so a
/// silent agent holds nothing of ours.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An answer whose headers arrived; its body is still on the wire.
struct Answer<'a> {
    node: &'a str,
    status: StatusCode,
    body: Tracked<Incoming>,
    activity: Activity,
    idle: Duration,
    // Dropped after the body: the connection lives as long as the answer is read.
    _sender: SendRequest<Body>,
    _connection: Connection,
}

impl Answer<'_> {
    fn timeout(&self, stage: &'static str, after: Duration) -> ClientError {
        ClientError::Timeout {
            node: self.node.to_string(),
            stage,
            after,
        }
    }

    /// The whole body, bounded by progress and [`MAX_ANSWER`].
    async fn bytes(&mut self) -> Result<Bytes, ClientError> {
        let node = self.node;
        let body = &mut self.body;
        let read = async move {
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ClientError::Http {
                    node: node.to_string(),
                    detail: e.to_string(),
                })?;
                if let Some(data) = frame.data_ref() {
                    if bytes.len() + data.len() > MAX_ANSWER {
                        return Err(ClientError::Protocol {
                            node: node.to_string(),
                            detail: format!("answer larger than {MAX_ANSWER} bytes"),
                        });
                    }
                    bytes.extend_from_slice(data);
                }
            }
            Ok(Bytes::from(bytes))
        };
        let idle = self.idle;
        match self.activity.watch(idle, read).await {
            Some(result) => result,
            None => Err(self.timeout("answer (no progress)", idle)),
        }
    }

    /// Itself when the status is 2xx; otherwise the refusal with the agent's message.
    async fn success(mut self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        let body = self.bytes().await.unwrap_or_default();
        Err(ClientError::Refused {
            node: self.node.to_string(),
            status: self.status,
            message: error_message(&body),
        })
    }

    /// A 2xx answer's body as JSON.
    async fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, ClientError> {
        let mut answer = self.success().await?;
        let bytes = answer.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            node: answer.node.to_string(),
            detail: e.to_string(),
        })
    }
}

impl AgentClient {
    /// A client presenting and trusting what `config` says, with the default (agent to
    /// agent) [`Timeouts`].
    pub fn new(config: Arc<ClientConfig>, port: u16) -> Self {
        AgentClient {
            connector: TlsConnector::from(config),
            port,
            timeouts: Timeouts::default(),
            dialer: None,
        }
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The same client, connecting through `dialer`.
    pub fn with_dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// `GET /v1/health`: the agent's own description (address, backends, warnings).
    pub async fn health(&self, node: &str) -> Result<serde_json::Value, ClientError> {
        self.open(node, Method::GET, paths::HEALTH, empty(), false)
            .await?
            .json()
            .await
    }

    /// `GET /v1/state`.
    pub async fn state(&self, node: &str) -> Result<NodeState, ClientError> {
        self.open(node, Method::GET, paths::STATE, empty(), false)
            .await?
            .json()
            .await
    }

    /// `POST /v1/converge`: sends one phase's actions and returns the events the agent
    /// streamed back. `on_event` sees each event as it arrives (progress bars).
    pub async fn converge(
        &self,
        node: &str,
        request: &ConvergeRequest,
        on_event: impl FnMut(&ConvergeEvent),
    ) -> Result<Vec<ConvergeEvent>, ClientError> {
        let body = ConvergeBody::from_request(request).map_err(|e| ClientError::Protocol {
            node: node.to_string(),
            detail: format!("cannot encode the converge request: {e}"),
        })?;
        self.converge_encoded(node, body, on_event).await
    }

    /// [`AgentClient::converge`] with the request body as given, for tests that send what
    /// [`ConvergeRequest`] cannot hold.
    pub async fn converge_body(
        &self,
        node: &str,
        body: Vec<u8>,
        on_event: impl FnMut(&ConvergeEvent),
    ) -> Result<Vec<ConvergeEvent>, ClientError> {
        self.send_converge(node, full(body), on_event).await
    }

    /// [`AgentClient::converge`] with a request encoded in parts (the deploy driver's,
    /// whose route map is shared by every node's request).
    pub async fn converge_encoded(
        &self,
        node: &str,
        body: ConvergeBody,
        on_event: impl FnMut(&ConvergeEvent),
    ) -> Result<Vec<ConvergeEvent>, ClientError> {
        self.send_converge(node, body.into_body(), on_event).await
    }

    async fn send_converge(
        &self,
        node: &str,
        body: Body,
        mut on_event: impl FnMut(&ConvergeEvent),
    ) -> Result<Vec<ConvergeEvent>, ClientError> {
        let mut answer = self
            .open(node, Method::POST, paths::CONVERGE, body, true)
            .await?
            .success()
            .await?;
        let silence = self.timeouts.events;
        let mut events = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let Ok(frame) = tokio::time::timeout(silence, answer.body.frame()).await else {
                return Err(ClientError::Stalled {
                    node: node.to_string(),
                    after: silence,
                });
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| ClientError::Http {
                node: node.to_string(),
                detail: e.to_string(),
            })?;
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
                        detail: format!("bad event line: {e}"),
                    })?;
                on_event(&event);
                events.push(event);
            }
            if pending.len() > MAX_ANSWER {
                return Err(ClientError::Protocol {
                    node: node.to_string(),
                    detail: format!("event line longer than {MAX_ANSWER} bytes"),
                });
            }
        }
        Ok(events)
    }

    /// `GET /v1/volumes/NAME`: the node's copy of a volume, `None` when it has none.
    pub async fn volume(&self, node: &str, name: &str) -> Result<Option<VolumeState>, ClientError> {
        let answer = self
            .open(node, Method::GET, &paths::volume(name), empty(), false)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        answer.json().await.map(Some)
    }

    /// `POST /v1/volumes/NAME/receive`: pushes a volume stream; the answer comes once the
    /// receiver verified and applied all of it.
    pub async fn receive(
        &self,
        node: &str,
        name: &str,
        params: &ReceiveParams,
        stream: Body,
    ) -> Result<ReceiveReport, ClientError> {
        self.open(
            node,
            Method::POST,
            &paths::receive(name, params),
            stream,
            false,
        )
        .await?
        .json()
        .await
    }

    /// `POST /v1/volumes/NAME/handoff`: tells `node` it owns the volume now.
    pub async fn handoff(
        &self,
        node: &str,
        name: &str,
        request: &TakeOverRequest,
    ) -> Result<VolumeState, ClientError> {
        let json = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            node: node.to_string(),
            detail: format!("cannot encode the handoff request: {e}"),
        })?;
        self.open(node, Method::POST, &paths::handoff(name), full(json), true)
            .await?
            .json()
            .await
    }

    /// Any request, answered with its status and whole body whatever the status: for tests
    /// of how the agent refuses what the typed methods never send.
    pub async fn request(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut answer = self.open(node, method, path, body, false).await?;
        let bytes = answer.bytes().await?;
        Ok((answer.status, bytes))
    }

    async fn dial(&self, node: &str) -> std::io::Result<TcpStream> {
        match &self.dialer {
            Some(dial) => dial(node.to_string(), self.port).await,
            None => TcpStream::connect((node, self.port)).await,
        }
    }

    /// Connects, sends the request and waits for the answer's headers, within
    /// [`Timeouts::answer`] if set.
    async fn open<'a>(
        &self,
        node: &'a str,
        method: Method,
        path: &str,
        body: Body,
        json: bool,
    ) -> Result<Answer<'a>, ClientError> {
        let opening = self.open_unbounded(node, method, path, body, json);
        match self.timeouts.answer {
            None => opening.await,
            Some(limit) => tokio::time::timeout(limit, opening)
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Timeout {
                        node: node.to_string(),
                        stage: "answer",
                        after: limit,
                    })
                }),
        }
    }

    async fn open_unbounded<'a>(
        &self,
        node: &'a str,
        method: Method,
        path: &str,
        body: Body,
        json: bool,
    ) -> Result<Answer<'a>, ClientError> {
        let t = self.timeouts;
        let timeout = |stage: &'static str, after: Duration| ClientError::Timeout {
            node: node.to_string(),
            stage,
            after,
        };
        let connect = |source| ClientError::Connect {
            node: node.to_string(),
            source,
        };
        let http = |detail: String| ClientError::Http {
            node: node.to_string(),
            detail,
        };
        let name = ServerName::try_from(node.to_string())
            .map_err(|_| ClientError::BadName(node.to_string()))?;
        let tcp = tokio::time::timeout(t.connect, self.dial(node))
            .await
            .map_err(|_| timeout("connect", t.connect))?
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(t.handshake, self.connector.connect(name, tcp))
            .await
            .map_err(|_| timeout("TLS handshake", t.handshake))?
            .map_err(connect)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(e.to_string()))?;
        let connection = Connection(tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "agent connection ended");
            }
        }));
        let activity = Activity::default();
        let mut request = Request::builder().method(method).uri(path).header(
            hyper::header::HOST,
            flocker_wire::address::authority(node, self.port),
        );
        if json {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Tracked::new(body, activity.clone()).boxed())
            .map_err(|e| http(e.to_string()))?;
        let response = activity
            .watch(t.idle, sender.send_request(request))
            .await
            .ok_or_else(|| timeout("answer (no progress)", t.idle))?
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        Ok(Answer {
            node,
            status,
            body: Tracked::new(response.into_body(), activity.clone()),
            activity,
            idle: t.idle,
            _sender: sender,
            _connection: connection,
        })
    }
}
