//! The nftables backend: one table `inet flocker` programmed over netlink, for IPv4 and IPv6
//! alike. The ruleset is fixed and built once per backend instance; every later change is a
//! diff of the `routes` and `routes6` maps' elements (keyed by protocol and port, TCP and UDP
//! alike) sent as one transaction. While routes are installed, `docker_user` keeps one
//! accept rule in Docker's `DOCKER-USER` chain, so Docker's `FORWARD` policy `DROP` does not
//! drop the connections the table routes.
//!
//! **Architecture invariant:** the table `inet flocker` is the only table ever created or
//! changed, and it and `ip flocker` (what agents before IPv6 made) the only ones deleted; in
//! other tables, only our one rule in `ip filter DOCKER-USER` (recognised by its comment) is
//! ever added or removed. Other tables' chains are read only to detect forward
//! filters that would drop routed connections.

pub mod docker_user;
// The one module of this crate that calls C (libnftnl, libmnl); each block says why it is sound.
#[allow(unsafe_code)]
pub mod netlink;
pub mod plan;
pub mod services;

use tracing::{debug, info, warn};

use crate::{
    RouteTable, RoutingBackend, RoutingError,
    conntrack::Janitor,
    settings::{self, KernelSettings, SharedSettings},
};
use docker_user::ForwardGuard;
use plan::{Ruleset, Scope, TableDiff};
use services::SetDiff;

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
    /// The kernel settings we changed and their originals.
    settings: SharedSettings,
    /// Whether clearing this backend puts the kernel settings back (not when it is the
    /// eBPF backend's outside table: the eBPF backend still needs them then).
    restores_settings: bool,
    /// Our rule in `DOCKER-USER`, kept while the table is installed.
    forward: Option<ForwardGuard>,
    /// Warnings from the last look at the forward filters when no guard runs.
    forward_warnings: Vec<String>,
    /// IPv6 forwarding was turned on (or found on) for the IPv6 routes.
    forwarding6: bool,
}

impl NftBackend {
    /// A backend handling all traffic (from outside, from the node itself, masquerade),
    /// keeping the originals of the kernel settings it changes in memory only.
    pub fn new() -> NftBackend {
        NftBackend::with_settings(KernelSettings::in_memory().shared())
    }

    /// As [`NftBackend::new`], with the settings (and their journal) given, and a first look
    /// at the forward filters, whose problems are logged loudly.
    pub fn with_settings(settings: SharedSettings) -> NftBackend {
        let mut backend = NftBackend::embedded(Scope::All, settings);
        backend.restores_settings = true;
        backend.forward_warnings = match docker_user::check() {
            Ok(assessment) => {
                if assessment.docker_user {
                    info!(
                        "forward filter: Docker's DOCKER-USER chain found; routed connections will be accepted there while routes are installed"
                    );
                }
                docker_user::report(&assessment)
            }
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "forward filter: cannot read the forward chains");
                Vec::new()
            }
        };
        backend
    }

    /// `Scope::FromOutside` is the part the eBPF backend delegates to nftables; it shares the
    /// eBPF backend's settings, and leaves restoring them to it.
    pub fn embedded(scope: Scope, settings: SharedSettings) -> NftBackend {
        NftBackend {
            scope,
            installed: None,
            known_absent: false,
            janitor: Janitor::spawn(),
            settings,
            restores_settings: false,
            forward: None,
            forward_warnings: Vec::new(),
            forwarding6: false,
        }
    }

    /// IPv6 forwarding, once the table holds an IPv6 route (see
    /// [`settings::enable_ipv6_forwarding`] for why not before).
    fn forward_ipv6_if_routed(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        if self.forwarding6 || table.entries6.is_empty() {
            return Ok(());
        }
        let mut settings = self.settings.lock().map_err(|_| RoutingError::Poisoned)?;
        settings::enable_ipv6_forwarding(&mut settings)?;
        self.forwarding6 = true;
        Ok(())
    }

    fn rebuild(&mut self, wanted: &RouteTable) -> Result<(), RoutingError> {
        {
            let mut settings = self.settings.lock().map_err(|_| RoutingError::Poisoned)?;
            settings::enable_forwarding(&mut settings)?;
            settings.note_rcu_expedited()?;
        }
        let elements = plan::elements_of(&wanted.entries);
        let elements6 = plan::elements_of(&wanted.entries6);
        let service_elements: Vec<_> = services::elements(&wanted.services).into_iter().collect();
        let encoded = netlink::encode_rebuild(
            &Ruleset::new(self.scope),
            &elements,
            &elements6,
            &service_elements,
        )?;
        netlink::send(&encoded)?;
        info!(
            routes = elements.len(),
            routes6 = elements6.len(),
            services = wanted.services.services.len(),
            relays = wanted.services.relays.len(),
            "nftables: table inet flocker rebuilt"
        );
        self.installed = Some(wanted.clone());
        self.known_absent = false;
        if self.forward.is_none() {
            // Without the rule the table still routes where nothing drops forwarded packets,
            // so a failure here is a warning, not a failed apply.
            match ForwardGuard::start() {
                Ok(guard) => self.forward = Some(guard),
                Err(error) => {
                    let text = format!(
                        "cannot keep the DOCKER-USER accept rule: {}",
                        crate::error_chain(&error)
                    );
                    warn!(warning = %text, "forward filter");
                    self.forward_warnings = vec![text];
                }
            }
        }
        Ok(())
    }

    /// Problems found with the forward filters: the guard's latest, or those seen last.
    pub fn warnings(&self) -> Vec<String> {
        match &self.forward {
            Some(guard) => guard.warnings(),
            None => self.forward_warnings.clone(),
        }
    }

    /// Removes the table and our `DOCKER-USER` rule, leaving the kernel settings alone.
    fn remove(&mut self) -> Result<(), RoutingError> {
        if let Some(guard) = self.forward.take() {
            guard.stop_and_remove()?;
        } else if self.installed.is_none() && !self.known_absent {
            // A rule an earlier agent left behind.
            docker_user::remove()?;
        }
        netlink::send(&netlink::encode_delete_table())?;
        if self.installed.take().is_some() {
            info!("nftables: table inet flocker removed");
        }
        self.known_absent = true;
        self.forwarding6 = false;
        Ok(())
    }
}

impl NftBackend {
    /// [`RoutingBackend::apply`]; with `forget`, the conntrack entries of moved ports go.
    fn apply_forgetting(&mut self, table: &RouteTable, forget: bool) -> Result<(), RoutingError> {
        if table.is_empty() {
            // No routes means no table at all: the ruleset is left as the agent found it.
            // A table left by a previous run is removed once; after that there is nothing to do.
            if self.known_absent {
                return Ok(());
            }
            return self.clear();
        }
        self.forward_ipv6_if_routed(table)?;
        let Some(mut installed) = self.installed.take() else {
            return self.rebuild(table);
        };
        let diff = TableDiff::between(&installed, table);
        let service_diff = SetDiff::between(&installed.services, &table.services);
        if diff.is_empty() && service_diff.is_empty() {
            self.installed = Some(installed);
            return Ok(());
        }
        let encoded = netlink::encode_diff(&diff, &service_diff)?;
        // On failure `installed` stays None, so the next apply rebuilds from scratch.
        netlink::send(&encoded)?;
        debug!(
            deleted = diff.v4.delete.len() + diff.v6.delete.len(),
            added = diff.v4.add.len() + diff.v6.add.len(),
            service_elements_deleted = service_diff.delete.len(),
            service_elements_added = service_diff.add.len(),
            "nftables: routes maps updated"
        );
        if forget {
            self.janitor.forget(diff.changed_ports());
        }
        diff.patch(&mut installed, table);
        if !service_diff.is_empty() {
            installed.services = table.services.clone();
        }
        self.installed = Some(installed);
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
        self.apply_forgetting(table, true)
    }

    fn apply_keeping_connections(&mut self, table: &RouteTable) -> Result<(), RoutingError> {
        self.apply_forgetting(table, false)
    }

    fn clear(&mut self) -> Result<(), RoutingError> {
        self.remove()?;
        if self.restores_settings {
            self.settings
                .lock()
                .map_err(|_| RoutingError::Poisoned)?
                .restore()?;
        }
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        NftBackend::warnings(self)
    }
}

impl Drop for NftBackend {
    /// The agent stops: the routes stay, and with them the settings they need and our
    /// `DOCKER-USER` rule (the next agent takes them over); only the transient RCU switch,
    /// which no commit holds any more, is forgotten.
    fn drop(&mut self) {
        if self.restores_settings
            && let Ok(mut settings) = self.settings.lock()
            && let Err(error) = settings.release_transient()
        {
            warn!(error = %crate::error_chain(&error), "kernel settings journal");
        }
    }
}
