//! Expedited RCU grace periods for the duration of one nf_tables transaction.
//!
//! Committing an nf_tables transaction that releases anything (a map element, a rule, a
//! chain) waits for an RCU grace period while holding the commit mutex. A normal grace period
//! takes 10-20 ms on this project's machines (a 2-core VM), so moving one route at 10,000
//! routes took 20 ms while adding one took 0.1 ms. With expedited grace periods the same
//! commit takes about 0.1 ms.
//!
//! `/sys/kernel/rcu_expedited` is a kernel-wide switch, so it is turned on only while one of
//! our transactions that deletes something is in flight, and turned back off afterwards
//! unless someone else had it on before us. Within this process a count keeps concurrent
//! backends (one per network namespace in the tests) from switching it off under each other;
//! another process toggling the same switch at the same moment can only make our commit slow
//! again, never wrong. Where the file cannot be written (no sysfs, not root, read-only /sys)
//! the transaction simply runs at normal speed.

use std::{fs, path::Path, sync::Mutex};

use tracing::debug;

const SWITCH: &str = "/sys/kernel/rcu_expedited";

/// How many guards of this process hold the switch on, and whether we turned it on.
struct State {
    holders: usize,
    we_turned_it_on: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    holders: 0,
    we_turned_it_on: false,
});

/// Keeps grace periods expedited while it lives.
#[must_use = "grace periods go back to normal when the guard is dropped"]
pub struct Expedited(());

impl Expedited {
    /// Turns expedited grace periods on (if they are not already).
    pub fn start() -> Expedited {
        let mut state = STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.holders == 0 {
            state.we_turned_it_on = switch_on(Path::new(SWITCH));
        }
        state.holders += 1;
        Expedited(())
    }
}

impl Drop for Expedited {
    fn drop(&mut self) {
        let mut state = STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.holders = state.holders.saturating_sub(1);
        if state.holders == 0 && state.we_turned_it_on {
            state.we_turned_it_on = false;
            if let Err(error) = fs::write(SWITCH, "0") {
                debug!(%error, "cannot switch expedited RCU grace periods back off");
            }
        }
    }
}

/// Switches `path` to 1; true when it was 0 and is now 1 (so we must switch it back).
fn switch_on(path: &Path) -> bool {
    match fs::read_to_string(path) {
        Ok(current) if current.trim() == "0" => match fs::write(path, "1") {
            Ok(()) => true,
            Err(error) => {
                debug!(%error, "cannot expedite RCU grace periods; deletions commit at normal speed");
                false
            }
        },
        Ok(_) => false,
        Err(error) => {
            debug!(%error, "cannot read the RCU expedite switch");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_on_flips_zero_and_leaves_others_alone() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rcu_expedited");
        fs::write(&path, "0\n")?;
        assert!(switch_on(&path), "0 becomes 1 and is ours to restore");
        assert_eq!(fs::read_to_string(&path)?, "1");
        assert!(!switch_on(&path), "already 1: not ours to restore");
        assert!(!switch_on(&dir.path().join("missing")), "missing file");
        Ok(())
    }
}
