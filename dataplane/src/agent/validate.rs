//! Validation of a converge request: everything that can be known to fail before acting,
//! checked against what this node holds (its volumes, its listening ports, its own API port),
//! with every value from the wire checked again as if no `flockerctl` had validated it.

use std::collections::{BTreeMap, BTreeSet};

use flocker_wire::checks;
use flocker_wire::{
    Action, Application, ConvergeRequest, Protocol, Route, RouteMap, RouteTarget, VolumeState,
};

use crate::ownership;
use crate::volume::check_name;

use super::{Agent, AgentError};

impl Agent {
    /// Everything that can be known to fail before acting. Pulls missing images, which
    /// changes no state the API reports.
    pub(super) async fn validate(&self, request: &ConvergeRequest) -> Result<(), AgentError> {
        let volumes: BTreeMap<String, VolumeState> = self
            .blocking(|b| b.list())
            .await?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let mut created: Vec<&str> = Vec::new();
        let bad = |s: String| Err(AgentError::BadRequest(s));
        // Everything the request carries is checked again here, as if no flockerctl had
        // validated it: names end up in paths and commands, ports in the node's routing.
        let problems = checks::desired_problems(&request.desired);
        if !problems.is_empty() {
            return bad(format!("invalid desired state: {}", problems.join("; ")));
        }
        if let Some(map) = &request.routes {
            self.validate_route_map(request, map)?;
        }
        for action in &request.actions {
            match action {
                Action::CreateVolume { volume, .. } => {
                    check_name(volume)?;
                    if let Some(v) = volumes.get(volume)
                        && v.owner != self.me
                    {
                        return Err(AgentError::Conflict(format!(
                            "create volume {volume:?}: a copy already exists here, owned by {} at epoch {}",
                            v.owner, v.epoch
                        )));
                    }
                    created.push(volume);
                }
                Action::StartApplication { application }
                | Action::RestartApplication { application } => {
                    self.validate_application(request, application, &volumes, &created)?;
                    self.runtime
                        .ensure_image(&application.image.to_string())
                        .await?;
                }
                Action::PrepareApplication { application } => {
                    // Its volumes are replicas still: they are checked at the start.
                    check_name(&application.name)?;
                    if request.desired.applications.get(&application.name) != Some(application) {
                        return bad(format!(
                            "prepare {:?}: not the application of the desired state",
                            application.name
                        ));
                    }
                    self.runtime
                        .ensure_image(&application.image.to_string())
                        .await?;
                }
                Action::StopApplication { application } => check_name(application)?,
                Action::PushVolume { volume, to, .. } | Action::Handoff { volume, to } => {
                    check_name(volume)?;
                    if to == &self.me {
                        return bad(format!(
                            "volume {volume:?}: cannot push or hand off to this node itself ({to})"
                        ));
                    }
                    if !request.desired.nodes.contains_key(to) {
                        return bad(format!(
                            "volume {volume:?}: target {to:?} is not a node of the desired state"
                        ));
                    }
                    let Some(v) = volumes.get(volume) else {
                        return Err(AgentError::NotFound(format!(
                            "volume {volume:?} does not exist on this node ({})",
                            self.me
                        )));
                    };
                    if v.owner != self.me && &v.owner != to {
                        ownership::check_owner(&self.me, v)?;
                    }
                }
                Action::Promote { volume, epoch } => {
                    check_name(volume)?;
                    let Some(v) = volumes.get(volume) else {
                        return Err(AgentError::NotFound(format!(
                            "promote volume {volume:?}: this node ({}) holds no replica of it",
                            self.me
                        )));
                    };
                    ownership::check_promote(&self.me, v, *epoch)?;
                    // Owned from here on, like a volume this request creates.
                    created.push(volume);
                }
                Action::SetRoutes { routes } => self.validate_routes(request, routes)?,
                Action::FollowRoutes { version } => {
                    let Some(map) = &request.routes else {
                        return bad(format!(
                            "follow routes {version}: the request carries no route map"
                        ));
                    };
                    let actual = map.version();
                    if *version != actual {
                        return bad(format!(
                            "follow routes {version}: the route map carried is version {actual}"
                        ));
                    }
                    self.validate_own_ports(request, map)?;
                    self.validate_routes(request, &map.routes_for(&self.me))?;
                }
                Action::SwitchRoutes { moves } => self.validate_switch(request, moves)?,
                Action::SetStandby { standby } => {
                    if *standby != request.desired.standby_for(&self.me) {
                        return bad(
                            "set standby: the schedule differs from the desired state's `standby` for this node".to_string(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Every entry of a route map, whole or in part: application names, nodes of the desired
    /// state, and a port said to lead into this node exactly as its application maps it.
    fn validate_route_map(
        &self,
        request: &ConvergeRequest,
        map: &RouteMap,
    ) -> Result<(), AgentError> {
        let bad = |s: String| Err(AgentError::BadRequest(s));
        let mine = request.desired.nodes.get(&self.me);
        for (&key, p) in &map.ports {
            let port = key;
            check_name(&p.application)?;
            if key.port == 0 || p.internal_port == 0 {
                return bad(format!(
                    "route map: {:?} routes port 0 ({port}:{})",
                    p.application, p.internal_port
                ));
            }
            if !request.desired.nodes.contains_key(&p.node) {
                return bad(format!(
                    "route map: port {port} of {:?} leads to {:?}, which is not a node of the desired state",
                    p.application, p.node
                ));
            }
            if p.node != self.me {
                continue;
            }
            let placed = mine.is_some_and(|m| m.contains(&p.application));
            let mapped = request
                .desired
                .applications
                .get(&p.application)
                .is_some_and(|a| {
                    a.ports.iter().any(|m| {
                        m.external == key.port
                            && m.protocol == key.protocol
                            && m.internal == p.internal_port
                    })
                });
            if !placed || !mapped {
                return bad(format!(
                    "route map: port {port} leads to {:?} on this node ({}) at :{}, which the desired state does not place or map here",
                    p.application, self.me, p.internal_port
                ));
            }
        }
        self.validate_services(request, map)
    }

    /// The map's services: names, addresses in the service range and each once, nodes of
    /// the desired state, relay ports in their range clear of every published port, and a
    /// service said to run here exactly as the desired state places and maps it here.
    fn validate_services(
        &self,
        request: &ConvergeRequest,
        map: &RouteMap,
    ) -> Result<(), AgentError> {
        use flocker_wire::services::{RELAY_PORTS, in_service_range, service_ports};
        let bad = |s: String| Err(AgentError::BadRequest(s));
        let mine = request.desired.nodes.get(&self.me);
        let mut addresses = std::collections::BTreeSet::new();
        let mut relays_here = std::collections::BTreeSet::new();
        let listening = crate::listeners::listening_ports();
        // As for routes: a port this node relays already was checked when it was taken.
        let relayed_now: BTreeSet<(flocker_wire::Protocol, u16)> = self
            .routes
            .services()
            .iter()
            .filter(|s| matches!(s.target, RouteTarget::Local { .. }))
            .filter_map(|s| s.relay.map(|r| (s.protocol, r)))
            .collect();
        for (name, service) in &map.services {
            check_name(name)?;
            if !in_service_range(service.address) || !addresses.insert(service.address) {
                return bad(format!(
                    "route map: service {name:?} has address {}, outside the service range or taken twice",
                    service.address
                ));
            }
            if !request.desired.nodes.contains_key(&service.node) {
                return bad(format!(
                    "route map: service {name:?} runs on {:?}, which is not a node of the desired state",
                    service.node
                ));
            }
            for port in &service.ports {
                let Some(relay) = port.relay else { continue };
                let published = map.get(port.protocol, relay).is_some();
                if !(RELAY_PORTS.0..=RELAY_PORTS.1).contains(&relay) || published {
                    return bad(format!(
                        "route map: service {name:?} relays port {} at {relay}, outside the relay range or a published port",
                        port.port
                    ));
                }
                if service.node == self.me && !relays_here.insert((port.protocol, relay)) {
                    return bad(format!(
                        "route map: relay port {relay} is taken twice on this node"
                    ));
                }
                if service.node == self.me
                    && listening.contains(&(port.protocol, relay))
                    && !relayed_now.contains(&(port.protocol, relay))
                {
                    return bad(format!(
                        "route map: relay port {relay}/{} of {name:?} is held by a service of this node ({}), which the relay would take over from the cluster's nodes",
                        port.protocol, self.me
                    ));
                }
            }
            if service.node != self.me {
                continue;
            }
            let placed = mine.is_some_and(|m| m.contains(name));
            let ports: Vec<(u16, flocker_wire::Protocol)> =
                service.ports.iter().map(|p| (p.port, p.protocol)).collect();
            let mapped = request
                .desired
                .applications
                .get(name)
                .is_some_and(|a| service_ports(a) == ports);
            if !placed || !mapped {
                return bad(format!(
                    "route map: service {name:?} is said to run on this node ({}) with ports the desired state does not place or map here",
                    self.me
                ));
            }
        }
        Ok(())
    }

    /// A map this node follows routes every port of its own applications to itself.
    fn validate_own_ports(
        &self,
        request: &ConvergeRequest,
        map: &RouteMap,
    ) -> Result<(), AgentError> {
        let mine = request.desired.nodes.get(&self.me).into_iter().flatten();
        for app in mine.filter_map(|name| request.desired.applications.get(name)) {
            for port in &app.ports {
                let here = map
                    .get(port.protocol, port.external)
                    .is_some_and(|p| p.node == self.me && p.application == app.name);
                if !here {
                    return Err(AgentError::BadRequest(format!(
                        "follow routes: the route map does not lead port {} to {:?} on this node ({})",
                        port.external, app.name, self.me
                    )));
                }
            }
        }
        Ok(())
    }

    /// Routes are programmed into the node's kernel: every port and target is checked.
    pub(super) fn validate_routes(
        &self,
        request: &ConvergeRequest,
        routes: &[Route],
    ) -> Result<(), AgentError> {
        let bad = |s: String| Err(AgentError::BadRequest(s));
        let listening = crate::listeners::listening_ports();
        let already: BTreeSet<(Protocol, u16)> = self
            .routes
            .current()
            .iter()
            .map(|r| (r.protocol, r.external_port))
            .collect();
        let mut seen = BTreeMap::new();
        for r in routes {
            let port = r.external_port;
            let key = (r.protocol, port);
            if let Some(first) = seen.insert(key, &r.application) {
                return bad(format!(
                    "set routes: external port {port}/{} is routed twice (applications {first:?} and {:?})",
                    r.protocol, r.application
                ));
            }
            if port == 0 {
                return bad(format!("set routes: {:?} routes port 0", r.application));
            }
            if Some(port) == self.api_port {
                return bad(format!(
                    "set routes: external port {port} of {:?} is this agent's API port; routing it would cut the node off",
                    r.application
                ));
            }
            if listening.contains(&key) && !already.contains(&key) {
                return bad(format!(
                    "set routes: external port {port}/{} of {:?} is held by a service of this node ({}), which a route would take over: stop that service or choose another port",
                    r.protocol, r.application, self.me
                ));
            }
            match &r.target {
                RouteTarget::Local { internal_port } => {
                    if !request.desired.applications.contains_key(&r.application) {
                        return bad(format!(
                            "set routes: local route to unknown application {:?}",
                            r.application
                        ));
                    }
                    if *internal_port == 0 {
                        return bad(format!("set routes: {:?} routes to port 0", r.application));
                    }
                }
                RouteTarget::Node { address } => {
                    if !request.desired.nodes.contains_key(address) || address == &self.me {
                        return bad(format!(
                            "set routes: port {port} of {:?} is routed to {address:?}, which is not another node of the desired state",
                            r.application
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_application(
        &self,
        request: &ConvergeRequest,
        app: &Application,
        volumes: &BTreeMap<String, VolumeState>,
        created: &[&str],
    ) -> Result<(), AgentError> {
        check_name(&app.name)?;
        if !request.desired.applications.contains_key(&app.name) {
            return Err(AgentError::BadRequest(format!(
                "unknown application {:?}: not in the desired state",
                app.name
            )));
        }
        for (volume, _) in app.volumes() {
            if created.contains(&volume) {
                continue;
            }
            match volumes.get(volume) {
                None => {
                    return Err(AgentError::Conflict(format!(
                        "application {:?} needs volume {volume:?}, which does not exist on this node ({})",
                        app.name, self.me
                    )));
                }
                Some(v) => ownership::check_owner(&self.me, v)?,
            }
        }
        Ok(())
    }
}
