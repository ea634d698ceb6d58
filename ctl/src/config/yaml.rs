//! A small located YAML tree built from `saphyr-parser` events: every node, and every mapping
//! key, keeps the line and column where it starts, so the validators can point at the exact
//! spot of each problem.
//!
//! Scalars keep their source text and whether they were quoted; they are typed lazily with
//! the YAML 1.2 core schema (so `no` and `on` are strings, `80:80` is a string, `0x10` is an
//! integer). Duplicate mapping keys, non-scalar keys and more than one document are rejected
//! here, with locations. Anchors and aliases work (with a size budget, so a "billion laughs"
//! file is an error rather than an out-of-memory), and so do `<<` merge keys, which compose
//! files use to share settings between services.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScanError, Span};

/// A position in the source: 1-based line and 1-based column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    fn from_span(span: &Span) -> Self {
        Mark {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// A YAML node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub mark: Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One `key: value` pair of a mapping. Keys are always scalars (enforced by the builder).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_mark: Mark,
    pub value: Node,
}

/// A scalar as written: its text and whether it was plain (unquoted, untagged), which decides
/// whether it can be anything but a string.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub text: String,
    pub plain: bool,
}

/// A scalar typed with the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    Null,
    Bool(bool),
    /// Saturated to the `i128` range; range checks quote the source text anyway.
    Int(i128),
    Float,
    Str(&'a str),
}

impl Scalar {
    pub fn resolve(&self) -> Resolved<'_> {
        if !self.plain {
            return Resolved::Str(&self.text);
        }
        let t = self.text.as_str();
        match t {
            "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
            "true" | "True" | "TRUE" => return Resolved::Bool(true),
            "false" | "False" | "FALSE" => return Resolved::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf"
            | "-.INF" | ".nan" | ".NaN" | ".NAN" => return Resolved::Float,
            _ => {}
        }
        if let Some(v) = parse_core_int(t) {
            return Resolved::Int(v);
        }
        if is_core_float(t) {
            return Resolved::Float;
        }
        Resolved::Str(t)
    }
}

fn parse_core_int(t: &str) -> Option<i128> {
    let (radix, digits, negative) = if let Some(h) = t.strip_prefix("0x") {
        (16, h, false)
    } else if let Some(o) = t.strip_prefix("0o") {
        (8, o, false)
    } else if let Some(d) = t.strip_prefix('-') {
        (10, d, true)
    } else {
        (10, t.strip_prefix('+').unwrap_or(t), false)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let mut value: i128 = 0;
    for c in digits.chars() {
        let d = i128::from(c.to_digit(radix).unwrap_or(0));
        value = value.saturating_mul(i128::from(radix)).saturating_add(d);
    }
    Some(if negative { -value } else { value })
}

fn is_core_float(t: &str) -> bool {
    // [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            !(int.is_empty() && frac.is_empty())
                && int.chars().all(|c| c.is_ascii_digit())
                && frac.chars().all(|c| c.is_ascii_digit())
        }
        None => !mantissa.is_empty() && mantissa.chars().all(|c| c.is_ascii_digit()),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
        }
    };
    mantissa_ok && exponent_ok
}

impl Node {
    /// A short description of what the node is, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Seq(_) => "a list".to_owned(),
            Kind::Map(_) => "a mapping".to_owned(),
            Kind::Scalar(s) => match s.resolve() {
                Resolved::Null => "nothing (null)".to_owned(),
                Resolved::Bool(b) => format!("the boolean {b}"),
                Resolved::Int(_) => format!("the integer {}", s.text),
                Resolved::Float => format!("the number {}", s.text),
                Resolved::Str(t) => format!("the string {t:?}"),
            },
        }
    }

    pub fn as_scalar(&self) -> Option<&Scalar> {
        match &self.kind {
            Kind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[Entry]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The scalar's text when it resolves to a string.
    pub fn as_str(&self) -> Option<&str> {
        match self.as_scalar()?.resolve() {
            Resolved::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The scalar's value when it resolves to an integer.
    pub fn as_int(&self) -> Option<i128> {
        match self.as_scalar()?.resolve() {
            Resolved::Int(i) => Some(i),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.as_scalar().map(Scalar::resolve), Some(Resolved::Null))
    }

    /// Looks a key up in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.as_map()?.iter().find(|e| e.key == key)
    }
}

/// A problem found while building the tree: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlProblem {
    pub mark: Mark,
    pub message: String,
}

/// The result of reading a file: the root node (absent when the file has no document or the
/// YAML is broken) and every problem found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub root: Option<Node>,
    pub problems: Vec<YamlProblem>,
}

/// Alias expansion copies nodes; this bounds the total (one unit per node plus one per byte
/// of scalar text) so hostile input cannot exhaust memory. Real configs weigh a few thousand.
const EXPANSION_BUDGET: usize = 1 << 18;
/// Deeper nesting than any config needs; bounds recursion in the validators.
const MAX_DEPTH: usize = 64;

enum Frame {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        anchor: usize,
        entries: Vec<Entry>,
        /// Key -> index into `entries`, so duplicate detection stays linear.
        seen: HashMap<String, usize>,
        merges: Vec<Node>,
        pending_key: Option<Node>,
    },
}

/// Parses one YAML document into a located tree.
pub fn load(text: &str) -> Loaded {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    let mut documents = 0usize;
    while let Some(next) = parser.next_event() {
        let (event, span) = match next {
            Ok(ev) => ev,
            Err(e) => {
                builder.problems.push(scan_problem(&e));
                return Loaded {
                    root: None,
                    problems: builder.problems,
                };
            }
        };
        let mark = Mark::from_span(&span);
        match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    builder.problems.push(YamlProblem {
                        mark,
                        message: "the file holds more than one YAML document; put everything \
                                  in one document"
                            .to_owned(),
                    });
                    return Loaded {
                        root: builder.root,
                        problems: builder.problems,
                    };
                }
            }
            Event::Alias(id) => {
                let node = match builder.anchors.get(&id) {
                    Some((node, size)) => {
                        builder.budget = builder.budget.saturating_add(*size);
                        if builder.budget > EXPANSION_BUDGET {
                            builder.problems.push(YamlProblem {
                                mark,
                                message: format!(
                                    "aliases expand the document beyond {EXPANSION_BUDGET} nodes \
                                     and bytes; the file is too large to be a configuration"
                                ),
                            });
                            return Loaded {
                                root: None,
                                problems: builder.problems,
                            };
                        }
                        Node {
                            kind: node.kind.clone(),
                            mark,
                        }
                    }
                    None => {
                        builder.problems.push(YamlProblem {
                            mark,
                            message: "alias to an unknown anchor".to_owned(),
                        });
                        return Loaded {
                            root: None,
                            problems: builder.problems,
                        };
                    }
                };
                builder.push_node(node, 0);
            }
            Event::Scalar(text, style, anchor, tag) => {
                // `!!str 80` is the explicit way to write a string that looks like a number.
                let forced_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == saphyr_parser::ScalarStyle::Plain && !forced_str;
                builder.budget += 1 + text.len();
                builder.push_node(
                    Node {
                        kind: Kind::Scalar(Scalar {
                            text: text.into_owned(),
                            plain,
                        }),
                        mark,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => {
                if !builder.open(
                    Frame::Seq {
                        mark,
                        anchor,
                        items: Vec::new(),
                    },
                    mark,
                ) {
                    return Loaded {
                        root: None,
                        problems: builder.problems,
                    };
                }
            }
            Event::MappingStart(anchor, _) => {
                if !builder.open(
                    Frame::Map {
                        mark,
                        anchor,
                        entries: Vec::new(),
                        seen: HashMap::new(),
                        merges: Vec::new(),
                        pending_key: None,
                    },
                    mark,
                ) {
                    return Loaded {
                        root: None,
                        problems: builder.problems,
                    };
                }
            }
            Event::SequenceEnd | Event::MappingEnd => builder.close(),
        }
    }
    Loaded {
        root: builder.root,
        problems: builder.problems,
    }
}

fn scan_problem(e: &ScanError) -> YamlProblem {
    YamlProblem {
        mark: Mark {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        },
        message: format!("invalid YAML: {}", e.info()),
    }
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, (Node, usize)>,
    budget: usize,
    problems: Vec<YamlProblem>,
}

impl Builder {
    fn open(&mut self, frame: Frame, mark: Mark) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            self.problems.push(YamlProblem {
                mark,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
            return false;
        }
        self.budget += 1;
        self.stack.push(frame);
        true
    }

    fn close(&mut self) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        let (node, anchor) = match frame {
            Frame::Seq {
                mark,
                anchor,
                items,
            } => (
                Node {
                    kind: Kind::Seq(items),
                    mark,
                },
                anchor,
            ),
            Frame::Map {
                mark,
                anchor,
                mut entries,
                mut seen,
                merges,
                ..
            } => {
                // Explicit keys win over merged ones, whatever their order in the file.
                for merged in merges {
                    for source in merge_sources(&merged) {
                        for entry in source {
                            if !seen.contains_key(&entry.key) {
                                seen.insert(entry.key.clone(), entries.len());
                                entries.push(entry.clone());
                            }
                        }
                    }
                }
                (
                    Node {
                        kind: Kind::Map(entries),
                        mark,
                    },
                    anchor,
                )
            }
        };
        self.push_node(node, anchor);
    }

    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            let size = node_count(&node);
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let Some(top) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match top {
            Frame::Seq { items, .. } => items.push(node),
            Frame::Map {
                entries,
                seen,
                merges,
                pending_key,
                ..
            } => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    let Kind::Scalar(k) = &key.kind else {
                        self.problems.push(YamlProblem {
                            mark: key.mark,
                            message: format!(
                                "mapping keys must be plain strings, found {}",
                                key.describe()
                            ),
                        });
                        return;
                    };
                    if k.plain && k.text == "<<" {
                        match &node.kind {
                            Kind::Map(_) => merges.push(node),
                            Kind::Seq(items)
                                if items.iter().all(|i| matches!(i.kind, Kind::Map(_))) =>
                            {
                                merges.push(node)
                            }
                            _ => self.problems.push(YamlProblem {
                                mark: node.mark,
                                message: format!(
                                    "a `<<` merge key needs a mapping or a list of mappings, \
                                     found {}",
                                    node.describe()
                                ),
                            }),
                        }
                        return;
                    }
                    if let Some(first) = seen.get(&k.text).and_then(|&i| entries.get(i)) {
                        self.problems.push(YamlProblem {
                            mark: key.mark,
                            message: format!(
                                "duplicate key {:?} (first given at line {})",
                                k.text, first.key_mark.line
                            ),
                        });
                        return;
                    }
                    seen.insert(k.text.clone(), entries.len());
                    entries.push(Entry {
                        key: k.text.clone(),
                        key_mark: key.mark,
                        value: node,
                    });
                }
            },
        }
    }
}

fn merge_sources(node: &Node) -> Vec<&[Entry]> {
    match &node.kind {
        Kind::Map(entries) => vec![entries.as_slice()],
        Kind::Seq(items) => items.iter().filter_map(Node::as_map).collect(),
        Kind::Scalar(_) => Vec::new(),
    }
}

/// The node's weight against [`EXPANSION_BUDGET`].
fn node_count(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar(s) => 1 + s.text.len(),
        Kind::Seq(items) => 1 + items.iter().map(node_count).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|e| 1 + e.key.len() + node_count(&e.value))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        let loaded = load(text);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        loaded.root.expect("a document")
    }

    #[test]
    fn keeps_locations_of_keys_and_values() {
        let n = root("a:\n  b: 1\n  c: [x, 'y']\n");
        let a = n.get("a").expect("a");
        assert_eq!(a.key_mark, Mark { line: 1, column: 1 });
        let b = a.value.get("b").expect("b");
        assert_eq!(b.key_mark, Mark { line: 2, column: 3 });
        assert_eq!(b.value.mark, Mark { line: 2, column: 6 });
        assert_eq!(b.value.as_int(), Some(1));
        let c = a.value.get("c").expect("c");
        let items = c.value.as_seq().expect("seq");
        assert_eq!(
            items[1].mark,
            Mark {
                line: 3,
                column: 10
            }
        );
        assert_eq!(items[1].as_str(), Some("y"));
    }

    #[test]
    fn core_schema_typing() {
        let n = root(
            "a: no\nb: 80:80\nc: 0x10\nd: '5'\ne: ~\nf: 1.5\ng: true\nh: -3\ni: !!str 7\nj: 1e3\n",
        );
        let get = |k: &str| n.get(k).expect(k).value.clone();
        assert_eq!(get("a").as_str(), Some("no"));
        assert_eq!(get("b").as_str(), Some("80:80"));
        assert_eq!(get("c").as_int(), Some(16));
        assert_eq!(get("d").as_str(), Some("5"));
        assert!(get("e").is_null());
        assert_eq!(get("f").describe(), "the number 1.5");
        assert_eq!(get("g").describe(), "the boolean true");
        assert_eq!(get("h").as_int(), Some(-3));
        assert_eq!(get("i").as_str(), Some("7"));
        assert_eq!(get("j").describe(), "the number 1e3");
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_lines() {
        let loaded = load("a: 1\nb: 2\na: 3\n");
        assert_eq!(
            loaded.problems,
            vec![YamlProblem {
                mark: Mark { line: 3, column: 1 },
                message: "duplicate key \"a\" (first given at line 1)".to_owned(),
            }]
        );
    }

    #[test]
    fn syntax_errors_carry_the_parser_location() {
        let loaded = load("a: [1, 2\nb: 3\n");
        assert!(loaded.root.is_none());
        assert_eq!(loaded.problems.len(), 1);
        assert!(loaded.problems[0].message.starts_with("invalid YAML: "));
        assert!(loaded.problems[0].mark.line >= 1);
    }

    #[test]
    fn merge_keys_and_aliases() {
        let n = root("base: &b\n  x: 1\n  y: 2\nthing:\n  <<: *b\n  y: 3\n");
        let thing = &n.get("thing").expect("thing").value;
        assert_eq!(thing.get("x").expect("x").value.as_int(), Some(1));
        assert_eq!(thing.get("y").expect("y").value.as_int(), Some(3));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let loaded = load(&text);
        assert!(loaded.root.is_none());
        assert!(loaded.problems[0].message.contains("aliases expand"));
    }

    #[test]
    fn aliases_of_long_scalars_count_their_bytes() {
        let long = "x".repeat(64 * 1024);
        let aliases = vec!["*s"; 32].join(", ");
        let loaded = load(&format!(
            "s: &s {long}
t: [{aliases}]
"
        ));
        assert!(loaded.root.is_none());
        assert!(loaded.problems[0].message.contains("aliases expand"));
    }

    #[test]
    fn second_document_is_an_error() {
        let loaded = load("a: 1\n---\nb: 2\n");
        assert_eq!(loaded.problems.len(), 1);
        assert_eq!(loaded.problems[0].mark.line, 2);
    }
}
