//! The one seam through which volume backends run `zfs` and `btrfs`: [`CommandRunner`].
//! [`SystemRunner`] runs real processes; unit tests substitute a recording fake.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::{ReceiveSink, SendStream, VolumeError};

/// Runs the external commands of a backend.
pub trait CommandRunner: Send + Sync {
    /// Runs to completion and returns stdout; a non-zero exit is an error carrying stderr.
    fn run(&self, program: &str, args: &[String]) -> Result<String, VolumeError>;
    /// Starts a command whose stdout is a stream to read (`zfs send`).
    fn spawn_reader(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn SendStream>, VolumeError>;
    /// Starts a command whose stdin is a stream to write (`zfs recv`).
    fn spawn_writer(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn ReceiveSink>, VolumeError>;
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

/// Runs real processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

fn spawn_error(program: &str, args: &[String], e: std::io::Error) -> VolumeError {
    VolumeError::Command {
        command: command_line(program, args),
        detail: e.to_string(),
    }
}

impl CommandRunner for SystemRunner {
    fn run(&self, program: &str, args: &[String]) -> Result<String, VolumeError> {
        tracing::debug!(command = %command_line(program, args), "running");
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error(program, args, e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(VolumeError::Command {
                command: command_line(program, args),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }

    fn spawn_reader(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn SendStream>, VolumeError> {
        tracing::debug!(command = %command_line(program, args), "spawning sender");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(program, args, e))?;
        let stdout = child.stdout.take();
        Ok(Box::new(ChildReader {
            command: command_line(program, args),
            child: Some(child),
            stdout,
        }))
    }

    fn spawn_writer(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<Box<dyn ReceiveSink>, VolumeError> {
        tracing::debug!(command = %command_line(program, args), "spawning receiver");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(program, args, e))?;
        let stdin = child.stdin.take();
        Ok(Box::new(ChildWriter {
            command: command_line(program, args),
            child: Some(child),
            stdin,
        }))
    }
}

fn wait_child(command: &str, child: Child) -> Result<(), VolumeError> {
    let out = child.wait_with_output().map_err(|e| VolumeError::Command {
        command: command.to_string(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Command {
            command: command.to_string(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Kills a child that was abandoned mid-stream, so `zfs recv` discards the partial stream.
fn abandon(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

struct ChildReader {
    command: String,
    child: Option<Child>,
    stdout: Option<ChildStdout>,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.stdout {
            Some(s) => s.read(buf),
            None => Ok(0),
        }
    }
}

impl SendStream for ChildReader {
    fn finish(mut self: Box<Self>) -> Result<(), VolumeError> {
        self.stdout = None;
        match self.child.take() {
            Some(child) => wait_child(&self.command, child),
            None => Ok(()),
        }
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        abandon(&mut self.child);
    }
}

struct ChildWriter {
    command: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl Write for ChildWriter {
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

impl ReceiveSink for ChildWriter {
    fn finish(mut self: Box<Self>) -> Result<(), VolumeError> {
        // Closing stdin is the end-of-stream the receiver waits for.
        self.stdin = None;
        match self.child.take() {
            Some(child) => wait_child(&self.command, child),
            None => Ok(()),
        }
    }
}

impl Drop for ChildWriter {
    fn drop(&mut self) {
        self.stdin = None;
        abandon(&mut self.child);
    }
}

#[cfg(test)]
pub mod fake {
    //! A recording [`CommandRunner`] for unit tests: canned outputs by command prefix.

    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct FakeRunner {
        pub calls: Mutex<Vec<String>>,
        /// (command-line prefix, stdout); the first matching entry answers.
        pub outputs: Mutex<Vec<(String, Result<String, String>)>>,
    }

    impl FakeRunner {
        pub fn answer(&self, prefix: &str, out: Result<&str, &str>) {
            if let Ok(mut o) = self.outputs.lock() {
                o.push((
                    prefix.to_string(),
                    out.map(str::to_string).map_err(str::to_string),
                ));
            }
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    struct Empty;
    impl Read for Empty {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Ok(0)
        }
    }
    impl SendStream for Empty {
        fn finish(self: Box<Self>) -> Result<(), VolumeError> {
            Ok(())
        }
    }
    struct Sink;
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl ReceiveSink for Sink {
        fn finish(self: Box<Self>) -> Result<(), VolumeError> {
            Ok(())
        }
    }

    impl CommandRunner for FakeRunner {
        fn run(&self, program: &str, args: &[String]) -> Result<String, VolumeError> {
            let line = command_line(program, args);
            if let Ok(mut c) = self.calls.lock() {
                c.push(line.clone());
            }
            let outputs = self.outputs.lock().map(|o| o.clone()).unwrap_or_default();
            for (prefix, out) in outputs {
                if line.starts_with(&prefix) {
                    return out.map_err(|detail| VolumeError::Command {
                        command: line.clone(),
                        detail,
                    });
                }
            }
            Ok(String::new())
        }

        fn spawn_reader(
            &self,
            program: &str,
            args: &[String],
        ) -> Result<Box<dyn SendStream>, VolumeError> {
            if let Ok(mut c) = self.calls.lock() {
                c.push(command_line(program, args));
            }
            Ok(Box::new(Empty))
        }

        fn spawn_writer(
            &self,
            program: &str,
            args: &[String],
        ) -> Result<Box<dyn ReceiveSink>, VolumeError> {
            if let Ok(mut c) = self.calls.lock() {
                c.push(command_line(program, args));
            }
            Ok(Box::new(Sink))
        }
    }
}
