//! The migration protocol's agent side: pushes (pre-copy and final) to a peer, receiving
//! a peer's push, giving a volume away and taking it over, and the parameters of those
//! agent-to-agent requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio_util::io::SyncIoBridge;

use flocker_client::ClientError;
use flocker_wire::{ConvergeEvent, VolumeState};

use crate::ownership::{self, HandoffStep, RecordOrder, TakeOver};
use crate::ownership::{Record, next_push_snapshot};
use crate::transfer;
use crate::volume::{VolumeError, check_name};

use flocker_wire::transfer::{ReceiveParams, ReceiveReport, TakeOverRequest};

use super::{Agent, AgentError, Events, STORAGE_TIMEOUT};

/// At most this many pushes per pre-copy: the first and its catch-up passes.
const PRE_COPY_PASSES: u32 = 3;
/// A pre-copy pass that took at least this long is followed by another.
const CATCH_UP_AFTER: Duration = Duration::from_secs(1);

impl Agent {
    async fn remote_volume(
        &self,
        node: &str,
        name: &str,
    ) -> Result<Option<VolumeState>, AgentError> {
        Ok(self.peers.volume(node, name).await?)
    }

    /// Pushes the volume to `to`. A pre-copy (`last` false) that took long is followed by
    /// catch-up passes while the application still runs, as live VM migration does: each
    /// carries only what changed during the one before (and lets the target finish writing
    /// the big one out), so the final push after the stop is left with the last moments only.
    pub(super) async fn push_volume(
        &self,
        name: &str,
        to: &str,
        last: bool,
        step: &str,
        events: &Events,
    ) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        let phase = if last { "final-push" } else { "pre-copy" };
        for pass in 1..=PRE_COPY_PASSES {
            let started = std::time::Instant::now();
            let pushed = self
                .push_pass(name, to, last, step, events, self.move_rate)
                .await?;
            self.metrics.move_phase(phase, started.elapsed());
            let quick = started.elapsed() < CATCH_UP_AFTER;
            if last || !pushed || quick {
                break;
            }
            tracing::info!(
                volume = name,
                to,
                pass,
                took_ms = started.elapsed().as_millis() as u64,
                "pre-copy took long: catching up while the application runs"
            );
        }
        Ok(())
    }

    /// One push of everything since the newest snapshot both sides hold; `false` when there
    /// was nothing to push (the target already owns the volume). The caller holds the lock.
    async fn push_pass(
        &self,
        name: &str,
        to: &str,
        last: bool,
        step: &str,
        events: &Events,
        limit_rate: Option<u64>,
    ) -> Result<bool, AgentError> {
        let began = std::time::Instant::now();
        // Four reads at once (each a storage, Docker or peer round trip; a final push is in
        // the clients' pause), judged below in the order the checks need them. The proof
        // that the dataset is mounted where the application wrote is only a read (or the
        // mount of a dataset over an empty directory), so it need not wait for the checks.
        let ((local, local_took), (remote, remote_took), (user, user_took), (proof, proof_took)) = tokio::join!(
            timed(self.local_volume(name)),
            timed(self.remote_volume(to, name)),
            timed(async {
                if last {
                    self.using_volume(name).await
                } else {
                    Ok(None)
                }
            }),
            timed(self.prove_volume(name))
        );
        let local = local?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))?;
        if local.owner == to {
            // A retry after the handoff: the target already holds everything.
            tracing::info!(
                volume = name,
                to,
                last,
                "already handed off, nothing to push"
            );
            return Ok(false);
        }
        ownership::check_owner(&self.me, &local)?;
        // The final push hands the volume off with its stream (one round trip, not two).
        let handoff = if last {
            Some(ownership::pushed_handoff_epoch(&self.me, &local)?)
        } else {
            None
        };
        if let Some(c) = user?
            && c.running
        {
            // The final push is what the handoff relies on: nothing may be written after it.
            return Err(AgentError::Conflict(format!(
                "final push of volume {name:?}: application {:?} still runs here; stop it first",
                c.application.name
            )));
        }
        let remote = remote?;
        if let (Some(epoch), Some(r)) = (handoff, &remote)
            && let Some(newest) = local.snapshots.last()
            && ownership::took_over_by_push(&local, to, r, newest)
        {
            // An earlier final push got through, its answer did not (or this agent died
            // before recording it): record the handoff now.
            self.record_given_away(name, to, epoch).await?;
            return Ok(false);
        }
        let (base, replace) = match &remote {
            None => (None, false),
            Some(r) => match ownership::newest_common(&local.snapshots, &r.snapshots) {
                Some(common) => (Some(common.to_string()), false),
                // A replica left behind by an earlier move, whose snapshots were pruned
                // since: it is not the only copy (we own the volume), so it may be replaced.
                None if r.owner != to && r.epoch <= local.epoch => (None, true),
                None => {
                    return Err(AgentError::Conflict(format!(
                        "{to} holds a copy of volume {name:?} sharing no snapshot with this node; remove that copy first"
                    )));
                }
            },
        };
        // The snapshot is what the target will run on: it must be of the volume itself.
        proof?;
        let checks = began.elapsed();
        let snapshot = next_push_snapshot(&local.snapshots);
        // A target sets the quota only on a copy a full stream creates (a first push, or
        // one replacing a stale replica): for an incremental the lookup (a storage round
        // trip, in a final push's pause) is skipped.
        let first_copy = base.is_none();
        let quota = {
            let (n, s) = (name.to_string(), snapshot.clone());
            self.blocking(move |b| {
                b.snapshot(&n, &s)?;
                if first_copy { b.quota(&n) } else { Ok(None) }
            })
            .await?
        };
        let params = ReceiveParams {
            snapshot: snapshot.clone(),
            base: base.clone(),
            owner: local.owner.clone(),
            epoch: local.epoch,
            from: self.me.clone(),
            quota,
            replace,
            handoff,
        };
        let snapshotted = began.elapsed();
        tracing::info!(volume = name, to, %snapshot, base = ?base, last, "pushing");
        let sent = Arc::new(AtomicU64::new(0));
        let (n, b, s) = (name.to_string(), base.clone(), snapshot.clone());
        // The estimate (`zfs send -nP`, or what the backend can tell) gives the deploy a
        // total and an ETA; unknown for some backends and for incrementals on zfs-fuse.
        let (mut source, estimate) = self
            .blocking(move |be| {
                let source = be.send(&n, b.as_deref(), &s)?;
                let estimate = source.size_hint();
                Ok((source, estimate))
            })
            .await?;
        let (writer, reader) = tokio::io::duplex(1 << 20);
        let mut bridge = SyncIoBridge::new(writer);
        let counter = sent.clone();
        // The source reaps its process: a failed `zfs send` is a read error at its end, so
        // a broken source never yields a complete stream.
        let sender = tokio::task::spawn_blocking(move || {
            let result = transfer::send(source.as_mut(), &mut bridge, counter, limit_rate);
            drop(bridge);
            result
        });
        let body = flocker_client::body_from_reader(reader);
        let ticker = {
            let (events, step, sent) = (events.clone(), step.to_string(), sent.clone());
            tokio::spawn(async move {
                // At once (so the total is known from the start), then every second.
                loop {
                    let _ = events
                        .send(ConvergeEvent::Progress {
                            step: step.clone(),
                            bytes_done: sent.load(Ordering::Relaxed),
                            bytes_total: estimate,
                        })
                        .await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let answer: Result<ReceiveReport, ClientError> =
            self.peers.receive(to, name, &params, body).await;
        let answered = began.elapsed();
        ticker.abort();
        let send_result = sender
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let transfer_err = |detail: String| AgentError::Transfer {
            volume: name.to_string(),
            detail,
        };
        let report = match answer {
            Ok(report) => report,
            Err(e) => {
                if let Some(epoch) = handoff
                    && self.took_over(&local, name, to, &snapshot).await
                {
                    tracing::warn!(volume = name, to, error = %e, "the final push's answer was lost, but the target took the volume over");
                    self.record_given_away(name, to, epoch).await?;
                    return Ok(true);
                }
                return Err(e.into());
            }
        };
        let bytes = send_result.map_err(|e| transfer_err(e.to_string()))?;
        if report.snapshot != snapshot {
            return Err(transfer_err(format!(
                "{to} confirmed snapshot {:?}, expected {snapshot:?}",
                report.snapshot
            )));
        }
        if let Some(epoch) = handoff {
            if report.owner.as_deref() != Some(to) || report.epoch != Some(epoch) {
                return Err(AgentError::Conflict(format!(
                    "{to} received the final push of volume {name:?} but did not take it over at epoch {epoch} \
                     (it reports owner {:?} at epoch {:?}; an agent from before the handoff rode on the final push?)",
                    report.owner, report.epoch
                )));
            }
            self.record_given_away(name, to, epoch).await?;
        }
        let _ = events
            .send(ConvergeEvent::Progress {
                step: step.to_string(),
                bytes_done: bytes,
                bytes_total: Some(bytes),
            })
            .await;
        // Both sides now hold `snapshot`: older push snapshots are no longer a base, except
        // the newest one another standby holds (its next push starts there).
        let keep = self.note_pushed(name, to, &snapshot);
        let recorded = began.elapsed();
        let mut known = local.snapshots;
        known.push(snapshot.clone());
        self.prune(name, keep, last, Some(known)).await?;
        self.metrics.sent(bytes);
        tracing::info!(
            volume = name,
            to,
            %snapshot,
            bytes,
            checks_ms = ms(checks),
            local_ms = ms(local_took),
            remote_ms = ms(remote_took),
            user_ms = ms(user_took),
            proof_ms = ms(proof_took),
            snapshot_ms = ms(snapshotted - checks),
            stream_ms = ms(answered - snapshotted),
            record_ms = ms(recorded - answered),
            "pushed"
        );
        Ok(true)
    }

    /// Everything a receive can be refused for before reading the stream; returns this
    /// node's copy, if any.
    async fn check_receive(
        &self,
        name: &str,
        params: &ReceiveParams,
    ) -> Result<Option<VolumeState>, AgentError> {
        check_name(name)?;
        check_name(&params.snapshot)?;
        if let Some(b) = &params.base {
            check_name(b)?;
        }
        let local = self.local_volume(name).await?;
        ownership::check_receive(
            &self.me,
            name,
            &params.from,
            &params.owner,
            params.epoch,
            local.as_ref(),
        )?;
        if let Some(epoch) = params.handoff {
            let (owner, at) =
                ownership::received_record(local.as_ref(), &params.owner, params.epoch);
            let received = Record { owner, epoch: at };
            ownership::accept_pushed_handoff(&self.me, name, &params.from, &received, epoch)?;
        }
        match (&local, &params.base) {
            (None, Some(base)) => Err(AgentError::Conflict(format!(
                "volume {name:?}: incremental stream from {base:?}, but this node has no copy"
            ))),
            (Some(v), None) if params.replace && v.owner != self.me && v.epoch <= params.epoch => {
                Ok(local)
            }
            (Some(_), None) => Err(AgentError::Conflict(format!(
                "volume {name:?}: full stream refused, this node already has a copy"
            ))),
            (Some(v), Some(base)) if !v.snapshots.contains(base) => Err(AgentError::Conflict(
                format!("volume {name:?}: this copy does not hold base snapshot {base:?}"),
            )),
            (Some(v), _) if v.snapshots.contains(&params.snapshot) => {
                Err(AgentError::Conflict(format!(
                    "volume {name:?}: this copy already holds snapshot {:?}",
                    params.snapshot
                )))
            }
            _ => Ok(local),
        }
    }

    /// `POST /v1/volumes/NAME/receive`: applies a pushed stream to this node's copy.
    pub async fn receive(
        self: &Arc<Self>,
        name: &str,
        params: ReceiveParams,
        body: impl AsyncRead + Send + Unpin + 'static,
    ) -> Result<ReceiveReport, AgentError> {
        let _lock = self.lock_volume(name).await;
        let began = std::time::Instant::now();
        let local = match self.check_receive(name, &params).await {
            Ok(local) => local,
            Err(e) => {
                // An HTTP/1.1 client still writing the stream would see a broken connection
                // instead of this answer: read the stream away first.
                drain(body).await;
                return Err(e);
            }
        };
        let (n, b, s) = (
            name.to_string(),
            params.base.clone(),
            params.snapshot.clone(),
        );
        let replace_stale = local.is_some() && params.base.is_none();
        // A stale replica is replaced only once the stream verified (the sink swaps it in
        // at commit); a refused or cut-off stream leaves it as it was.
        let mut sink = match self
            .blocking(move |be| be.receive(&n, b.as_deref(), &s, replace_stale))
            .await
        {
            Ok(sink) => sink,
            Err(e) => {
                drain(body).await;
                return Err(e);
            }
        };
        let record = match params.handoff {
            // Checked before the stream was read (`check_receive`): the sender, the owner
            // this copy gets, hands it over at exactly the next epoch.
            Some(epoch) => Record {
                owner: self.me.clone(),
                epoch,
            },
            None => {
                let (owner, epoch) =
                    ownership::received_record(local.as_ref(), &params.owner, params.epoch);
                Record { owner, epoch }
            }
        };
        let writable = record.owner == self.me;
        let reported = record.clone();
        let (n, snap) = (name.to_string(), params.snapshot.clone());
        let local = local.filter(|_| !replace_stale);
        let quota = params.quota.filter(|_| local.is_none());
        let backend = self.volumes.clone();
        let mut bridge = SyncIoBridge::new(body);
        let checked = began.elapsed();
        // The stream verified end to end is committed (swapped in), and recorded, on one
        // blocking thread: a sender that hangs up right after its last frame drops this
        // request's future, but never leaves a received copy without its record. Any
        // failure before the commit aborts the sink, which leaves no partial copy and the
        // replica as it was.
        let (bytes, streamed) = tokio::task::spawn_blocking(move || -> Result<_, AgentError> {
            let bytes = transfer::receive(&mut bridge, sink.as_mut()).map_err(|e| {
                // Read the rest of the stream away so the sender gets this answer.
                drop(sink);
                let _ = std::io::copy(&mut bridge, &mut std::io::sink());
                AgentError::from(e)
            })?;
            let streamed = began.elapsed();
            backend.set_record(&n, &record, writable, RecordOrder::TakeOver)?;
            if let Some(q) = quota {
                backend.set_quota(&n, q)?;
            }
            Ok((bytes, streamed))
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
        // Older push snapshots go after the answer: a final push's pause does not wait.
        let recorded = began.elapsed();
        self.prune(name, snap, params.handoff.is_some(), None)
            .await?;
        self.metrics.received(bytes);
        tracing::info!(
            volume = name,
            from = %params.from,
            snapshot = %params.snapshot,
            bytes,
            checks_ms = ms(checked),
            stream_ms = ms(streamed - checked),
            record_ms = ms(recorded - streamed),
            "received"
        );
        if params.handoff.is_some() {
            tracing::info!(volume = name, from = %params.from, epoch = reported.epoch, "took ownership with the final push");
            self.start_after_final_push(name);
            crate::test_hooks::pause_at(crate::test_hooks::Hook::HoldPushAnswer).await;
        }
        Ok(ReceiveReport {
            snapshot: params.snapshot,
            bytes,
            owner: Some(reported.owner),
            epoch: Some(reported.epoch),
        })
    }

    pub(super) async fn handoff(&self, name: &str, to: &str) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        let local = self
            .local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))?;
        if local.owner == self.me
            && let Some(c) = self.using_volume(name).await?
            && c.running
        {
            return Err(AgentError::Conflict(format!(
                "application {:?} still runs here; stop it before handing its volume {name:?} off",
                c.application.name
            )));
        }
        let remote = if local.owner == to {
            None
        } else {
            self.remote_volume(to, name).await?
        };
        let step = ownership::plan_handoff(
            &self.me,
            &local,
            to,
            remote.as_ref().map(|r| r.snapshots.as_slice()),
        )?;
        let epoch = match step {
            HandoffStep::GiveAway { epoch } => {
                self.prove_volume(name).await?;
                self.record_given_away(name, to, epoch).await?;
                epoch
            }
            HandoffStep::RetellTarget { epoch } => epoch,
        };
        let request = TakeOverRequest {
            epoch,
            from: self.me.clone(),
        };
        let theirs = self.peers.handoff(to, name, &request).await?;
        if theirs.owner != to || theirs.epoch != epoch {
            return Err(AgentError::Conflict(format!(
                "{to} reports volume {name:?} owned by {} at epoch {} after the handoff at epoch {epoch}",
                theirs.owner, theirs.epoch
            )));
        }
        tracing::info!(volume = name, to, epoch, "handoff complete");
        Ok(())
    }

    /// Destroys the push snapshots that are no longer a base (all older than `keep`, see
    /// [`ownership::prunable`]): at once, or for a final push (`after` true) once the push or
    /// receive has answered, so the move's pause does not wait for it. Pre-copy and
    /// replication pushes prune at once: a replication round finding the volume's lock held
    /// by a pruning task would skip. `known` is the copy's snapshots when the caller has
    /// them (saving a listing); the task after the answer lists them afresh.
    async fn prune(
        &self,
        name: &str,
        keep: String,
        after: bool,
        known: Option<Vec<String>>,
    ) -> Result<(), AgentError> {
        if after {
            self.prune_after(name, keep);
            return Ok(());
        }
        let n = name.to_string();
        self.blocking(move |b| prune_push_snapshots(b, &n, &keep, known))
            .await
            .map(drop)
    }

    /// [`Self::prune`] in a task that takes the volume's lock, so it runs after the push or
    /// receive that asked for it and before the next one (which would prune the same
    /// snapshots again if this failed).
    fn prune_after(&self, name: &str, keep: String) {
        let lock = self.volume_lock(name);
        let backend = self.volumes.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let _lock = lock.lock_owned().await;
            let n = name.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                prune_push_snapshots(backend.as_ref(), &n, &keep, None)
            });
            match tokio::time::timeout(STORAGE_TIMEOUT, pruned).await {
                Ok(Ok(Ok(count))) => {
                    tracing::debug!(volume = %name, count, "pruned push snapshots")
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(volume = %name, error = %e, "pruning push snapshots failed; the next push prunes again")
                }
                Ok(Err(e)) => {
                    tracing::warn!(volume = %name, error = %e, "pruning push snapshots failed")
                }
                Err(_) => {
                    tracing::warn!(volume = %name, "pruning push snapshots did not finish within the storage timeout")
                }
            }
        });
    }

    /// Records on this node's copy that `to` owns the volume at `epoch` (read-only here from
    /// now on): the source's side of a handoff, once `to` holds the newest snapshot.
    async fn record_given_away(&self, name: &str, to: &str, epoch: u64) -> Result<(), AgentError> {
        let record = Record {
            owner: to.to_string(),
            epoch,
        };
        let n = name.to_string();
        self.blocking(move |b| b.set_record(&n, &record, false, RecordOrder::GiveAway))
            .await?;
        tracing::info!(volume = name, to, epoch, "recorded handoff");
        Ok(())
    }

    /// Whether `to` reports owning the volume at `local`'s next epoch with `snapshot` (the
    /// final push it answered reached it); `false` when it cannot be asked.
    async fn took_over(&self, local: &VolumeState, name: &str, to: &str, snapshot: &str) -> bool {
        match self.remote_volume(to, name).await {
            Ok(Some(remote)) => ownership::took_over_by_push(local, to, &remote, snapshot),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(volume = name, to, error = %e, "cannot ask the target whether it took the volume over");
                false
            }
        }
    }

    /// `POST /v1/volumes/NAME/handoff`: this node becomes the owner at `epoch`.
    pub async fn take_over(
        &self,
        name: &str,
        request: TakeOverRequest,
    ) -> Result<VolumeState, AgentError> {
        check_name(name)?;
        let _lock = self.lock_volume(name).await;
        let local = self.local_volume(name).await?.ok_or_else(|| {
            AgentError::NotFound(format!(
                "volume {name:?} does not exist on this node ({}): push it first",
                self.me
            ))
        })?;
        match ownership::accept_ownership(&self.me, &local, &request.from, request.epoch)? {
            TakeOver::AlreadyOwner => {}
            TakeOver::Record => {
                let record = Record {
                    owner: self.me.clone(),
                    epoch: request.epoch,
                };
                let n = name.to_string();
                self.blocking(move |b| b.set_record(&n, &record, true, RecordOrder::TakeOver))
                    .await?;
                tracing::info!(volume = name, from = %request.from, epoch = request.epoch, "took ownership");
            }
        }
        self.local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} vanished")))
    }

    /// Records that `peer` holds `snapshot` of `volume`, and returns the oldest snapshot a
    /// current standby of the volume still needs as its base (`snapshot` when none needs an
    /// older one). Pruning keeps that one and everything newer.
    fn note_pushed(&self, volume: &str, peer: &str, snapshot: &str) -> String {
        let standbys: Vec<String> = self
            .last_desired()
            .and_then(|d| d.standby.get(volume).map(|s| s.nodes.clone()))
            .unwrap_or_default();
        let Ok(mut pushed) = self.pushed_to.lock() else {
            return snapshot.to_string();
        };
        let marks = pushed.entry(volume.to_string()).or_default();
        marks.insert(peer.to_string(), snapshot.to_string());
        marks.retain(|node, _| standbys.contains(node) || node == peer);
        marks
            .values()
            .filter(|s| ownership::push_sequence(s).is_some())
            .min_by_key(|s| ownership::push_sequence(s))
            .cloned()
            .unwrap_or_else(|| snapshot.to_string())
    }

    /// `Promote { volume, epoch }`: this node's replica becomes the owning copy. The person
    /// who asked (`deploy --failover`) decided the owner is lost; the checks here make sure
    /// the promoted copy outranks every record this node has seen.
    pub(super) async fn promote(&self, name: &str, epoch: u64) -> Result<(), AgentError> {
        let _lock = self.lock_volume(name).await;
        let local = self
            .local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("no replica of volume {name:?} here")))?;
        match ownership::check_promote(&self.me, &local, epoch)? {
            ownership::Promote::AlreadyOwner => Ok(()),
            ownership::Promote::Record => {
                let record = Record {
                    owner: self.me.clone(),
                    epoch,
                };
                let n = name.to_string();
                self.blocking(move |b| b.set_record(&n, &record, true, RecordOrder::TakeOver))
                    .await?;
                tracing::warn!(
                    volume = name,
                    lost_owner = %local.owner,
                    lost_epoch = local.epoch,
                    epoch,
                    newest = ?local.snapshots.last(),
                    "promoted this replica to owner (failover)"
                );
                Ok(())
            }
        }
    }

    /// One replication push of `name` to the standby `to`, unless a move holds the volume
    /// (replication never waits for or slows a move: it skips this round). `Ok(false)` when
    /// skipped.
    pub(crate) async fn replicate_once(&self, name: &str, to: &str) -> Result<bool, AgentError> {
        let Ok(_guard) = self.volume_lock(name).try_lock_owned() else {
            return Ok(false);
        };
        // Nobody reads replication progress: with the receiver gone, sends fail at once.
        let (events, _) = tokio::sync::mpsc::channel(1);
        self.push_pass(name, to, false, "replicate", &events, self.replication_rate)
            .await
    }

    /// Asks `node` for its copy of `name` (fencing compares epochs).
    pub(crate) async fn peer_volume(
        &self,
        node: &str,
        name: &str,
    ) -> Result<Option<VolumeState>, AgentError> {
        self.remote_volume(node, name).await
    }

    /// `GET /v1/volumes/NAME`.
    pub async fn volume(&self, name: &str) -> Result<VolumeState, AgentError> {
        check_name(name)?;
        self.local_volume(name)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("volume {name:?} does not exist here")))
    }
}

/// Reads a pushed stream to its end (bounded in time), discarding it.
pub async fn drain(mut body: impl AsyncRead + Unpin) {
    let _ = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::io::copy(&mut body, &mut tokio::io::sink()),
    )
    .await;
}

/// Destroys the push snapshots of `name` older than `keep` that are no longer a base; how
/// many. `known` is the copy's snapshots if the caller has them, else they are listed.
fn prune_push_snapshots(
    backend: &dyn crate::volume::VolumeBackend,
    name: &str,
    keep: &str,
    known: Option<Vec<String>>,
) -> Result<usize, VolumeError> {
    let snapshots = match known {
        Some(s) => s,
        None => match backend.get(name)? {
            Some(v) => v.snapshots,
            None => return Ok(0),
        },
    };
    let prune = ownership::prunable(&snapshots, keep);
    for s in &prune {
        backend.destroy_snapshot(name, s)?;
    }
    Ok(prune.len())
}

/// Milliseconds, for the timing fields of the push and receive log lines.
/// Runs `f`, returning its output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let began = std::time::Instant::now();
    let out = f.await;
    (out, began.elapsed())
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
