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
//! Clients name these paths through `flocker_client::paths`, and call them through
//! `flocker_client::AgentClient`.
//!
//! Errors are `{"error": "..."}` with a 4xx status for requests that were refused before
//! anything changed. Who may call what is decided by [`crate::identity`] from the caller's
//! certificate: state and converge need a user, pushes and handoffs the node they name as
//! sender (403 otherwise). Connections, handshakes and their limits are [`crate::server`]'s.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio_stream_shim::ReceiverStream;

use crate::agent::{Agent, AgentError, ReceiveParams, TakeOverRequest, event_line};
use crate::identity::{AuthError, Caller};
use crate::idle::IdleTimeout;
use crate::limits::ServerLimits;

/// Request bodies beyond this are refused. The largest converge request carries the route
/// map, about 75 bytes a port: every one of the 65,535 ports fits in 5 MB.
const MAX_JSON_BODY: usize = 16 << 20;

type Body = BoxBody<Bytes, Infallible>;

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
    timeout: Duration,
) -> Result<T, AgentError> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BODY);
    let bytes = tokio::time::timeout(timeout, limited.collect())
        .await
        .map_err(|_| {
            AgentError::BadRequest(format!("{what}: body not received within {timeout:?}"))
        })?
        .map_err(|e| AgentError::BadRequest(format!("{what}: reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| AgentError::BadRequest(format!("invalid {what}: {e}")))
}

fn forbidden(e: AuthError) -> AgentError {
    AgentError::Forbidden(e.to_string())
}

/// Routes one request.
pub async fn handle(
    agent: Arc<Agent>,
    caller: Arc<Caller>,
    limits: ServerLimits,
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
        (&Method::GET, ["v1", "state"]) => match caller.require_user("state") {
            Ok(()) => agent
                .state()
                .await
                .map(|s| json_response(StatusCode::OK, &s)),
            Err(e) => Err(forbidden(e)),
        },
        (&Method::POST, ["v1", "converge"]) => match caller.require_user("converge") {
            Ok(()) => converge(&agent, req.into_body(), limits.json_body_timeout).await,
            Err(e) => Err(forbidden(e)),
        },
        (&Method::GET, ["v1", "volumes", name]) => match caller.require_role("volume query") {
            Ok(()) => agent
                .volume(name)
                .await
                .map(|v| json_response(StatusCode::OK, &v)),
            Err(e) => Err(forbidden(e)),
        },
        (&Method::POST, ["v1", "volumes", name, "receive"]) => {
            let name = name.to_string();
            // The agent reads a byte stream; HTTP framing stays here.
            let body = tokio_util::io::StreamReader::new(
                IdleTimeout::new(req.into_body(), limits.body_idle_timeout)
                    .into_data_stream()
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
            match ReceiveParams::parse(&query)
                .map_err(|e| AgentError::BadRequest(e.to_string()))
                .and_then(|p| {
                    caller
                        .require_node(&p.from, "volume push")
                        .map(|()| p)
                        .map_err(forbidden)
                }) {
                Ok(params) => agent
                    .receive(&name, params, body)
                    .await
                    .map(|r| json_response(StatusCode::OK, &r)),
                Err(e) => {
                    crate::agent::drain(body).await;
                    Err(e)
                }
            }
        }
        (&Method::POST, ["v1", "volumes", name, "handoff"]) => {
            let name = name.to_string();
            let request = read_json::<TakeOverRequest>(
                req.into_body(),
                "handoff request",
                limits.json_body_timeout,
            )
            .await
            .and_then(|r| {
                caller
                    .require_node(&r.from, "volume handoff")
                    .map(|()| r)
                    .map_err(forbidden)
            });
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

async fn converge(
    agent: &Arc<Agent>,
    body: Incoming,
    timeout: Duration,
) -> Result<Response<Body>, AgentError> {
    let request = read_json(body, "converge request", timeout).await?;
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
