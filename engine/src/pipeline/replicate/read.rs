//! The read stage: one thread maps each chunk position the run reads and reads it through a
//! [`ChunkReader`] (`pread`, or `io_uring` with many chunks in flight) into a pooled buffer
//! for the workers; positions without data go to the collector as runs of holes.

use std::time::Duration;

use crossbeam_channel::Sender;

use super::collect::Msg;
use super::work::{Shared, Work};
use crate::error::Result;
use crate::image::Mapping;
use crate::io::buf::BufferPool;
use crate::io::chunks::{ChunkReader, PreadChunks, has_data};
use crate::io::{Engine, ReadBackend};
use crate::job::Counters;

/// Chunk positions of a disk, a bit each: those a run does not read (durable from an earlier
/// run of its job, or taken from a delta's base).
#[derive(Debug)]
pub(super) struct Positions(Vec<u64>);

impl Positions {
    /// No position of `n`.
    pub(super) fn new(n: u64) -> Positions {
        Positions(vec![
            0;
            usize::try_from(n.div_ceil(64)).unwrap_or(usize::MAX)
        ])
    }

    pub(super) fn insert(&mut self, idx: u64) {
        if let Some(word) = usize::try_from(idx / 64)
            .ok()
            .and_then(|w| self.0.get_mut(w))
        {
            *word |= 1 << (idx % 64);
        }
    }

    pub(super) fn contains(&self, idx: u64) -> bool {
        usize::try_from(idx / 64)
            .ok()
            .and_then(|w| self.0.get(w))
            .is_some_and(|word| word & (1 << (idx % 64)) != 0)
    }
}

/// Runs the read stage on `engine`: `io_uring` if it holds a ring, else `pread` through
/// `backend`. Errors go to the collector.
pub(super) fn run(
    sh: &Shared<'_>,
    engine: Engine,
    backend: Box<dyn ReadBackend>,
    direct: bool,
    pool: &BufferPool,
    work: &Sender<Work>,
    msgs: &Sender<Msg>,
) {
    let result = match engine {
        #[cfg(target_os = "linux")]
        Engine::Uring(ring) => {
            use crate::io::chunks::{DirectFiles, RingChunks};
            // Declared before the ring that borrows them, as the compiler insists.
            let direct_files = direct.then(|| DirectFiles::new(sh.source));
            let mut reader = RingChunks::new(*ring, sh.source, direct_files.as_ref(), pool);
            read_all(sh, &mut reader, pool, work, msgs)
        }
        Engine::Pread => {
            let _ = direct;
            read_all(
                sh,
                &mut PreadChunks::new(sh.source, backend),
                pool,
                work,
                msgs,
            )
        }
    };
    if let Err(e) = result {
        sh.fail(msgs, e);
    }
}

/// Reads every position the run reads, keeping as many chunks in flight as `reader` takes
/// and handing each to the workers as it completes (in any order: positions travel with
/// the chunks).
fn read_all(
    sh: &Shared<'_>,
    reader: &mut dyn ChunkReader,
    pool: &BufferPool,
    work: &Sender<Work>,
    msgs: &Sender<Msg>,
) -> Result<()> {
    let mut maps = Vec::new();
    let mut holes = Holes::new(msgs);
    let mut next = 0u64;
    loop {
        if sh.stopping() {
            return Ok(());
        }
        // Submit chunks while the reader has room.
        let mut submitted = false;
        while reader.has_room() && next < sh.n_chunks && !sh.stopping() {
            let idx = next;
            if sh.skip.contains(idx) || !map_position(sh, idx, &mut maps, &mut holes)? {
                next += 1;
                continue;
            }
            // Without chunks in flight, wait a little for a buffer the workers give back.
            let wait = Duration::from_millis(if reader.in_flight() > 0 { 0 } else { 50 });
            let Some(mut buf) = pool.get_timeout(wait) else {
                break; // Buffers are in the reader: take chunks back first.
            };
            next += 1;
            buf.set_len(usize::try_from(sh.chunk_len(idx)).expect("a chunk fits in memory"));
            reader.submit(idx, buf, &maps, idx * sh.chunk_size)?;
            submitted = true;
        }
        if reader.in_flight() == 0 {
            if next >= sh.n_chunks {
                return Ok(());
            }
            continue;
        }
        // Hand on what completed: wait for one unless more could be submitted right away.
        let mut wait = !submitted || !reader.has_room() || next >= sh.n_chunks;
        while let Some(done) = reader.complete(wait)? {
            Counters::add(&sh.counters.bytes_read, done.read);
            if work
                .send(Work {
                    idx: done.token,
                    buf: done.buf,
                })
                .is_err()
            {
                return Ok(());
            }
            wait = false;
        }
    }
}

/// Maps chunk position `idx` into `maps`; a position without data is recorded as such (and
/// `false` returned), one with data is left to the caller to read.
fn map_position(
    sh: &Shared<'_>,
    idx: u64,
    maps: &mut Vec<Mapping>,
    holes: &mut Holes<'_>,
) -> Result<bool> {
    let len = sh.chunk_len(idx);
    maps.clear();
    sh.source.map(idx * sh.chunk_size, len, maps)?;
    crate::image::coalesce(maps);
    if has_data(maps) {
        holes.flush();
        return Ok(true);
    }
    holes.add(idx);
    Ok(false)
}

/// Most positions one [`Msg::Holes`] covers (progress moves at least this often).
const MAX_HOLE_RUN: u64 = 1 << 14;

/// A reader's run of positions without data, sent as one message when it ends, grows to
/// [`MAX_HOLE_RUN`], or the reader returns (by any path: sent on drop).
struct Holes<'a> {
    msgs: &'a Sender<Msg>,
    first: u64,
    count: u64,
}

impl<'a> Holes<'a> {
    fn new(msgs: &'a Sender<Msg>) -> Holes<'a> {
        Holes {
            msgs,
            first: 0,
            count: 0,
        }
    }

    fn add(&mut self, idx: u64) {
        if self.count > 0 && self.first + self.count == idx && self.count < MAX_HOLE_RUN {
            self.count += 1;
        } else {
            self.flush();
            self.first = idx;
            self.count = 1;
        }
    }

    fn flush(&mut self) {
        if self.count > 0 {
            let _ = self.msgs.send(Msg::Holes {
                first: self.first,
                count: self.count,
            });
            self.count = 0;
        }
    }
}

impl Drop for Holes<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
