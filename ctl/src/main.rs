//! `flockerctl`: parse flags, run the command, map its outcome to an exit code.

use clap::Parser;
use flocker_ctl::cli::{Cli, run};

fn main() {
    flocker_ctl::logging::init();
    let outcome = run(Cli::parse());
    std::process::exit(outcome.exit_code());
}
