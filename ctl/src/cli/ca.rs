//! `flockerctl ca ...`: the subcommands and thin wiring from them to [`crate::ca`].

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Subcommand, ValueEnum};

use super::output::Outcome;
use crate::ca::{self, CaError, IssuedCert, Role, Validity};

/// The role a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A node's agent (NAME is the node's address as the deployment file spells it).
    Node,
    /// A user of flockerctl.
    User,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new cluster CA in DIR.
    ///
    /// Writes the CA certificate cluster.crt, its key cluster.key (keep it off the nodes)
    /// and an empty revocation list cluster.crl; refuses to overwrite an existing CA.
    Init {
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a certificate for the agent on node ADDRESS.
    ///
    /// Writes DIR/nodes/ADDRESS.{crt,key}, signed by the CA in DIR. ADDRESS is the node's
    /// address exactly as the deployment file spells it.
    Node {
        address: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Issue a certificate for user NAME.
    ///
    /// Writes DIR/users/NAME.{crt,key}; flockerctl presents it to the agents (`--user NAME`).
    User {
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Replace a node's or user's certificate with a new key and a fresh lifetime.
    ///
    /// Also the way to give certificates from before roles existed a role. The old
    /// certificate stays valid until it expires; revoke it too if its key may have leaked.
    /// Restart the agent (or flockerctl) that uses the pair to pick the new one up.
    ///
    /// Example: flockerctl ca renew node 198.18.0.11 --dir ca
    Renew {
        role: RoleArg,
        /// The node's address or the user's name, as issued.
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime in days (1 to 1825).
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
    },
    /// Put a node's or user's certificate on the revocation list DIR/cluster.crl.
    ///
    /// Copy cluster.crl to every node (to the path the agents' --crl names); agents re-read
    /// it on the next connection, without a restart. Write it there atomically (copy to a
    /// temporary name, then rename): an agent refuses every client while the file it was
    /// told to use is missing or unreadable.
    ///
    /// Example: flockerctl ca revoke user alice --dir ca
    Revoke {
        role: RoleArg,
        /// The node's address or the user's name, as issued.
        name: String,
        /// The CA directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

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
