//! `flocker-stream send|recv`: the standalone streamer. Only wiring lives here; see `cli/`.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    flocker_wire::logging::init("warn", flocker_wire::logging::LogFormat::Text);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flocker-stream: error: {}", cli::render_error(&e));
            ExitCode::from(1)
        }
    }
}
