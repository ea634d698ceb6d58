//! `SwitchRoutes`: before the old container of a move stops, this node routes the moving
//! applications' ports to the node each moves to. On that node itself the route leads into
//! a container that does not run yet: it is left out of the kernel until the start, and the
//! agent holds new connections to its TCP ports meanwhile (`crate::hold`). The table then
//! follows no route map version; the plan's `routes` phase sends the map again.

use flocker_wire::routes::MovedPorts;
use flocker_wire::{ConvergeRequest, Protocol, Route, RouteTarget};

use crate::hold::HeldPort;
use crate::volume::check_name;

use super::{Agent, AgentError};

impl Agent {
    /// Every value of the moves checked as if no `flockerctl` had: names, nodes of the
    /// desired state, a move here exactly as the desired state places and maps the
    /// application here, and the routes it makes as any route of this node.
    pub(super) fn validate_switch(
        &self,
        request: &ConvergeRequest,
        moves: &[MovedPorts],
    ) -> Result<(), AgentError> {
        let bad = |s: String| Err(AgentError::BadRequest(s));
        let mine = request.desired.nodes.get(&self.me);
        for m in moves {
            check_name(&m.application)?;
            if !request.desired.nodes.contains_key(&m.node) {
                return bad(format!(
                    "switch routes: {:?} moves to {:?}, which is not a node of the desired state",
                    m.application, m.node
                ));
            }
            let placed_here = mine.is_some_and(|apps| apps.contains(&m.application));
            if m.node == self.me {
                let mut mapped: Vec<_> = request
                    .desired
                    .applications
                    .get(&m.application)
                    .map(|a| a.ports.clone())
                    .unwrap_or_default();
                let mut said = m.ports.clone();
                mapped.sort();
                said.sort();
                if !placed_here || mapped != said {
                    return bad(format!(
                        "switch routes: {:?} is said to move here ({}) with ports the desired state does not place or map here",
                        m.application, self.me
                    ));
                }
            } else if placed_here {
                return bad(format!(
                    "switch routes: {:?} is placed on this node ({}), not on {:?}",
                    m.application, self.me, m.node
                ));
            }
        }
        let routes: Vec<Route> = moves.iter().flat_map(|m| m.routes_for(&self.me)).collect();
        self.validate_routes(request, &routes)
    }

    /// Holds the TCP ports of every application that moves here and does not run yet,
    /// then programs the switched table. A hold whose table could not be programmed is
    /// released again.
    pub(super) async fn switch_routes(&self, moves: &[MovedPorts]) -> Result<(), AgentError> {
        let resolver = self.resolver().await?;
        let mut holding: Vec<String> = Vec::new();
        for m in moves.iter().filter(|m| m.node == self.me) {
            if resolver.containers.contains_key(&m.application) {
                // Already running here: the route leads into it at once.
                continue;
            }
            let ports = held_ports(m);
            if ports.is_empty() {
                continue;
            }
            // Listening before the route to the old node goes: no moment without either.
            if let Err(e) = self.holds.hold(&m.application, &ports) {
                for name in &holding {
                    self.holds.release(name);
                }
                return Err(AgentError::Internal(e.to_string()));
            }
            holding.push(m.application.clone());
        }
        let routes = switched_table(self.routes.current(), moves, &self.me);
        let count = routes.len();
        let started = std::time::Instant::now();
        let result = self.routes.switch_resolvable(routes, &resolver);
        self.metrics
            .routes_applied(result.is_ok().then_some(count), started.elapsed());
        if result.is_err() {
            for name in &holding {
                self.holds.release(name);
            }
        }
        Ok(result?)
    }

    /// After the routes changed by a route map or a list: holds of applications whose
    /// ports no longer lead into this node end.
    pub(super) fn release_rerouted_holds(&self) {
        let routes = self.routes.current();
        self.holds.release_unless(|application| {
            routes.iter().any(|r| {
                r.application == application && matches!(r.target, RouteTarget::Local { .. })
            })
        });
    }
}

/// The TCP ports of a move, as the hold listens on them.
fn held_ports(m: &MovedPorts) -> Vec<HeldPort> {
    m.ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| HeldPort {
            external: p.external,
            internal: p.internal,
        })
        .collect()
}

/// `current` with every route of a moving application, and every route on one of its
/// ports, replaced by the move's routes as seen from `me`.
pub(crate) fn switched_table(current: Vec<Route>, moves: &[MovedPorts], me: &str) -> Vec<Route> {
    let moved = |r: &Route| {
        moves.iter().any(|m| {
            m.application == r.application
                || m.ports
                    .iter()
                    .any(|p| p.external == r.external_port && p.protocol == r.protocol)
        })
    };
    let mut routes: Vec<Route> = current.into_iter().filter(|r| !moved(r)).collect();
    routes.extend(moves.iter().flat_map(|m| m.routes_for(me)));
    routes.sort();
    routes
}

#[cfg(test)]
mod tests {
    use flocker_wire::PortMap;

    use super::*;

    fn route(port: u16, application: &str, target: RouteTarget) -> Route {
        Route {
            external_port: port,
            protocol: Protocol::Tcp,
            application: application.into(),
            target,
        }
    }

    fn to(node: &str) -> RouteTarget {
        RouteTarget::Node {
            address: node.into(),
        }
    }

    fn moved_db(node: &str) -> MovedPorts {
        MovedPorts {
            application: "db".into(),
            node: node.into(),
            ports: vec![PortMap::tcp(6379, 6379)],
        }
    }

    #[test]
    fn the_old_node_forwards_to_the_new_one_and_keeps_the_rest() {
        let current = vec![
            route(
                6379,
                "db",
                RouteTarget::Local {
                    internal_port: 6379,
                },
            ),
            route(80, "web", to("n3")),
        ];
        let table = switched_table(current, &[moved_db("n2")], "n1");
        assert_eq!(
            table,
            vec![route(80, "web", to("n3")), route(6379, "db", to("n2"))]
        );
    }

    #[test]
    fn the_new_node_routes_into_itself() {
        let current = vec![route(6379, "db", to("n1"))];
        let table = switched_table(current, &[moved_db("n2")], "n2");
        assert_eq!(
            table,
            vec![route(
                6379,
                "db",
                RouteTarget::Local {
                    internal_port: 6379
                }
            )]
        );
    }

    #[test]
    fn a_port_another_application_held_and_a_dropped_port_are_replaced() {
        // `db` used to publish 7000 as well; 6379 belonged to `old` before.
        let current = vec![
            route(6379, "old", to("n3")),
            route(7000, "db", to("n1")),
            route(80, "web", to("n3")),
        ];
        let table = switched_table(current, &[moved_db("n2")], "n3");
        assert_eq!(
            table,
            vec![route(80, "web", to("n3")), route(6379, "db", to("n2"))]
        );
    }

    #[test]
    fn only_tcp_ports_are_held() {
        let m = MovedPorts {
            application: "dns".into(),
            node: "n2".into(),
            ports: vec![
                PortMap::tcp(53, 5353),
                PortMap {
                    internal: 53,
                    external: 5353,
                    protocol: Protocol::Udp,
                },
            ],
        };
        assert_eq!(
            held_ports(&m),
            vec![HeldPort {
                external: 5353,
                internal: 53
            }]
        );
    }
}
