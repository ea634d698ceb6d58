//! Hooks for the fault-injection suite (`cargo xtask chaos`) only: with
//! `FLOCKER_TEST_HOOKS=DIR` in the agent's environment, a file in `DIR` named after a hook
//! makes the agent pause at that point once, for the milliseconds the file holds (at most
//! [`MAX_PAUSE`]), and the agent removes the file as it fires. Without the variable (every real
//! deployment) no hook is looked at.
//!
//! The suite uses them to put a fault in a window too short to hit from outside, e.g. between
//! the target of a final push recording itself owner and its answer reaching the source.

use std::path::PathBuf;
use std::time::Duration;

/// The environment variable naming the hooks' directory.
pub const ENV: &str = "FLOCKER_TEST_HOOKS";
/// A hook's longest pause, whatever its file says.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Where the agent pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The target of a final push has verified the stream and recorded itself owner, and
    /// is about to answer.
    HoldPushAnswer,
}

impl Hook {
    /// The hook's file name.
    pub fn file_name(self) -> &'static str {
        match self {
            Hook::HoldPushAnswer => "hold-push-answer",
        }
    }
}

/// The pause a hook file asks for: milliseconds, bounded; `None` for anything else.
pub fn parse_pause(text: &str) -> Option<Duration> {
    let ms: u64 = text.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_PAUSE))
}

fn armed(hook: Hook) -> Option<(PathBuf, Duration)> {
    let dir = std::env::var_os(ENV)?;
    let path = PathBuf::from(dir).join(hook.file_name());
    let text = std::fs::read_to_string(&path).ok()?;
    let pause = parse_pause(&text);
    if pause.is_none() {
        tracing::warn!(path = %path.display(), "test hook file does not hold milliseconds; ignored");
    }
    Some((path, pause?))
}

/// Pauses at `hook` if the suite armed it, once (the file is removed as it fires).
pub async fn pause_at(hook: Hook) {
    let Some((path, pause)) = armed(hook) else {
        return;
    };
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot disarm test hook; not pausing");
        return;
    }
    tracing::warn!(
        hook = hook.file_name(),
        pause_ms = pause.as_millis() as u64,
        "test hook: pausing"
    );
    tokio::time::sleep(pause).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_file_holds_bounded_milliseconds() {
        assert_eq!(parse_pause("2500\n"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_pause("999999999"), Some(MAX_PAUSE));
        assert_eq!(parse_pause("soon"), None);
        assert_eq!(parse_pause("-1"), None);
    }
}
