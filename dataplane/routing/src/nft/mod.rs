//! The nftables backend: one table `ip flocker` programmed over netlink. The ruleset is fixed
//! and built once per backend instance; every later change is a diff of the `routes` map's
//! elements sent as one transaction.
//!
//! **Architecture invariant:** only the table `ip flocker` is ever created, changed or
//! deleted; other tables (Docker's, firewalld's) are never read or written.

pub mod netlink;
pub mod plan;

use tracing::{debug, info};

use crate::{RouteTable, RoutingBackend, RoutingError, conntrack::Janitor, sysctl};
use plan::{ElementDiff, MapElement, Ruleset, Scope};

pub use netlink::NetlinkError;

/// nftables over netlink.
pub struct NftBackend {
    scope: Scope,
    /// What the kernel holds, as far as this instance knows; `None` until the first apply
    /// (or after a failed one), which forces a full rebuild of the table.
    installed: Option<RouteTable>,
    /// This instance removed the table and installed nothing since: an empty apply is a no-op.
    known_absent: bool,
    /// Forgets conntrack entries of moved ports off the apply path.
    janitor: Janitor,
}

impl NftBackend {
    /// A backend handling all traffic: from outside, from the node itself, masquerade.
    pub fn new() -> NftBackend {
        NftBackend::with_scope(Scope::All)
    }

    /// `Scope::FromOutside` is the part the eBPF backend delegates to nftables.
    pub fn with_scope(scope: Scope) -> NftBackend {
        NftBackend {
            scope,
            installed: None,
            known_absent: false,
            janitor: Janitor::spawn(),
        }
    }

    fn rebuild(&mut self, wanted: &RouteTable) -> Result<(), RoutingError> {
        sysctl::enable_forwarding()?;
        let elements: Vec<MapElement> = plan::map_elements(wanted)
            .iter()
            .map(|(port, backend)| MapElement {
                port: *port,
                backend: *backend,
            })
            .collect();
        let encoded = netlink::encode_rebuild(&Ruleset::new(self.scope), &elements)?;
        netlink::send(&encoded)?;
        info!(
            routes = elements.len(),
            "nftables: table ip flocker rebuilt"
        );
        self.installed = Some(wanted.clone());
        self.known_absent = false;
        Ok(())
    }
}

impl Default for NftBackend {
    fn default() -> Self {
        NftBackend::new()
    }
}

impl RoutingBackend for NftBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        if table.entries.is_empty() {
            // No routes means no table at all: the ruleset is left as the agent found it.
            // A table left by a previous run is removed once; after that there is nothing to do.
            if self.known_absent {
                return Ok(());
            }
            return self.clear();
        }
        let Some(mut installed) = self.installed.take() else {
            return self.rebuild(table);
        };
        let diff = ElementDiff::between_tables(&installed, table);
        if diff.is_empty() {
            self.installed = Some(installed);
            return Ok(());
        }
        let encoded = netlink::encode_diff(&diff)?;
        // On failure `installed` stays None, so the next apply rebuilds from scratch.
        netlink::send(&encoded)?;
        debug!(
            deleted = diff.delete.len(),
            added = diff.add.len(),
            "nftables: routes map updated"
        );
        self.janitor.forget(diff.changed_ports());
        diff.patch(&mut installed, table);
        self.installed = Some(installed);
        Ok(())
    }

    fn clear(&mut self) -> Result<(), RoutingError> {
        netlink::send(&netlink::encode_delete_table())?;
        if self.installed.take().is_some() {
            info!("nftables: table ip flocker removed");
        }
        self.known_absent = true;
        Ok(())
    }
}
