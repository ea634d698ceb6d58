//! Compose `secrets:` and `configs:`: the top-level declarations (`file:`, `environment:`,
//! and for configs `content:`), read now by flockerctl, and each service's list of the ones
//! it mounts (short form `NAME`, long form `{source, target, uid, gid, mode}`).
//!
//! The content goes to the node that runs the application and nowhere else: the
//! application only records name, target, mode and a BLAKE3 digest (see
//! `flocker_wire::files`).

use std::collections::BTreeMap;

use flocker_wire::files::{MAX_FILE_BYTES, file_name_problem, to_hex};
use flocker_wire::{FileContent, FileKind, FileMount};

use super::fields::{
    Sink, check_keys, expect_list, expect_map, find, join, mountpoint_problem, string,
};
use super::interpolate::ComposeEnv;
use super::yaml::{Kind, Node, Resolved};

/// The compose section a kind is declared in.
fn section(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Secret => "secrets",
        FileKind::Config => "configs",
    }
}

/// One declared file: its content, or `None` when it could not be read (already reported).
pub type Declared = BTreeMap<String, Option<Vec<u8>>>;

/// Reads a top-level `secrets:` or `configs:` section.
pub fn declarations(
    sink: &mut Sink<'_>,
    node: &Node,
    kind: FileKind,
    env: &ComposeEnv,
) -> Declared {
    let section = section(kind);
    let mut out = Declared::new();
    if node.is_null() {
        return out;
    }
    let Some(entries) = expect_map(
        sink,
        node,
        section,
        "a mapping of names to `file:` or `environment:`",
    ) else {
        return out;
    };
    for entry in entries {
        let path = join(section, &entry.key);
        if let Some(problem) = file_name_problem(&entry.key) {
            sink.error(entry.key_mark, path.clone(), problem);
        }
        let Some(fields) = expect_map(
            sink,
            &entry.value,
            &path,
            "a mapping with `file` or `environment`",
        ) else {
            out.insert(entry.key.clone(), None);
            continue;
        };
        let allowed: &[&str] = match kind {
            FileKind::Secret => &["file", "environment", "name"],
            FileKind::Config => &["file", "environment", "content", "name"],
        };
        if let Some(external) = find(fields, "external") {
            sink.error(
                external.key_mark,
                join(&path, "external"),
                format!(
                    "an external {} lives in a swarm or on one host, which no other node can read; declare it with `file:` or `environment:`",
                    &section[..section.len() - 1]
                ),
            );
            out.insert(entry.key.clone(), None);
            continue;
        }
        check_keys(sink, fields, allowed, &path);
        let sources: Vec<_> = fields
            .iter()
            .filter(|f| matches!(f.key.as_str(), "file" | "environment" | "content"))
            .collect();
        let content = match sources.as_slice() {
            [one] => read_source(
                sink,
                one.key.as_str(),
                &one.value,
                &join(&path, &one.key),
                env,
            ),
            [] => {
                sink.error(
                    entry.value.mark,
                    path,
                    "missing `file` or `environment`: say where the content comes from",
                );
                None
            }
            [_, second, ..] => {
                sink.error(
                    second.key_mark,
                    join(&path, &second.key),
                    "give one of `file`, `environment` and `content`",
                );
                None
            }
        };
        out.insert(entry.key.clone(), content);
    }
    out
}

fn read_source(
    sink: &mut Sink<'_>,
    key: &str,
    node: &Node,
    path: &str,
    env: &ComposeEnv,
) -> Option<Vec<u8>> {
    let text = string(sink, node, path, "a string")?;
    let content = match key {
        "file" => {
            let full = env.base_dir.join(text);
            match std::fs::read(&full) {
                Ok(bytes) => bytes,
                Err(e) => {
                    sink.error(
                        node.mark,
                        path,
                        format!("cannot read {}: {e}", full.display()),
                    );
                    return None;
                }
            }
        }
        "environment" => match env.vars.get(text) {
            Some(value) => value.clone().into_bytes(),
            None => {
                sink.error(
                    node.mark,
                    path,
                    format!("the variable {text} is not set in flockerctl's environment"),
                );
                return None;
            }
        },
        _ => text.as_bytes().to_vec(),
    };
    if content.len() > MAX_FILE_BYTES {
        sink.error(
            node.mark,
            path,
            format!(
                "{} bytes is more than the {MAX_FILE_BYTES} a secret or config may hold",
                content.len()
            ),
        );
        return None;
    }
    Some(content)
}

/// A service's `secrets:` or `configs:` list: the mounts and their content, by name.
pub fn service_files(
    sink: &mut Sink<'_>,
    node: &Node,
    kind: FileKind,
    service: &str,
    declared: &Declared,
) -> Vec<(FileMount, FileContent)> {
    let section = section(kind);
    let path = join(service, section);
    let mut out: Vec<(FileMount, FileContent)> = Vec::new();
    for (i, item) in expect_list(sink, node, &path, "a list of names")
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let item_path = format!("{path}[{i}]");
        let Some(mount) = mount(sink, item, kind, &item_path) else {
            continue;
        };
        match declared.get(&mount.name) {
            None => sink.error(
                item.mark,
                item_path,
                format!(
                    "`{}` is not declared under the top-level `{section}:`",
                    mount.name
                ),
            ),
            // Unreadable: reported at the declaration.
            Some(None) => {}
            Some(Some(content)) => {
                if out.iter().any(|(m, _)| m.target == mount.target) {
                    sink.error(
                        item.mark,
                        item_path,
                        format!("a second file mounted at {}", mount.target),
                    );
                    continue;
                }
                let digest = to_hex(blake3::hash(content).as_bytes());
                out.push((FileMount { digest, ..mount }, FileContent(content.clone())));
            }
        }
    }
    out
}

/// `NAME` or `{source, target, uid, gid, mode}`; the digest is filled in by the caller.
fn mount(sink: &mut Sink<'_>, item: &Node, kind: FileKind, path: &str) -> Option<FileMount> {
    let (name, fields) = match &item.kind {
        Kind::Map(fields) => {
            check_keys(
                sink,
                fields,
                &["source", "target", "uid", "gid", "mode"],
                path,
            );
            let source = super::fields::require(sink, fields, "source", item.mark, path)?;
            (
                string(sink, &source.value, &join(path, "source"), "a name")?.to_owned(),
                Some(fields),
            )
        }
        _ => (
            string(sink, item, path, "a name or a mapping with `source`")?.to_owned(),
            None,
        ),
    };
    let default_target = match kind {
        FileKind::Secret => format!("/run/secrets/{name}"),
        FileKind::Config => format!("/{name}"),
    };
    let field = |key: &str| fields.and_then(|f| find(f, key));
    let target = match field("target") {
        Some(t) => {
            let text = string(sink, &t.value, &join(path, "target"), "a path")?;
            // A secret's bare target is a name under /run/secrets, as compose has it.
            if kind == FileKind::Secret && !text.starts_with('/') {
                format!("/run/secrets/{text}")
            } else {
                text.to_owned()
            }
        }
        None => default_target,
    };
    if let Some(problem) = mountpoint_problem(&target) {
        sink.error(item.mark, path, problem);
        return None;
    }
    let number = |sink: &mut Sink<'_>, key: &str, octal: bool| -> Option<u32> {
        let f = field(key)?;
        let text = f
            .value
            .as_scalar()
            .map(|s| s.text.clone())
            .unwrap_or_default();
        let parsed = match f.value.as_scalar().map(|s| s.resolve()) {
            // `mode: 0440` means octal in compose files, whatever YAML 1.2 says.
            Some(Resolved::Int(_)) if octal && text.starts_with('0') && !text.starts_with("0o") => {
                u32::from_str_radix(&text, 8).ok()
            }
            Some(Resolved::Int(i)) => u32::try_from(i).ok(),
            Some(Resolved::Str(s)) => s.parse().ok(),
            _ => None,
        };
        if parsed.is_none() {
            sink.error(
                f.value.mark,
                join(path, key),
                format!("expected a number, found {}", f.value.describe()),
            );
        }
        parsed
    };
    let uid = number(sink, "uid", false);
    let gid = number(sink, "gid", false);
    let mode = number(sink, "mode", true);
    Some(FileMount {
        name,
        kind,
        target,
        mode,
        uid,
        gid,
        digest: String::new(),
    })
}
