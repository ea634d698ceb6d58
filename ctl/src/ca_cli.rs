//! `flockerctl ca ...`: thin wiring from the subcommands to [`crate::ca`].

use crate::ca::{self, IssuedCert};
use crate::cli::{CaCommand, Outcome};

pub fn run(command: CaCommand) -> Outcome {
    let result = match &command {
        CaCommand::Init { dir } => ca::init(dir, "flocker cluster CA"),
        CaCommand::Node { address, dir } => ca::issue_node(dir, address),
        CaCommand::User { name, dir } => ca::issue_user(dir, name),
    };
    match result {
        Ok(IssuedCert { cert, key }) => {
            println!("wrote {} and {}", cert.display(), key.display());
            Outcome::Success
        }
        Err(e) => {
            eprintln!("flockerctl ca: {e}");
            Outcome::Failure
        }
    }
}
