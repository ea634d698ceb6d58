//! The start that follows a move's final push at once (issue 16: "fold the handoff round
//! trips into the final push").
//!
//! Before the old container stops, the node an application moves to already knows what the
//! deploy's `start` phase will ask of it: `PrepareApplication` handed it the application
//! (whose container it created) and `SwitchRoutes` made it hold the application's new
//! connections. So when the final push makes this node the owner, the agent starts the
//! prepared container itself, at once, while the source records the handoff and the
//! deploy's next round trip is still on its way. The `start` phase then finds the
//! application running and only waits for its readiness. Out of the clients' pause go the
//! source's record (two property writes), one `flockerctl` round trip and the phase's
//! validation.
//!
//! It starts only what that `start` phase would start, and nothing when in doubt (the phase
//! then does the start, as before):
//!
//! - the application was prepared here by this agent (kept in memory, at most
//!   [`MAX_AGE`]), and no converge since started, stopped or prepared it again;
//! - this node holds its connections (`SwitchRoutes` of a move here, within the hold
//!   timeout, and no start began): an application without TCP ports is started by the
//!   phase;
//! - the desired state of this node's last converge still places it here, unchanged;
//! - this node owns every volume of it (the other volumes' final pushes may still come:
//!   the last of them starts it), and each is proven mounted: the start's own checks, as
//!   in the `start` phase, which also starts the prepared container only while it matches
//!   the application (else it creates the container anew, as that phase would).
//!
//! Who can set it off: only a final push this node accepted, which `check_receive` takes only
//! from a node with a node certificate that names itself as the volume's owner, handing the
//! volume over at exactly the next epoch; and it starts only what `flockerctl` (a client
//! certificate) prepared and held here. A node cannot start anything here that the deploy did
//! not ask for.
//!
//! The start runs under the converge lock like any converge (the phase's request waits for
//! it, then finds the container running); the wait for readiness runs after the lock, so a
//! slow application never makes the phase's request time out on the lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flocker_wire::{Application, DesiredState, RouteMap};
use tokio::sync::mpsc;

use super::{Agent, AgentError, lock};

/// How long a preparation may start the application after a final push. A move's prepare
/// and final push are seconds apart (the stop's grace period in between); an older one is
/// left from a deploy that did not finish, and its start belongs to the next deploy.
pub const MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// An application prepared here for a move, with what its start needs.
#[derive(Clone)]
pub(crate) struct Prepared {
    /// The prepare's desired state as it came, with the application's secrets and configs
    /// (the start writes them again, as the start phase would); the remembered one
    /// (`Agent::last_desired`) has none. Kept in memory only, for at most [`MAX_AGE`].
    desired: DesiredState,
    /// The prepare's routes: the container's spec (its links) was made from them.
    routes: Option<RouteMap>,
    app: Application,
    at: Instant,
}

/// The applications prepared here whose start may follow their final push, by name.
#[derive(Default)]
pub(crate) struct PreparedStarts {
    entries: std::sync::Mutex<HashMap<String, Prepared>>,
}

impl PreparedStarts {
    /// `app` was prepared here by a converge carrying `desired` and `routes`.
    pub(crate) fn remember(
        &self,
        desired: &DesiredState,
        routes: Option<&RouteMap>,
        app: &Application,
    ) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                app.name.clone(),
                Prepared {
                    desired: desired.clone(),
                    routes: routes.cloned(),
                    app: app.clone(),
                    at: Instant::now(),
                },
            );
        }
    }

    /// A converge took `application` over (started, stopped, or prepared it without a
    /// container to start): its final push starts nothing.
    pub(crate) fn forget(&self, application: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(application);
        }
    }

    /// The application prepared here, within [`MAX_AGE`], that uses `volume`.
    fn using(&self, volume: &str) -> Option<Prepared> {
        let entries = self.entries.lock().ok()?;
        entries
            .values()
            .find(|p| p.app.uses_volume(volume) && p.at.elapsed() <= MAX_AGE)
            .cloned()
    }

    /// Takes `prepared` out, when it is still the entry of its application.
    fn take(&self, prepared: &Prepared) -> bool {
        let Ok(mut entries) = self.entries.lock() else {
            return false;
        };
        match entries.get(&prepared.app.name) {
            Some(p) if p.at == prepared.at => {
                entries.remove(&prepared.app.name);
                true
            }
            _ => false,
        }
    }
}

impl Agent {
    /// The final push of `volume` made this node its owner: starts the application prepared
    /// for the move, when it may (see the module's rules), on a task of its own.
    pub(super) fn start_after_final_push(self: &Arc<Self>, volume: &str) {
        let Some(prepared) = self.prepared_starts.using(volume) else {
            return;
        };
        if !self.holds.holding(&prepared.app.name) {
            tracing::debug!(application = %prepared.app.name, "not held here: the deploy's start phase starts it");
            return;
        }
        let agent = self.clone();
        let volume = volume.to_string();
        tokio::spawn(async move { agent.start_prepared(prepared, &volume).await });
    }

    async fn start_prepared(&self, prepared: Prepared, received: &str) {
        let began = Instant::now();
        let app = &prepared.app;
        let guard = match lock::converge_lock(&self.converge_lock).await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::info!(application = %app.name, error = %e, "no start after the final push; the deploy's start phase starts it");
                return;
            }
        };
        match self.may_start_prepared(&prepared, received).await {
            Ok(None) => {}
            Ok(Some(why)) => {
                tracing::debug!(application = %app.name, why, "no start after the final push");
                return;
            }
            Err(e) => {
                tracing::info!(application = %app.name, error = %e, "no start after the final push; the deploy's start phase starts it");
                return;
            }
        }
        if !self.prepared_starts.take(&prepared) {
            return;
        }
        tracing::info!(application = %app.name, waited_ms = began.elapsed().as_millis() as u64, "starting the prepared container after the final push");
        self.holds.starting(&app.name);
        let started = Instant::now();
        let result = self
            .start_container(&prepared.desired, prepared.routes.as_ref(), app, false)
            .await;
        drop(guard);
        // Nobody follows these events: the deploy's start phase reports its own.
        let (events, _) = mpsc::channel(1);
        let step = format!("start {} after the final push", app.name);
        let result = match result {
            Ok(started_now) => {
                self.wait_until_ready(app, started, started_now, &step, &events)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::warn!(application = %app.name, error = %e, "the start after the final push failed; the deploy's start phase tries again");
        }
        self.end_hold(app, &result).await;
    }

    /// `None` when `prepared` may start now, else why not. Under the converge lock, after
    /// the final push of `received`. What the start checks itself (the records and mount
    /// proofs of every volume, whether the container is the prepared one) is not read twice.
    async fn may_start_prepared(
        &self,
        prepared: &Prepared,
        received: &str,
    ) -> Result<Option<&'static str>, AgentError> {
        let app = &prepared.app;
        if !self.holds.holding(&app.name) {
            return Ok(Some("its connections are no longer held here"));
        }
        let placed = self.last_desired().is_some_and(|d| {
            d.applications.get(&app.name) == Some(app)
                && d.nodes
                    .get(self.address())
                    .is_some_and(|a| a.contains(&app.name))
        });
        if !placed {
            return Ok(Some(
                "the last desired state no longer places it here as prepared",
            ));
        }
        // The start would fail on a volume not owned yet, and reset the held connections:
        // the final push of the last one starts it.
        for (volume, _) in app.volumes().filter(|(v, _)| *v != received) {
            if !self.owns_volume(volume).await? {
                return Ok(Some("not every volume of it is owned here yet"));
            }
        }
        Ok(None)
    }
}
