//! The memory planner: how a replication splits its budget between read buffers (one chunk
//! each, including those in flight on the ring) and pack buffers (one per worker and one per
//! uploader), and the settings a run derives from its options and its store.

use super::ReplicateOptions;
use super::packer::{MAX_PART_BYTES, PackMode};
use crate::error::{Error, Result};
use crate::io::Engine;
use crate::store::Store;
use crate::store::format::{self, ENTRY_BYTES};

/// The smallest memory budget a replication picks for itself (see [`default_memory_budget`]).
pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;
/// Uploads in flight at once on a multipart store, unless configured.
pub(crate) const DEFAULT_UPLOAD_JOBS: usize = 4;

/// Default chunks in flight with buffered `io_uring` reads. Measured here (2 GiB, read and
/// hash only): warm, depth 4 matched `pread` while 32 was 1.4× slower (more fresh buffers,
/// more kernel time); cold, the kernel's readahead keeps the device busy at any depth.
pub const DEFAULT_IO_DEPTH: usize = 4;
/// Default chunks in flight with `O_DIRECT` reads, which get no readahead: the queue depth is
/// all the device sees. Measured here (2 GiB cold, read and hash): depth 4 took 1.78–1.89 s,
/// 16 1.29–1.46 s, 32 1.12–1.34 s, 64 1.14–1.26 s.
pub const DEFAULT_DIRECT_IO_DEPTH: usize = 32;

/// How a replication spends its memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryPlan {
    /// Worker threads.
    pub workers: usize,
    /// Pooled read buffers of one chunk each.
    pub read_bufs: usize,
    /// Blob bytes at which a worker's pack is sent.
    pub pack_target: usize,
    /// Capacity of each pack buffer.
    pub pack_capacity: usize,
    /// The total: `read_bufs × chunk + (workers + uploads) × pack_capacity`.
    pub total: usize,
}

/// Splits a memory budget between read buffers and pack buffers on a store that takes packs
/// whole (one pack writer).
#[cfg(test)]
pub(crate) fn plan(budget: usize, chunk_size: usize, workers: usize) -> Result<MemoryPlan> {
    plan_parts(budget, chunk_size, workers, 1, None, 0)
}

/// Splits a memory budget between read buffers and pack buffers: one being filled per worker,
/// plus one per uploader thread (`uploads`: the parts in flight on a multipart store, whose
/// parts are at least `min_part` bytes, `part_size` if given; or the pack being written by
/// the pack writer).
pub(crate) fn plan_parts(
    budget: usize,
    chunk_size: usize,
    workers: usize,
    uploads: usize,
    min_part: Option<u64>,
    part_size: usize,
) -> Result<MemoryPlan> {
    let workers = worker_count(workers);
    let blob = format::blob_bound(chunk_size);
    let buffers = workers + uploads;
    let pack_target = match min_part {
        None => (budget / (4 * buffers))
            .clamp(2 * chunk_size, format::MAX_PACK_BYTES.max(2 * chunk_size)),
        Some(min) => {
            let min = usize::try_from(min).unwrap_or(usize::MAX).max(chunk_size);
            if part_size > 0 {
                if part_size < min || part_size > MAX_PART_BYTES {
                    return Err(Error::config(format!(
                        "part size {part_size} is outside {min}..={MAX_PART_BYTES} bytes"
                    )));
                }
                part_size
            } else {
                (budget / (2 * buffers)).clamp(min, MAX_PART_BYTES.max(min))
            }
        }
    };
    let pack_capacity = pack_target + blob + format::MAX_PACK_CHUNKS * ENTRY_BYTES + 64;
    let fixed = buffers * pack_capacity;
    let min_read_bufs = workers + 1;
    let want_read_bufs = 2 * workers + 2;
    let read_bufs = budget.saturating_sub(fixed) / chunk_size;
    if read_bufs < min_read_bufs {
        let need = fixed + min_read_bufs * chunk_size;
        return Err(Error::config(format!(
            "memory budget of {} MiB is too small for {} MiB chunks, {workers} workers and \
             {uploads} uploads in flight (needs at least {} MiB)",
            budget >> 20,
            chunk_size >> 20,
            need.div_ceil(1 << 20)
        )));
    }
    let read_bufs = read_bufs.min(want_read_bufs);
    Ok(MemoryPlan {
        workers,
        read_bufs,
        pack_target,
        pack_capacity,
        total: fixed + read_bufs * chunk_size,
    })
}

/// The memory budget of a replication that was given none: 64 MiB per core, at least
/// [`DEFAULT_MEMORY_BUDGET`], but at most an eighth of the memory this process may use (the
/// machine's, or its control group's limit in a container), and never below 8 MiB per core
/// with 64 MiB at least (what the pipeline's buffers need).
pub fn default_memory_budget() -> usize {
    let cores = worker_count(0);
    let wanted = cores.saturating_mul(64 << 20).max(DEFAULT_MEMORY_BUDGET);
    let floor = cores.saturating_mul(8 << 20).max(64 << 20);
    crate::io::sys::usable_memory()
        .map_or(wanted, |m| wanted.min(m / 8))
        .max(floor)
}

/// The smallest budget (to 64 KiB) that [`plan_parts`] accepts for these settings. Whether a
/// budget fits only grows with it, so a bisection finds the edge.
pub(crate) fn min_memory_budget(
    chunk_size: usize,
    workers: usize,
    uploads: usize,
    min_part: Option<u64>,
    part_size: usize,
) -> usize {
    let fits =
        |budget| plan_parts(budget, chunk_size, workers, uploads, min_part, part_size).is_ok();
    let mut hi: usize = 64 << 20;
    while !fits(hi) {
        if hi >= 1 << 50 {
            return hi; // Settings no budget fits (a part size out of range): plan_parts says why.
        }
        hi *= 2;
    }
    let mut lo = 0;
    while hi - lo > 64 << 10 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Worker threads to use: `requested`, or one per core when 0 (at most 64).
pub(crate) fn worker_count(requested: usize) -> usize {
    if requested == 0 {
        crate::io::sys::cores()
    } else {
        requested
    }
    .clamp(1, 64)
}

/// The settings of one run, from its options and its store, with the memory plan they give.
#[derive(Debug, Clone, Copy)]
pub(super) struct Setup {
    /// Threads that take finished packs (or parts) from the workers: uploaders on a
    /// multipart store, one pack writer on a store that takes packs whole.
    pub(super) uploads: usize,
    pub(super) pack_mode: PackMode,
    /// Chunks in flight on the ring, with `io_uring`.
    pub(super) io_depth: usize,
    pub(super) budget: usize,
    pub(super) chunk_size: usize,
    workers: usize,
    min_part: Option<u64>,
    part_size: usize,
}

impl Setup {
    /// Checks the options against the store and plans the run's memory without a ring (the
    /// figure [`Setup::plan`] grows as far as the budget allows): settings no budget fits
    /// fail here, before anything is locked or read.
    pub(super) fn new(store: &Store, opts: &ReplicateOptions) -> Result<Setup> {
        let chunk_size = store.chunk_size() as usize;
        let rules = store.backend().multipart();
        if rules.is_none() && opts.part_size > 0 {
            return Err(Error::config(format!(
                "a part size applies to S3 stores; {} takes packs whole",
                store.location()
            )));
        }
        let uploads = match rules {
            None => 1,
            Some(_) if opts.upload_jobs == 0 => DEFAULT_UPLOAD_JOBS,
            Some(_) => opts.upload_jobs.clamp(1, 64),
        };
        let min_part = rules.map(|r| r.min_part);
        // Workers never wait for the store (the writer or the uploaders do): one per core,
        // by default. Measured on 2 cores, local store: a third worker gave nothing (medians
        // of 4 paired runs 2.56 s and 2.61 s).
        let budget = match opts.memory_budget {
            // A budget picked for the user must fit the store's chunk size (up to 16 MiB).
            0 => default_memory_budget().max(min_memory_budget(
                chunk_size,
                opts.workers,
                uploads,
                min_part,
                opts.part_size,
            )),
            b => b,
        };
        let setup = Setup {
            uploads,
            pack_mode: match rules {
                None => PackMode::Whole,
                Some(r) => PackMode::Multipart {
                    max_parts: r.max_parts.max(2),
                },
            },
            io_depth: match opts.io_depth {
                0 if opts.direct_io => DEFAULT_DIRECT_IO_DEPTH,
                0 => DEFAULT_IO_DEPTH,
                n => n.min(1024),
            },
            budget,
            chunk_size,
            workers: opts.workers,
            min_part,
            part_size: opts.part_size,
        };
        setup.plan(&Engine::Pread)?;
        Ok(setup)
    }

    /// The memory plan with `engine`: on a ring, chunks in flight on top of those waiting for
    /// the workers, as far as the budget allows.
    pub(super) fn plan(&self, engine: &Engine) -> Result<MemoryPlan> {
        let mut plan = plan_parts(
            self.budget,
            self.chunk_size,
            self.workers,
            self.uploads,
            self.min_part,
            self.part_size,
        )?;
        if !matches!(engine, Engine::Pread) {
            let room = self.budget.saturating_sub(plan.total) / self.chunk_size;
            let extra = self.io_depth.min(room);
            plan.read_bufs += extra;
            plan.total += extra * self.chunk_size;
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests;
