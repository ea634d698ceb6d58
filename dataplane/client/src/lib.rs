//! `flocker-client`: the one client of the agent API. `flockerctl` (state, converge),
//! agents talking to agents (volume queries, pushes with streaming bodies, handoffs) and
//! the tests all go through [`AgentClient`], so every endpoint path lives in [`paths`] and
//! every error answer is read one way: [`ClientError::Refused`] with the status and the
//! agent's `error` message.
//!
//! Every wait is bounded ([`Timeouts`]): connecting, the TLS handshake, then progress (the
//! agent taking request bytes or sending answer bytes), optionally the whole way to the
//! answer's headers, and the silence between two converge events. The TLS configuration
//! (which CA, which revocation list, which certificate we present) is the caller's.
//!
//! **Architecture invariant:** this crate knows the wire ([`flocker_wire`]) and HTTP, not
//! what an agent does with a request; it depends on no other workspace crate, so
//! `flocker-ctl` and `flocker-dataplane` both use it without depending on each other.

#![forbid(unsafe_code)]

mod client;
pub mod converge_body;
pub mod paths;
pub mod progress;

use std::future::Future;

use flocker_wire::{ConvergeEvent, NodeState};

pub use converge_body::{ConvergeBody, EncodedRoutes};
pub use hyper::{Method, StatusCode};

pub use client::{
    AgentClient, Body, ClientError, Dialer, EVENT_IDLE_TIMEOUT, Timeouts, body_from_reader, empty,
    error_message, full,
};

/// What a user does with agents (`flockerctl deploy` and `status`): the seam the deploy
/// driver is written against, so it is unit-tested with fake agents.
pub trait AgentApi: Clone + Send + Sync + 'static {
    /// `GET /v1/state` of `node`.
    fn state(&self, node: &str) -> impl Future<Output = Result<NodeState, ClientError>> + Send;

    /// `POST /v1/converge` to `node`; `on_event` sees each event as it arrives, and all of
    /// them are returned once the agent finished.
    fn converge<F>(
        &self,
        node: &str,
        request: ConvergeBody,
        on_event: F,
    ) -> impl Future<Output = Result<Vec<ConvergeEvent>, ClientError>> + Send
    where
        F: FnMut(&ConvergeEvent) + Send;
}

impl AgentApi for AgentClient {
    fn state(&self, node: &str) -> impl Future<Output = Result<NodeState, ClientError>> + Send {
        AgentClient::state(self, node)
    }

    fn converge<F>(
        &self,
        node: &str,
        request: ConvergeBody,
        on_event: F,
    ) -> impl Future<Output = Result<Vec<ConvergeEvent>, ClientError>> + Send
    where
        F: FnMut(&ConvergeEvent) + Send,
    {
        AgentClient::converge_encoded(self, node, request, on_event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn error_answers_are_read_from_their_error_field_or_as_text() {
        assert_eq!(
            error_message(br#"{"error": "volume \"db\" is owned by 10.0.0.2"}"#),
            "volume \"db\" is owned by 10.0.0.2"
        );
        assert_eq!(error_message(b"  bad gateway\n"), "bad gateway");
        assert_eq!(error_message(br#"{"other": 1}"#), r#"{"other": 1}"#);
    }

    #[test]
    fn flockerctl_bounds_everything_by_its_timeout_but_the_event_stream() {
        let t = Timeouts::within(Duration::from_secs(3));
        assert_eq!(t.answer, Some(Duration::from_secs(3)));
        assert_eq!(
            (t.connect, t.handshake, t.idle),
            (t.idle, t.idle, Duration::from_secs(3))
        );
        assert_eq!(t.events, EVENT_IDLE_TIMEOUT);
        assert_eq!(
            Timeouts::default().answer,
            None,
            "a push answers after its stream"
        );
    }
}
