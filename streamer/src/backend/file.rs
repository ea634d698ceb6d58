//! Files, stdin/stdout and arbitrary readers/writers.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BackendError, Sink, Source};

/// Reads a regular file (or device).
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl Source for FileSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        let f = File::open(&self.path).map_err(|source| BackendError::Fs {
            op: "open",
            path: self.path.clone(),
            source,
        })?;
        Ok(Box::new(f))
    }

    fn size_hint(&self) -> Option<u64> {
        std::fs::metadata(&self.path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }
}

/// Reads standard input.
#[derive(Debug, Default)]
pub struct StdinSource;

impl Source for StdinSource {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        Ok(Box::new(std::io::stdin()))
    }
}

/// Wraps any reader (the caller owns its failure semantics).
pub struct ReaderSource<R>(pub Option<R>);

impl<R: Read + Send> Source for ReaderSource<R> {
    fn open(&mut self) -> Result<Box<dyn Read + Send + '_>, BackendError> {
        self.0
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>)
            .ok_or_else(|| BackendError::Target("reader already used".into()))
    }
}

/// Writes a file: into `PATH.flocker-partial`, renamed over `PATH` on commit (after `fsync`),
/// removed on abort. The partial file is written with direct I/O, straight from the
/// receiver's aligned chunk buffers (see [`super::direct`]). An existing device (`/dev/null`,
/// a block device) is written in place, through ordinary buffered writes, and cannot be rolled
/// back.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    partial: PathBuf,
    file: Option<Arc<File>>,
}

impl FileSink {
    /// A sink writing `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut partial = path.clone().into_os_string();
        partial.push(".flocker-partial");
        Self {
            path,
            partial: partial.into(),
            file: None,
        }
    }

    /// The staging path.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }
}

impl FileSink {
    /// Devices (`/dev/null`, a block device) cannot be staged and renamed: write in place.
    fn is_device(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| !m.is_file() && !m.is_dir())
    }
}

impl Sink for FileSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        let fs_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BackendError::Fs {
                op: "create",
                path,
                source,
            }
        };
        if self.is_device() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(fs_err(&self.path))?;
            let file = Arc::new(f);
            self.file = Some(Arc::clone(&file));
            return Ok(Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                ArcFile(file),
            )));
        }
        let f = super::direct::create(&self.partial).map_err(fs_err(&self.partial))?;
        let file = Arc::new(f);
        self.file = Some(Arc::clone(&file));
        Ok(Box::new(super::direct::DirectWriter::new(file)))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| BackendError::Target("file sink committed before open".into()))?;
        if self.is_device() {
            // Best effort: character devices such as /dev/null do not sync.
            let _ = file.sync_all();
            return Ok(());
        }
        file.sync_all().map_err(|source| BackendError::Fs {
            op: "sync",
            path: self.partial.clone(),
            source,
        })?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(|source| BackendError::Fs {
            op: "rename into place",
            path: self.path.clone(),
            source,
        })?;
        // The rename is durable only once its directory is: a crash right after the commit
        // must not bring back the partial name (or no file at all).
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| BackendError::Fs {
                op: "sync the directory of",
                path: self.path.clone(),
                source,
            })
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        self.file = None;
        if self.is_device() {
            return Ok(None);
        }
        match std::fs::remove_file(&self.partial) {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BackendError::Fs {
                op: "remove",
                path: self.partial.clone(),
                source,
            }),
        }
    }
}

/// A shared file handle as a writer.
struct ArcFile(Arc<File>);

impl Write for ArcFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// Writes standard output. It cannot take back what it wrote: on failure the output holds a
/// verified prefix and the process must exit non-zero.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        Ok(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        Ok(None)
    }
}

/// Wraps any writer; like [`StdoutSink`] it cannot take back a verified prefix.
pub struct WriterSink<W>(pub W);

impl<W: Write + Send> Sink for WriterSink<W> {
    fn open(&mut self) -> Result<Box<dyn Write + Send + '_>, BackendError> {
        Ok(Box::new(&mut self.0))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn abort(&mut self) -> Result<Option<String>, BackendError> {
        Ok(None)
    }
}
