//! The one `tracing` setup every binary uses (`flockerctl`, `flocker-agent`,
//! `flocker-stream`): an env filter (`RUST_LOG`, else the binary's default level), text or
//! JSON, always on stderr so that stdout stays clean for `--output json` and for streams.
//!
//! Behind the `logging` feature, so that embedders of the wire types do not pull in
//! `tracing-subscriber`.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `default_level` applies when `RUST_LOG` is unset or
/// invalid. A second call does nothing, so tests may call it freely.
pub fn init(default_level: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
