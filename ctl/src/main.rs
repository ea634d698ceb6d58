//! `flockerctl`: parse flags, run the command, map its outcome to an exit code.
#![forbid(unsafe_code)]

use clap::Parser;
use flocker_ctl::cli::{Cli, run};

fn main() {
    flocker_wire::logging::init("warn", flocker_wire::logging::LogFormat::Text);
    let outcome = run(Cli::parse());
    std::process::exit(outcome.exit_code());
}
