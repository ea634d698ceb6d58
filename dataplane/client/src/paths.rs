//! Every endpoint of the agent API, in one place. The server (`flocker_dataplane::api`)
//! routes exactly these; a new endpoint gets its path here and its method on
//! [`crate::AgentClient`].

use flocker_wire::transfer::ReceiveParams;

/// `GET`: liveness, address, backends and routing warnings. Any certificate of the CA.
pub const HEALTH: &str = "/v1/health";
/// `GET`: the node's [`flocker_wire::NodeState`]. Users only.
pub const STATE: &str = "/v1/state";
/// `POST`: a [`flocker_wire::ConvergeRequest`]; answers NDJSON
/// [`flocker_wire::ConvergeEvent`]s. Users only.
pub const CONVERGE: &str = "/v1/converge";

/// `GET`: this node's copy of volume `name`. Users and nodes.
pub fn volume(name: &str) -> String {
    format!("/v1/volumes/{name}")
}

/// `POST`: a pushed volume stream. Only the node that `params.from` names.
pub fn receive(name: &str, params: &ReceiveParams) -> String {
    format!("/v1/volumes/{name}/receive?{}", params.query())
}

/// `POST`: "you own `name` at epoch e". Only the node the request names as `from`.
pub fn handoff(name: &str) -> String {
    format!("/v1/volumes/{name}/handoff")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_what_the_agent_routes() {
        let params = ReceiveParams {
            snapshot: "push-0000000002".into(),
            base: Some("push-0000000001".into()),
            owner: "10.0.0.1".into(),
            epoch: 3,
            from: "10.0.0.1".into(),
            quota: None,
            replace: false,
            handoff: None,
        };
        assert_eq!(volume("db"), "/v1/volumes/db");
        assert_eq!(handoff("db"), "/v1/volumes/db/handoff");
        let receive = receive("db", &params);
        let (path, query) = receive.split_once('?').expect("query");
        assert_eq!(path, "/v1/volumes/db/receive");
        assert_eq!(ReceiveParams::parse(query), Ok(params));
    }
}
