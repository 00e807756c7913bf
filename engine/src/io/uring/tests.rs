// Test data: small, trusted sizes.
#![allow(clippy::cast_possible_truncation)]

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use super::*;
use crate::io::buf::BufferPool;

fn file_of(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn read(fd: BorrowedFd<'_>, at: usize, len: usize, offset: u64) -> ChunkRead<'_> {
    ChunkRead {
        fd,
        fallback_fd: fd,
        file: 7,
        at,
        len,
        offset,
    }
}

/// Says why a test cannot run here and lets it pass, unless the run requires every tool
/// (`BF_REQUIRE_TOOLS`, as CI sets it): then it fails.
fn unavailable(why: &str) {
    assert!(
        std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "{why}, and BF_REQUIRE_TOOLS is set"
    );
    eprintln!("{why}; skipped");
}

/// A ring of `depth`, or `None` (after [`unavailable`]) where `io_uring` is off.
fn ring<'fd>(depth: usize) -> Option<ChunkRing<'fd>> {
    ChunkRing::new(depth)
        .map_err(|e| unavailable(&format!("io_uring unavailable here ({e})")))
        .ok()
}

fn check(done: &Done, expected: &std::collections::HashMap<u64, Vec<u8>>) {
    let want = &expected[&done.token];
    assert_eq!(*done.result.as_ref().unwrap(), 50_000);
    assert_eq!(&done.buf[..30_000], &want[..30_000]);
    assert_eq!(&done.buf[40_000..60_000], &want[40_000..60_000]);
}

#[test]
fn chunks_come_back_filled_whatever_the_order_of_completion() {
    chunks_come_back_filled(false);
}

#[test]
fn chunks_come_back_filled_into_registered_buffers() {
    chunks_come_back_filled(true);
}

fn chunks_come_back_filled(fixed: bool) {
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    let f = file_of(&data);
    let fd = f.as_file().as_fd();
    let pool = BufferPool::new(8, 64 << 10);
    let Some(mut ring) = ring(4) else {
        return;
    };
    if fixed {
        match ring.register_pool(&pool) {
            Ok(n) => assert_eq!(n, 8),
            Err(e) => {
                unavailable(&format!("fixed buffers refused here ({e})"));
                return;
            }
        }
    }
    let mut expected = std::collections::HashMap::new();
    let mut got = 0;
    for token in 0..16u64 {
        while !ring.has_room() {
            let done = ring.complete(true).unwrap().unwrap();
            check(&done, &expected);
            got += 1;
        }
        let mut buf = pool.get_timeout(Duration::from_millis(10)).unwrap();
        buf.set_len(64 << 10);
        // Two reads from different places, and a hole left as it is.
        let a = token * 40_000;
        let b = 1_000_000 - token * 1000;
        ring.queue(
            token,
            buf,
            &[read(fd, 0, 30_000, a), read(fd, 40_000, 20_000, b)],
        )
        .unwrap();
        let mut want = vec![0u8; 64 << 10];
        want[..30_000].copy_from_slice(&data[a as usize..a as usize + 30_000]);
        want[40_000..60_000].copy_from_slice(&data[b as usize..b as usize + 20_000]);
        expected.insert(token, want);
    }
    while let Some(done) = ring.complete(true).unwrap() {
        check(&done, &expected);
        got += 1;
    }
    assert_eq!(got, 16);
    assert_eq!(ring.in_flight(), 0);
    // Every read went through a registered buffer, or none did.
    assert_eq!(ring.fixed_reads(), if fixed { 32 } else { 0 });
}

#[test]
fn reading_past_the_end_fails_with_the_file_and_offset() {
    let f = file_of(&[1u8; 10_000]);
    let fd = f.as_file().as_fd();
    let pool = BufferPool::new(1, 16 << 10);
    let Some(mut ring) = ring(2) else {
        return;
    };
    let mut buf = pool.get_timeout(Duration::from_millis(10)).unwrap();
    buf.set_len(16 << 10);
    // 10,000 bytes exist: the read gets 8,000 (short), then none (end of file).
    ring.queue(1, buf, &[read(fd, 0, 10_000, 2_000)]).unwrap();
    let done = ring.complete(true).unwrap().unwrap();
    let failure = done.result.unwrap_err();
    assert_eq!(failure.file, 7);
    // Reported at the read's start, as pread reports it.
    assert_eq!(failure.offset, 2_000);
    assert_eq!(failure.error.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(&done.buf[..8_000], &[1u8; 8_000][..]);
}

#[test]
fn a_ring_dropped_with_reads_in_flight_waits_for_them() {
    let f = file_of(&vec![3u8; 4 << 20]);
    let fd = f.as_file().as_fd();
    let pool = BufferPool::new(4, 1 << 20);
    let Some(mut ring) = ring(4) else {
        return;
    };
    for token in 0..4 {
        let mut buf = pool.get_timeout(Duration::from_millis(10)).unwrap();
        buf.set_len(1 << 20);
        ring.queue(token, buf, &[read(fd, 0, 1 << 20, token << 20)])
            .unwrap();
    }
    drop(ring);
    // Every buffer came back to the pool once its read completed.
    for _ in 0..4 {
        assert!(pool.get_timeout(Duration::from_millis(100)).is_some());
    }
}

#[test]
fn a_chunk_with_more_reads_than_the_completion_queue_holds_completes() {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let f = file_of(&data);
    let fd = f.as_file().as_fd();
    let pool = BufferPool::new(1, 1 << 20);
    let Some(mut ring) = ring(1) else {
        return;
    };
    let mut buf = pool.get_timeout(Duration::from_millis(10)).unwrap();
    buf.set_len(1 << 20);
    // 256 grains of 4 KiB from scattered places: far more than the queue's entries.
    let reads: Vec<ChunkRead> = (0..256)
        .map(|g| read(fd, g * 4096, 4096, ((g * 7919) % 480) as u64 * 4096))
        .collect();
    ring.queue(1, buf, &reads).unwrap();
    let done = ring.complete(true).unwrap().unwrap();
    assert_eq!(*done.result.as_ref().unwrap(), 1 << 20);
    for r in &reads {
        let off = r.offset as usize;
        assert_eq!(&done.buf[r.at..r.at + 4096], &data[off..off + 4096]);
    }
}
