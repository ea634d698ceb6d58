//! The documented memory bound holds: a stream far larger than the bound goes through with the
//! heap's peak growth under `SendOptions::memory_bound() + ReceiveOptions::memory_bound()`
//! plus a fixed allowance for threads, zstd contexts and channels.
//!
//! A counting global allocator measures the peak; it lives in its own test binary so it does
//! not slow the other tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};

use flocker_stream::{ReceiveOptions, SendOptions, receive_stream, send_stream};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An endless-looking compressible source of `left` bytes that allocates nothing per read.
struct Generated {
    left: u64,
    x: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            self.x = self
                .x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Half the bits random: roughly 2:1 compressible.
            *b = b'a' + ((self.x >> 60) as u8 & 0x0f);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts bytes written without storing them.
struct Discard(u64);

impl std::io::Write for Discard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn peak_heap_stays_under_the_documented_bound_for_a_large_stream() {
    let total: u64 = 512 << 20;
    let so = SendOptions {
        chunk_size: 256 * 1024,
        threads: 2,
        ..Default::default()
    };
    let ro = ReceiveOptions {
        threads: 2,
        ..Default::default()
    };
    let bound = so.memory_bound() + ro.memory_bound(so.chunk_size);
    // Pipe the sender into the receiver through a small OS pipe, both running at once.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let (sent, got, written) = std::thread::scope(|s| {
        let sender = s.spawn(|| send_stream(Generated { left: total, x: 1 }, writer, &so));
        let mut sink = Discard(0);
        let got = receive_stream(reader, &mut sink, &ro);
        (sender.join().expect("sender thread"), got, sink.0)
    });
    let sent = sent.expect("send");
    let got = got.expect("receive");
    assert_eq!(written, total);
    assert_eq!(sent.stream_hash, got.stream_hash);
    let growth = PEAK.load(Ordering::Relaxed).saturating_sub(baseline) as u64;
    // zstd contexts (~1-2 MiB each at level 1, one per worker per side), thread stacks are
    // not heap, channels and hashers are small.
    let allowance = 8u64 << 20;
    eprintln!(
        "stream {total} bytes, peak heap growth {growth} bytes, bound {bound} + allowance {allowance}"
    );
    assert!(
        growth < bound + allowance,
        "peak heap growth {growth} exceeds bound {bound} + {allowance}"
    );
    assert!(
        total > 20 * (bound + allowance),
        "the stream must dwarf the bound for this test to mean anything"
    );
}
