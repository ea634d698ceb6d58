//! Runs `flockerctl deploy --output json` bounded in time, reading its phase events from
//! stderr as they come so that a fault can be injected the moment a phase starts.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cluster::Cluster;

/// How one deploy ended.
#[derive(Debug, Clone)]
pub struct DeployRun {
    /// The exit code; `None` when it was killed (by the fault, or by us at its deadline).
    pub code: Option<i32>,
    /// Still running at its deadline (then killed): a hung command.
    pub hung: bool,
    pub stdout: String,
    /// Every stderr line, JSON events and others.
    pub stderr: Vec<String>,
    pub elapsed: Duration,
    /// Whether the phase the hook waited for was announced (and the hook ran).
    pub phase_seen: bool,
}

impl DeployRun {
    pub fn succeeded(&self) -> bool {
        self.code == Some(0)
    }

    /// `nothing to do` on stdout: the cluster already matched (JSON: an empty plan).
    pub fn nothing_to_do(&self) -> bool {
        self.succeeded() && nothing_to_do(&self.stdout)
    }

    /// What the deploy said went wrong: its JSON answer's `error`, else the last `failed`
    /// event, else the last stderr line.
    pub fn message(&self) -> String {
        error_message(&self.stdout, &self.stderr)
    }

    /// The phases the deploy announced, in order.
    pub fn phases(&self) -> Vec<String> {
        self.stderr.iter().filter_map(|l| phase_of(l)).collect()
    }

    /// A one-line account for the report.
    pub fn summary(&self) -> String {
        let end = match (self.hung, self.code) {
            (true, _) => "HUNG (killed at its deadline)".to_string(),
            (false, None) => "killed".to_string(),
            (false, Some(0)) if self.nothing_to_do() => "exit 0, nothing to do".to_string(),
            (false, Some(0)) => "exit 0".to_string(),
            (false, Some(code)) => format!("exit {code}: {}", self.message()),
        };
        format!("{end} after {:.1} s", self.elapsed.as_secs_f64())
    }
}

/// Whether a deploy's stdout says there was nothing to do: with `--output json`, an answer
/// `"changed": false`.
pub fn nothing_to_do(stdout: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(stdout)
        .ok()
        .and_then(|v| v.get("changed").and_then(serde_json::Value::as_bool))
        == Some(false)
}

fn error_message(stdout: &str, stderr: &[String]) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(stdout)
        && let Some(e) = v.get("error").and_then(serde_json::Value::as_str)
    {
        return e.to_string();
    }
    let failed = stderr.iter().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v.get("event")?.as_str()? == "failed").then(|| {
            format!(
                "{} {}: {}",
                v.get("node").and_then(|n| n.as_str()).unwrap_or("?"),
                v.get("step").and_then(|n| n.as_str()).unwrap_or("?"),
                v.get("error").and_then(|n| n.as_str()).unwrap_or("?")
            )
        })
    });
    failed
        .or_else(|| stderr.iter().rev().find(|l| !l.trim().is_empty()).cloned())
        .unwrap_or_default()
}

/// The phase a stderr line announces, if it is a phase event.
pub fn phase_of(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v.get("event")?.as_str()? == "phase").then(|| v.get("phase")?.as_str().map(str::to_string))?
}

/// What runs when the phase starts, given the running `flockerctl`.
pub type Inject<'a> = Box<dyn FnMut(&mut Child) -> Result<()> + 'a>;

/// Called once when the deploy announces `phase`, with the running `flockerctl`.
pub struct PhaseHook<'a> {
    pub phase: &'a str,
    pub run: Inject<'a>,
    /// Called every 100 ms after the hook ran, while the deploy runs (a fault that heals
    /// after a while does it here).
    pub tick: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// `flockerctl deploy [FLAGS] DEPLOYMENT APPLICATION --output json`, killed after `deadline`.
pub fn deploy(
    cluster: &Cluster,
    flags: &[&str],
    deployment: &Path,
    application: &Path,
    deadline: Duration,
    mut hook: Option<PhaseHook<'_>>,
) -> Result<DeployRun> {
    let started = Instant::now();
    let mut child = Command::new(&cluster.spec.ctl_binary)
        .arg("deploy")
        .args(flags)
        .arg(deployment)
        .arg(application)
        .args(["--output", "json"])
        .env("FLOCKER_CA_DIR", cluster.ca_dir())
        .env("FLOCKER_USER", "admin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start flockerctl deploy")?;
    let mut stdout = child.stdout.take().context("deploy stdout")?;
    let stderr = child.stderr.take().context("deploy stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let (lines_tx, lines) = mpsc::channel();
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr_lines = Vec::new();
    let mut phase_seen = false;
    let mut hung = false;
    let mut hook_error = None;
    let status = loop {
        while let Ok(line) = lines.try_recv() {
            if !phase_seen
                && let Some(hook) = hook.as_mut()
                && phase_of(&line).as_deref() == Some(hook.phase)
            {
                phase_seen = true;
                if let Err(e) = (hook.run)(&mut child) {
                    hook_error = Some(e);
                }
            }
            stderr_lines.push(line);
        }
        if phase_seen
            && let Some(hook) = hook.as_mut()
            && let Err(e) = (hook.tick)()
        {
            hook_error.get_or_insert(e);
        }
        if let Some(status) = child.try_wait().context("wait for flockerctl")? {
            break status;
        }
        if started.elapsed() > deadline {
            hung = true;
            let _ = child.kill();
            break child.wait().context("reap flockerctl")?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = err_reader.join();
    stderr_lines.extend(lines.try_iter());
    let stdout = out_reader.join().unwrap_or_default();
    if let Some(e) = hook_error {
        return Err(e.context("injecting the fault"));
    }
    Ok(DeployRun {
        code: status.code(),
        hung,
        stdout,
        stderr: stderr_lines,
        elapsed: started.elapsed(),
        phase_seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_events_are_recognised_and_nothing_else() {
        let line = r#"{"event":"phase","phase":"final-push","index":4,"of":7}"#;
        assert_eq!(phase_of(line).as_deref(), Some("final-push"));
        assert_eq!(
            phase_of(r#"{"event":"started","step":"final-push","node":"n"}"#),
            None
        );
        assert_eq!(phase_of("running phase 4/7: final-push"), None);
    }

    #[test]
    fn the_message_is_the_answer_s_error_then_the_failed_event() {
        let stderr = vec![
            r#"{"event":"failed","node":"198.18.0.12","step":"receive","error":"pool is full"}"#
                .to_string(),
            "trailing".to_string(),
        ];
        assert_eq!(
            error_message(r#"{"ok":false,"error":"node 198.18.0.12 failed"}"#, &stderr),
            "node 198.18.0.12 failed"
        );
        assert_eq!(
            error_message("", &stderr),
            "198.18.0.12 receive: pool is full"
        );
        assert_eq!(error_message("", &["last words".into()]), "last words");
    }

    #[test]
    fn nothing_to_do_is_an_answer_that_changed_nothing() {
        assert!(nothing_to_do(r#"{"ok":true,"changed":false,"phases":[]}"#));
        assert!(!nothing_to_do(r#"{"ok":true,"changed":true,"phases":[]}"#));
        assert!(!nothing_to_do("nothing to do"));
    }
}
