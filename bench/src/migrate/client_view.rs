//! The client's view of moves (issue 16): while the application moves back and forth
//! between two nodes with `--delta` MiB changed before each move, a client opens a new
//! connection every 10 ms through the third node, sends a request (`SET` of its own key) and
//! reads the reply (`flocker_e2e::client_view`), and the PING probe measures the downtime as
//! the other rows do. Reported: attempts, failed attempts, the worst connect-to-reply time,
//! the median downtime and the median time of each deploy phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use flocker_e2e::client_view::ClientView;
use flocker_e2e::cluster::{Cluster, ClusterNode};
use flocker_e2e::probe::measure;

use super::{deploy, median, ms, write_data};

/// The phases of a move, in plan order (those a move does not have are left out).
const PHASES: [&str; 9] = [
    "pre-copy",
    "prepare",
    "hold",
    "switch-routes",
    "stop",
    "final-push",
    "handoff",
    "start",
    "routes",
];

/// What the moves of one run showed.
pub(super) struct ClientViewRun {
    pub label: String,
    pub moves: usize,
    pub attempts: usize,
    pub failed: usize,
    /// The first few failures, for the notes.
    pub failures: Vec<String>,
    pub worst: Duration,
    pub downtimes: Vec<Duration>,
    pub phases: BTreeMap<String, Vec<Duration>>,
}

/// Where the moves go and what they measure.
pub(super) struct Moves<'a> {
    pub cluster: &'a Cluster,
    /// The application starts on `.0` and moves to `.1`, back, and so on.
    pub between: (&'a ClusterNode, &'a ClusterNode),
    pub deployment_on: &'a dyn Fn(&ClusterNode, &str) -> Result<PathBuf>,
    pub applications: &'a Path,
    pub through: SocketAddr,
    pub delta_mib: u64,
    pub count: usize,
}

/// Runs `count` moves under the client and the probe; the application ends where it began
/// (one more, unmeasured move when `count` is odd).
pub(super) fn run(m: &Moves<'_>, label: &str) -> Result<ClientViewRun> {
    let mut out = ClientViewRun {
        label: label.to_string(),
        moves: m.count,
        attempts: 0,
        failed: 0,
        failures: Vec::new(),
        worst: Duration::ZERO,
        downtimes: Vec::new(),
        phases: BTreeMap::new(),
    };
    let (a, b) = m.between;
    for i in 0..m.count {
        let (from, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
        write_data(from, &format!("client-view-{label}-{i}"), m.delta_mib)?;
        let deployment = (m.deployment_on)(to, &format!("client-view-{label}-{i}.yml"))?;
        eprintln!("migrate: client view {label}, move {}/{}", i + 1, m.count);
        let client = ClientView::start(
            m.through,
            Duration::from_millis(10),
            &format!("cv-{label}-{i}"),
            Duration::from_secs(10),
        );
        std::thread::sleep(Duration::from_millis(200));
        let mut phases = BTreeMap::new();
        let measured = measure(m.through, || {
            phases = deploy(m.cluster, &deployment, m.applications)?;
            Ok(())
        })?;
        std::thread::sleep(Duration::from_millis(200));
        let report = client.finish();
        out.attempts += report.attempts.len();
        out.failed += report.failed().len();
        for f in report.failed().iter().take(3) {
            out.failures.push(format!(
                "move {}: {} at {} ms: {}",
                i + 1,
                f.key,
                f.at.as_millis(),
                f.error.as_deref().unwrap_or_default()
            ));
        }
        out.worst = out.worst.max(report.worst_latency());
        out.downtimes.push(measured.downtime);
        for (phase, took) in phases {
            out.phases.entry(phase).or_default().push(took);
        }
    }
    if m.count % 2 == 1 {
        let home = (m.deployment_on)(a, &format!("client-view-{label}-home.yml"))?;
        deploy(m.cluster, &home, m.applications)?;
    }
    Ok(out)
}

/// The table: one column per run.
pub(super) fn table(runs: &[ClientViewRun], delta_mib: u64, size_mib: u64) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let mut t = format!(
        "\n| client view: {} moves of a {size_mib} MiB volume, {delta_mib} MiB changed before each; a new connection every 10 ms through the third node | {} |\n| --- |{}\n",
        first.moves,
        runs.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " ---: |".repeat(runs.len())
    );
    let row = |name: &str, cell: &dyn Fn(&ClientViewRun) -> String| {
        format!(
            "| {name} | {} |\n",
            runs.iter().map(cell).collect::<Vec<_>>().join(" | ")
        )
    };
    t.push_str(&row("attempts (request + reply)", &|r| {
        r.attempts.to_string()
    }));
    t.push_str(&row("failed attempts", &|r| r.failed.to_string()));
    t.push_str(&row("worst connect-to-reply", &|r| ms(r.worst)));
    t.push_str(&row("downtime (PING every 10 ms), median", &|r| {
        ms(median(r.downtimes.clone()))
    }));
    t.push_str(&row("downtime (PING every 10 ms), worst", &|r| {
        ms(r.downtimes.iter().copied().max().unwrap_or_default())
    }));
    for phase in PHASES {
        if runs.iter().all(|r| !r.phases.contains_key(phase)) {
            continue;
        }
        t.push_str(&row(&format!("phase `{phase}`, median"), &|r| {
            r.phases
                .get(phase)
                .map_or("-".to_string(), |times| ms(median(times.clone())))
        }));
    }
    for r in runs {
        for f in &r.failures {
            t.push_str(&format!("\n{}: {f}", r.label));
        }
    }
    t
}
