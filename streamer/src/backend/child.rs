//! Child processes (`zfs send`, `zfs recv`, `btrfs send`, `btrfs receive`) with their stderr
//! collected, readers that turn a failed exit into a read error, and kill-on-abort.

use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::BackendError;

/// Keep the last this many bytes of a tool's stderr.
const STDERR_TAIL: usize = 4096;

/// A running tool.
#[derive(Debug)]
pub(crate) struct Tool {
    pub(crate) command: String,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

/// A tool fed through its stdin: the running half of a command-backed sink (`zfs recv`,
/// `btrfs receive`).
#[derive(Debug, Default)]
pub(crate) struct ToolWriter {
    tool: Option<Tool>,
    stdin: Option<ChildStdin>,
}

impl ToolWriter {
    /// Starts `cmd` and returns its stdin to write the stream into.
    pub(crate) fn start(
        &mut self,
        cmd: Command,
        what: &str,
    ) -> Result<&mut ChildStdin, BackendError> {
        let mut tool = Tool::spawn(cmd, false)?;
        self.stdin = tool.take_stdin();
        self.tool = Some(tool);
        self.stdin
            .as_mut()
            .ok_or_else(|| BackendError::Target(format!("{what} has no stdin")))
    }

    /// Closes stdin, which is the tool's end of stream, and waits for it to succeed.
    pub(crate) fn finish(&mut self, what: &str) -> Result<(), BackendError> {
        self.stdin = None;
        let mut tool = self
            .tool
            .take()
            .ok_or_else(|| BackendError::Target(format!("{what} committed before open")))?;
        tool.wait()
    }

    /// Kills the tool before closing stdin, so that a stream cut at a record boundary cannot
    /// look complete; returns what it printed on stderr, if it ran.
    pub(crate) fn kill(&mut self) -> Option<String> {
        let stderr = self.tool.take().map(|mut t| t.kill());
        self.stdin = None;
        stderr
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

impl Tool {
    /// Spawns `cmd` with stdout (`read`) or stdin (`!read`) piped.
    pub(crate) fn spawn(mut cmd: Command, read: bool) -> Result<Self, BackendError> {
        let command = describe(&cmd);
        if read {
            cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        } else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        }
        cmd.stderr(Stdio::piped());
        tracing::debug!(%command, "starting");
        let mut child = cmd.spawn().map_err(|source| BackendError::Spawn {
            command: command.clone(),
            source,
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_thread = child.stderr.take().map(|mut pipe| {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut v) = sink.lock() {
                        v.extend_from_slice(&buf[..n]);
                        if v.len() > STDERR_TAIL {
                            let cut = v.len() - STDERR_TAIL;
                            v.drain(..cut);
                        }
                    }
                }
            })
        });
        Ok(Self {
            command,
            child,
            stderr,
            stderr_thread,
        })
    }

    pub(crate) fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub(crate) fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    fn stderr_text(&mut self) -> String {
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let v = self.stderr.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&v).trim().to_owned()
    }

    /// Waits for a normal exit; an error carries the tool's stderr.
    pub(crate) fn wait(&mut self) -> Result<(), BackendError> {
        let status = self.child.wait().map_err(|source| BackendError::Spawn {
            command: self.command.clone(),
            source,
        })?;
        let stderr = self.stderr_text();
        if status.success() {
            if !stderr.is_empty() {
                tracing::debug!(command = %self.command, %stderr, "tool succeeded");
            }
            Ok(())
        } else {
            Err(BackendError::Command {
                command: self.command.clone(),
                status: status.to_string(),
                stderr,
            })
        }
    }

    /// Kills the tool (if still running) and returns its stderr.
    pub(crate) fn kill(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr_text()
    }
}

/// Runs a short command to completion and returns its stdout.
pub(crate) fn run(mut cmd: Command) -> Result<String, BackendError> {
    let command = describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BackendError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BackendError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A tool's stdout; at EOF it waits for the tool and reports a failed exit as a read error.
/// Dropping it early kills the tool.
pub(crate) struct ToolReader {
    tool: Tool,
    stdout: ChildStdout,
    done: bool,
}

impl ToolReader {
    pub(crate) fn spawn(cmd: Command) -> Result<Self, BackendError> {
        let mut tool = Tool::spawn(cmd, true)?;
        let stdout = tool.take_stdout().ok_or_else(|| BackendError::Spawn {
            command: tool.command.clone(),
            source: std::io::Error::other("no stdout pipe"),
        })?;
        Ok(Self {
            tool,
            stdout,
            done: false,
        })
    }
}

impl Read for ToolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.tool.wait().map_err(std::io::Error::other)?;
            self.done = true;
        }
        Ok(n)
    }
}

impl Drop for ToolReader {
    fn drop(&mut self) {
        if !self.done {
            let stderr = self.tool.kill();
            tracing::debug!(command = %self.tool.command, %stderr, "source stopped early; killed");
        }
    }
}
