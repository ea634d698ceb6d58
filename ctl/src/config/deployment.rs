//! The deployment config: `version: 1` and `nodes:`, mapping each node address (IP or
//! hostname) to the list of applications it runs (`[]` or nothing means none), and optionally
//! `standby:`, naming per application the nodes that keep a replica of its volume and how
//! often the owner pushes to them:
//!
//! ```yaml
//! standby:
//!   redis: {nodes: [198.18.0.12], every: 5s}   # `every` defaults to 10s; 1s to 24h
//! ```

pub use flocker_wire::checks::address_problem;
use std::collections::{BTreeMap, BTreeSet};

use flocker_wire::{MAX_REPLICATION_INTERVAL_MS, MIN_REPLICATION_INTERVAL_MS};

use super::fields::{Sink, check_keys, duration_ms, expect_list, expect_map, find, join, string};
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
    /// Standby replicas, in file order.
    pub standby: Vec<StandbyEntry>,
}

/// One application's standby replicas as written under `standby:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyEntry {
    pub application: String,
    /// Where the application's key under `standby:` is written.
    pub mark: Mark,
    pub nodes: Vec<String>,
    pub interval_ms: u64,
}

/// The replication interval when `every` is not given.
pub const DEFAULT_REPLICATION_INTERVAL_MS: u64 = 10_000;

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
    check_keys(sink, top, &["version", "nodes", "standby"], "");
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
    if let Some(standby) = find(top, "standby") {
        deployment.standby = parse_standby(sink, &standby.value, &deployment, &placed);
    }
    deployment
}

/// `standby:`: checks that need only this file (nodes exist, differ from the owner, the
/// application is placed, the interval is sane); the volume check needs the application file.
fn parse_standby(
    sink: &mut Sink<'_>,
    node: &Node,
    deployment: &Deployment,
    placed: &BTreeMap<String, Placement>,
) -> Vec<StandbyEntry> {
    let mut out = Vec::new();
    let Some(entries) = expect_map(
        sink,
        node,
        "standby",
        "a mapping from application names to `{nodes: [...], every: 5s}`",
    ) else {
        return out;
    };
    for entry in entries {
        let application = entry.key.clone();
        let path = join("standby", &application);
        let Some(fields) = expect_map(
            sink,
            &entry.value,
            &path,
            "a mapping with `nodes:` (a list of node addresses) and optionally `every:`",
        ) else {
            continue;
        };
        check_keys(sink, fields, &["nodes", "every"], &path);
        let owner = placed.get(&application).map(|p| p.node.clone());
        if owner.is_none() {
            sink.error(
                entry.key_mark,
                path.clone(),
                format!("`{application}` is not placed on any node under `nodes:`, so it has no volume to replicate"),
            );
        }
        let mut nodes = Vec::new();
        let mut ok = owner.is_some();
        match super::fields::require(sink, fields, "nodes", entry.key_mark, &path) {
            None => ok = false,
            Some(list) => {
                let list_path = join(&path, "nodes");
                let items = expect_list(sink, &list.value, &list_path, "a list of node addresses")
                    .unwrap_or(&[]);
                if items.is_empty() {
                    sink.error(
                        list.value.mark,
                        list_path.clone(),
                        "name at least one standby node (or remove the entry)",
                    );
                    ok = false;
                }
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{list_path}[{i}]");
                    let Some(address) = string(sink, item, &item_path, "a node address") else {
                        ok = false;
                        continue;
                    };
                    let problem = if !deployment.nodes.contains_key(address) {
                        Some(format!(
                            "{address} is not a node of this deployment (add it under `nodes:`)"
                        ))
                    } else if owner.as_deref() == Some(address) {
                        Some(format!(
                            "{address} runs `{application}` itself: a standby must be another node"
                        ))
                    } else if nodes.iter().any(|n| n == address) {
                        Some(format!("{address} is listed twice"))
                    } else {
                        None
                    };
                    match problem {
                        Some(message) => {
                            sink.error(item.mark, item_path, message);
                            ok = false;
                        }
                        None => nodes.push(address.to_owned()),
                    }
                }
            }
        }
        let interval_ms = match find(fields, "every") {
            None => Some(DEFAULT_REPLICATION_INTERVAL_MS),
            Some(every) => {
                let every_path = join(&path, "every");
                duration_ms(sink, &every.value, &every_path).and_then(|ms| {
                    if (MIN_REPLICATION_INTERVAL_MS..=MAX_REPLICATION_INTERVAL_MS).contains(&ms) {
                        Some(ms)
                    } else {
                        sink.error(
                            every.value.mark,
                            every_path,
                            "the replication interval must be between 1s and 24h",
                        );
                        None
                    }
                })
            }
        };
        if let (true, Some(interval_ms)) = (ok, interval_ms) {
            out.push(StandbyEntry {
                application,
                mark: entry.key_mark,
                nodes,
                interval_ms,
            });
        }
    }
    out
}
