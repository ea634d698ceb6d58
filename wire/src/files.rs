//! Secrets and configs: small files `flockerctl` reads and the agent mounts read-only into
//! the container (compose's `secrets:` at `/run/secrets/NAME`, `configs:` at `/NAME`).
//!
//! The application itself carries only each file's name, target, mode and digest, so a
//! changed file restarts the application, while the application's JSON (which is in Docker
//! labels, in plans and in `status`) never holds the content. The content travels beside
//! it in the converge request ([`FileContent`]), whose `Debug` shows only its size.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest secret or config accepted (compose and swarm allow 500 KB).
pub const MAX_FILE_BYTES: usize = 512 * 1024;

/// What kind of file, which decides its default target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    Secret,
    Config,
}

/// One file mounted into an application's container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMount {
    /// The name in the config's top-level `secrets:`/`configs:`.
    pub name: String,
    pub kind: FileKind,
    /// Absolute path inside the container.
    pub target: String,
    /// Permission bits; 0444 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// BLAKE3 of the content, hex: what makes a changed file restart the application.
    pub digest: String,
}

/// A file's bytes. Serialized as hex; never printed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct FileContent(pub Vec<u8>);

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileContent(<{} bytes, not shown>)", self.0.len())
    }
}

impl Serialize for FileContent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for FileContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.len() > 2 * MAX_FILE_BYTES {
            return Err(serde::de::Error::custom(format!(
                "a file of more than {MAX_FILE_BYTES} bytes"
            )));
        }
        from_hex(&text)
            .map(FileContent)
            .ok_or_else(|| serde::de::Error::custom("file content is not hex"))
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// File names as compose allows them, safe as a path component.
pub fn file_name_problem(name: &str) -> Option<String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    (!valid).then(|| {
        format!("{name:?} cannot name a secret or config: letters, digits, `_`, `-` and `.`")
    })
}

impl FileMount {
    /// Every problem of the mount itself (not of its content).
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = file_name_problem(&self.name).into_iter().collect();
        out.extend(
            crate::checks::mountpoint_problem(&self.target).map(|p| format!("{}: {p}", self.name)),
        );
        if self.mode.is_some_and(|m| m > 0o7777) {
            out.push(format!(
                "{}: mode {:o} is not a permission mode",
                self.name,
                self.mode.unwrap_or(0)
            ));
        }
        if self.digest.len() != 64 || from_hex(&self.digest).is_none() {
            out.push(format!(
                "{}: the digest is not a BLAKE3 hex digest",
                self.name
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_as_hex_and_never_prints() {
        let content = FileContent(b"s3cr3t\n\x00\xff".to_vec());
        let json = serde_json::to_string(&content).expect("json");
        assert_eq!(json, "\"7333637233740a00ff\"");
        let back: FileContent = serde_json::from_str(&json).expect("back");
        assert_eq!(back, content);
        assert_eq!(format!("{content:?}"), "FileContent(<9 bytes, not shown>)");
        assert!(serde_json::from_str::<FileContent>("\"abc\"").is_err());
        assert!(serde_json::from_str::<FileContent>("\"zz\"").is_err());
    }

    #[test]
    fn hostile_mounts_are_named() {
        let mount = FileMount {
            name: "../x".into(),
            kind: FileKind::Secret,
            target: "run/x".into(),
            mode: Some(0o17777),
            uid: None,
            gid: None,
            digest: "xyz".into(),
        };
        let problems = mount.problems().join("\n");
        for needle in [
            "cannot name a secret",
            "absolute path",
            "not a permission mode",
            "not a BLAKE3",
        ] {
            assert!(problems.contains(needle), "{needle:?} in {problems}");
        }
    }
}
