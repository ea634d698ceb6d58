//! The ownership rules of the migration protocol, as pure decisions over volume records.
//!
//! A volume is owned by exactly one node; ownership carries an epoch that only grows. Moving
//! volume V from S to T: S pushes until T holds S's newest snapshot, then S records "handed
//! to T at epoch e+1" (its copy turns read-only), then T records "owner T, epoch e+1". The
//! newest epoch among all copies is authoritative (`ClusterState::volume_owner`).

use flocker_wire::VolumeState;

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
}

/// What the source of a handoff does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffStep {
    /// Record "handed to T at `epoch`" locally, then tell T.
    GiveAway { epoch: u64 },
    /// Already recorded (a retry after a crash or a lost answer): only tell T again.
    RetellTarget { epoch: u64 },
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
        epoch: local.epoch + 1,
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

/// Decides the target side: accept only a strictly newer epoch, or the same record again.
pub fn accept_ownership(
    me: &str,
    local: &VolumeState,
    epoch: u64,
) -> Result<TakeOver, OwnershipError> {
    if local.owner == me && local.epoch == epoch {
        return Ok(TakeOver::AlreadyOwner);
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
    Ok(TakeOver::Record)
}

/// Checks that this node may write (start the application on, push from) its copy.
pub fn check_owner(me: &str, local: &VolumeState) -> Result<(), OwnershipError> {
    if local.owner == me {
        Ok(())
    } else {
        Err(not_owner(me, local))
    }
}

/// Checks that a push from `from` may land on this node's copy (if any): never on the copy
/// this node owns, which would destroy the only writable copy.
pub fn check_receive(
    me: &str,
    from: &str,
    local: Option<&VolumeState>,
) -> Result<(), OwnershipError> {
    match local {
        Some(v) if v.owner == me => Err(OwnershipError::WouldOverwriteOwner {
            volume: v.name.clone(),
            from: from.to_string(),
        }),
        _ => Ok(()),
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
    let Some(keep_seq) = crate::volume::push_sequence(keep) else {
        return vec![];
    };
    snapshots
        .iter()
        .filter(|s| crate::volume::push_sequence(s).is_some_and(|n| n < keep_seq))
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

    fn vol(owner: &str, epoch: u64, snaps: &[&str]) -> VolumeState {
        VolumeState {
            name: "db".into(),
            owner: owner.into(),
            epoch,
            snapshots: snaps.iter().map(|s| s.to_string()).collect(),
            used_bytes: 0,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
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
    fn takeover_accepts_only_newer_epochs_or_the_same_record() {
        assert_eq!(
            accept_ownership("T", &vol("S", 3, &[]), 4),
            Ok(TakeOver::Record)
        );
        assert_eq!(
            accept_ownership("T", &vol("T", 4, &[]), 4),
            Ok(TakeOver::AlreadyOwner)
        );
        assert!(accept_ownership("T", &vol("S", 4, &[]), 4).is_err());
        assert!(accept_ownership("T", &vol("R", 6, &[]), 5).is_err());
    }

    #[test]
    fn receive_never_overwrites_the_owners_copy() {
        assert!(check_receive("T", "S", Some(&vol("T", 2, &[]))).is_err());
        assert!(check_receive("T", "S", Some(&vol("S", 2, &[]))).is_ok());
        assert!(check_receive("T", "S", None).is_ok());
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
