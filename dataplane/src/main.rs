//! `flocker-agent`: parse the configuration, set up logging, run the agent until a signal.
//! Exit codes: 0 after a clean shutdown, 2 for a bad configuration, 1 for a failed start.

use clap::Parser;
use flocker_dataplane::config::{AgentConfig, Flags};
use flocker_dataplane::{daemon, observability};

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match AgentConfig::resolve(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flocker-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    observability::init(config.json_logs);
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
