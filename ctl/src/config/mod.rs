//! Parsing and validation of the application config (native and docker-compose forms) and
//! the deployment config into one `DesiredState`.
//!
//! The pipeline: bytes -> located YAML tree ([`yaml`]) -> per-dialect validators
//! (`application`, `compose`, `deployment`) that report every problem with its location ->
//! cross-file checks ([`validate`]) -> [`DesiredState`]. Nothing stops at the first problem.
//!
//! Entry points:
//! - [`load_files`] (`ConfigError::Usage` for a missing/unreadable file: exit 2;
//!   `ConfigError::Invalid` with every [`Diagnostic`]: exit 1).
//! - [`parse_application`], [`parse_deployment`] and [`load_texts`] work on strings, for tests
//!   and the fuzzer.
//!
//! Decisions a reader may want to know:
//! - Environment values that are numbers are kept as written (`PORT: 6379` is `"6379"`);
//!   booleans and null are refused with a hint to quote them.
//! - Application names use `[a-z0-9][a-z0-9_.-]*`, at most 63 characters, because they name
//!   both the container and the volume's dataset.
//! - The `DesiredState` holds only the applications the deployment places; defined but
//!   unplaced applications are validated and then left out (they run nowhere).

mod application;
mod compose;
mod compose_volumes;
mod cross_checks;
pub mod deployment;
mod fields;
mod files;
mod health;
pub use flocker_wire::image;
pub mod interpolate;
mod settings;
pub mod size;
pub mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use flocker_wire::{Application, DesiredState, Standby};

pub use cross_checks::{NodeResolver, SystemResolver, validate};
pub use deployment::{Deployment, Placement};

use fields::Sink;
pub use interpolate::ComposeEnv;
use yaml::{Mark, Node};

/// One problem found in a config file, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Where in the model, e.g. `redis/ports[0]/external`; empty for file-level problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The files could not be used at all (missing, unreadable): a usage error.
    #[error("{0}")]
    Usage(String),
    /// The files were read but are not a valid configuration.
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<Diagnostic>),
}

/// Which form an application config was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// `version: 1` + `applications:`.
    #[default]
    Native,
    /// docker-compose with `services:`.
    Compose,
    /// docker-compose in the old fig style (services at the top level).
    Fig,
}

/// A parsed application config with what the cross-file checks need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplicationConfig {
    /// The applications that are valid.
    pub applications: BTreeMap<String, Application>,
    /// Every application the file defines, valid or not, and where its name is written: a
    /// deployment naming a broken application is not also told it is undefined.
    pub defined: BTreeMap<String, Mark>,
    pub dialect: Dialect,
    /// The file is not an application config at all (a deployment given in its place).
    pub misplaced: bool,
    /// The content of each application's secrets and configs, read by flockerctl.
    pub files: BTreeMap<String, BTreeMap<String, flocker_wire::FileContent>>,
}

/// What a file looks like from its top-level keys, used to pick the dialect and to notice
/// files passed in the wrong order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Native,
    Compose,
    Fig,
    Deployment,
}

fn shape(root: &Node) -> (Shape, Mark) {
    let Some(_) = root.as_map() else {
        return (Shape::Native, root.mark);
    };
    for (key, shape) in [
        ("applications", Shape::Native),
        ("services", Shape::Compose),
        ("nodes", Shape::Deployment),
    ] {
        // A fig-style service may be named like a section; a mapping with an `image` is one.
        if let Some(e) = root.get(key).filter(|e| e.value.get("image").is_none()) {
            return (shape, e.key_mark);
        }
    }
    if let Some(version) = root
        .get("version")
        .filter(|e| e.value.get("image").is_none())
    {
        // `version: 1` is Flocker's; compose versions are "2"/"3" strings.
        let shape = if version.value.as_int() == Some(1) {
            Shape::Native
        } else {
            Shape::Compose
        };
        return (shape, version.key_mark);
    }
    (Shape::Fig, root.mark)
}

const ORDER_HINT: &str =
    "the deployment config comes first: `flockerctl validate DEPLOYMENT APPLICATION`";

/// Turns bytes into text, pointing at the first byte that is not UTF-8.
pub fn decode<'a>(bytes: &'a [u8], file: &Path) -> Result<&'a str, Diagnostic> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
        let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let column = 1 + String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count();
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            path: String::new(),
            message: "the file is not UTF-8 text".to_owned(),
        }
    })
}

/// Loads the YAML tree, reporting syntax problems; `None` when there is nothing to validate.
fn load_tree(sink: &mut Sink<'_>, text: &str, expected: &str) -> Option<Node> {
    let loaded = yaml::load(text);
    for problem in &loaded.problems {
        sink.error(problem.mark, "", problem.message.clone());
    }
    if loaded.root.is_none() && loaded.problems.is_empty() {
        sink.error(
            Mark { line: 1, column: 1 },
            "",
            format!("the file is empty; expected {expected}"),
        );
    }
    let root = loaded.root?;
    if root.is_null() {
        sink.error(
            root.mark,
            "",
            format!("the file holds no settings; expected {expected}"),
        );
        return None;
    }
    Some(root)
}

/// Parses an application config in any dialect, returning what is valid and every problem.
pub fn parse_application_config(text: &str, file: &Path) -> (ApplicationConfig, Vec<Diagnostic>) {
    let (env, mut env_diagnostics) = ComposeEnv::for_file(file);
    let (config, diagnostics) = parse_application_config_in(text, file, &env);
    env_diagnostics.extend(diagnostics);
    (config, env_diagnostics)
}

/// [`parse_application_config`] with the variables and base directory a compose file is
/// read with given, instead of taken from the process and the file's directory.
pub fn parse_application_config_in(
    text: &str,
    file: &Path,
    env: &ComposeEnv,
) -> (ApplicationConfig, Vec<Diagnostic>) {
    let mut sink = Sink::new(file);
    let expected = "`version: 1` and `applications:`, or a docker-compose file";
    let Some(root) = load_tree(&mut sink, text, expected) else {
        return (ApplicationConfig::default(), sink.finish());
    };
    let config = match shape(&root) {
        (Shape::Native, _) => ApplicationConfig {
            dialect: Dialect::Native,
            ..application::parse_native(&mut sink, &root)
        },
        (Shape::Compose, _) => {
            let mut root = root;
            interpolate::interpolate_file(&mut sink, &mut root, &env.vars, false);
            ApplicationConfig {
                dialect: Dialect::Compose,
                ..compose::parse_modern(&mut sink, &root, env)
            }
        }
        (Shape::Fig, _) => {
            let mut root = root;
            interpolate::interpolate_file(&mut sink, &mut root, &env.vars, true);
            ApplicationConfig {
                dialect: Dialect::Fig,
                ..compose::parse_fig(&mut sink, &root, env)
            }
        }
        (Shape::Deployment, mark) => {
            sink.error(
                mark,
                "",
                format!(
                    "this is a deployment config (it has `nodes:`), given where the application config is \
                     expected; were the files passed in the wrong order? {ORDER_HINT}"
                ),
            );
            ApplicationConfig {
                misplaced: true,
                ..ApplicationConfig::default()
            }
        }
    };
    (config, sink.finish())
}

/// Parses an application config in any dialect into its applications.
pub fn parse_application(
    text: &str,
    file: &Path,
) -> Result<BTreeMap<String, Application>, Vec<Diagnostic>> {
    match parse_application_config(text, file) {
        (config, diagnostics) if diagnostics.is_empty() => Ok(config.applications),
        (_, diagnostics) => Err(diagnostics),
    }
}

/// Parses a deployment config, returning what is valid and every problem.
pub fn parse_deployment_config(text: &str, file: &Path) -> (Deployment, Vec<Diagnostic>) {
    let mut sink = Sink::new(file);
    let Some(root) = load_tree(&mut sink, text, "`version: 1` and `nodes:`") else {
        return (Deployment::default(), sink.finish());
    };
    let looks_like_fig = root.as_map().is_some_and(|entries| {
        !entries.is_empty()
            && entries.iter().all(|e| {
                e.value
                    .as_map()
                    .is_some_and(|m| m.iter().any(|f| f.key == "image"))
            })
    });
    let deployment = match shape(&root) {
        (Shape::Native | Shape::Compose, mark)
            if root.get("applications").is_some() || root.get("services").is_some() =>
        {
            let key = if root.get("applications").is_some() {
                "applications"
            } else {
                "services"
            };
            sink.error(
                mark,
                "",
                format!(
                    "this is an application config (it has `{key}:`), given where the deployment config is \
                     expected; were the files passed in the wrong order? {ORDER_HINT}"
                ),
            );
            Deployment {
                misplaced: true,
                ..Deployment::default()
            }
        }
        (Shape::Fig, mark) if looks_like_fig => {
            sink.error(
                mark,
                "",
                format!(
                    "this is an application config in docker-compose form, given where the deployment config \
                     is expected; were the files passed in the wrong order? {ORDER_HINT}"
                ),
            );
            Deployment {
                misplaced: true,
                ..Deployment::default()
            }
        }
        _ => deployment::parse_deployment_tree(&mut sink, &root),
    };
    (deployment, sink.finish())
}

/// Parses a deployment config.
pub fn parse_deployment(text: &str, file: &Path) -> Result<Deployment, Vec<Diagnostic>> {
    match parse_deployment_config(text, file) {
        (deployment, diagnostics) if diagnostics.is_empty() => Ok(deployment),
        (_, diagnostics) => Err(diagnostics),
    }
}

/// Parses and cross-checks both texts into the desired state, reporting every problem of
/// both files (the deployment's first).
pub fn load_texts(
    deployment_text: &str,
    deployment_file: &Path,
    application_text: &str,
    application_file: &Path,
    resolver: &dyn NodeResolver,
) -> Result<DesiredState, ConfigError> {
    let (deployment, mut diagnostics) = parse_deployment_config(deployment_text, deployment_file);
    let (applications, app_diagnostics) =
        parse_application_config(application_text, application_file);
    let swapped = deployment.misplaced || applications.misplaced;
    // An application file that could not be read as a whole defines nothing; saying every
    // placement is undefined would bury the real problem.
    let unreadable = applications.defined.is_empty() && !app_diagnostics.is_empty();
    diagnostics.extend(app_diagnostics);
    // With a misplaced file every cross-check would be noise.
    if !swapped {
        let mut sink = Sink::new(deployment_file);
        if !unreadable {
            cross_checks::check_placements(&mut sink, &applications, application_file, &deployment);
            cross_checks::check_standby(&mut sink, &applications, &deployment);
            cross_checks::check_dependencies_placed(&mut sink, &applications, &deployment);
        }
        cross_checks::check_addresses(&mut sink, &deployment, resolver);
        diagnostics.extend(sink.finish());
    }
    diagnostics.sort_by_key(|d| (d.file != deployment_file, d.line, d.column));
    tracing::debug!(
        dialect = ?applications.dialect,
        applications = applications.defined.len(),
        nodes = deployment.nodes.len(),
        problems = diagnostics.len(),
        "configuration checked"
    );
    if !diagnostics.is_empty() {
        return Err(ConfigError::Invalid(diagnostics));
    }
    let applications_files = applications.files;
    // A set, not a scan of the placements per application: that costs applications squared.
    let placed: std::collections::HashSet<&str> = deployment
        .placements
        .iter()
        .map(|p| p.application.as_str())
        .collect();
    let applications = applications
        .applications
        .into_iter()
        .filter(|(name, _)| placed.contains(name.as_str()))
        .collect();
    let standby = deployment
        .standby
        .into_iter()
        .map(|s| {
            (
                s.application,
                Standby {
                    nodes: s.nodes,
                    interval_ms: s.interval_ms,
                },
            )
        })
        .collect();
    let files = applications_files
        .into_iter()
        .filter(|(name, _)| placed.contains(name.as_str()))
        .collect();
    Ok(DesiredState {
        applications,
        nodes: deployment.nodes,
        standby,
        files,
    })
}

fn read(path: &Path, role: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        ConfigError::Usage(format!(
            "cannot read the {role} config {}: {e}",
            path.display()
        ))
    })
}

/// Reads, parses and cross-checks both files, resolving node addresses with the system
/// resolver.
pub fn load_files(deployment: &Path, application: &Path) -> Result<DesiredState, ConfigError> {
    load_files_with(deployment, application, &SystemResolver)
}

/// [`load_files`] with a chosen resolver.
pub fn load_files_with(
    deployment: &Path,
    application: &Path,
    resolver: &dyn NodeResolver,
) -> Result<DesiredState, ConfigError> {
    let deployment_bytes = read(deployment, "deployment")?;
    let application_bytes = read(application, "application")?;
    let deployment_text = decode(&deployment_bytes, deployment);
    let application_text = decode(&application_bytes, application);
    match (deployment_text, application_text) {
        (Ok(d), Ok(a)) => load_texts(d, deployment, a, application, resolver),
        (d, a) => Err(ConfigError::Invalid(
            d.err().into_iter().chain(a.err()).collect(),
        )),
    }
}

#[cfg(test)]
mod compose_keys_tests;
#[cfg(test)]
mod tests;
