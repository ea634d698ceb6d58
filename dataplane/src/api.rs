//! The agent's HTTP/1.1 API over mutual TLS:
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | `/v1/health` | liveness, address, backends and routing warnings |
//! | GET | `/v1/state` | [`flocker_wire::NodeState`] |
//! | POST | `/v1/converge` | [`flocker_wire::ConvergeRequest`] in, NDJSON [`flocker_wire::ConvergeEvent`]s out |
//! | GET | `/v1/volumes/NAME` | this node's copy of a volume |
//! | POST | `/v1/volumes/NAME/receive?...` | a pushed volume stream (agent to agent) |
//! | POST | `/v1/volumes/NAME/handoff` | "you own NAME at epoch e" (agent to agent) |
//!
//! Errors are `{"error": "..."}` with a 4xx status for requests that were refused before
//! anything changed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream_shim::ReceiverStream;

use crate::agent::{Agent, AgentError, ReceiveParams, TakeOverRequest, event_line};

/// Request bodies beyond this are refused (converge requests are small JSON).
const MAX_JSON_BODY: usize = 16 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// Errors of the server itself (not of single requests).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &AgentError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(error = %e, "request failed");
    } else {
        tracing::info!(error = %e, %status, "request refused");
    }
    json_response(status, &serde_json::json!({ "error": e.to_string() }))
}

async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
    what: &str,
) -> Result<T, AgentError> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| AgentError::BadRequest(format!("{what}: reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| AgentError::BadRequest(format!("invalid {what}: {e}")))
}

/// The verified certificate the peer presented during the handshake.
pub type PeerCert = Option<CertificateDer<'static>>;

fn require_node(peer: &PeerCert, node: &str, what: &str) -> Result<(), AgentError> {
    if peer
        .as_ref()
        .is_some_and(|c| crate::tls::is_node_certificate(c, node))
    {
        Ok(())
    } else {
        Err(AgentError::Forbidden(format!(
            "{what}: only the agent of {node} may send this, with its node certificate"
        )))
    }
}

/// Routes one request.
pub async fn handle(
    agent: Arc<Agent>,
    peer: Arc<PeerCert>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    tracing::debug!(%method, %path, "request");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "health"]) => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "address": agent.address(),
                "api_version": flocker_wire::API_VERSION,
                "volumes": agent.volume_kind(),
                "routing": agent.routing_name(),
                "routing_warnings": agent.routing_warnings(),
            }),
        )),
        (&Method::GET, ["v1", "state"]) => agent
            .state()
            .await
            .map(|s| json_response(StatusCode::OK, &s)),
        (&Method::POST, ["v1", "converge"]) => converge(&agent, req.into_body()).await,
        (&Method::GET, ["v1", "volumes", name]) => agent
            .volume(name)
            .await
            .map(|v| json_response(StatusCode::OK, &v)),
        (&Method::POST, ["v1", "volumes", name, "receive"]) => {
            let name = name.to_string();
            match ReceiveParams::parse(&query)
                .and_then(|p| require_node(&peer, &p.from, "volume push").map(|()| p))
            {
                Ok(params) => agent
                    .receive(&name, params, req.into_body())
                    .await
                    .map(|r| json_response(StatusCode::OK, &r)),
                Err(e) => {
                    crate::agent::drain(req.into_body()).await;
                    Err(e)
                }
            }
        }
        (&Method::POST, ["v1", "volumes", name, "handoff"]) => {
            let name = name.to_string();
            let request = read_json::<TakeOverRequest>(req.into_body(), "handoff request")
                .await
                .and_then(|r| require_node(&peer, &r.from, "volume handoff").map(|()| r));
            match request {
                Ok(r) => agent
                    .take_over(&name, r)
                    .await
                    .map(|v| json_response(StatusCode::OK, &v)),
                Err(e) => Err(e),
            }
        }
        (_, ["v1", ..]) => Err(AgentError::NotFound(format!(
            "no such endpoint: {method} {path}"
        ))),
        _ => Err(AgentError::NotFound(format!(
            "no such endpoint: {method} {path}"
        ))),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

async fn converge(agent: &Arc<Agent>, body: Incoming) -> Result<Response<Body>, AgentError> {
    let request = read_json(body, "converge request").await?;
    let events = agent.converge(request).await?;
    let stream =
        ReceiverStream::new(events).map(|e| Ok::<_, Infallible>(Frame::data(event_line(&e))));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// Serves the API on `listener` until the task is dropped. Peers that fail the mutual TLS
/// handshake never reach [`handle`].
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, agent: Arc<Agent>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "refused TLS peer");
                    return;
                }
            };
            let cert: PeerCert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let cert = Arc::new(cert);
            let service = service_fn(move |req| {
                let (agent, cert) = (agent.clone(), cert.clone());
                async move { Ok::<_, Infallible>(handle(agent, cert, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Binds the listen address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

mod tokio_stream_shim {
    //! A `Stream` over an mpsc receiver (what `tokio-stream` provides, without the crate).

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc::Receiver;

    pub struct ReceiverStream<T>(Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(rx: Receiver<T>) -> Self {
            ReceiverStream(rx)
        }
    }

    impl<T> futures_util::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}
