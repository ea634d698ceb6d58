//! Forward filters that drop what we route, and our one rule in Docker's `DOCKER-USER` chain.
//!
//! In netfilter a packet dropped by any base chain of a hook is gone, whatever another table
//! accepted, so an `accept` in our own table cannot undo the `FORWARD` policy `DROP` that
//! dockerd sets. Docker provides `DOCKER-USER` (jumped to first from `FORWARD`) for exactly
//! this, and kube-proxy and others put their accepts there too. So the nftables table marks
//! every connection it DNATs (`plan::ROUTED_MARK`, a conntrack mark bit, so replies carry it
//! too), and while routes are installed one rule at the head of `ip filter DOCKER-USER`
//! accepts connections with that bit, recognisable by its comment ([`RULE_COMMENT`]). It is
//! encoded as iptables-nft encodes `-m connmark --mark BIT/BIT -m comment -j ACCEPT`, so
//! Docker's own iptables calls on that chain still parse it. Where Docker manages ip6tables
//! too (`ip6tables: true`, the default since Docker 27), `ip6 filter FORWARD` drops as well and
//! `ip6 filter DOCKER-USER` exists: the same rule goes there, for the IPv6 routes. Each family
//! is handled where its chain exists, independently of the other.
//!
//! [`ForwardGuard`] inserts the rule, watches nf_tables notifications (and re-checks every
//! [`RECHECK`] in case one was lost) to put it back whenever something (dockerd restarting,
//! `iptables -F`) removed it, and deletes it when routing is cleared. A dropping forward
//! chain it cannot handle (a `DROP` policy in another table, or `FORWARD DROP` without
//! `DOCKER-USER`) is reported by [`assess`] as a warning: we add nothing to other tables.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use nftnl::ProtoFamily;

use super::{
    netlink::{self, ChainInfo, Events, ForeignRule, NetlinkError},
    plan::{Expr, ROUTED_MARK},
};

pub const FILTER_TABLE: &str = "filter";
pub const DOCKER_USER: &str = "DOCKER-USER";
/// What identifies our rule in `DOCKER-USER`.
pub const RULE_COMMENT: &str = "flocker-agent: accept the connections it routes";
/// How often the rule is checked without a notification.
pub const RECHECK: Duration = Duration::from_secs(5);
/// How long the watcher blocks before looking at its stop flag.
const WAIT: Duration = Duration::from_millis(200);

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// A family whose `filter` table Docker manages: ip (iptables) and ip6 (ip6tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    nfproto: u8,
    proto: ProtoFamily,
    /// As nft names it: `ip`, `ip6`.
    pub name: &'static str,
}

pub const IP: Family = Family {
    nfproto: NFPROTO_IPV4,
    proto: ProtoFamily::Ipv4,
    name: "ip",
};
pub const IP6: Family = Family {
    nfproto: NFPROTO_IPV6,
    proto: ProtoFamily::Ipv6,
    name: "ip6",
};
const FAMILIES: [Family; 2] = [IP, IP6];
const NF_INET_FORWARD: u32 = 2;
const NF_DROP: u32 = 0;

/// Why our rule could not be checked, kept or removed.
#[derive(Debug, thiserror::Error)]
pub enum DockerUserError {
    #[error("nf_tables")]
    Netlink(#[from] NetlinkError),
    #[error("cannot start the DOCKER-USER watcher thread")]
    Spawn(#[source] std::io::Error),
}

/// `-m connmark --mark ROUTED_MARK/ROUTED_MARK -m comment --comment RULE_COMMENT -j ACCEPT`,
/// for `family`'s `DOCKER-USER`.
pub fn accept_rule(family: Family) -> ForeignRule {
    // struct xt_connmark_mtinfo1 { u32 mark, mask; u8 invert; }, padded to XT_ALIGN (8).
    let mut info = Vec::with_capacity(16);
    info.extend_from_slice(&ROUTED_MARK.to_ne_bytes());
    info.extend_from_slice(&ROUTED_MARK.to_ne_bytes());
    info.resize(16, 0);
    ForeignRule {
        family: family.proto,
        table: FILTER_TABLE,
        chain: DOCKER_USER,
        exprs: vec![
            Expr::XtMatch {
                name: "connmark",
                rev: 1,
                info,
            },
            Expr::Counter,
            Expr::Accept,
        ],
        comment: RULE_COMMENT,
    }
}

/// What the forward filters of this namespace do to the connections we route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assessment {
    /// `ip filter DOCKER-USER` exists, so our rule can go there.
    pub docker_user: bool,
    /// `ip6 filter DOCKER-USER` exists, so our rule can go there too.
    pub docker_user6: bool,
    /// Dropping chains that our rule does not get past, as sentences for logs and health.
    pub warnings: Vec<String>,
}

impl Assessment {
    /// The families whose `DOCKER-USER` exists.
    fn families(&self) -> impl Iterator<Item = Family> + '_ {
        FAMILIES.into_iter().filter(|family| match family.nfproto {
            NFPROTO_IPV4 => self.docker_user,
            _ => self.docker_user6,
        })
    }
}

fn family_name(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        NFPROTO_IPV4 => "ip",
        NFPROTO_IPV6 => "ip6",
        _ => "?",
    }
}

/// Whether `chains` hold `family`'s `filter DOCKER-USER`.
fn has_docker_user(chains: &[ChainInfo], family: u8) -> bool {
    chains
        .iter()
        .any(|c| c.family == family && c.table == FILTER_TABLE && c.name == DOCKER_USER)
}

/// Which forward chains drop by policy, and whether our rule in `DOCKER-USER` gets our
/// connections past them. `legacy_filter`: a legacy (x_tables) `filter` table exists, whose
/// policies nf_tables cannot see. Pure.
pub fn assess(chains: &[ChainInfo], legacy_filter: bool) -> Assessment {
    let docker_user = has_docker_user(chains, NFPROTO_IPV4);
    let docker_user6 = has_docker_user(chains, NFPROTO_IPV6);
    let mut warnings = Vec::new();
    for chain in chains {
        let dropping = matches!(chain.family, NFPROTO_IPV4 | NFPROTO_IPV6 | NFPROTO_INET)
            && chain.hook == Some(NF_INET_FORWARD)
            && chain.policy == Some(NF_DROP);
        if !dropping {
            continue;
        }
        let docker_forward = matches!(chain.family, NFPROTO_IPV4 | NFPROTO_IPV6)
            && chain.table == FILTER_TABLE
            && chain.name == "FORWARD";
        if docker_forward && has_docker_user(chains, chain.family) {
            continue;
        }
        let mut warning = format!(
            "table {} {} chain {} drops forwarded packets by policy: connections routed to \
             other nodes or into containers are dropped",
            family_name(chain.family),
            chain.table,
            chain.name
        );
        if docker_forward && chain.family == NFPROTO_IPV6 {
            warning.push_str(
                " (there is no ip6 DOCKER-USER chain to accept IPv6 routes in: enable Docker's \
                 `ip6tables`, or accept connections with conntrack mark 0x800000 in that chain)",
            );
        } else if docker_forward {
            warning.push_str(
                " (there is no DOCKER-USER chain to accept them in; start dockerd, or accept \
                 connections with conntrack mark 0x800000 in that chain)",
            );
        } else {
            warning.push_str(&format!(
                " (flocker only adds its accept rule to Docker's DOCKER-USER; accept \
                 connections with conntrack mark {ROUTED_MARK:#x} in this chain)"
            ));
        }
        warnings.push(warning);
    }
    if legacy_filter {
        warnings.push(
            "a legacy iptables filter table exists (iptables-legacy): its FORWARD policy is \
             invisible to nf_tables, and a DROP there drops routed connections"
                .to_owned(),
        );
    }
    Assessment {
        docker_user,
        docker_user6,
        warnings,
    }
}

fn legacy_filter_table() -> bool {
    std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l.trim() == FILTER_TABLE))
}

/// Reads the forward chains of this namespace (nothing is changed).
pub fn check() -> Result<Assessment, DockerUserError> {
    Ok(assess(&netlink::list_chains()?, legacy_filter_table()))
}

/// Handles of our rules in `family`'s `DOCKER-USER`.
fn our_rules(family: Family) -> Result<Vec<u64>, DockerUserError> {
    Ok(
        netlink::list_rules(family.proto, FILTER_TABLE, DOCKER_USER)?
            .into_iter()
            .filter(|r| r.comment.as_deref() == Some(RULE_COMMENT))
            .map(|r| r.handle)
            .collect(),
    )
}

/// Puts our rule at the head of each family's `DOCKER-USER` that exists and lacks it (one
/// copy: extra copies, say from two agents racing, are deleted).
pub fn ensure() -> Result<Assessment, DockerUserError> {
    let assessment = check()?;
    for family in assessment.families() {
        let ours = our_rules(family)?;
        match ours.as_slice() {
            [] => {
                netlink::send(&netlink::encode_insert_at_head(&accept_rule(family))?)?;
                info!(
                    chain = %format!("{} filter DOCKER-USER", family.name),
                    "forward filter: our accept rule for routed connections inserted"
                );
            }
            [_] => {}
            [_, extra @ ..] => {
                netlink::send(&netlink::encode_delete_rules(
                    family.proto,
                    FILTER_TABLE,
                    DOCKER_USER,
                    extra,
                )?)?;
            }
        }
    }
    Ok(assessment)
}

/// Deletes our rules from every family's `DOCKER-USER`; returns how many there were.
pub fn remove() -> Result<usize, DockerUserError> {
    let chains = netlink::list_chains()?;
    let mut removed = 0;
    for family in assess(&chains, false).families() {
        let ours = our_rules(family)?;
        if !ours.is_empty() {
            netlink::send(&netlink::encode_delete_rules(
                family.proto,
                FILTER_TABLE,
                DOCKER_USER,
                &ours,
            )?)?;
            info!(
                chain = %format!("{} filter DOCKER-USER", family.name),
                "forward filter: our accept rule removed"
            );
        }
        removed += ours.len();
    }
    Ok(removed)
}

/// Logs an assessment's warnings loudly; returns them.
pub fn report(assessment: &Assessment) -> Vec<String> {
    for warning in &assessment.warnings {
        error!(%warning, "forward filter drops routed connections");
    }
    assessment.warnings.clone()
}

/// Keeps our rule in `DOCKER-USER` while routes are installed: a thread in the network
/// namespace of the caller of [`ForwardGuard::start`]. Dropping it stops the thread and leaves
/// the rule (the routes stay too); [`ForwardGuard::stop_and_remove`] removes it.
pub struct ForwardGuard {
    warnings: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ForwardGuard {
    /// Subscribes to nf_tables notifications, ensures the rule now, then watches.
    pub fn start() -> Result<ForwardGuard, DockerUserError> {
        let events = Events::subscribe(WAIT)?;
        let first = ensure()?;
        let warnings = Arc::new(Mutex::new(report(&first)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (warnings, stop) = (Arc::clone(&warnings), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("flk-docker-user".into())
                .spawn(move || watch(&events, &warnings, &stop))
                .map_err(DockerUserError::Spawn)?
        };
        Ok(ForwardGuard {
            warnings,
            stop,
            thread: Some(thread),
        })
    }

    /// The latest assessment's warnings.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().map(|w| w.clone()).unwrap_or_default()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Stops watching, then deletes the rule. Must run in the guard's namespace.
    pub fn stop_and_remove(mut self) -> Result<(), DockerUserError> {
        self.stop_thread();
        remove().map(|_| ())
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn watch(events: &Events, warnings: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let mut last = Instant::now();
    let mut last_warnings: Option<Vec<String>> = None;
    while !stop.load(Ordering::Relaxed) {
        let changed = match events.wait() {
            Ok(changed) => changed,
            Err(error) => {
                debug!(error = %crate::error_chain(&error), "nf_tables notifications");
                std::thread::sleep(WAIT);
                false
            }
        };
        if !changed && last.elapsed() < RECHECK {
            continue;
        }
        events.drain();
        last = Instant::now();
        match ensure() {
            Ok(assessment) => {
                if last_warnings.as_ref() != Some(&assessment.warnings) {
                    let now = report(&assessment);
                    if let Ok(mut w) = warnings.lock() {
                        w.clone_from(&now);
                    }
                    last_warnings = Some(now);
                }
            }
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "forward filter: cannot check or restore our DOCKER-USER rule");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(
        family: u8,
        table: &str,
        name: &str,
        hook: Option<u32>,
        policy: Option<u32>,
    ) -> ChainInfo {
        ChainInfo {
            family,
            table: table.into(),
            name: name.into(),
            hook,
            policy,
        }
    }

    fn docker(with_user_chain: bool) -> Vec<ChainInfo> {
        let mut chains = vec![
            chain(
                NFPROTO_IPV4,
                "filter",
                "FORWARD",
                Some(NF_INET_FORWARD),
                Some(NF_DROP),
            ),
            chain(NFPROTO_IPV4, "filter", "INPUT", Some(1), Some(NF_DROP)),
            chain(NFPROTO_IPV4, "filter", "DOCKER", None, None),
        ];
        if with_user_chain {
            chains.push(chain(NFPROTO_IPV4, "filter", DOCKER_USER, None, None));
        }
        chains
    }

    #[test]
    fn docker_forward_drop_is_handled_through_docker_user() {
        let a = assess(&docker(true), false);
        assert!(a.docker_user);
        assert_eq!(a.warnings, Vec::<String>::new());
    }

    #[test]
    fn forward_drop_without_docker_user_is_a_warning() {
        let a = assess(&docker(false), false);
        assert!(!a.docker_user);
        assert_eq!(a.warnings.len(), 1);
        assert!(
            a.warnings[0].starts_with("table ip filter chain FORWARD drops"),
            "{a:?}"
        );
    }

    #[test]
    fn other_dropping_forward_chains_and_legacy_tables_are_warnings() {
        let mut chains = docker(true);
        chains.push(chain(
            NFPROTO_INET,
            "firewalld",
            "filter_FORWARD",
            Some(NF_INET_FORWARD),
            Some(NF_DROP),
        ));
        // Accepting, or not on the forward hook, or a family we do not route: not ours to
        // report.
        chains.push(chain(
            NFPROTO_INET,
            "mine",
            "fwd",
            Some(NF_INET_FORWARD),
            Some(1),
        ));
        chains.push(chain(NFPROTO_IPV6, "six", "input", Some(1), Some(NF_DROP)));
        chains.push(chain(
            7,
            "bridge",
            "fwd",
            Some(NF_INET_FORWARD),
            Some(NF_DROP),
        ));
        let a = assess(&chains, true);
        assert_eq!(a.warnings.len(), 2, "{a:?}");
        assert!(a.warnings[0].starts_with("table inet firewalld chain filter_FORWARD"));
        assert!(a.warnings[1].contains("legacy"));
    }

    #[test]
    fn ip6tables_forward_drop_is_handled_through_its_own_docker_user() {
        let mut chains = docker(true);
        chains.push(chain(
            NFPROTO_IPV6,
            "filter",
            "FORWARD",
            Some(NF_INET_FORWARD),
            Some(NF_DROP),
        ));
        // Docker < 27, or `ip6tables: false`: ip6 FORWARD drops with no chain of Docker's to
        // accept in, which is reported.
        let a = assess(&chains, false);
        assert!(a.docker_user && !a.docker_user6);
        assert_eq!(a.warnings.len(), 1, "{a:?}");
        assert!(
            a.warnings[0].starts_with("table ip6 filter chain FORWARD drops"),
            "{a:?}"
        );
        assert_eq!(a.families().collect::<Vec<_>>(), vec![IP]);
        // Docker managing ip6tables: our rule goes in both chains, nothing to report.
        chains.push(chain(NFPROTO_IPV6, "filter", DOCKER_USER, None, None));
        let a = assess(&chains, false);
        assert!(a.docker_user6 && a.warnings.is_empty(), "{a:?}");
        assert_eq!(a.families().collect::<Vec<_>>(), vec![IP, IP6]);
    }

    #[test]
    fn accept_rule_matches_the_mark_the_table_sets() {
        let rule = accept_rule(IP6);
        assert_eq!(rule.family, ProtoFamily::Ipv6);
        let Expr::XtMatch { name, rev, info } = &rule.exprs[0] else {
            panic!("first expression is the connmark match: {rule:?}");
        };
        assert_eq!((*name, *rev, info.len()), ("connmark", 1, 16));
        assert_eq!(info[..4], ROUTED_MARK.to_ne_bytes());
        assert_eq!(info[4..8], ROUTED_MARK.to_ne_bytes());
        assert_eq!(rule.exprs.last(), Some(&Expr::Accept));
    }

    #[test]
    fn comments_round_trip_through_userdata() {
        let data = netlink::comment_udata(RULE_COMMENT).expect("short comment");
        assert_eq!(netlink::udata_comment(&data).as_deref(), Some(RULE_COMMENT));
        // A comment after another TLV, and a truncated TLV.
        let mut other = vec![7u8, 2, 1, 2];
        other.extend_from_slice(&data);
        assert_eq!(
            netlink::udata_comment(&other).as_deref(),
            Some(RULE_COMMENT)
        );
        assert_eq!(netlink::udata_comment(&data[..5]), None);
    }
}
