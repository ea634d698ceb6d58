//! The ownership record of backends without user properties: a JSON file next to the volume,
//! replaced atomically (write a temporary file, fsync it, rename it over, fsync the directory)
//! so a crash leaves either the old record or the new one.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::VolumeError;

/// What the sidecar file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// The volume this record belongs to, so a record found at a path proves which volume
    /// is there. Records written before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub owner: String,
    pub epoch: u64,
    #[serde(default)]
    pub writable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_size: Option<u64>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a sidecar; `None` when there is none.
pub fn read(path: &Path, volume: &str) -> Result<Option<Sidecar>, VolumeError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VolumeError::Corrupt {
                volume: volume.to_string(),
                detail: format!("{}: {e}", path.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Replaces a sidecar atomically and durably.
pub fn write(path: &Path, sidecar: &Sidecar) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec_pretty(sidecar).map_err(|e| VolumeError::Corrupt {
        volume: path.display().to_string(),
        detail: e.to_string(),
    })?;
    write_bytes(path, &bytes)
}

/// Replaces any small file atomically and durably (the route file uses it too).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), VolumeError> {
    let dir = path.parent().ok_or_else(|| VolumeError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.json");
        assert_eq!(read(&path, "v").expect("read"), None);
        let mut s = Sidecar {
            volume: Some("v".into()),
            owner: "a".into(),
            epoch: 1,
            writable: true,
            maximum_size: None,
        };
        write(&path, &s).expect("write");
        s.epoch = 2;
        write(&path, &s).expect("write");
        assert_eq!(read(&path, "v").expect("read"), Some(s));
        assert!(!dir.path().join("v.tmp").exists());
        fs::write(&path, "{").expect("corrupt");
        assert!(matches!(read(&path, "v"), Err(VolumeError::Corrupt { .. })));
    }
}
