//! The one seam through which storage runs processes (`zfs`, `btrfs`, `cp`, `stat`,
//! `findmnt`): [`Runner`]. [`SystemRunner`] runs real processes, with their stderr collected;
//! unit tests substitute a recording fake (`fake::FakeRunner`, with the `fake` feature).
//!
//! A streaming child is never left behind: a reader that stops early and an input that is
//! dropped unfinished kill their process and wait for it.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::BackendError;

/// Keep the last this many bytes of a tool's stderr.
const STDERR_TAIL: usize = 4096;

/// Runs the external commands of sources, sinks and volume backends.
pub trait Runner: Send + Sync {
    /// Runs to completion and returns stdout; a non-zero exit is [`BackendError::Command`]
    /// carrying stderr.
    fn run(&self, program: &str, args: &[String]) -> Result<String, BackendError>;
    /// Starts a command whose stdout is a stream to read (`zfs send`). A failed exit turns
    /// the end of the stream into a read error; dropping the reader early kills the command.
    fn spawn_reader(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn Read + Send>, BackendError>;
    /// Starts a command whose stdin is a stream to write (`zfs recv`).
    fn spawn_writer(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn ChildInput>, BackendError>;
}

/// The stdin of a running command. Dropped without [`ChildInput::finish`], it is killed.
pub trait ChildInput: Write + Send {
    /// Closes stdin, which is the command's end of stream, and waits for it to succeed.
    fn finish(self: Box<Self>) -> Result<(), BackendError>;
    /// Kills the command before closing stdin, so that a stream cut at a record boundary
    /// cannot look complete, waits for it and returns what it printed on stderr.
    fn kill(self: Box<Self>) -> String;
}

/// Finishes the running input of sink `what` (its commit): closes stdin, waits for success.
pub(crate) fn finish(
    input: &mut Option<Box<dyn ChildInput>>,
    what: &str,
) -> Result<(), BackendError> {
    input
        .take()
        .ok_or_else(|| BackendError::Target(format!("{what} committed before open")))?
        .finish()
}

/// Renders a command line for messages and logs.
pub fn command_line(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// The arguments of a command from string slices.
pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs real processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

/// The runner used where none is given.
pub fn system() -> Arc<dyn Runner> {
    Arc::new(SystemRunner)
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[String]) -> Result<String, BackendError> {
        let command = command_line(program, args);
        tracing::debug!(%command, "running");
        let out = Command::new(program)
            .args(args)
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

    fn spawn_reader(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn Read + Send>, BackendError> {
        let mut tool = Tool::spawn(program, args, true)?;
        let stdout = tool
            .child
            .stdout
            .take()
            .ok_or_else(|| BackendError::Spawn {
                command: tool.command.clone(),
                source: std::io::Error::other("no stdout pipe"),
            })?;
        Ok(Box::new(ToolReader {
            tool,
            stdout,
            done: false,
        }))
    }

    fn spawn_writer(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn ChildInput>, BackendError> {
        let mut tool = Tool::spawn(program, args, false)?;
        let stdin = tool.child.stdin.take().ok_or_else(|| BackendError::Spawn {
            command: tool.command.clone(),
            source: std::io::Error::other("no stdin pipe"),
        })?;
        Ok(Box::new(ToolWriter {
            tool: Some(tool),
            stdin: Some(stdin),
        }))
    }
}

/// A running command with its stderr collected on a thread.
#[derive(Debug)]
struct Tool {
    command: String,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Tool {
    /// Spawns with stdout (`read`) or stdin (`!read`) piped.
    fn spawn(program: &str, args: &[String], read: bool) -> Result<Self, BackendError> {
        let command = command_line(program, args);
        let mut cmd = Command::new(program);
        cmd.args(args);
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

    fn stderr_text(&mut self) -> String {
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let v = self.stderr.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&v).trim().to_owned()
    }

    /// Waits for a normal exit; an error carries the tool's stderr.
    fn wait(&mut self) -> Result<(), BackendError> {
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

    /// Kills the tool (if still running), waits for it and returns its stderr.
    fn kill(&mut self) -> String {
        self.stop();
        self.stderr_text()
    }

    /// Kills the tool (if still running) and waits for it.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tool's stdout; at EOF it waits for the tool and reports a failed exit as a read error.
/// Dropping it early kills the tool.
struct ToolReader {
    tool: Tool,
    stdout: ChildStdout,
    done: bool,
}

impl Read for ToolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.done = true;
            self.tool.wait().map_err(std::io::Error::other)?;
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

/// A tool fed through its stdin.
struct ToolWriter {
    tool: Option<Tool>,
    stdin: Option<ChildStdin>,
}

impl Write for ToolWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.stdin {
            Some(s) => s.write(buf),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.stdin {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

impl ChildInput for ToolWriter {
    fn finish(mut self: Box<Self>) -> Result<(), BackendError> {
        self.stdin = None;
        match self.tool.take() {
            Some(mut tool) => tool.wait(),
            None => Ok(()),
        }
    }

    fn kill(mut self: Box<Self>) -> String {
        let Some(mut tool) = self.tool.take() else {
            return String::new();
        };
        // Killed before its stdin closes, so a cut stream never ends at a clean EOF; stdin
        // closes before the stderr is collected, so a helper the tool forked sees its end.
        tool.stop();
        self.stdin = None;
        tool.stderr_text()
    }
}

impl Drop for ToolWriter {
    fn drop(&mut self) {
        if let Some(tool) = self.tool.take() {
            let stdin = self.stdin.take();
            let command = tool.command.clone();
            let stderr = ChildInput::kill(Box::new(ToolWriter {
                tool: Some(tool),
                stdin,
            }));
            tracing::debug!(%command, %stderr, "input dropped unfinished; killed");
        }
    }
}

#[cfg(any(test, feature = "fake"))]
pub mod fake {
    //! A recording [`Runner`] for unit tests: canned outputs by command-line prefix; streaming
    //! commands read as empty and swallow what is written.

    use std::sync::Mutex;

    use super::*;

    /// One canned answer.
    #[derive(Debug, Clone)]
    struct Answer {
        prefix: String,
        out: Result<String, String>,
        once: bool,
    }

    /// Records every command line; answers from [`FakeRunner::answer`] (the latest matching
    /// answer wins, so a test can change the world between steps), else an empty stdout.
    #[derive(Debug, Default)]
    pub struct FakeRunner {
        calls: Mutex<Vec<String>>,
        answers: Mutex<Vec<Answer>>,
    }

    impl FakeRunner {
        /// Commands starting with `prefix` answer `out` (`Err`: fail with that stderr).
        pub fn answer(&self, prefix: &str, out: Result<&str, &str>) {
            self.push(prefix, out, false);
        }

        /// Like [`FakeRunner::answer`], for the next matching command only.
        pub fn answer_once(&self, prefix: &str, out: Result<&str, &str>) {
            self.push(prefix, out, true);
        }

        fn push(&self, prefix: &str, out: Result<&str, &str>, once: bool) {
            if let Ok(mut a) = self.answers.lock() {
                a.push(Answer {
                    prefix: prefix.to_string(),
                    out: out.map(str::to_string).map_err(str::to_string),
                    once,
                });
            }
        }

        fn lookup(&self, line: &str) -> Option<Result<String, String>> {
            let mut answers = self.answers.lock().ok()?;
            let i = answers.iter().rposition(|a| line.starts_with(&a.prefix))?;
            Some(if answers[i].once {
                answers.remove(i).out
            } else {
                answers[i].out.clone()
            })
        }

        /// Every command line run or spawned so far, in order.
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        fn record(&self, program: &str, args: &[String]) -> String {
            let line = command_line(program, args);
            if let Ok(mut c) = self.calls.lock() {
                c.push(line.clone());
            }
            line
        }
    }

    struct Swallow;

    impl Write for Swallow {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl ChildInput for Swallow {
        fn finish(self: Box<Self>) -> Result<(), BackendError> {
            Ok(())
        }
        fn kill(self: Box<Self>) -> String {
            String::new()
        }
    }

    impl Runner for FakeRunner {
        fn run(&self, program: &str, args: &[String]) -> Result<String, BackendError> {
            let line = self.record(program, args);
            match self.lookup(&line) {
                Some(out) => out.map_err(|stderr| BackendError::Command {
                    command: line,
                    status: "exit status: 1".into(),
                    stderr,
                }),
                None => Ok(String::new()),
            }
        }

        fn spawn_reader(
            &self,
            program: &str,
            args: &[String],
        ) -> Result<Box<dyn Read + Send>, BackendError> {
            self.record(program, args);
            Ok(Box::new(std::io::empty()))
        }

        fn spawn_writer(
            &self,
            program: &str,
            args: &[String],
        ) -> Result<Box<dyn ChildInput>, BackendError> {
            self.record(program, args);
            Ok(Box::new(Swallow))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_exit_is_a_read_error_at_the_end_of_the_stream() {
        let mut ok = String::new();
        SystemRunner
            .spawn_reader("sh", &args(&["-c", "echo hi"]))
            .expect("spawn")
            .read_to_string(&mut ok)
            .expect("read");
        assert_eq!(ok, "hi\n");
        let mut out = Vec::new();
        let e = SystemRunner
            .spawn_reader("sh", &args(&["-c", "echo oops >&2; exit 3"]))
            .expect("spawn")
            .read_to_end(&mut out)
            .expect_err("failed exit");
        assert!(e.to_string().contains("oops"), "{e}");
    }

    #[test]
    fn an_input_is_finished_or_killed() {
        let mut w = SystemRunner
            .spawn_writer("sh", &args(&["-c", "exec cat >/dev/null"]))
            .expect("spawn");
        w.write_all(b"data").expect("write");
        w.finish().expect("finish");
        let w = SystemRunner
            .spawn_writer("sh", &args(&["-c", "echo said >&2; exec cat >/dev/null"]))
            .expect("spawn");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(w.kill(), "said");
        let e = SystemRunner
            .run("sh", &args(&["-c", "echo no >&2; exit 1"]))
            .expect_err("fails");
        assert!(
            matches!(&e, BackendError::Command { stderr, .. } if stderr == "no"),
            "{e}"
        );
    }
}
