//! Checks that need both files: every placed application is defined, and every node address
//! resolves. Resolution sits behind [`NodeResolver`] so unit tests never touch DNS.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::Path;

use super::deployment::Deployment;
use super::fields::Sink;
use super::{ApplicationConfig, Diagnostic};

/// Answers whether a node address can be reached by name.
pub trait NodeResolver {
    fn resolves(&self, address: &str) -> bool;
}

/// The system resolver (`getaddrinfo`), which reads `/etc/hosts` before any DNS, so a
/// cluster named in `/etc/hosts` validates offline.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl NodeResolver for SystemResolver {
    fn resolves(&self, address: &str) -> bool {
        if address.parse::<IpAddr>().is_ok() {
            return true;
        }
        match (address, 0u16).to_socket_addrs() {
            Ok(mut addrs) => addrs.next().is_some(),
            Err(e) => {
                tracing::debug!(address, error = %e, "node address does not resolve");
                false
            }
        }
    }
}

/// Cross-file checks. Reported against the deployment file, which is where the fix goes.
pub fn validate(
    applications: &ApplicationConfig,
    application_file: &Path,
    deployment: &Deployment,
    deployment_file: &Path,
    resolver: &dyn NodeResolver,
) -> Vec<Diagnostic> {
    let mut sink = Sink::new(deployment_file);
    check_placements(&mut sink, applications, application_file, deployment);
    check_addresses(&mut sink, deployment, resolver);
    sink.finish()
}

/// What a placed application `depends_on` must be placed too: its start waits for it.
pub(super) fn check_dependencies_placed(
    sink: &mut Sink<'_>,
    applications: &ApplicationConfig,
    deployment: &Deployment,
) {
    let placed = |name: &str| deployment.placements.iter().any(|p| p.application == name);
    for placement in &deployment.placements {
        let Some(app) = applications.applications.get(&placement.application) else {
            continue;
        };
        for dependency in app.depends_on.iter().filter(|d| !placed(d)) {
            sink.error(
                placement.mark,
                placement.application.clone(),
                format!(
                    "`{}` depends on `{dependency}`, which this deployment places on no node; place it too",
                    placement.application
                ),
            );
        }
    }
}

/// Every placed application must be defined.
pub(super) fn check_placements(
    sink: &mut Sink<'_>,
    applications: &ApplicationConfig,
    application_file: &Path,
    deployment: &Deployment,
) {
    for placement in &deployment.placements {
        if !applications.defined.contains_key(&placement.application) {
            sink.error(
                placement.mark,
                placement.path.clone(),
                format!(
                    "application `{}` is not defined in {}",
                    placement.application,
                    application_file.display()
                ),
            );
        }
    }
}

/// Every syntactically valid node address must resolve.
pub(super) fn check_addresses(
    sink: &mut Sink<'_>,
    deployment: &Deployment,
    resolver: &dyn NodeResolver,
) {
    for (node, mark) in &deployment.node_marks {
        if super::deployment::address_problem(node).is_none() && !resolver.resolves(node) {
            sink.error(
                *mark,
                format!("nodes/{node}"),
                format!(
                    "the node address {node:?} does not resolve: it is not an IP address and the system \
                     resolver (/etc/hosts, DNS) does not know it"
                ),
            );
        }
    }
}

/// Every application with standby replicas must have a volume to replicate.
pub(super) fn check_standby(
    sink: &mut Sink<'_>,
    applications: &ApplicationConfig,
    deployment: &Deployment,
) {
    for entry in &deployment.standby {
        let Some(app) = applications.applications.get(&entry.application) else {
            // Undefined applications are reported at their placement; broken ones in their
            // own file.
            continue;
        };
        if app.volume.is_none() {
            sink.error(
                entry.mark,
                format!("standby/{}", entry.application),
                format!(
                    "`{}` has no volume: there is nothing to replicate (give it a volume, or remove this entry)",
                    entry.application
                ),
            );
        }
    }
}
