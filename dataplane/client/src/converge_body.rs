//! A converge request encoded for sending: the JSON of [`flocker_wire::ConvergeRequest`] in
//! parts, so that the part every node gets alike (the cluster's route map) is encoded once
//! and shared by reference between all the requests, not encoded again for each node.

use bytes::Bytes;
use flocker_wire::{Action, ConvergeRequest, DesiredState, RouteMap};

use crate::client::Body;

/// A route map's JSON, encoded once; cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct EncodedRoutes(Bytes);

impl EncodedRoutes {
    pub fn encode(map: &RouteMap) -> Result<Self, serde_json::Error> {
        Ok(EncodedRoutes(Bytes::from(serde_json::to_vec(map)?)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The body of one `POST /v1/converge`, as the parts it is sent in.
#[derive(Debug, Clone)]
pub struct ConvergeBody {
    parts: Vec<Bytes>,
}

impl ConvergeBody {
    /// The JSON of `ConvergeRequest { desired, routes, actions, nodes_version }`, with
    /// `routes` spliced in as already encoded. `nodes_version` is set when `desired` leaves
    /// the other nodes out for the agent to fill in from the list of that version it holds.
    pub fn encode(
        desired: &DesiredState,
        routes: Option<&EncodedRoutes>,
        actions: &[Action],
        nodes_version: Option<&str>,
    ) -> Result<Self, serde_json::Error> {
        let mut head = b"{\"desired\":".to_vec();
        serde_json::to_writer(&mut head, desired)?;
        let mut parts = Vec::with_capacity(3);
        if let Some(routes) = routes {
            head.extend_from_slice(b",\"routes\":");
            parts.push(Bytes::from(head));
            parts.push(routes.0.clone());
            head = Vec::new();
        }
        head.extend_from_slice(b",\"actions\":");
        serde_json::to_writer(&mut head, actions)?;
        if let Some(version) = nodes_version {
            head.extend_from_slice(b",\"nodes_version\":");
            serde_json::to_writer(&mut head, version)?;
        }
        head.push(b'}');
        parts.push(Bytes::from(head));
        Ok(ConvergeBody { parts })
    }

    /// A request as it is (tests, and callers that hold a whole request).
    pub fn from_request(request: &ConvergeRequest) -> Result<Self, serde_json::Error> {
        Ok(ConvergeBody {
            parts: vec![Bytes::from(serde_json::to_vec(request)?)],
        })
    }

    /// Bytes on the wire (the body, without HTTP framing).
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The request the agent decodes (fake agents and tests).
    pub fn decode(&self) -> Result<ConvergeRequest, serde_json::Error> {
        serde_json::from_slice(&self.parts.concat())
    }

    pub(crate) fn into_body(self) -> Body {
        use http_body_util::BodyExt;
        let frames = self
            .parts
            .into_iter()
            .map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_parts_are_the_request_the_agent_decodes() {
        let mut desired = DesiredState::default();
        desired
            .nodes
            .insert("198.18.0.1".into(), Default::default());
        let mut map = RouteMap::default();
        map.ports.insert(
            flocker_wire::routes::PortKey {
                port: 8080,
                protocol: flocker_wire::Protocol::Tcp,
            },
            flocker_wire::PortRoute {
                application: "web".into(),
                node: "198.18.0.1".into(),
                internal_port: 80,
            },
        );
        let actions = vec![Action::FollowRoutes {
            version: map.version(),
        }];
        let routes = EncodedRoutes::encode(&map).expect("encode");
        let body = ConvergeBody::encode(&desired, Some(&routes), &actions, None).expect("encode");
        let whole = ConvergeRequest {
            desired: desired.clone(),
            routes: Some(map),
            actions: actions.clone(),
            nodes_version: None,
        };
        assert_eq!(body.decode().expect("decode"), whole);
        assert_eq!(
            body.len(),
            serde_json::to_vec(&whole).expect("encode").len()
        );
        let bare = ConvergeBody::encode(&desired, None, &actions, None).expect("encode");
        let mut without = whole;
        without.routes = None;
        assert_eq!(bare.decode().expect("decode"), without);
        let version = desired.nodes_version();
        let named = ConvergeBody::encode(&desired, None, &actions, Some(&version)).expect("encode");
        without.nodes_version = Some(version);
        assert_eq!(named.decode().expect("decode"), without);
    }
}
