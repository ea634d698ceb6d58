//! The ownership rules of the migration protocol, as pure decisions over volume records.
//!
//! A volume is owned by exactly one node; ownership carries an epoch that only grows. Moving
//! volume V from S to T: S pushes until T holds S's newest snapshot, then S records "handed
//! to T at epoch e+1" (its copy turns read-only), then T records "owner T, epoch e+1". The
//! newest epoch among all copies is authoritative (`ClusterState::volume_owner`).
//!
//! This module is the bottom of the volume model: the record a copy carries ([`Record`]),
//! the order its fields are written in ([`RecordOrder`]) and the names of push snapshots live
//! here, and the volume backends store what these rules decide. It uses
//! nothing of the backends.

use flocker_wire::VolumeState;

/// Prefix of the snapshots the agent takes for pushes; only these are reported and pruned.
pub use flocker_wire::snapshots::{PUSH_PREFIX, push_sequence};

/// Who owns a copy, at which epoch: what a copy records, and where a received copy says it
/// came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub owner: String,
    pub epoch: u64,
}

/// In which order the fields of a record are written. Backends that cannot write owner and
/// epoch atomically (ZFS user properties are set one at a time) follow it so that a crash
/// between the writes never leaves two owners at one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOrder {
    /// The source giving a volume away: read-only first, then the new epoch, then the new
    /// owner. A crash in between leaves "S at e+1" on S, which still names S alone.
    GiveAway,
    /// The target taking a volume over: owner first, then epoch, then writable. A crash in
    /// between leaves "T at e" on T, outranked by S's "T at e+1".
    TakeOver,
}

/// The name of the next push snapshot: one past the highest sequence present, stamped with
/// the time it is taken (see [`flocker_wire::snapshots`]).
pub fn next_push_snapshot(existing: &[String]) -> String {
    let next = existing
        .iter()
        .filter_map(|s| push_sequence(s))
        .max()
        .map_or(1, |n| n + 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    flocker_wire::snapshots::push_snapshot_name(next, now_ms)
}

/// Keeps only push snapshots, oldest first.
pub fn sort_push_snapshots(mut snapshots: Vec<String>) -> Vec<String> {
    snapshots.retain(|s| push_sequence(s).is_some());
    snapshots.sort_by_key(|s| push_sequence(s));
    snapshots
}

/// Why a protocol step was refused; rendered into the 4xx answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    #[error("volume {volume:?} is owned by {owner} at epoch {epoch}, not by this node ({me})")]
    NotOwner {
        volume: String,
        owner: String,
        epoch: u64,
        me: String,
    },
    #[error(
        "volume {volume:?} is owned by this node: refusing to overwrite it with a copy from {from}"
    )]
    WouldOverwriteOwner { volume: String, from: String },
    #[error(
        "stale ownership record for volume {volume:?}: offered {owner} at epoch {offered}, this copy already records {current_owner} at epoch {current}"
    )]
    Stale {
        volume: String,
        owner: String,
        offered: u64,
        current_owner: String,
        current: u64,
    },
    #[error("{to} does not hold snapshot {snapshot:?} of volume {volume:?} yet: push it first")]
    TargetBehind {
        volume: String,
        to: String,
        snapshot: String,
    },
    #[error("volume {volume:?} has no snapshot to hand off: push it first")]
    NoSnapshot { volume: String },
    #[error("cannot hand volume {volume:?} to this node itself")]
    HandoffToSelf { volume: String },
    #[error(
        "handoff of volume {volume:?} refused: it comes from {from}, but this copy records {owner} as owner at epoch {epoch}; only the recorded owner hands a volume off"
    )]
    NotFromOwner {
        volume: String,
        from: String,
        owner: String,
        epoch: u64,
    },
    #[error(
        "handoff of volume {volume:?} refused: offered epoch {offered}, but this copy is at epoch {current}; a handoff is exactly one epoch up"
    )]
    WrongEpoch {
        volume: String,
        offered: u64,
        current: u64,
    },
    #[error("volume {volume:?}: the epoch cannot grow past {epoch}")]
    EpochExhausted { volume: String, epoch: u64 },
    #[error(
        "push of volume {volume:?} refused: it names {owner} as owner but comes from {from}; only the owner pushes its volume"
    )]
    PushNotFromOwner {
        volume: String,
        owner: String,
        from: String,
    },
}

/// What the source of a handoff does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffStep {
    /// Record "handed to T at `epoch`" locally, then tell T.
    GiveAway { epoch: u64 },
    /// Already recorded (a retry after a crash or a lost answer): only tell T again.
    RetellTarget { epoch: u64 },
}

/// What a promotion (failover) does with this node's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promote {
    /// Record "owner: this node, at `epoch`", writable.
    Record,
    /// Already promoted at that epoch (a retried deploy).
    AlreadyOwner,
}

/// Decides `Promote { volume, epoch }` on this node: only a replica may be promoted, and only
/// to an epoch above everything it records, so the promoted copy outranks the lost owner's.
pub fn check_promote(me: &str, local: &VolumeState, epoch: u64) -> Result<Promote, OwnershipError> {
    if local.owner == me && local.epoch == epoch {
        return Ok(Promote::AlreadyOwner);
    }
    if local.owner == me {
        return Err(OwnershipError::WouldOverwriteOwner {
            volume: local.name.clone(),
            from: "a promotion".to_string(),
        });
    }
    if epoch <= local.epoch {
        return Err(OwnershipError::Stale {
            volume: local.name.clone(),
            owner: me.to_string(),
            offered: epoch,
            current_owner: local.owner.clone(),
            current: local.epoch,
        });
    }
    Ok(Promote::Record)
}

/// Whether this node's copy must be fenced: it records itself as owner, but `other` (a
/// peer's copy) records a newer epoch, so someone else was promoted or handed it since.
pub fn must_fence(me: &str, local: &VolumeState, other: &VolumeState) -> bool {
    local.owner == me && other.epoch > local.epoch && other.owner != me
}

/// Decides the source side of `Handoff { volume, to }`. `target_snapshots` is what T reports
/// holding; T must hold this node's newest snapshot.
pub fn plan_handoff(
    me: &str,
    local: &VolumeState,
    to: &str,
    target_snapshots: Option<&[String]>,
) -> Result<HandoffStep, OwnershipError> {
    if to == me {
        return Err(OwnershipError::HandoffToSelf {
            volume: local.name.clone(),
        });
    }
    if local.owner == to {
        return Ok(HandoffStep::RetellTarget { epoch: local.epoch });
    }
    if local.owner != me {
        return Err(not_owner(me, local));
    }
    let newest = local
        .snapshots
        .last()
        .ok_or_else(|| OwnershipError::NoSnapshot {
            volume: local.name.clone(),
        })?;
    if !target_snapshots.is_some_and(|s| s.contains(newest)) {
        return Err(OwnershipError::TargetBehind {
            volume: local.name.clone(),
            to: to.to_string(),
            snapshot: newest.clone(),
        });
    }
    Ok(HandoffStep::GiveAway {
        epoch: next_epoch(local)?,
    })
}

/// `epoch + 1`, refused rather than wrapped or panicking at the end of the range.
fn next_epoch(local: &VolumeState) -> Result<u64, OwnershipError> {
    local
        .epoch
        .checked_add(1)
        .ok_or_else(|| OwnershipError::EpochExhausted {
            volume: local.name.clone(),
            epoch: local.epoch,
        })
}

/// What the target of a handoff does when told "you own V at `epoch`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// Write the record.
    Record,
    /// Already recorded: nothing to do.
    AlreadyOwner,
}

/// Decides the target side of "you own V at `epoch`", sent by `from` (whose certificate the
/// API checked): only the owner this copy records may hand it over, and only at exactly its
/// epoch + 1. The same record again (a retried handoff) is accepted and changes nothing.
pub fn accept_ownership(
    me: &str,
    local: &VolumeState,
    from: &str,
    epoch: u64,
) -> Result<TakeOver, OwnershipError> {
    if local.owner == me && local.epoch == epoch {
        return Ok(TakeOver::AlreadyOwner);
    }
    if local.owner != from {
        return Err(OwnershipError::NotFromOwner {
            volume: local.name.clone(),
            from: from.to_string(),
            owner: local.owner.clone(),
            epoch: local.epoch,
        });
    }
    if epoch != next_epoch(local)? {
        return Err(OwnershipError::WrongEpoch {
            volume: local.name.clone(),
            offered: epoch,
            current: local.epoch,
        });
    }
    Ok(TakeOver::Record)
}

/// The epoch a move's final push hands the volume off at (the push carries the handoff, see
/// [`accept_pushed_handoff`]): only the owner hands off, at exactly its epoch + 1.
pub fn pushed_handoff_epoch(me: &str, local: &VolumeState) -> Result<u64, OwnershipError> {
    check_owner(me, local)?;
    next_epoch(local)
}

/// Decides the target side of a final push that carries a handoff to `epoch`, before the
/// stream is read: `received` is the record the pushed copy gets ([`received_record`]).
/// The same rules as [`accept_ownership`] on that record: only its owner, who must be the
/// sender `from`, hands it over, and only at exactly its epoch + 1.
pub fn accept_pushed_handoff(
    me: &str,
    volume: &str,
    from: &str,
    received: &Record,
    epoch: u64,
) -> Result<(), OwnershipError> {
    let copy = VolumeState {
        name: volume.to_string(),
        owner: received.owner.clone(),
        epoch: received.epoch,
        snapshots: Vec::new(),
        used_bytes: 0,
    };
    match accept_ownership(me, &copy, from, epoch)? {
        TakeOver::Record => Ok(()),
        // A copy this node owns is never the target of a push.
        TakeOver::AlreadyOwner => Err(OwnershipError::WouldOverwriteOwner {
            volume: volume.to_string(),
            from: from.to_string(),
        }),
    }
}

/// Whether `to`'s copy shows that a final push of this node's copy (`local`, still
/// recording this node as owner) reached it with its handoff, though the answer never came
/// back: `to` owns the volume at exactly `local`'s epoch + 1 and holds `snapshot`, the one
/// pushed. The sender then records the handoff as if the answer had arrived.
pub fn took_over_by_push(
    local: &VolumeState,
    to: &str,
    remote: &VolumeState,
    snapshot: &str,
) -> bool {
    remote.owner == to
        && local.epoch.checked_add(1) == Some(remote.epoch)
        && remote.snapshots.iter().any(|s| s == snapshot)
}

/// Checks that this node may write (start the application on, push from) its copy.
pub fn check_owner(me: &str, local: &VolumeState) -> Result<(), OwnershipError> {
    if local.owner == me {
        Ok(())
    } else {
        Err(not_owner(me, local))
    }
}

/// Checks that a push from `from` (whose certificate the API checked), claiming the record
/// "`owner` at `epoch`", may land on this node's copy of `volume` (if any). The pusher must
/// be the owner it names; the copy this node owns is never a target (it would destroy the
/// only writable copy); an existing replica takes pushes from its recorded owner at its
/// epoch or later, or from anyone at a newer epoch (ownership moved on), never from a
/// stale or rival owner.
pub fn check_receive(
    me: &str,
    volume: &str,
    from: &str,
    owner: &str,
    epoch: u64,
    local: Option<&VolumeState>,
) -> Result<(), OwnershipError> {
    if owner != from {
        return Err(OwnershipError::PushNotFromOwner {
            volume: volume.to_string(),
            owner: owner.to_string(),
            from: from.to_string(),
        });
    }
    match local {
        Some(v) if v.owner == me => Err(OwnershipError::WouldOverwriteOwner {
            volume: v.name.clone(),
            from: from.to_string(),
        }),
        Some(v) if epoch > v.epoch || (epoch == v.epoch && v.owner == from) => Ok(()),
        Some(v) => Err(OwnershipError::Stale {
            volume: v.name.clone(),
            owner: owner.to_string(),
            offered: epoch,
            current_owner: v.owner.clone(),
            current: v.epoch,
        }),
        None => Ok(()),
    }
}

/// The record a received copy gets: the sender's record, unless this copy already knows a
/// newer one (epochs only grow).
pub fn received_record(local: Option<&VolumeState>, owner: &str, epoch: u64) -> (String, u64) {
    match local {
        Some(v) if v.epoch > epoch => (v.owner.clone(), v.epoch),
        _ => (owner.to_string(), epoch),
    }
}

/// The newest snapshot both sides hold, the base of an incremental push.
pub fn newest_common<'a>(source: &'a [String], target: &[String]) -> Option<&'a str> {
    source
        .iter()
        .rev()
        .find(|s| target.contains(s))
        .map(String::as_str)
}

/// The push snapshots to destroy once `keep` is known to be on both sides: every older one.
pub fn prunable(snapshots: &[String], keep: &str) -> Vec<String> {
    let Some(keep_seq) = push_sequence(keep) else {
        return vec![];
    };
    snapshots
        .iter()
        .filter(|s| push_sequence(s).is_some_and(|n| n < keep_seq))
        .cloned()
        .collect()
}

fn not_owner(me: &str, local: &VolumeState) -> OwnershipError {
    OwnershipError::NotOwner {
        volume: local.name.clone(),
        owner: local.owner.clone(),
        epoch: local.epoch,
        me: me.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_snapshot_names_sort_by_age() {
        let snaps = vec![
            "push-0000000002".to_string(),
            "manual".into(),
            "push-0000000010".into(),
        ];
        assert!(next_push_snapshot(&snaps).starts_with("push-0000000011-"));
        assert!(next_push_snapshot(&[]).starts_with("push-0000000001-"));
        assert_eq!(
            sort_push_snapshots(snaps),
            vec!["push-0000000002".to_string(), "push-0000000010".into()]
        );
    }

    fn vol(owner: &str, epoch: u64, snaps: &[&str]) -> VolumeState {
        VolumeState {
            name: "db".into(),
            owner: owner.into(),
            epoch,
            snapshots: snaps.iter().map(|s| s.to_string()).collect(),
            used_bytes: 0,
        }
    }

    fn rec(owner: &str, epoch: u64) -> Record {
        Record {
            owner: owner.into(),
            epoch,
        }
    }

    #[test]
    fn a_pushed_handoff_follows_the_handoff_rules() {
        assert_eq!(pushed_handoff_epoch("S", &vol("S", 3, &["a"])), Ok(4));
        assert!(matches!(
            pushed_handoff_epoch("S", &vol("T", 3, &["a"])),
            Err(OwnershipError::NotOwner { .. })
        ));
        assert!(matches!(
            pushed_handoff_epoch("S", &vol("S", u64::MAX, &["a"])),
            Err(OwnershipError::EpochExhausted { .. })
        ));
        // Exactly one above the record the stream gives the copy, from its owner.
        assert_eq!(
            accept_pushed_handoff("T", "db", "S", &rec("S", 3), 4),
            Ok(())
        );
        assert!(matches!(
            accept_pushed_handoff("T", "db", "S", &rec("S", 3), 5),
            Err(OwnershipError::WrongEpoch { .. })
        ));
        assert!(matches!(
            accept_pushed_handoff("T", "db", "S", &rec("S", 3), 3),
            Err(OwnershipError::WrongEpoch { .. })
        ));
        // A copy that keeps a newer record of another owner is not the sender's to give.
        assert!(matches!(
            accept_pushed_handoff("T", "db", "S", &rec("R", 7), 8),
            Err(OwnershipError::NotFromOwner { .. })
        ));
        assert!(matches!(
            accept_pushed_handoff("T", "db", "S", &rec("T", 4), 4),
            Err(OwnershipError::WouldOverwriteOwner { .. })
        ));
        assert!(matches!(
            accept_pushed_handoff("T", "db", "S", &rec("S", u64::MAX), 0),
            Err(OwnershipError::EpochExhausted { .. })
        ));
    }

    #[test]
    fn a_lost_answer_is_recognised_only_from_the_takeover_itself() {
        let local = vol("S", 3, &["p1", "p2"]);
        assert!(took_over_by_push(
            &local,
            "T",
            &vol("T", 4, &["p1", "p2"]),
            "p2"
        ));
        // Not yet received, not at the next epoch, or someone else's.
        assert!(!took_over_by_push(&local, "T", &vol("T", 4, &["p1"]), "p2"));
        assert!(!took_over_by_push(
            &local,
            "T",
            &vol("T", 5, &["p1", "p2"]),
            "p2"
        ));
        assert!(!took_over_by_push(
            &local,
            "T",
            &vol("S", 3, &["p1", "p2"]),
            "p2"
        ));
        assert!(!took_over_by_push(
            &local,
            "T",
            &vol("R", 4, &["p1", "p2"]),
            "p2"
        ));
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_a_replica_is_promoted_and_only_upwards() {
        let replica = vol("S", 3, &["push-0000000004"]);
        assert_eq!(check_promote("T", &replica, 5), Ok(Promote::Record));
        assert!(matches!(
            check_promote("T", &replica, 3),
            Err(OwnershipError::Stale { .. })
        ));
        assert_eq!(
            check_promote("T", &vol("T", 5, &[]), 5),
            Ok(Promote::AlreadyOwner)
        );
        assert!(matches!(
            check_promote("T", &vol("T", 4, &[]), 6),
            Err(OwnershipError::WouldOverwriteOwner { .. })
        ));
    }

    #[test]
    fn a_stale_owner_is_fenced_by_any_newer_epoch() {
        let mine = vol("S", 3, &[]);
        assert!(must_fence("S", &mine, &vol("T", 5, &[])));
        assert!(!must_fence("S", &mine, &vol("S", 3, &[])));
        assert!(!must_fence("S", &mine, &vol("T", 3, &[])));
        assert!(!must_fence("S", &vol("T", 5, &[]), &vol("T", 6, &[])));
    }

    #[test]
    fn handoff_needs_the_target_to_hold_the_newest_snapshot() {
        let local = vol("S", 3, &["push-0000000001", "push-0000000002"]);
        let behind = s(&["push-0000000001"]);
        assert!(matches!(
            plan_handoff("S", &local, "T", Some(&behind)),
            Err(OwnershipError::TargetBehind { .. })
        ));
        assert!(matches!(
            plan_handoff("S", &local, "T", None),
            Err(OwnershipError::TargetBehind { .. })
        ));
        let current = s(&["push-0000000002"]);
        assert_eq!(
            plan_handoff("S", &local, "T", Some(&current)),
            Ok(HandoffStep::GiveAway { epoch: 4 })
        );
    }

    #[test]
    fn handoff_retry_only_retells_and_strangers_are_refused() {
        let handed = vol("T", 4, &["push-0000000002"]);
        assert_eq!(
            plan_handoff("S", &handed, "T", None),
            Ok(HandoffStep::RetellTarget { epoch: 4 })
        );
        let foreign = vol("R", 4, &["push-0000000002"]);
        assert!(matches!(
            plan_handoff("S", &foreign, "T", Some(&s(&["push-0000000002"]))),
            Err(OwnershipError::NotOwner { .. })
        ));
        assert!(matches!(
            plan_handoff("S", &vol("S", 1, &[]), "S", None),
            Err(OwnershipError::HandoffToSelf { .. })
        ));
        assert!(matches!(
            plan_handoff("S", &vol("S", 1, &[]), "T", Some(&[])),
            Err(OwnershipError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn takeover_accepts_only_the_recorded_owner_one_epoch_up() {
        assert_eq!(
            accept_ownership("T", &vol("S", 3, &[]), "S", 4),
            Ok(TakeOver::Record)
        );
        assert_eq!(
            accept_ownership("T", &vol("T", 4, &[]), "S", 4),
            Ok(TakeOver::AlreadyOwner)
        );
        // A third node is not the owner this copy records.
        assert!(matches!(
            accept_ownership("T", &vol("S", 3, &[]), "R", 4),
            Err(OwnershipError::NotFromOwner { .. })
        ));
        // The owner, but not exactly one epoch up.
        for epoch in [3, 5, u64::MAX] {
            assert!(matches!(
                accept_ownership("T", &vol("S", 3, &[]), "S", epoch),
                Err(OwnershipError::WrongEpoch { .. })
            ));
        }
        assert!(accept_ownership("T", &vol("S", 4, &[]), "S", 4).is_err());
        // The end of the range is an error, not a panic.
        assert!(matches!(
            accept_ownership("T", &vol("S", u64::MAX, &[]), "S", 0),
            Err(OwnershipError::EpochExhausted { .. })
        ));
        assert!(matches!(
            plan_handoff(
                "S",
                &vol("S", u64::MAX, &["push-1"]),
                "T",
                Some(&s(&["push-1"]))
            ),
            Err(OwnershipError::EpochExhausted { .. })
        ));
    }

    #[test]
    fn receive_only_from_the_owner_it_names_and_never_onto_the_owners_copy() {
        let ok = |local: Option<&VolumeState>, from: &str, owner: &str, epoch: u64| {
            check_receive("T", "db", from, owner, epoch, local).is_ok()
        };
        assert!(!ok(Some(&vol("T", 2, &[])), "S", "S", 3), "T owns it");
        assert!(ok(Some(&vol("S", 2, &[])), "S", "S", 2), "its owner");
        assert!(ok(None, "S", "S", 1), "a new replica");
        assert!(!ok(None, "R", "S", 1), "R claims to push S's volume");
        assert!(
            !ok(Some(&vol("S", 2, &[])), "R", "R", 2),
            "a rival at the same epoch"
        );
        assert!(!ok(Some(&vol("S", 2, &[])), "S", "S", 1), "a stale record");
        assert!(
            ok(Some(&vol("S", 2, &[])), "U", "U", 3),
            "ownership moved on to U"
        );
        assert_eq!(
            received_record(Some(&vol("R", 9, &[])), "S", 3),
            ("R".to_string(), 9)
        );
        assert_eq!(received_record(None, "S", 3), ("S".to_string(), 3));
    }

    #[test]
    fn incremental_base_and_pruning() {
        let src = s(&["push-0000000001", "push-0000000002", "push-0000000003"]);
        assert_eq!(
            newest_common(&src, &s(&["push-0000000001", "push-0000000002"])),
            Some("push-0000000002")
        );
        assert_eq!(newest_common(&src, &[]), None);
        assert_eq!(
            prunable(&src, "push-0000000003"),
            s(&["push-0000000001", "push-0000000002"])
        );
        assert!(prunable(&src, "manual").is_empty());
    }
}
