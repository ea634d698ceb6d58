//! `flockerctl ca ...`: thin wiring from the subcommands to [`crate::ca`].

use crate::cli::{CaCommand, Outcome};

pub fn run(command: CaCommand) -> Outcome {
    let _ = command;
    eprintln!("flockerctl: the cluster CA commands are not built yet");
    Outcome::Failure
}
