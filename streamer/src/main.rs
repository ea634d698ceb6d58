//! `flocker-stream send|recv`: the standalone streamer. Only wiring lives here; see `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_tracing();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flocker-stream: error: {}", cli::render_error(&e));
            ExitCode::from(1)
        }
    }
}
