//! What routing leaves on a node besides its routes, checked on the real kernel in network
//! namespaces: the kernel settings it changes (back to their originals after routing is
//! cleared, also when the process that changed them was killed), and the warning it gives
//! when a forward filter would drop what it routes.
//!
//! The killed process is this test binary re-executed inside the namespace (the ignored test
//! `killed_agent`), so it runs the real backend in a process of its own.
//!
//! Needs root, `ip` and `iptables` (to set a FORWARD policy as Docker or an admin would).

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use flocker_e2e::netns::Netns;
use flocker_routing::{
    BackendChoice, BackendConfig, RouteEntry, RouteKey, RouteTable, open_backend,
    settings::{IP_FORWARD, RCU_EXPEDITED, RP_FILTER_ALL, RP_FILTER_DEFAULT},
};

/// Set in the environment of the re-executed child: where its journal goes.
const CHILD_JOURNAL: &str = "FLOCKER_TEST_KILLED_AGENT_JOURNAL";

fn table(port: u16, last_octet: u8) -> RouteTable {
    let container = SocketAddrV4::new(Ipv4Addr::new(198, 19, 77, last_octet), 7000);
    RouteTable {
        entries: [(RouteKey::tcp(port), RouteEntry::Local { container })].into(),
        ..RouteTable::default()
    }
}

fn config(journal: &Path) -> BackendConfig {
    BackendConfig {
        choice: BackendChoice::Nftables,
        cgroup_path: None,
        settings_journal: Some(journal.to_owned()),
        ..BackendConfig::default()
    }
}

/// The child: routes, then moves its route back and forth (each move a commit that deletes,
/// so under the expedited RCU switch) until it is killed.
#[test]
#[ignore = "run by kernel_settings_are_restored_after_a_kill, in a namespace"]
fn killed_agent() -> anyhow::Result<()> {
    let Ok(journal) = std::env::var(CHILD_JOURNAL) else {
        return Ok(());
    };
    let mut backend = open_backend(&config(Path::new(&journal)))?;
    backend.apply(&table(7000, 2))?;
    println!("ready");
    for i in 0u64.. {
        backend.apply(&table(7000, 2 + (i % 2) as u8))?;
    }
    Ok(())
}

fn read(ns: &Netns, path: &'static str) -> anyhow::Result<String> {
    Ok(ns.run(|| std::fs::read_to_string(path))??.trim().to_owned())
}

#[test]
#[ignore = "privileged: needs root and network namespaces; `cargo xtask ci` runs it"]
fn kernel_settings_are_restored_after_a_kill() -> anyhow::Result<()> {
    let ns = Netns::create("kset")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    // Originals other than what routing wants, so that every change shows.
    ns.sysctl("net.ipv4.ip_forward", "0")?;
    ns.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
    ns.sysctl("net.ipv4.conf.default.rp_filter", "1")?;
    let rcu_before = std::fs::read_to_string(RCU_EXPEDITED)?.trim().to_owned();
    let state = tempfile::tempdir()?;
    let journal = state.path().join("kernel-settings-kset");

    let mut child = ns
        .command(&std::env::current_exe()?.to_string_lossy())
        .args(["--exact", "killed_agent", "--ignored", "--nocapture"])
        .env(CHILD_JOURNAL, &journal)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("re-executing the test binary")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        ensure!(Instant::now() < deadline, "the child never routed");
        let Some(line) = lines.next() else {
            anyhow::bail!("the child exited before routing");
        };
        if line?.trim() == "ready" {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill()?;
    child.wait()?;

    // What the killed agent left: its settings, and (if the kill landed mid-commit, which
    // it often does) the RCU switch still on.
    ensure!(
        read(&ns, IP_FORWARD)? == "1",
        "the child did not turn forwarding on"
    );
    ensure!(
        read(&ns, RP_FILTER_ALL)? == "2",
        "the child did not relax rp_filter"
    );
    ensure!(journal.exists(), "no journal at {}", journal.display());
    if rcu_before == "0" && std::fs::read_to_string(RCU_EXPEDITED)?.trim() == "0" {
        // The kill fell between two commits: leave the switch on as a kill inside one does,
        // so that the repair below is always exercised.
        std::fs::write(RCU_EXPEDITED, "1\n")?;
    }

    // The next agent: at start, the switch is repaired at once; the routing settings stay
    // while its routes do.
    let mut backend = ns.run(|| open_backend(&config(&journal)))??;
    ensure!(
        std::fs::read_to_string(RCU_EXPEDITED)?.trim() == rcu_before,
        "rcu_expedited not repaired at start"
    );
    ns.run(|| backend.apply(&table(7000, 2)))??;
    ensure!(
        read(&ns, IP_FORWARD)? == "1",
        "forwarding off while routing"
    );

    // Routing cleared: everything as it was before the first agent, the journal gone.
    ns.run(|| backend.apply(&RouteTable::default()))??;
    for (path, original) in [
        (IP_FORWARD, "0"),
        (RP_FILTER_ALL, "1"),
        (RP_FILTER_DEFAULT, "1"),
    ] {
        ensure!(
            read(&ns, path)? == original,
            "{path} is {} after clear, was {original}",
            read(&ns, path)?
        );
    }
    ensure!(std::fs::read_to_string(RCU_EXPEDITED)?.trim() == rcu_before);
    ensure!(!journal.exists(), "journal left after clear");
    drop(backend);
    Ok(())
}

/// A FORWARD policy DROP with no DOCKER-USER to accept in is reported; with DOCKER-USER it
/// is handled (our rule goes there), so it is not.
#[test]
#[ignore = "privileged: needs root and network namespaces; `cargo xtask ci` runs it"]
fn a_forward_drop_policy_is_reported_unless_docker_user_handles_it() -> anyhow::Result<()> {
    let ns = Netns::create("fwdrop")?;
    let iptables = |args: &[&str]| -> anyhow::Result<()> {
        let status = ns.command("iptables").args(args).status()?;
        ensure!(status.success(), "iptables {args:?}");
        Ok(())
    };
    let warnings = |ns: &Netns| -> anyhow::Result<Vec<String>> {
        let backend = ns.run(|| {
            open_backend(&BackendConfig {
                choice: BackendChoice::Nftables,
                ..BackendConfig::default()
            })
        })??;
        Ok(backend.warnings())
    };
    ensure!(warnings(&ns)?.is_empty(), "warnings with no filter at all");
    iptables(&["-P", "FORWARD", "DROP"])?;
    let found = warnings(&ns)?;
    ensure!(
        found.len() == 1 && found[0].contains("table ip filter chain FORWARD drops"),
        "{found:?}"
    );
    iptables(&["-N", "DOCKER-USER"])?;
    iptables(&["-I", "FORWARD", "-j", "DOCKER-USER"])?;
    ensure!(
        warnings(&ns)?.is_empty(),
        "DOCKER-USER present, still: {:?}",
        warnings(&ns)?
    );
    Ok(())
}
