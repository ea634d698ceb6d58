//! `flocker-agent`: parse the configuration, set up logging, run the agent until a signal.
//! Exit codes: 0 after a clean shutdown, 2 for a bad configuration, 1 for a failed start.
#![forbid(unsafe_code)]

use clap::Parser;
use flocker_dataplane::config::{AgentConfig, Flags};
use flocker_dataplane::daemon;
use flocker_wire::logging::{self, LogFormat};

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match AgentConfig::resolve(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flocker-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let format = if config.json_logs {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    logging::init("info", format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flocker-agent: tokio runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            eprintln!("flocker-agent: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
