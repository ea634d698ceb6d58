//! Names of the snapshots agents take for pushes: `push-SEQUENCE-UNIXMS`. The sequence
//! (zero-padded, so that name order is age order on every backend) orders them; the time the
//! snapshot was taken travels with the name to every copy, so any node can tell how old a
//! replica is (a failover's data-loss window) without a clock of the owner's. Names from
//! before the time was added (`push-SEQUENCE`) still parse, with no time.

/// Prefix of the snapshots agents take for pushes; only these are reported and pruned.
pub const PUSH_PREFIX: &str = "push-";

/// The name of push snapshot `sequence`, taken at `unix_ms`.
pub fn push_snapshot_name(sequence: u64, unix_ms: u64) -> String {
    format!("{PUSH_PREFIX}{sequence:010}-{unix_ms}")
}

/// The sequence number of a push snapshot name, `None` for other snapshots.
pub fn push_sequence(snapshot: &str) -> Option<u64> {
    parse(snapshot).map(|(sequence, _)| sequence)
}

/// When a push snapshot was taken (milliseconds since the Unix epoch), if its name says.
pub fn push_time_ms(snapshot: &str) -> Option<u64> {
    parse(snapshot).and_then(|(_, time)| time)
}

fn parse(snapshot: &str) -> Option<(u64, Option<u64>)> {
    let rest = snapshot.strip_prefix(PUSH_PREFIX)?;
    let (sequence, time) = match rest.split_once('-') {
        Some((sequence, time)) => (sequence, Some(time)),
        None => (rest, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(sequence) {
        return None;
    }
    let time = match time {
        Some(t) if digits(t) => Some(t.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some((sequence.parse().ok()?, time))
}

/// The newest push snapshot (highest sequence) of a list, if any.
pub fn newest_push(snapshots: &[String]) -> Option<&str> {
    snapshots
        .iter()
        .filter_map(|s| push_sequence(s).map(|n| (n, s)))
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_sequence_and_time() {
        let name = push_snapshot_name(12, 1_733_150_000_123);
        assert_eq!(name, "push-0000000012-1733150000123");
        assert_eq!(push_sequence(&name), Some(12));
        assert_eq!(push_time_ms(&name), Some(1_733_150_000_123));
    }

    #[test]
    fn old_names_parse_without_time_and_others_not_at_all() {
        assert_eq!(push_sequence("push-0000000003"), Some(3));
        assert_eq!(push_time_ms("push-0000000003"), None);
        for other in [
            "manual", "push-", "push-x", "push-1-", "push-1-x", "fenced-1",
        ] {
            assert_eq!(push_sequence(other), None, "{other}");
        }
    }

    #[test]
    fn newest_is_by_sequence_not_by_name() {
        let snaps = vec![
            "push-0000000009-5".to_string(),
            "manual".into(),
            "push-0000000010-4".into(),
        ];
        assert_eq!(newest_push(&snaps), Some("push-0000000010-4"));
        assert_eq!(newest_push(&[]), None);
    }
}
