//! Reading typed fields, shared by both application dialects and the deployment parser: the diagnostic
//! sink, key-set checks, ports, names, mount points, sizes and environment values.
//!
//! Every check reports into a [`Sink`] and returns `None` on failure instead of stopping, so
//! one run reports every problem in the file.

use std::collections::BTreeMap;
use std::path::Path;

pub use flocker_wire::checks::{
    alias_problem, application_name_problem, env_name_problem, mountpoint_problem,
};

use flocker_wire::Protocol;

use super::Diagnostic;
use super::size::{SizeError, parse_size};
use super::yaml::{Entry, Kind, Mark, Node, Resolved};

/// Collects the diagnostics of one file.
#[derive(Debug)]
pub struct Sink<'f> {
    pub file: &'f Path,
    pub diagnostics: Vec<Diagnostic>,
    /// Values already reported (a failed interpolation): what later checks would say about
    /// the text left in them is noise.
    silenced: Vec<Mark>,
}

impl<'f> Sink<'f> {
    pub fn new(file: &'f Path) -> Self {
        Sink {
            file,
            diagnostics: Vec::new(),
            silenced: Vec::new(),
        }
    }

    /// Reports a problem at `mark` and drops any later report at the same place.
    pub fn error_once(&mut self, mark: Mark, path: impl Into<String>, message: impl Into<String>) {
        self.error(mark, path, message);
        self.silenced.push(mark);
    }

    pub fn error(&mut self, mark: Mark, path: impl Into<String>, message: impl Into<String>) {
        if self.silenced.contains(&mark) {
            return;
        }
        self.diagnostics.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: mark.line.max(1),
            column: mark.column.max(1),
            path: path.into(),
            message: message.into(),
        });
    }

    /// Diagnostics in file order; a stable sort keeps same-spot problems in check order.
    pub fn finish(mut self) -> Vec<Diagnostic> {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        self.diagnostics
    }
}

/// Joins a model path: `join("redis", "ports[0]")` is `redis/ports[0]`.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}/{child}")
    }
}

/// The mapping entries of `node`, or an error saying what was found instead.
pub fn expect_map<'n>(
    sink: &mut Sink<'_>,
    node: &'n Node,
    path: &str,
    what: &str,
) -> Option<&'n [Entry]> {
    match &node.kind {
        Kind::Map(entries) => Some(entries),
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected {what}, found {}", node.describe()),
            );
            None
        }
    }
}

/// The items of a list; `null` (an empty `key:`) counts as an empty list.
pub fn expect_list<'n>(
    sink: &mut Sink<'_>,
    node: &'n Node,
    path: &str,
    what: &str,
) -> Option<&'n [Node]> {
    match &node.kind {
        Kind::Seq(items) => Some(items),
        _ if node.is_null() => Some(&[]),
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected {what}, found {}", node.describe()),
            );
            None
        }
    }
}

/// Reports every key of `entries` not in `allowed`, naming the likely one or listing all.
pub fn check_keys(sink: &mut Sink<'_>, entries: &[Entry], allowed: &[&str], path: &str) {
    for entry in entries {
        if !allowed.contains(&entry.key.as_str()) {
            sink.error(
                entry.key_mark,
                join(path, &entry.key),
                unknown_key(&entry.key, allowed),
            );
        }
    }
}

/// "unknown key; did you mean `ports`?" when one allowed key is a typo away, else the list.
pub fn unknown_key(key: &str, allowed: &[&str]) -> String {
    let close = allowed
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2.min(key.len() / 2))
        .min();
    match close {
        Some((_, candidate)) => format!("unknown key; did you mean `{candidate}`?"),
        None => format!("unknown key; allowed keys are: {}", allowed.join(", ")),
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

pub fn find<'n>(entries: &'n [Entry], key: &str) -> Option<&'n Entry> {
    entries.iter().find(|e| e.key == key)
}

/// A required key: reports it missing at `mark` (the mapping's own position).
pub fn require<'n>(
    sink: &mut Sink<'_>,
    entries: &'n [Entry],
    key: &str,
    mark: Mark,
    path: &str,
) -> Option<&'n Entry> {
    let found = find(entries, key);
    if found.is_none() {
        sink.error(mark, path, format!("missing key `{key}`"));
    }
    found
}

/// A TCP port: an integer in 1..65535. Strings are refused even when they hold digits, so the
/// file says what it means.
pub fn port(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u16> {
    match node.as_scalar().map(|s| s.resolve()) {
        Some(Resolved::Int(i)) => match u16::try_from(i) {
            Ok(p) if p >= 1 => Some(p),
            _ => {
                let text = node.as_scalar().map_or(String::new(), |s| s.text.clone());
                sink.error(node.mark, path, format!("port {text} is outside 1..65535"));
                None
            }
        },
        _ => {
            sink.error(
                node.mark,
                path,
                format!("expected an integer port, found {}", node.describe()),
            );
            None
        }
    }
}

/// Checks a port number already extracted from a string (compose `"8080:80"`).
pub fn port_in_range(value: &str) -> Result<u16, String> {
    if value.is_empty() || !value.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{value:?} is not a port number"));
    }
    match value.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).map_err(|e| e.to_string()),
        _ => Err(format!("port {value} is outside 1..65535")),
    }
}

/// A byte size: a positive integer (bytes) or a size string such as `"1.5G"`.
pub fn size(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u64> {
    let result = match node.as_scalar().map(|s| s.resolve()) {
        Some(Resolved::Int(i)) if i < 0 => Err(SizeError::Negative(i.to_string())),
        Some(Resolved::Int(0)) => Err(SizeError::Zero("0".to_owned())),
        Some(Resolved::Int(i)) => u64::try_from(i).map_err(|_| SizeError::TooLarge(i.to_string())),
        Some(Resolved::Str(s)) => parse_size(s),
        _ => {
            sink.error(
                node.mark,
                path,
                format!(
                    "expected a size in bytes or a string such as \"500M\" or \"1.5G\", found {}",
                    node.describe()
                ),
            );
            return None;
        }
    };
    result
        .map_err(|e| sink.error(node.mark, path, e.to_string()))
        .ok()
}

/// A positive integer (`cpu_shares`, retry counts).
pub fn positive_int(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u64> {
    match node.as_int() {
        Some(i) if i >= 1 => u64::try_from(i).ok().or_else(|| {
            sink.error(node.mark, path, format!("{i} is too large"));
            None
        }),
        Some(i) => {
            sink.error(
                node.mark,
                path,
                format!("expected a positive integer, found {i}"),
            );
            None
        }
        None => {
            sink.error(
                node.mark,
                path,
                format!("expected a positive integer, found {}", node.describe()),
            );
            None
        }
    }
}

/// A string value; reports anything else.
pub fn string<'n>(sink: &mut Sink<'_>, node: &'n Node, path: &str, what: &str) -> Option<&'n str> {
    let found = node.as_str();
    if found.is_none() {
        sink.error(
            node.mark,
            path,
            format!("expected {what}, found {}", node.describe()),
        );
    }
    found
}

/// An environment value. Numbers are accepted and kept exactly as written (`PORT: 6379` is
/// `"6379"`), since that is unambiguous; booleans and null are refused because YAML readers
/// disagree on their spelling (`True`, `yes`) and compose reads null from the caller's shell,
/// which would differ from node to node.
pub fn env_value(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<String> {
    match node.as_scalar().map(|s| (s, s.resolve())) {
        Some((_, Resolved::Str(s))) => Some(s.to_owned()),
        Some((s, Resolved::Int(_) | Resolved::Float)) => Some(s.text.clone()),
        Some((s, Resolved::Bool(_))) => {
            sink.error(
                node.mark,
                path,
                format!(
                    "expected a string, found {}; quote it (\"{}\") to pass it as text",
                    node.describe(),
                    s.text
                ),
            );
            None
        }
        Some((_, Resolved::Null)) => {
            sink.error(
                node.mark,
                path,
                "the variable has no value; values are never taken from the shell running \
                 flockerctl, give one (\"\" for empty)",
            );
            None
        }
        None => {
            sink.error(
                node.mark,
                path,
                format!("expected a string, found {}", node.describe()),
            );
            None
        }
    }
}

/// A port's `protocol:` value: `tcp` or `udp`.
pub fn protocol(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Protocol> {
    let parsed = node.as_str().and_then(Protocol::parse);
    if parsed.is_none() {
        sink.error(
            node.mark,
            path,
            format!("expected `tcp` or `udp`, found {}", node.describe()),
        );
    }
    parsed
}

/// A port as messages name it: `8080` for TCP (as before UDP existed), `53/udp` otherwise.
pub fn port_label(protocol: Protocol, port: u16) -> String {
    match protocol {
        Protocol::Tcp => port.to_string(),
        Protocol::Udp => format!("{port}/udp"),
    }
}

/// One external port claimed by an application, with where it was written.
#[derive(Debug, Clone)]
pub struct PortClaim {
    pub external: u16,
    pub protocol: Protocol,
    pub application: String,
    pub mark: Mark,
    pub path: String,
}

/// External ports are routed on every node, so each one may be claimed only once per protocol
/// in the cluster. Reports every claim after the first.
pub fn check_external_ports(sink: &mut Sink<'_>, claims: &[PortClaim]) {
    let mut first: BTreeMap<(Protocol, u16), &PortClaim> = BTreeMap::new();
    for claim in claims {
        if claim.external == flocker_wire::checks::DEFAULT_AGENT_PORT {
            sink.error(
                claim.mark,
                claim.path.clone(),
                format!(
                    "external port {} is the port of the node agents' API; routing it to an \
                     application would cut every node off from flockerctl and its peers",
                    claim.external
                ),
            );
        }
        match first.get(&(claim.protocol, claim.external)) {
            Some(earlier) => sink.error(
                claim.mark,
                claim.path.clone(),
                format!(
                    "external port {} is already claimed by `{}` (line {}); each external port \
                     is routed cluster-wide to one application",
                    port_label(claim.protocol, claim.external),
                    earlier.application,
                    earlier.mark.line
                ),
            ),
            None => {
                first.insert((claim.protocol, claim.external), claim);
            }
        }
    }
}

/// A duration written with a unit: `500ms`, `5s`, `2m`, `1h`; returns milliseconds.
pub fn duration_ms(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u64> {
    let Some(text) = node.as_str() else {
        sink.error(
            node.mark,
            path,
            format!(
                "expected a duration such as `5s` or `2m`, found {}",
                node.describe()
            ),
        );
        return None;
    };
    parse_duration_ms(text)
        .map_err(|e| sink.error(node.mark, path, e))
        .ok()
}

/// A duration as compose (and Go) writes them: one or more `NUMBER UNIT` with units `us`,
/// `ms`, `s`, `m`, `h` and decimal numbers allowed; rounded up to milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("an empty duration".to_owned());
    }
    let mut total_us: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as \"10s\" or \"1m30s\""))?;
        let factor = match unit {
            "us" | "µs" => 1.0,
            "ms" => 1_000.0,
            "s" => 1_000_000.0,
            "m" => 60_000_000.0,
            "h" => 3_600_000_000.0,
            "" => {
                return Err(format!(
                    "{text:?} has no unit: write for example \"{text}s\""
                ));
            }
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}: use us, ms, s, m or h"
                ));
            }
        };
        total_us += value * factor;
        rest = after;
    }
    let ms = (total_us / 1_000.0).ceil();
    if !(0.0..=1e15).contains(&ms) {
        return Err(format!("the duration {text:?} is too long"));
    }
    // In range and integral, so the conversion is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(ms as u64)
}
