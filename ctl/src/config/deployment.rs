//! The deployment config: `version: 1` and `nodes:`, mapping each node address (IP or
//! hostname) to the list of applications it runs (`[]` or nothing means none).

pub use flocker_wire::checks::address_problem;
use std::collections::{BTreeMap, BTreeSet};

use super::fields::{Sink, check_keys, expect_list, expect_map, join, string};
use super::yaml::{Mark, Node};

/// A parsed deployment with the locations the cross-file checks point at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deployment {
    pub nodes: BTreeMap<String, BTreeSet<String>>,
    /// Where each node's key is written.
    pub node_marks: BTreeMap<String, Mark>,
    /// Every placement, in file order.
    pub placements: Vec<Placement>,
    /// The file is not a deployment config at all (an application config given in its place).
    pub misplaced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub application: String,
    pub node: String,
    pub mark: Mark,
    /// The model path of the list item, e.g. `nodes/198.18.0.11[1]`.
    pub path: String,
}

pub fn parse_deployment_tree(sink: &mut Sink<'_>, root: &Node) -> Deployment {
    let mut deployment = Deployment::default();
    let Some(top) = expect_map(sink, root, "", "a mapping with `version: 1` and `nodes:`") else {
        return deployment;
    };
    check_keys(sink, top, &["version", "nodes"], "");
    super::application::check_version(sink, top, root.mark);
    let Some(nodes) = super::fields::require(sink, top, "nodes", root.mark, "") else {
        return deployment;
    };
    let Some(entries) = expect_map(
        sink,
        &nodes.value,
        "nodes",
        "a mapping from node addresses to application lists",
    ) else {
        return deployment;
    };
    let mut placed: BTreeMap<String, Placement> = BTreeMap::new();
    for entry in entries {
        let node = entry.key.clone();
        let path = join("nodes", &node);
        if let Some(problem) = address_problem(&node) {
            sink.error(entry.key_mark, &path, problem);
        }
        deployment.node_marks.insert(node.clone(), entry.key_mark);
        let apps = deployment.nodes.entry(node.clone()).or_default();
        let items = expect_list(
            sink,
            &entry.value,
            &path,
            "a list of application names (`[]` for none)",
        )
        .unwrap_or(&[]);
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(name) = string(sink, item, &item_path, "an application name") else {
                continue;
            };
            if let Some(earlier) = placed.get(name) {
                let message = if earlier.node == node {
                    format!(
                        "`{name}` is listed twice on this node (line {})",
                        earlier.mark.line
                    )
                } else {
                    format!(
                        "`{name}` is already placed on node {} (line {}); an application runs on exactly one node",
                        earlier.node, earlier.mark.line
                    )
                };
                sink.error(item.mark, item_path, message);
                continue;
            }
            let placement = Placement {
                application: name.to_owned(),
                node: node.clone(),
                mark: item.mark,
                path: item_path.clone(),
            };
            placed.insert(name.to_owned(), placement.clone());
            apps.insert(name.to_owned());
            deployment.placements.push(placement);
        }
    }
    deployment
}
