//! `flockerctl ca ...`: thin wiring from the subcommands to [`crate::ca`].

use std::time::SystemTime;

use crate::ca::{self, CaError, IssuedCert, Role, Validity};
use crate::cli::{CaCommand, Outcome, RoleArg};

pub fn run(command: CaCommand) -> Outcome {
    match execute(command) {
        Ok(message) => {
            println!("{message}");
            Outcome::Success
        }
        Err(e) => {
            eprintln!("flockerctl ca: {e}");
            Outcome::Failure
        }
    }
}

fn execute(command: CaCommand) -> Result<String, CaError> {
    match command {
        CaCommand::Init { dir } => {
            let ca = ca::init(&dir, "flocker cluster CA")?;
            Ok(format!(
                "wrote {}, {} and {}",
                ca.cert.display(),
                ca.key.display(),
                dir.join(ca::CA_CRL).display()
            ))
        }
        CaCommand::Node { address, dir, days } => {
            ca::issue(&dir, Role::Node, &address, Validity::days(days)?).map(|c| wrote(&c))
        }
        CaCommand::User { name, dir, days } => {
            ca::issue(&dir, Role::User, &name, Validity::days(days)?).map(|c| wrote(&c))
        }
        CaCommand::Renew {
            role,
            name,
            dir,
            days,
        } => ca::renew(&dir, role.into(), &name, Validity::days(days)?).map(|c| {
            format!(
                "{}\nrestart whatever uses the old pair to pick the new one up",
                wrote(&c)
            )
        }),
        CaCommand::Revoke { role, name, dir } => {
            let revoked = ca::revoke(&dir, role.into(), &name)?;
            let what = if revoked.already {
                "was already revoked"
            } else {
                "revoked"
            };
            Ok(format!(
                "{role} {name} (serial {}) {what}; wrote {}\ncopy it to every node's --crl path; agents re-read it on their next connection",
                revoked.serial,
                revoked.crl.display(),
                role = Role::from(role),
            ))
        }
    }
}

fn wrote(c: &IssuedCert) -> String {
    let days = c
        .not_after
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs().div_ceil(86400))
        .unwrap_or(0);
    format!(
        "wrote {} and {} (valid for {days} days)",
        c.cert.display(),
        c.key.display()
    )
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Node => Role::Node,
            RoleArg::User => Role::User,
        }
    }
}
