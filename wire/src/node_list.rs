//! The cluster's node list as an agent holds it. An agent needs every node's address (the
//! peers it pushes to, asks when fencing, lets relay service traffic, routes to), but that
//! list changes rarely while it grows with the cluster: at 1,000 nodes it is most of a request
//! that moves one application. So the list is named by a version ([`node_list_version`]), each
//! agent reports the version it holds (`NodeState::nodes_version`), and a converge request to
//! an agent that holds the current list leaves the other nodes out and names that version
//! instead (`ConvergeRequest::nodes_version`, built by [`DesiredState::for_node_alone`]).
//!
//! The agent completes such a request from its own list only when that list has exactly the
//! version named, and refuses it otherwise: a request cannot make an agent trust an address
//! it was not sent in full, in a request validated address by address.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::DesiredState;

/// A short name of a value's content: the hex of the first 16 bytes of the BLAKE3 hash of
/// its JSON (maps and sets in key order, so the JSON is canonical), computed without holding
/// that JSON.
pub fn content_version<T: Serialize + ?Sized>(value: &T) -> String {
    let mut hasher = blake3::Hasher::new();
    if let Err(e) = serde_json::to_writer(&mut hasher, value) {
        // Writing into a hasher cannot fail, and the wire types always serialise.
        return format!("unencodable-{e}");
    }
    hasher.finalize().as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The version of a node list: equal sets of addresses have equal versions, whatever the
/// applications placed on them.
pub fn node_list_version<'a>(nodes: impl IntoIterator<Item = &'a String>) -> String {
    let nodes: BTreeSet<&String> = nodes.into_iter().collect();
    content_version(&nodes)
}

impl DesiredState {
    /// The version of this desired state's node list (its node addresses only).
    pub fn nodes_version(&self) -> String {
        node_list_version(self.nodes.keys())
    }

    /// [`DesiredState::for_node`] without the other nodes: for an agent that holds this node
    /// list already (its reported version is [`DesiredState::nodes_version`]); the request
    /// names that version and the agent fills the list in from its own.
    pub fn for_node_alone(&self, node: &str) -> DesiredState {
        self.share_of(node, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(nodes: &[(&str, &[&str])]) -> DesiredState {
        let mut d = DesiredState::default();
        for (node, apps) in nodes {
            d.nodes.insert(
                node.to_string(),
                apps.iter().map(|a| a.to_string()).collect(),
            );
        }
        d
    }

    #[test]
    fn the_version_names_the_addresses_not_the_placement() {
        let a = desired(&[("198.18.0.1", &["web"]), ("198.18.0.2", &[])]);
        let b = desired(&[("198.18.0.1", &[]), ("198.18.0.2", &["web", "db"])]);
        let c = desired(&[("198.18.0.1", &["web"]), ("198.18.0.3", &[])]);
        let d = desired(&[("198.18.0.1", &["web"])]);
        assert_eq!(a.nodes_version(), b.nodes_version());
        assert_ne!(a.nodes_version(), c.nodes_version());
        assert_ne!(a.nodes_version(), d.nodes_version());
        assert_eq!(a.nodes_version().len(), 32);
    }

    #[test]
    fn the_version_does_not_depend_on_the_order_given() {
        let forwards = ["198.18.0.1".to_string(), "198.18.0.2".to_string()];
        let backwards = ["198.18.0.2".to_string(), "198.18.0.1".to_string()];
        assert_eq!(
            node_list_version(forwards.iter()),
            node_list_version(backwards.iter())
        );
    }

    #[test]
    fn alone_keeps_only_the_node_itself() {
        let d = desired(&[("198.18.0.1", &["web"]), ("198.18.0.2", &["db"])]);
        let alone = d.for_node_alone("198.18.0.1");
        assert_eq!(alone.nodes.len(), 1);
        assert_eq!(alone.nodes["198.18.0.1"].len(), 1);
        let full = d.for_node("198.18.0.1");
        assert_eq!(alone.applications, full.applications);
        assert_eq!(full.nodes.len(), 2);
    }
}
