//! Compose variable interpolation and `.env` files.
//!
//! Values (never keys) of a compose file may name variables: `$VAR`, `${VAR}`,
//! `${VAR:-default}` (default when unset or empty), `${VAR-default}` (when unset),
//! `${VAR:?message}` / `${VAR?message}` (an error), `${VAR:+other}` / `${VAR+other}` (other when
//! set), and `$$` for a literal `$`. Defaults may themselves use variables. The variables are
//! `flockerctl`'s environment, then a `.env` file beside the compose file for those the
//! environment does not set (compose's precedence). They are resolved once, by `flockerctl`,
//! so every node gets the same values.
//!
//! One deliberate difference from compose: a variable that is unset and has no default is an
//! error at its use, not an empty string with a warning, since a deploy tool that silently
//! blanks a value on every node of a cluster is worse than one that stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Diagnostic;
use super::fields::{Sink, join};
use super::yaml::{Kind, Node};

/// The variables a compose file is interpolated with, and where its relative paths start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComposeEnv {
    pub vars: BTreeMap<String, String>,
    /// The compose file's directory: `env_file` paths are relative to it.
    pub base_dir: PathBuf,
}

impl ComposeEnv {
    /// The process environment plus the `.env` file beside `file`, if there is one. Problems
    /// in `.env` are reported against it.
    pub fn for_file(file: &Path) -> (Self, Vec<Diagnostic>) {
        let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut vars: BTreeMap<String, String> = std::env::vars().collect();
        let dotenv = base_dir.join(".env");
        let mut diagnostics = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&dotenv) {
            let mut sink = Sink::new(&dotenv);
            for (key, value) in parse_env_file(&mut sink, &text, &vars) {
                vars.entry(key).or_insert(value);
            }
            diagnostics = sink.finish();
        }
        (ComposeEnv { vars, base_dir }, diagnostics)
    }
}

/// Interpolates a whole compose file; problems are reported with the model paths the
/// validators use (`cache/image`, not `services/cache/image`).
pub fn interpolate_file(
    sink: &mut Sink<'_>,
    root: &mut Node,
    vars: &BTreeMap<String, String>,
    fig: bool,
) {
    let Kind::Map(entries) = &mut root.kind else {
        return;
    };
    for entry in entries.iter_mut().filter(|e| !e.key.starts_with("x-")) {
        if entry.key == "services" && !fig {
            if let Kind::Map(services) = &mut entry.value.kind {
                for service in services.iter_mut() {
                    interpolate_tree(sink, &mut service.value, vars, &service.key);
                }
            }
        } else {
            interpolate_tree(sink, &mut entry.value, vars, &entry.key);
        }
    }
}

/// Replaces the variables of every scalar value in `node`, reporting each failure at its
/// scalar. Mapping keys are left alone, as are `x-*` extension entries (inert by definition).
fn interpolate_tree(
    sink: &mut Sink<'_>,
    node: &mut Node,
    vars: &BTreeMap<String, String>,
    path: &str,
) {
    let mark = node.mark;
    match &mut node.kind {
        Kind::Scalar(scalar) => {
            if scalar.text.contains('$') {
                match interpolate(&scalar.text, vars) {
                    Ok(text) => scalar.text = text,
                    Err(e) => sink.error_once(mark, path, e),
                }
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(sink, item, vars, &format!("{path}[{i}]"));
            }
        }
        Kind::Map(entries) => {
            for entry in entries.iter_mut().filter(|e| !e.key.starts_with("x-")) {
                let entry_path = join(path, &entry.key);
                interpolate_tree(sink, &mut entry.value, vars, &entry_path);
            }
        }
    }
}

/// Interpolates one value; `Err` says what is wrong, naming the variable.
pub fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let close = matching_brace(inner).ok_or_else(|| {
                format!("`${{` in {text:?} is not closed; write `$$` for a literal `$`")
            })?;
            out.push_str(&expand_braced(&inner[..close], vars)?);
            rest = &inner[close + 1..];
        } else {
            let len = name_length(after);
            if len == 0 {
                return Err(format!(
                    "invalid interpolation in {text:?}: `$` must start a variable (`$VAR` or `${{VAR}}`); write `$$` for a literal `$`"
                ));
            }
            out.push_str(&lookup(&after[..len], vars)?);
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The index of the `}` closing a `${`, skipping nested `${...}` in defaults.
fn matching_brace(inner: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = inner.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn name_length(text: &str) -> usize {
    let mut len = 0;
    for (i, c) in text.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        len = i + c.len_utf8();
    }
    len
}

fn lookup(name: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    vars.get(name).cloned().ok_or_else(|| {
        format!(
            "the variable {name} is not set: set it in flockerctl's environment or in .env \
             beside the compose file, or give a default such as `${{{name}:-value}}`"
        )
    })
}

/// `NAME`, `NAME:-x`, `NAME-x`, `NAME:?x`, `NAME?x`, `NAME:+x`, `NAME+x`.
fn expand_braced(inner: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let len = name_length(inner);
    if len == 0 {
        return Err(format!(
            "`${{{inner}}}` does not start with a variable name"
        ));
    }
    let (name, modifier) = inner.split_at(len);
    if modifier.is_empty() {
        return lookup(name, vars);
    }
    let value = vars.get(name);
    let (colon, op, word) = match modifier.strip_prefix(':') {
        Some(m) => (true, m.chars().next(), m.get(1..).unwrap_or("")),
        None => (
            false,
            modifier.chars().next(),
            modifier.get(1..).unwrap_or(""),
        ),
    };
    // With a colon an empty value counts as unset.
    let set = value.is_some_and(|v| !colon || !v.is_empty());
    match op {
        Some('-') if set => Ok(value.cloned().unwrap_or_default()),
        Some('-') => interpolate(word, vars),
        Some('+') if set => interpolate(word, vars),
        Some('+') => Ok(String::new()),
        Some('?') if set => Ok(value.cloned().unwrap_or_default()),
        Some('?') => {
            let message = interpolate(word, vars)?;
            Err(if message.is_empty() {
                format!("the variable {name} is required")
            } else {
                format!("the variable {name} is required: {message}")
            })
        }
        _ => Err(format!(
            "`${{{inner}}}`: unknown modifier {modifier:?}; use :-, -, :?, ?, :+ or +"
        )),
    }
}

/// Reads a `.env` / `env_file` file: `KEY=VALUE` lines, `#` comments, blank lines, an
/// optional `export ` prefix, values in single quotes (kept as written), double quotes
/// (`\n`, `\t`, `\"`, `\\` escapes; variables interpolated) or bare (trimmed, ` #` starts a
/// comment; variables interpolated). A bare `KEY` takes the value from `vars` or is left out.
/// Later lines see earlier ones. Problems are reported at their line.
pub fn parse_env_file(
    sink: &mut Sink<'_>,
    text: &str,
    vars: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut scope = vars.clone();
    let mut out: Vec<(String, String)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let mark = super::yaml::Mark {
            line: index + 1,
            column: 1,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim_start())),
            None => (line, None),
        };
        if let Some(problem) = flocker_wire::checks::env_name_problem(key) {
            sink.error(mark, key, problem);
            continue;
        }
        let value = match value {
            None => match scope.get(key) {
                Some(v) => v.clone(),
                None => continue,
            },
            Some(v) => match env_file_value(v, &scope) {
                Ok(v) => v,
                Err(e) => {
                    sink.error(mark, key, e);
                    continue;
                }
            },
        };
        scope.insert(key.to_owned(), value.clone());
        out.retain(|(k, _)| k != key);
        out.push((key.to_owned(), value));
    }
    out
}

fn env_file_value(value: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    if let Some(body) = value.strip_prefix('\'') {
        let end = body
            .find('\'')
            .ok_or_else(|| "a single quote is not closed".to_owned())?;
        return Ok(body[..end].to_owned());
    }
    if let Some(body) = value.strip_prefix('"') {
        let mut unescaped = String::new();
        let mut chars = body.chars();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => unescaped.push('\n'),
                    Some('t') => unescaped.push('\t'),
                    Some('r') => unescaped.push('\r'),
                    Some('$') => unescaped.push_str("$$"),
                    Some(c @ ('"' | '\\')) => unescaped.push(c),
                    Some(c) => {
                        unescaped.push('\\');
                        unescaped.push(c);
                    }
                    None => return Err("a double quote is not closed".to_owned()),
                },
                Some(c) => unescaped.push(c),
                None => return Err("a double quote is not closed".to_owned()),
            }
        }
        return interpolate(&unescaped, vars);
    }
    let bare = match value.find(" #") {
        Some(at) => &value[..at],
        None => value,
    };
    interpolate(bare.trim_end(), vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("TAG".to_owned(), "7.2".to_owned()),
            ("EMPTY".to_owned(), String::new()),
            ("PORT".to_owned(), "6379".to_owned()),
        ])
    }

    #[test]
    fn the_compose_specification_forms() {
        let v = vars();
        let cases = [
            ("redis:${TAG}", "redis:7.2"),
            ("redis:$TAG", "redis:7.2"),
            ("$PORT:$PORT", "6379:6379"),
            ("${UNSET:-default}", "default"),
            ("${EMPTY:-default}", "default"),
            ("${EMPTY-default}", ""),
            ("${UNSET-default}", "default"),
            ("${TAG:+set}", "set"),
            ("${EMPTY:+set}", ""),
            ("${EMPTY+set}", "set"),
            ("${UNSET+set}", ""),
            ("${UNSET:-${TAG}}", "7.2"),
            ("${UNSET:-${ALSO_UNSET:-deep}}", "deep"),
            ("cost: $$5", "cost: $5"),
            ("$${TAG}", "${TAG}"),
            ("${TAG}-${PORT}", "7.2-6379"),
            ("no variables", "no variables"),
        ];
        for (input, expected) in cases {
            assert_eq!(interpolate(input, &v).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn errors_name_the_variable_and_the_fix() {
        let v = vars();
        let err = |s: &str| interpolate(s, &v).expect_err(s);
        assert!(err("${UNSET}").contains("the variable UNSET is not set"));
        assert!(err("$UNSET").contains("${UNSET:-value}"));
        assert_eq!(
            err("${EMPTY:?must be set}"),
            "the variable EMPTY is required: must be set"
        );
        assert_eq!(err("${UNSET?}"), "the variable UNSET is required");
        assert!(interpolate("${EMPTY?x}", &v).is_ok());
        assert!(err("${TAG").contains("is not closed"));
        assert!(err("price $5").contains("write `$$`"));
        assert!(err("${1X}").contains("does not start with a variable name"));
        assert!(err("${TAG/x/y}").contains("unknown modifier"));
    }

    #[test]
    fn env_files_follow_compose_rules() {
        let file = Path::new(".env");
        let mut sink = Sink::new(file);
        let text = "# comment\n\nexport TAG=7.4\nQUOTED=\"a b\\n\"\nLITERAL='$NOT ${X}'\nBARE=value # note\nREF=${TAG}-x\nFROM_ENV\nMISSING\nBROKEN=\"open\nTAG=8\n";
        let parsed = parse_env_file(
            &mut sink,
            text,
            &BTreeMap::from([("FROM_ENV".to_owned(), "e".to_owned())]),
        );
        let map: BTreeMap<_, _> = parsed.into_iter().collect();
        assert_eq!(map["TAG"], "8");
        assert_eq!(map["QUOTED"], "a b\n");
        assert_eq!(map["LITERAL"], "$NOT ${X}");
        assert_eq!(map["BARE"], "value");
        assert_eq!(map["REF"], "7.4-x");
        assert_eq!(map["FROM_ENV"], "e");
        assert!(!map.contains_key("MISSING"));
        let diagnostics = sink.finish();
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(diagnostics[0].line, 10);
    }
}
