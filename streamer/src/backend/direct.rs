//! A file writer for the file sink: `O_DIRECT` writes straight from the caller's buffers when
//! they are aligned (the receiver's chunk buffers are, see [`crate::aligned`]), so the receiver
//! copies nothing on its way to the disk.
//!
//! Why: profiling the file sink on a VM showed over half of the receiver's CPU in
//! `copy_folio_from_iter_atomic`, the copy into freshly allocated page-cache pages (which a VM
//! pays for with a host fault on the first touch of each page). Direct writes skip that copy and
//! the dirty-page write-back; the sink's commit still calls `fsync` before its rename, which is
//! what makes the file durable (direct writes alone do not flush the device cache or metadata).
//! The writer before this one copied every chunk into 4 MiB aligned blocks for a writer thread;
//! that copy was a fifth of the receiver's CPU on loopback (`bench/RESULTS.md`, "file sink").
//!
//! The writes are synchronous: the receiver's writer thread waits for each, while its reader
//! and workers fill the other pooled chunk buffers, so the disk works while the network does.
//! The receiver hands over the chunks that are ready together in one vectored write (up to
//! four), one system call and one wait instead of four. Input that is not aligned (the last
//! chunk, another chunk size, a caller with small buffers) is copied into one aligned
//! [`BLOCK`]-byte block, allocated on first use and written when full; the unaligned tail at
//! the end is written with `O_DIRECT` cleared. A file system that refuses direct I/O (tmpfs
//! before Linux 6.6 refuses the open, others may refuse a write with `EINVAL`) gets ordinary
//! buffered writes.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::OFlags;

use crate::aligned::{ALIGN, AlignedBuf};

/// Bytes per write of unaligned input; a multiple of every logical block size.
pub const BLOCK: usize = 4 << 20;

/// Opens `path` for writing (created or truncated), with `O_DIRECT` when the file system
/// allows it.
pub fn create(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(OFlags::DIRECT.bits() as i32)
        .open(path);
    match direct {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            File::create(path)
        }
        Err(e) => Err(e),
    }
}

/// Turns `O_DIRECT` off for the rest of the file.
fn buffered(file: &File) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    rustix::fs::fcntl_setfl(file, flags - OFlags::DIRECT)?;
    Ok(())
}

/// Whether `data` may be written with `O_DIRECT` at a file offset of `offset` (with the
/// slices before it in the same write, each aligned).
fn aligned(data: &[u8], offset: u64) -> bool {
    (data.as_ptr() as usize).is_multiple_of(ALIGN)
        && data.len().is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN as u64)
}

/// The file and where it stands.
struct Target {
    file: Arc<File>,
    /// Bytes written.
    written: u64,
    /// The file is in direct mode (`O_DIRECT` set).
    direct: bool,
}

impl Target {
    /// Writes all of `data` at the end of the file.
    fn put(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.write_some(&[IoSlice::new(data)])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "file took no bytes",
                ));
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// One vectored write at the end of the file; returns the bytes written. Slices that cannot
    /// go direct (unaligned, or the file system refuses a direct write with `EINVAL`, nothing
    /// written) turn direct mode off for the rest of the file.
    fn write_some(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.direct && !bufs.iter().all(|b| aligned(b, self.written)) {
            buffered(&self.file)?;
            self.direct = false;
        }
        loop {
            match (&*self.file).write_vectored(bufs) {
                Ok(n) => {
                    self.written += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if self.direct
                        && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    tracing::debug!("direct I/O refused; writing through the page cache");
                    buffered(&self.file)?;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes a file opened by [`create`] (see the module docs). [`Write::flush`] writes what the
/// block holds; the caller syncs.
pub struct DirectWriter {
    target: Target,
    /// Unaligned input, written when full or at `flush`; allocated on first use.
    block: AlignedBuf,
    /// Bytes the block holds.
    held: usize,
}

impl DirectWriter {
    /// A writer appending to `file`, empty and opened by [`create`].
    pub fn new(file: Arc<File>) -> Self {
        Self {
            target: Target {
                file,
                written: 0,
                direct: true,
            },
            block: AlignedBuf::new(),
            held: 0,
        }
    }

    /// Whether the file is still written with direct I/O.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.target.direct
    }

    /// Writes out what the block holds.
    fn put_block(&mut self) -> io::Result<()> {
        let result = self.target.put(&self.block[..self.held]);
        self.held = 0;
        result
    }
}

/// Whether `data` starts on an alignment boundary and is at least one unit long.
fn aligned_start(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(ALIGN) && data.len() >= ALIGN
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.held == 0 && aligned_start(data) {
            // The caller's buffer is aligned: no copy.
            let n = data.len() - data.len() % ALIGN;
            self.target.put(&data[..n])?;
            return Ok(n);
        }
        if self.block.len() < BLOCK {
            self.block.resize(BLOCK);
        }
        let n = (BLOCK - self.held).min(data.len());
        self.block[self.held..self.held + n].copy_from_slice(&data[..n]);
        self.held += n;
        if self.held == BLOCK {
            self.put_block()?;
        }
        Ok(n)
    }

    /// Aligned slices (all but an unaligned last one) go to the file in one write, straight
    /// from the caller's buffers; anything else is written like [`Write::write`].
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let whole = bufs
            .iter()
            .take_while(|b| aligned_start(b) && b.len().is_multiple_of(ALIGN))
            .count();
        if self.held == 0 && whole > 1 {
            return self.target.write_some(&bufs[..whole]);
        }
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write(b),
            None => Ok(0),
        }
    }

    /// Writes what the block holds (an unaligned tail through the page cache).
    fn flush(&mut self) -> io::Result<()> {
        if self.held > 0 {
            self.put_block()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// `data` in an aligned buffer, as the receiver hands chunks over.
    fn aligned_copy(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new();
        b.resize(data.len());
        b.copy_from_slice(data);
        b
    }

    #[test]
    fn writes_every_byte_in_order_with_an_unaligned_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let data = pattern(3 * BLOCK + 12345);
        let file = Arc::new(create(&path).expect("create"));
        let mut w = DirectWriter::new(Arc::clone(&file));
        for piece in data.chunks(1_000_003) {
            w.write_all(piece).expect("write");
        }
        w.flush().expect("flush");
        file.sync_all().expect("sync");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn aligned_chunks_go_straight_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let data = pattern(5 * (1 << 20) + 777);
        let file = Arc::new(create(&path).expect("create"));
        let dio = rustix::fs::fcntl_getfl(&*file)
            .expect("getfl")
            .contains(OFlags::DIRECT);
        let mut w = DirectWriter::new(Arc::clone(&file));
        for piece in data.chunks(1 << 20) {
            w.write_all(&aligned_copy(piece)).expect("write");
        }
        // Only the unaligned tail went through the block, none of the full chunks.
        assert_eq!(w.held, 777);
        assert_eq!(w.target.written, 5 << 20);
        // Where the temporary directory takes direct I/O, the chunks went direct.
        assert_eq!(w.is_direct(), dio);
        w.flush().expect("flush");
        assert!(!w.is_direct(), "the tail is written buffered");
        file.sync_all().expect("sync");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn an_unaligned_start_then_aligned_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let data = pattern(3 * BLOCK + 4096);
        let file = Arc::new(create(&path).expect("create"));
        let mut w = DirectWriter::new(Arc::clone(&file));
        w.write_all(&data[..10]).expect("write");
        for piece in data[10..].chunks(1 << 20) {
            w.write_all(&aligned_copy(piece)).expect("write");
        }
        w.flush().expect("flush");
        file.sync_all().expect("sync");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn a_file_without_direct_io_gets_buffered_writes() {
        // A file opened without O_DIRECT: the writer's direct writes simply run buffered; a
        // file system that refuses O_DIRECT (EINVAL at the open) is opened like this by create.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let data = pattern(2 * BLOCK + 99);
        let file = Arc::new(File::create(&path).expect("create"));
        let mut w = DirectWriter::new(Arc::clone(&file));
        w.write_all(&aligned_copy(&data[..BLOCK])).expect("write");
        w.write_all(&data[BLOCK..]).expect("write");
        w.flush().expect("flush");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn vectored_aligned_chunks_go_in_one_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let data = pattern(4 * (1 << 20) + 10);
        let file = Arc::new(create(&path).expect("create"));
        let mut w = DirectWriter::new(Arc::clone(&file));
        let chunks: Vec<AlignedBuf> = data.chunks(1 << 20).map(aligned_copy).collect();
        let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        // The four whole chunks in one call (a file may take less; this one takes them all),
        // then the unaligned last one through the block.
        assert_eq!(w.write_vectored(&slices).expect("write"), 4 << 20);
        assert_eq!(w.write_vectored(&slices[4..]).expect("write"), 10);
        assert_eq!(w.held, 10);
        // Unaligned slices are written one at a time, like write().
        let odd = [IoSlice::new(b"abc"), IoSlice::new(b"def")];
        assert_eq!(w.write_vectored(&odd).expect("write"), 3);
        w.flush().expect("flush");
        file.sync_all().expect("sync");
        let mut expected = data.clone();
        expected.extend_from_slice(b"abc");
        assert_eq!(std::fs::read(&path).expect("read"), expected);
    }

    #[test]
    fn small_and_empty_streams() {
        let dir = tempfile::tempdir().expect("tempdir");
        for len in [0, 1, ALIGN, BLOCK] {
            let path = dir.path().join(format!("out{len}"));
            let data = pattern(len);
            let file = Arc::new(create(&path).expect("create"));
            let mut w = DirectWriter::new(file);
            w.write_all(&data).expect("write");
            w.flush().expect("flush");
            assert_eq!(std::fs::read(&path).expect("read"), data, "len {len}");
        }
    }
}
