//! What every subcommand shares: how it ends ([`Outcome`], the exit code in one place), how
//! it prints ([`Output`], text for people or one JSON document for scripts), and loading
//! the two config files with their problems reported in that form.

use std::io::Write;
use std::path::Path;

use clap::ValueEnum;
use flocker_wire::DesiredState;
use serde_json::json;

use crate::config::{self, ConfigError, Diagnostic};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// How a command ended; `main` turns it into the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The configuration is invalid or an operation failed: exit 1.
    Failure,
    /// The command was used wrongly (missing file, unreadable state): exit 2.
    Usage,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Usage => 2,
        }
    }
}

/// Loads both files, printing problems in the requested form.
pub(crate) fn load(
    deployment: &Path,
    application: &Path,
    output: Output,
) -> Result<DesiredState, Outcome> {
    match config::load_files(deployment, application) {
        Ok(desired) => Ok(desired),
        Err(ConfigError::Usage(message)) => {
            match output {
                Output::Json => print_json(&json!({ "valid": false, "usage_error": message })),
                Output::Text => eprintln!("flockerctl: {message}"),
            }
            Err(Outcome::Usage)
        }
        Err(ConfigError::Invalid(diagnostics)) => {
            report_invalid(&diagnostics, output);
            Err(Outcome::Failure)
        }
    }
}

fn report_invalid(diagnostics: &[Diagnostic], output: Output) {
    match output {
        Output::Json => {
            let errors: Vec<_> = diagnostics
                .iter()
                .map(|d| {
                    json!({
                        "file": d.file.display().to_string(),
                        "line": d.line,
                        "column": d.column,
                        "path": d.path,
                        "message": d.message,
                    })
                })
                .collect();
            print_json(&json!({ "valid": false, "errors": errors }));
        }
        Output::Text => {
            for d in diagnostics {
                eprintln!("{d}");
            }
            eprintln!(
                "flockerctl: {} problem(s) found; nothing was changed",
                diagnostics.len()
            );
        }
    }
}

/// A failed operation, as text on stderr or `{"ok": false, "error": ...}` on stdout.
pub(crate) fn fail(error: &dyn std::fmt::Display, output: Output) -> Outcome {
    match output {
        Output::Json => print_json(&json!({ "ok": false, "error": error.to_string() })),
        Output::Text => eprintln!("flockerctl: {error}"),
    }
    Outcome::Failure
}

pub(crate) fn print_json(value: &serde_json::Value) {
    // Stdout is line-buffered: unbuffered, a plan of many megabytes is a write per line.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    // A closed stdout (e.g. piped into `head`) is not worth a panic.
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
    let _ = out.flush();
}
