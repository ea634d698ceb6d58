//! The kernel settings the routing backends change, and the journal that puts them back.
//!
//! Before a backend first changes a setting (forwarding, reverse-path filtering, reserved
//! ports) or may switch `/sys/kernel/rcu_expedited` on for a commit, [`KernelSettings`] writes
//! the setting's original value, and the value we set, to a journal file in the agent's state
//! directory. Clearing routing puts every recorded setting back and empties the journal. A new
//! agent reads the journal of the one before it, so after a SIGKILL it still knows which
//! values are ours and what they replaced, instead of taking our own leftovers for the
//! node's configuration.
//!
//! Restoring writes the original only while the setting still holds the value we set: a value
//! someone changed after us is theirs, and is left alone (with a warning).
//!
//! `rcu_expedited` is transient (on only for the length of one commit, see `crate::rcu`): a
//! setting that differs from its original when a backend opens can only be a killed commit's
//! leftover, so opening repairs it at once. The others stay set while routes are installed,
//! which outlive the agent process on purpose (a restart does not interrupt routing); they are
//! restored when routing is cleared.
//!
//! The journal is tagged with the boot id and the network namespace it describes: kernel
//! settings do not survive a reboot, and per-namespace settings do not survive their
//! namespace, so a journal from another boot, or per-namespace entries from another
//! namespace, are dropped rather than applied. That is also why it is written without fsync:
//! it only has to outlive the process, not the machine.

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tracing::{info, warn};

/// `/sys/kernel/rcu_expedited`, the one host-wide setting we touch.
pub const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
pub const RP_FILTER_ALL: &str = "/proc/sys/net/ipv4/conf/all/rp_filter";
pub const RP_FILTER_DEFAULT: &str = "/proc/sys/net/ipv4/conf/default/rp_filter";
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
pub const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A setting or the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("kernel setting {path}")]
    Setting {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("kernel settings journal {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A backend's settings, shared between the eBPF backend and the nftables table it may keep.
pub type SharedSettings = Arc<Mutex<KernelSettings>>;

/// What the journal holds for one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub original: String,
    pub ours: String,
}

/// Which boot and network namespace a journal describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub boot: String,
    pub netns: u64,
}

impl Identity {
    fn current() -> Identity {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // thread-self: the tests move single threads into namespaces.
        let netns = fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        Identity { boot, netns }
    }
}

/// Host-wide settings live in /sys; the others are per network namespace.
fn is_per_namespace(path: &str) -> bool {
    path.starts_with("/proc/sys/net/")
}

fn is_transient(path: &str) -> bool {
    path == RCU_EXPEDITED
}

/// The originals of the settings we changed, mirrored in a journal file when one is given.
#[derive(Debug)]
pub struct KernelSettings {
    /// Prefix of every setting's path: `/` except in unit tests.
    root: PathBuf,
    journal: Option<PathBuf>,
    identity: Identity,
    entries: BTreeMap<String, Entry>,
}

impl KernelSettings {
    /// Settings kept in memory only (tests, benchmarks): restored on clear, not after a kill.
    pub fn in_memory() -> KernelSettings {
        KernelSettings {
            root: PathBuf::from("/"),
            journal: None,
            identity: Identity::current(),
            entries: BTreeMap::new(),
        }
    }

    /// Reads the journal at `journal` (if any), drops what describes another boot or
    /// namespace, and repairs transient settings a killed agent left behind.
    pub fn open(journal: Option<PathBuf>) -> Result<KernelSettings, SettingsError> {
        KernelSettings::open_at(PathBuf::from("/"), journal, Identity::current())
    }

    fn open_at(
        root: PathBuf,
        journal: Option<PathBuf>,
        identity: Identity,
    ) -> Result<KernelSettings, SettingsError> {
        let mut settings = KernelSettings {
            root,
            journal,
            identity,
            entries: BTreeMap::new(),
        };
        let Some(path) = settings.journal.clone() else {
            return Ok(settings);
        };
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(settings),
            Err(source) => return Err(SettingsError::Journal { path, source }),
        };
        let (recorded, entries) = parse_journal(&text);
        for (key, entry) in entries {
            let same_boot = recorded.boot == settings.identity.boot;
            let same_netns = recorded.netns == settings.identity.netns;
            if same_boot && (same_netns || !is_per_namespace(&key)) {
                settings.entries.insert(key, entry);
            } else {
                info!(setting = %key, "kernel settings journal: entry of another boot or namespace dropped");
            }
        }
        if !settings.entries.is_empty() {
            info!(journal = %path.display(), settings = settings.entries.len(), "kernel settings changed by an earlier agent, originals recorded");
        }
        let transient: Vec<String> = settings
            .entries
            .keys()
            .filter(|k| is_transient(k))
            .cloned()
            .collect();
        for key in transient {
            settings.put_back(&key)?;
        }
        settings.save()?;
        Ok(settings)
    }

    /// Shared, for a backend.
    pub fn shared(self) -> SharedSettings {
        Arc::new(Mutex::new(self))
    }

    fn file(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The current (trimmed) value of a setting.
    pub fn read(&self, path: &str) -> Result<String, SettingsError> {
        fs::read_to_string(self.file(path))
            .map(|s| s.trim().to_owned())
            .map_err(|source| SettingsError::Setting {
                path: path.to_owned(),
                source,
            })
    }

    fn write(&self, path: &str, value: &str) -> Result<(), SettingsError> {
        // With the newline: an empty write leaves a sysctl as it is, so an empty list (no
        // reserved ports) could not be written back otherwise.
        fs::write(self.file(path), format!("{value}\n")).map_err(|source| SettingsError::Setting {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads `path` and writes what `change` makes of its value unless that is `None`. The
    /// original is journaled before the first write.
    pub fn change(
        &mut self,
        path: &str,
        change: impl FnOnce(&str) -> Option<String>,
    ) -> Result<(), SettingsError> {
        let current = self.read(path)?;
        let Some(value) = change(&current) else {
            return Ok(());
        };
        let known = self.entries.contains_key(path);
        if !known {
            self.entries.insert(
                path.to_owned(),
                Entry {
                    original: current.clone(),
                    ours: value.clone(),
                },
            );
            self.save()?;
        }
        self.write(path, &value)?;
        // The kernel may print a value differently from how it was written (lists of ports).
        let now = self.read(path)?;
        if let Some(entry) = self.entries.get_mut(path)
            && entry.ours != now
        {
            entry.ours = now.clone();
            self.save()?;
        }
        info!(setting = path, from = %current, to = %now, "kernel setting changed");
        Ok(())
    }

    /// Journals that we may switch `rcu_expedited` on for a commit, if it is off now (when it
    /// is on, someone else holds it and we never switch it).
    pub fn note_rcu_expedited(&mut self) -> Result<(), SettingsError> {
        if self.entries.contains_key(RCU_EXPEDITED) {
            return Ok(());
        }
        if self.read(RCU_EXPEDITED).ok().as_deref() != Some("0") {
            return Ok(());
        }
        self.entries.insert(
            RCU_EXPEDITED.to_owned(),
            Entry {
                original: "0".to_owned(),
                ours: "1".to_owned(),
            },
        );
        self.save()
    }

    /// Puts every recorded setting back and empties the journal.
    pub fn restore(&mut self) -> Result<(), SettingsError> {
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        let mut first_error = None;
        for key in keys {
            if let Err(e) = self.put_back(&key) {
                warn!(setting = %key, error = %crate::error_chain(&e), "cannot restore kernel setting");
                first_error.get_or_insert(e);
            }
        }
        self.save()?;
        first_error.map_or(Ok(()), Err)
    }

    /// Forgets transient settings that are back at their original (the agent stops).
    pub fn release_transient(&mut self) -> Result<(), SettingsError> {
        let keys: Vec<String> = self
            .entries
            .keys()
            .filter(|k| is_transient(k))
            .cloned()
            .collect();
        for key in keys {
            self.put_back(&key)?;
        }
        self.save()
    }

    /// Restores one setting if it still holds our value, and forgets it.
    fn put_back(&mut self, key: &str) -> Result<(), SettingsError> {
        let Some(entry) = self.entries.get(key).cloned() else {
            return Ok(());
        };
        let current = self.read(key)?;
        if current == entry.ours && current != entry.original {
            self.write(key, &entry.original)?;
            info!(setting = key, from = %current, to = %entry.original, "kernel setting restored");
        } else if current != entry.original {
            warn!(setting = key, now = %current, ours = %entry.ours, original = %entry.original,
                "kernel setting changed by someone else since we set it; left as it is");
        }
        self.entries.remove(key);
        Ok(())
    }

    /// What is recorded now (for tests and logs).
    pub fn recorded(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Writes the journal (write to a temporary file, rename), or removes it when empty.
    fn save(&self) -> Result<(), SettingsError> {
        let Some(path) = &self.journal else {
            return Ok(());
        };
        let error = |source| SettingsError::Journal {
            path: path.clone(),
            source,
        };
        if self.entries.is_empty() {
            return match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(error(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(error)?;
        }
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, render_journal(&self.identity, &self.entries)).map_err(error)?;
        fs::rename(&temporary, path).map_err(error)
    }
}

/// The journal as text: `boot ID`, `netns INODE`, then `set PATH<TAB>ORIGINAL<TAB>OURS` lines.
/// Values never hold tabs or newlines (they are single-line /proc values, trimmed).
pub fn render_journal(identity: &Identity, entries: &BTreeMap<String, Entry>) -> String {
    let mut text = format!(
        "# flocker-agent: kernel settings to put back (path, original, ours)\nboot {}\nnetns {}\n",
        identity.boot, identity.netns
    );
    for (path, entry) in entries {
        text.push_str(&format!("set {path}\t{}\t{}\n", entry.original, entry.ours));
    }
    text
}

/// Reads what [`render_journal`] wrote; unreadable lines are skipped.
pub fn parse_journal(text: &str) -> (Identity, BTreeMap<String, Entry>) {
    let mut identity = Identity {
        boot: String::new(),
        netns: 0,
    };
    let mut entries = BTreeMap::new();
    for line in text.lines() {
        if let Some(boot) = line.strip_prefix("boot ") {
            identity.boot = boot.trim().to_owned();
        } else if let Some(netns) = line.strip_prefix("netns ") {
            identity.netns = netns.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("set ") {
            let mut fields = rest.split('\t');
            if let (Some(path), Some(original), Some(ours), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            {
                entries.insert(
                    path.to_owned(),
                    Entry {
                        original: original.to_owned(),
                        ours: ours.to_owned(),
                    },
                );
            }
        }
    }
    (identity, entries)
}

/// Turns on forwarding and relaxes strict (1) reverse-path filtering to loose (2); a disabled
/// filter (0) is left alone.
pub fn enable_forwarding(settings: &mut KernelSettings) -> Result<(), SettingsError> {
    settings.change(IP_FORWARD, |v| (v != "1").then(|| "1".to_owned()))?;
    for path in [RP_FILTER_ALL, RP_FILTER_DEFAULT] {
        settings.change(path, |v| (v == "1").then(|| "2".to_owned()))?;
    }
    Ok(())
}

/// Turns on IPv6 forwarding, for IPv6 routes to other nodes; a no-op where the kernel has no
/// IPv6. Only done while IPv6 routes are installed: with forwarding on, Linux stops taking
/// router advertisements on interfaces whose `accept_ra` is 1 (the default), so a node that
/// gets its IPv6 default route by SLAAC needs `accept_ra = 2` on its uplink.
pub fn enable_ipv6_forwarding(settings: &mut KernelSettings) -> Result<(), SettingsError> {
    if !Path::new(IPV6_FORWARD).exists() {
        return Ok(());
    }
    settings.change(IPV6_FORWARD, |v| (v != "1").then(|| "1".to_owned()))
}

/// Adds `first..=last` to `ip_local_reserved_ports` unless a listed range covers it already;
/// the ports listed before stay reserved.
pub fn reserve_local_ports(
    settings: &mut KernelSettings,
    first: u16,
    last: u16,
) -> Result<(), SettingsError> {
    settings.change(RESERVED_PORTS, |v| with_reserved(v, first, last))
}

/// The reserved-ports list `current` with `first..=last` added, or `None` when one of its
/// entries already covers that range.
fn with_reserved(current: &str, first: u16, last: u16) -> Option<String> {
    let covered = current.split(',').any(|entry| {
        let (low, high) = entry
            .trim()
            .split_once('-')
            .unwrap_or((entry.trim(), entry.trim()));
        matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if l <= first && h >= last)
    });
    if covered {
        return None;
    }
    let range = format!("{first}-{last}");
    Some(if current.is_empty() {
        range
    } else {
        format!("{current},{range}")
    })
}

/// The journal of the agent of `node` in its state directory `dir` (per node: test clusters
/// run several agents on one state directory).
pub fn journal_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("kernel-settings-{node}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_range_is_added_once_and_others_kept() {
        assert_eq!(
            with_reserved("", 61000, 65535).as_deref(),
            Some("61000-65535")
        );
        assert_eq!(
            with_reserved("8080,9000-9100", 61000, 65535).as_deref(),
            Some("8080,9000-9100,61000-65535")
        );
        assert_eq!(with_reserved("8080,61000-65535", 61000, 65535), None);
        assert_eq!(with_reserved("60000-65535", 61000, 65535), None);
        assert_eq!(
            with_reserved("61000-62000", 61000, 65535).as_deref(),
            Some("61000-62000,61000-65535")
        );
    }

    /// A fake root with the settings at the given values.
    fn root(values: &[(&str, &str)]) -> io::Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        for (path, value) in values {
            let file = dir.path().join(path.trim_start_matches('/'));
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(file, format!("{value}\n"))?;
        }
        Ok(dir)
    }

    fn here() -> Identity {
        Identity {
            boot: "boot-a".into(),
            netns: 7,
        }
    }

    fn value(root: &tempfile::TempDir, path: &str) -> String {
        fs::read_to_string(root.path().join(path.trim_start_matches('/')))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    const NODE: [(&str, &str); 5] = [
        (IP_FORWARD, "0"),
        (RP_FILTER_ALL, "1"),
        (RP_FILTER_DEFAULT, "0"),
        (RESERVED_PORTS, "8080"),
        (RCU_EXPEDITED, "0"),
    ];

    #[test]
    fn clear_puts_every_setting_back_and_empties_the_journal() -> anyhow::Result<()> {
        let root = root(&NODE)?;
        let journal = root.path().join("state/kernel-settings-n1");
        let mut s = KernelSettings::open_at(root.path().into(), Some(journal.clone()), here())?;
        enable_forwarding(&mut s)?;
        reserve_local_ports(&mut s, 61000, 65535)?;
        s.note_rcu_expedited()?;
        assert_eq!(value(&root, IP_FORWARD), "1");
        assert_eq!(value(&root, RP_FILTER_ALL), "2");
        assert_eq!(value(&root, RP_FILTER_DEFAULT), "0", "disabled filter kept");
        assert_eq!(value(&root, RESERVED_PORTS), "8080,61000-65535");
        let (_, journaled) = parse_journal(&fs::read_to_string(&journal)?);
        assert_eq!(journaled.len(), 4, "{journaled:?}");
        s.restore()?;
        for (path, original) in NODE {
            assert_eq!(value(&root, path), original, "{path}");
        }
        assert!(!journal.exists(), "empty journal removed");
        Ok(())
    }

    #[test]
    fn a_new_agent_restores_the_originals_of_a_killed_one() -> anyhow::Result<()> {
        let root = root(&NODE)?;
        let journal = root.path().join("kernel-settings-n1");
        let mut killed =
            KernelSettings::open_at(root.path().into(), Some(journal.clone()), here())?;
        enable_forwarding(&mut killed)?;
        killed.note_rcu_expedited()?;
        // Killed mid-commit: the switch is still on.
        fs::write(root.path().join("sys/kernel/rcu_expedited"), "1")?;
        drop(killed);
        let mut next = KernelSettings::open_at(root.path().into(), Some(journal.clone()), here())?;
        assert_eq!(value(&root, RCU_EXPEDITED), "0", "repaired at open");
        // Its own change sees "1", but the original stays the first agent's.
        enable_forwarding(&mut next)?;
        assert_eq!(next.recorded()[IP_FORWARD].original, "0");
        next.restore()?;
        for (path, original) in NODE {
            assert_eq!(value(&root, path), original, "{path}");
        }
        Ok(())
    }

    #[test]
    fn a_value_changed_by_someone_else_is_left_alone() -> anyhow::Result<()> {
        let root = root(&NODE)?;
        let mut s = KernelSettings::open_at(root.path().into(), None, here())?;
        reserve_local_ports(&mut s, 61000, 65535)?;
        fs::write(
            root.path()
                .join("proc/sys/net/ipv4/ip_local_reserved_ports"),
            "9000",
        )?;
        s.restore()?;
        assert_eq!(value(&root, RESERVED_PORTS), "9000");
        assert!(s.recorded().is_empty());
        Ok(())
    }

    #[test]
    fn journals_of_another_boot_or_namespace_are_dropped() -> anyhow::Result<()> {
        let root = root(&NODE)?;
        let journal = root.path().join("kernel-settings-n1");
        let entries: BTreeMap<String, Entry> = [IP_FORWARD, RCU_EXPEDITED]
            .into_iter()
            .map(|p| {
                (
                    p.to_owned(),
                    Entry {
                        original: "0".into(),
                        ours: "1".into(),
                    },
                )
            })
            .collect();
        let other_netns = Identity {
            boot: "boot-a".into(),
            netns: 8,
        };
        fs::write(&journal, render_journal(&other_netns, &entries))?;
        let s = KernelSettings::open_at(root.path().into(), Some(journal.clone()), here())?;
        assert_eq!(
            s.recorded().keys().collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "the namespace entry is dropped, the host one repaired and forgotten"
        );
        let other_boot = Identity {
            boot: "boot-b".into(),
            netns: 7,
        };
        fs::write(&journal, render_journal(&other_boot, &entries))?;
        fs::write(root.path().join("sys/kernel/rcu_expedited"), "1")?;
        let s = KernelSettings::open_at(root.path().into(), Some(journal), here())?;
        assert!(s.recorded().is_empty());
        assert_eq!(value(&root, RCU_EXPEDITED), "1", "not ours in this boot");
        Ok(())
    }

    #[test]
    fn journal_round_trips_empty_values() {
        let entries: BTreeMap<String, Entry> = [(
            RESERVED_PORTS.to_owned(),
            Entry {
                original: String::new(),
                ours: "61000-65535".into(),
            },
        )]
        .into();
        let (identity, parsed) = parse_journal(&render_journal(&here(), &entries));
        assert_eq!(identity, here());
        assert_eq!(parsed, entries);
    }
}
