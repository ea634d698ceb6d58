//! Parsing `SPEC` strings (`-`, `file:PATH`, `zfs:POOL/FS@SNAP`, `btrfs:PATH`, `dir:PATH`)
//! into sources and sinks.

use std::path::PathBuf;

use super::{
    BackendError, BtrfsSink, BtrfsSource, DirSink, DirSource, FileSink, FileSource, Sink, Source,
    StdinSource, StdoutSink, ZfsSink, ZfsSource,
};

/// Where a stream comes from or goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `-`: stdin (source) or stdout (sink).
    Stdio,
    /// `file:PATH`.
    File(PathBuf),
    /// `zfs:POOL/FS@SNAP` (source) or `zfs:POOL/FS` (sink).
    Zfs(String),
    /// `btrfs:PATH`: a read-only snapshot (source) or the directory to receive into (sink).
    Btrfs(PathBuf),
    /// `dir:PATH`.
    Dir(PathBuf),
}

impl std::str::FromStr for Spec {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-" {
            return Ok(Self::Stdio);
        }
        let bad = || {
            BackendError::Target(format!(
                "bad spec {s:?}: expected -, file:PATH, zfs:POOL/FS[@SNAP], btrfs:PATH or dir:PATH"
            ))
        };
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match kind {
            "file" => Ok(Self::File(rest.into())),
            "zfs" => Ok(Self::Zfs(rest.into())),
            "btrfs" => Ok(Self::Btrfs(rest.into())),
            "dir" => Ok(Self::Dir(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl Spec {
    /// A source for this spec. `incremental_from` applies to ZFS (`@SNAP`), `parent` to btrfs.
    pub fn source(
        &self,
        incremental_from: Option<&str>,
        parent: Option<&std::path::Path>,
    ) -> Result<Box<dyn Source>, BackendError> {
        let misplaced =
            |what: &str| BackendError::Target(format!("{what} does not apply to source {self:?}"));
        if incremental_from.is_some() && !matches!(self, Self::Zfs(_)) {
            return Err(misplaced("--incremental-from"));
        }
        if parent.is_some() && !matches!(self, Self::Btrfs(_)) {
            return Err(misplaced("--parent"));
        }
        Ok(match self {
            Self::Stdio => Box::new(StdinSource),
            Self::File(p) => Box::new(FileSource::new(p)),
            Self::Zfs(snap) => match incremental_from {
                Some(base) => Box::new(ZfsSource::incremental(snap, base)),
                None => Box::new(ZfsSource::full(snap)),
            },
            Self::Btrfs(p) => match parent {
                Some(parent) => Box::new(BtrfsSource::incremental(p, parent)),
                None => Box::new(BtrfsSource::full(p)),
            },
            Self::Dir(p) => Box::new(DirSource::new(p)),
        })
    }

    /// A sink for this spec; `rollback` passes `-F` to `zfs recv`.
    pub fn sink(&self, rollback: bool) -> Box<dyn Sink> {
        match self {
            Self::Stdio => Box::new(StdoutSink),
            Self::File(p) => Box::new(FileSink::new(p)),
            Self::Zfs(target) => Box::new(ZfsSink::new(target).rollback(rollback)),
            Self::Btrfs(p) => Box::new(BtrfsSink::new(p)),
            Self::Dir(p) => Box::new(DirSink::new(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spec;

    #[test]
    fn parses_specs() {
        assert_eq!("-".parse::<Spec>().ok(), Some(Spec::Stdio));
        assert_eq!(
            "zfs:tank/v@s1".parse::<Spec>().ok(),
            Some(Spec::Zfs("tank/v@s1".into()))
        );
        assert_eq!(
            "dir:/a/b".parse::<Spec>().ok(),
            Some(Spec::Dir("/a/b".into()))
        );
        assert!("nfs:/x".parse::<Spec>().is_err());
        assert!("file:".parse::<Spec>().is_err());
    }
}
