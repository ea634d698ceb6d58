//! The converge intake's side of the node list versions (`flocker_wire::node_list`): a
//! request that names a version instead of carrying every node is completed here from the
//! list this agent holds (the last accepted desired state's nodes), and only when the list
//! held has exactly that version. Whatever the request says, completion adds no address this
//! agent did not already hold: it was sent in full once, in a request validated address by
//! address, and then remembered.

use flocker_wire::DesiredState;
use flocker_wire::node_list::node_list_version;

/// The desired state this agent last accepted, with its node list's version computed once
/// (every state query reports it).
#[derive(Debug, Clone)]
pub struct Held {
    pub desired: DesiredState,
    pub nodes_version: String,
}

impl Held {
    pub fn new(desired: DesiredState) -> Self {
        Held {
            nodes_version: desired.nodes_version(),
            desired,
        }
    }
}

/// Why a request naming a node list version cannot be completed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeListError {
    /// Nothing to complete from: the sender must send the list in full.
    #[error(
        "the request names node list version {named}, and this node ({me}) holds no node list: send the node list in full"
    )]
    NoneHeld { named: String, me: String },
    /// The sender's list is not the one held here (it changed, or this node lost it).
    #[error(
        "the request names node list version {named}, and this node ({me}) holds version {held}: send the node list in full"
    )]
    Stale {
        named: String,
        held: String,
        me: String,
    },
    /// A request that leaves the list out must leave it out: other nodes in it would be
    /// addresses trusted without the version check.
    #[error(
        "a request naming node list version {named} may carry only this node ({me}), not {other:?}"
    )]
    OtherNode {
        named: String,
        other: String,
        me: String,
    },
}

impl NodeListError {
    /// Whether the sender can cure it by sending the list in full (HTTP 412), rather than
    /// having sent a malformed request (400).
    pub fn wants_full_list(&self) -> bool {
        !matches!(self, NodeListError::OtherNode { .. })
    }
}

/// Completes `desired`, which leaves the other nodes out under node list version `named`,
/// with the nodes of `held` (the desired state this agent last accepted), each with no
/// application placed (a node's request carries only its own placement).
pub fn complete(
    desired: &mut DesiredState,
    named: &str,
    held: Option<&Held>,
    me: &str,
) -> Result<(), NodeListError> {
    if let Some(other) = desired.nodes.keys().find(|n| *n != me) {
        return Err(NodeListError::OtherNode {
            named: named.to_string(),
            other: other.clone(),
            me: me.to_string(),
        });
    }
    let Some(held) = held else {
        return Err(NodeListError::NoneHeld {
            named: named.to_string(),
            me: me.to_string(),
        });
    };
    let version = held.nodes_version.clone();
    if version != named {
        return Err(NodeListError::Stale {
            named: named.to_string(),
            held: version,
            me: me.to_string(),
        });
    }
    for node in held.desired.nodes.keys() {
        desired.nodes.entry(node.clone()).or_default();
    }
    // This node, carried by the request but not in the list held, would make it another
    // list than the one named.
    let completed = node_list_version(desired.nodes.keys());
    if completed != named {
        return Err(NodeListError::Stale {
            named: named.to_string(),
            held: version,
            me: me.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "198.18.0.1";

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

    fn held() -> DesiredState {
        desired(&[(ME, &["old"]), ("198.18.0.2", &["db"]), ("198.18.0.3", &[])])
    }

    fn holding(d: &DesiredState) -> Option<Held> {
        Some(Held::new(d.clone()))
    }

    #[test]
    fn a_request_for_the_held_version_gets_the_held_nodes_and_keeps_its_placement() {
        let held = held();
        let full = desired(&[(ME, &["web"]), ("198.18.0.2", &["db"]), ("198.18.0.3", &[])]);
        let mut alone = full.for_node_alone(ME);
        complete(
            &mut alone,
            &held.nodes_version(),
            holding(&held).as_ref(),
            ME,
        )
        .expect("completes");
        assert_eq!(alone, full.for_node(ME));
        assert_eq!(
            alone.nodes[ME].len(),
            1,
            "its own placement is the request's"
        );
        assert!(
            alone.nodes["198.18.0.2"].is_empty(),
            "others carry no placement"
        );
    }

    #[test]
    fn a_stale_version_is_refused_and_asks_for_the_full_list() {
        let held = held();
        let changed = desired(&[(ME, &[]), ("198.18.0.2", &[]), ("198.18.0.9", &[])]);
        let mut alone = changed.for_node_alone(ME);
        let named = changed.nodes_version();
        let e = complete(&mut alone, &named, holding(&held).as_ref(), ME).expect_err("stale");
        assert_eq!(
            e,
            NodeListError::Stale {
                named,
                held: held.nodes_version(),
                me: ME.into()
            }
        );
        assert!(e.wants_full_list());
        assert_eq!(alone.nodes.len(), 1, "nothing was added");
    }

    #[test]
    fn a_made_up_version_is_refused() {
        let held = held();
        let mut alone = held.for_node_alone(ME);
        let e = complete(
            &mut alone,
            "00000000000000000000000000000000",
            holding(&held).as_ref(),
            ME,
        )
        .expect_err("unknown version");
        assert!(matches!(e, NodeListError::Stale { .. }));
    }

    #[test]
    fn nothing_held_means_the_full_list_is_needed() {
        let mut alone = held().for_node_alone(ME);
        let named = held().nodes_version();
        let e = complete(&mut alone, &named, None, ME).expect_err("none held");
        assert!(matches!(e, NodeListError::NoneHeld { .. }));
        assert!(e.wants_full_list());
    }

    #[test]
    fn an_address_smuggled_beside_the_held_version_is_refused() {
        // The version is right, but the request adds a node: trusting it would let a
        // request introduce an address without sending (and having checked) the list.
        let held = held();
        let mut sneaky = held.for_node_alone(ME);
        sneaky
            .nodes
            .insert("203.0.113.66".into(), Default::default());
        let e = complete(
            &mut sneaky,
            &held.nodes_version(),
            holding(&held).as_ref(),
            ME,
        )
        .expect_err("other node");
        assert!(matches!(e, NodeListError::OtherNode { ref other, .. } if other == "203.0.113.66"));
        assert!(!e.wants_full_list());
    }

    #[test]
    fn this_node_missing_from_the_held_list_is_not_added_under_its_version() {
        let held = desired(&[("198.18.0.2", &[]), ("198.18.0.3", &[])]);
        let mut alone = desired(&[(ME, &["web"])]);
        let e = complete(
            &mut alone,
            &held.nodes_version(),
            holding(&held).as_ref(),
            ME,
        )
        .expect_err("another list");
        assert!(matches!(e, NodeListError::Stale { .. }));
    }

    #[test]
    fn a_request_that_leaves_this_node_out_still_gets_only_the_held_list() {
        let held = held();
        let mut empty = DesiredState::default();
        complete(
            &mut empty,
            &held.nodes_version(),
            holding(&held).as_ref(),
            ME,
        )
        .expect("completes");
        assert_eq!(
            empty.nodes.keys().collect::<Vec<_>>(),
            held.nodes.keys().collect::<Vec<_>>()
        );
        assert!(empty.nodes.values().all(|apps| apps.is_empty()));
    }
}
