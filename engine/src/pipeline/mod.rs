//! The pipeline: plan → read → zero-detect → hash → dedup → compress → encrypt → pack → store.
//!
//! ```text
//!  reader thread ──Work(buf)──▶ worker threads ──Msg──▶ collector (calling thread)
//!   map chunk,                   zero? hash, dedup,       chunk map pages, index
//!   pread data                   lz4 + seal into the      objects, snapshot manifest
//!   into a pooled buf            worker's own pack;       (the commit point, last)
//!                                full pack → store
//! ```
//!
//! Every queue is bounded and every buffer is pooled or preallocated once, so peak memory is
//! [`plan`]'s figure whatever the disk size: `read_bufs × chunk + workers × pack buffer`, plus
//! the chunk index of the store (48 bytes per stored chunk) and a few manifest pages.

mod convert;
mod delta;
mod disk;
pub mod gc;
mod output;
mod packer;
pub mod prune;
mod restore;
mod verify;
mod walk;

pub use convert::{ConvertOptions, ConvertReport, convert};
pub use delta::{Changes, DEFAULT_VERIFY_SAMPLE, DeltaOptions};

/// The name a replication of `source` with `name` (if given) records its disk under (see
/// [`ReplicateOptions::disk_name`]).
pub fn disk_name(store: &Store, source: &dyn BlockSource, name: Option<&str>) -> Result<String> {
    disk::resolve_name(store, source, name, name.is_some()).map(|(n, _)| n)
}
pub use restore::{RestoreOptions, RestoreReport, restore};
pub use verify::{Problem, VerifyOptions, VerifyReport, verify};

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{BlockSource, Mapping, Target};
use crate::io::buf::{BufferPool, PooledBuf};
use crate::io::{Engine, IoEngine, ReadBackend};
use crate::job::state::{JobDb, JobKey, JobSource, POSITION_BATCH, SourceFile};
use crate::job::{CancelToken, Counters, Event, Observer, Phase, Reporter};
use crate::store::format::{self, ENTRY_BYTES, Entry, Id, PAGE_ENTRIES, PackId, ZERO_ID, hex};
use crate::store::lock::StoreLock;
use crate::store::{ChunkIndex, DiskMeta, Part, Snapshot, SnapshotStats, Store};
use packer::{OpenPack, Outgoing, PackMode};

/// The smallest memory budget a replication picks for itself (see [`default_memory_budget`]).
pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;
/// Largest pack a replication writes (before its trailer).
const MAX_PACK_BYTES: usize = 32 << 20;
/// Uploads in flight at once on a multipart store, unless configured.
pub const DEFAULT_UPLOAD_JOBS: usize = 4;
/// An index object is written after this many packs (and at the end of a run).
const INDEX_FLUSH_PACKS: usize = 16;

/// Default chunks in flight with buffered `io_uring` reads. Measured here (2 GiB, read and
/// hash only): warm, depth 4 matched `pread` while 32 was 1.4× slower (more fresh buffers,
/// more kernel time); cold, the kernel's readahead keeps the device busy at any depth.
pub const DEFAULT_IO_DEPTH: usize = 4;
/// Default chunks in flight with `O_DIRECT` reads, which get no readahead: the queue depth is
/// all the device sees. Measured here (2 GiB cold, read and hash): depth 4 took 1.78–1.89 s,
/// 16 1.29–1.46 s, 32 1.12–1.34 s, 64 1.14–1.26 s.
pub const DEFAULT_DIRECT_IO_DEPTH: usize = 32;

/// Options of [`replicate`].
// Switches of a call, not a state machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Peak memory the pipeline may use for data in flight, in bytes; 0 picks
    /// [`default_memory_budget`].
    pub memory_budget: usize,
    /// Worker threads for hashing, compression and encryption; 0 means one per core.
    pub workers: usize,
    /// Compress chunks with lz4 (kept raw whenever that does not shrink them).
    pub compression: bool,
    /// The disk's name in the store. By default the shortest of the source's file name and
    /// its paths with more folders (`vm1/disk.vmdk`, …) that no other source uses; a name
    /// given that another source uses is an error (unless `disk_moved`).
    pub disk_name: Option<String>,
    /// The source is the disk named `disk_name` at another path (moved, or a copy or export
    /// of it): take the name even though another source had it.
    pub same_disk: bool,
    /// How long to wait for another run replicating the same disk (here or on another host)
    /// before failing with [`ErrorKind::Busy`].
    pub wait: Duration,
    /// Read engine for the source's bulk reads.
    pub io_engine: IoEngine,
    /// Chunks in flight with `io_uring` (bounded by the memory budget's read buffers); 0
    /// picks [`DEFAULT_IO_DEPTH`], or [`DEFAULT_DIRECT_IO_DEPTH`] with `direct_io`.
    pub io_depth: usize,
    /// Read with `O_DIRECT` (past the page cache) where the file system and alignment allow,
    /// with `io_uring`. Off by default: measured here, warm-cache reads were about 6× slower
    /// (the device instead of memory), and cold ones no faster than `pread` with the
    /// kernel's 8 MiB readahead, whose rate on this virtual disk ranged from 0.55 to 2.2 GB/s
    /// between runs.
    pub direct_io: bool,
    /// Cancels the run; nothing is committed then.
    pub cancel: CancelToken,
    /// Folder of the job database: the run is a job whose checkpoints let a later run of the
    /// same replication resume it. `None`: nothing is recorded and nothing resumes.
    pub job_state: Option<std::path::PathBuf>,
    /// Start over even if an unfinished run of this job exists (its uploads are aborted).
    pub restart: bool,
    /// Start over (with a warning) instead of failing when an unfinished run of this job saw
    /// another state of the source or made another delta (continuous replication).
    pub restart_if_changed: bool,
    /// Which disk of a multi-disk source this is; part of the job's identity.
    pub disk_selector: String,
    /// Uploads in flight at once on a multipart store; 0 picks the default.
    pub upload_jobs: usize,
    /// Part size on a multipart store; 0 picks one from the memory budget.
    pub part_size: usize,
    /// Upload bandwidth cap in bytes per second (an average; bursts of one part).
    pub bwlimit: Option<u64>,
    /// Make a delta on a base snapshot (reading only what changed) instead of a full copy.
    pub delta: Option<DeltaOptions>,
    /// The source's change-tracking id now, recorded in the snapshot (for a full copy; a
    /// delta takes it from its options or its change list).
    pub change_id: Option<String>,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            memory_budget: 0,
            workers: 0,
            compression: true,
            disk_name: None,
            same_disk: false,
            wait: Duration::ZERO,
            io_engine: IoEngine::default(),
            io_depth: 0,
            direct_io: false,
            cancel: CancelToken::new(),
            job_state: None,
            restart: false,
            restart_if_changed: false,
            disk_selector: String::new(),
            upload_jobs: 0,
            part_size: 0,
            bwlimit: None,
            delta: None,
            change_id: None,
        }
    }
}

/// What a replication did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    /// The new snapshot's id.
    pub snapshot: String,
    /// The disk name recorded.
    pub disk: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes the source reported allocated.
    pub allocated_bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes recorded as zero (unallocated, or read and found zero).
    pub bytes_zero: u64,
    /// Bytes of chunks the store already held.
    pub bytes_deduplicated: u64,
    /// Plaintext bytes of new chunks.
    pub bytes_new: u64,
    /// Bytes written to the store (packs, including their headers and trailers).
    pub bytes_stored: u64,
    /// Chunk bytes copied in user space between the buffer the kernel read them into and the
    /// store writer (a debug statistic of the zero-copy path): a chunk stored compressed is
    /// compressed from its read buffer straight into the pack, and costs none; one stored as
    /// it is (incompressible, or `--compression none`) is copied once, into the pack, whose
    /// aligned buffer the local store writes with `O_DIRECT`.
    pub bytes_copied: u64,
    /// Chunk positions of the disk.
    pub chunks_total: u64,
    /// New chunks stored.
    pub chunks_stored: u64,
    /// Packs written.
    pub packs_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Read backend used.
    pub io_engine: &'static str,
    /// Worker threads used.
    pub workers: usize,
    /// Threads taking finished packs from the workers: uploaders on a multipart store, the
    /// one pack writer on a store that takes packs whole.
    pub uploads: usize,
    /// Bytes a delta took from its base without reading them.
    pub bytes_unchanged: u64,
    /// The base snapshot of a delta.
    pub base: Option<String>,
    /// How a delta used its change list (see [`ChangeRecord`](crate::store::ChangeRecord)).
    pub changes: Option<crate::store::ChangeRecord>,
    /// The memory budget, and what the pipeline planned to use within it.
    pub memory_budget: u64,
    /// Bytes the pipeline's buffers can reach at most.
    pub memory_planned: u64,
    /// The job id, when the run was a job.
    pub job: Option<String>,
    /// Whether the run resumed an earlier, interrupted run of the job.
    pub resumed: bool,
    /// Bytes of the disk an earlier run had made durable (neither read nor sent again).
    pub bytes_resumed: u64,
}

/// How a replication spends its memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
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
pub fn plan(budget: usize, chunk_size: usize, workers: usize) -> Result<MemoryPlan> {
    plan_parts(budget, chunk_size, workers, 1, None, 0)
}

/// Splits a memory budget between read buffers and pack buffers: one being filled per worker,
/// plus one per uploader thread (`uploads`: the parts in flight on a multipart store, whose
/// parts are at least `min_part` bytes, `part_size` if given; or the pack being written by
/// the pack writer).
pub fn plan_parts(
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
        None => (budget / (4 * buffers)).clamp(2 * chunk_size, MAX_PACK_BYTES.max(2 * chunk_size)),
        Some(min) => {
            let min = usize::try_from(min).unwrap_or(usize::MAX).max(chunk_size);
            if part_size > 0 {
                if part_size < min || part_size > packer::MAX_PART_BYTES {
                    return Err(Error::config(format!(
                        "part size {part_size} is outside {min}..={} bytes",
                        packer::MAX_PART_BYTES
                    )));
                }
                part_size
            } else {
                (budget / (2 * buffers)).clamp(min, packer::MAX_PART_BYTES.max(min))
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
    usable_memory()
        .map_or(wanted, |m| wanted.min(m / 8))
        .max(floor)
}

/// Memory this process may use: the machine's (`MemTotal`), or less under a control group
/// limit (v2 `memory.max`, v1 `memory.limit_in_bytes`). `None` where neither can be read.
fn usable_memory() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    // The limits of this process's control group and of its ancestors, from the paths in
    // /proc/self/cgroup (v2: "0::/path"; v1: "N:memory:/path" under the memory controller's
    // mount). "max" (v2) or a huge number (v1) when there is none: neither lowers the total.
    let mut files = Vec::new();
    for line in read("/proc/self/cgroup").unwrap_or_default().lines() {
        let (root, file, path) = if let Some(path) = line.strip_prefix("0::") {
            ("/sys/fs/cgroup", "memory.max", path)
        } else if let Some((_, path)) = line.split_once(":memory:") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", path)
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root);
        files.push(dir.join(file));
        for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
            dir.push(part);
            files.push(dir.join(file));
        }
    }
    let limit = files
        .iter()
        .filter_map(|p| {
            std::fs::read_to_string(p)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .min();
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The smallest budget (to 64 KiB) that [`plan_parts`] accepts for these settings. Whether a
/// budget fits only grows with it, so a bisection finds the edge.
pub fn min_memory_budget(
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
pub fn worker_count(requested: usize) -> usize {
    if requested == 0 {
        thread::available_parallelism().map_or(1, usize::from)
    } else {
        requested
    }
    .clamp(1, 64)
}

/// Whether every byte is zero (vectorises: no early exit inside a 4 KiB block).
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The last compressed grain a reader inflated, and the buffers it reuses: a grain larger
/// than a chunk (streamOptimized grains are up to 64 MiB) is inflated once for all the chunks
/// it holds, not once per chunk, and no buffer is allocated per chunk.
#[derive(Debug, Default)]
pub(crate) struct GrainCache {
    packed: Vec<u8>,
    grain: Vec<u8>,
    /// File index and offset of the grain in `grain`.
    key: Option<(usize, u64)>,
}

impl GrainCache {
    /// The inflated grain at `file_offset` of file `file` (read and inflated unless it is the
    /// one held), and the compressed bytes read to get it (0 if it was held).
    fn grain(
        &mut self,
        src: &crate::io::SourceFile,
        backend: &mut dyn ReadBackend,
        file: usize,
        file_offset: u64,
        stored_len: u32,
        grain_len: u32,
    ) -> Result<(&[u8], u64)> {
        if self.key == Some((file, file_offset)) && self.grain.len() == grain_len as usize {
            return Ok((&self.grain, 0));
        }
        self.key = None;
        self.packed.resize(stored_len as usize, 0);
        backend.read_exact_at(src, &mut self.packed, file_offset)?;
        self.grain.resize(grain_len as usize, 0);
        crate::image::inflate_grain(&self.packed, &mut self.grain).map_err(|why| {
            Error::new(ErrorKind::InvalidImage, why)
                .with_path(src.path())
                .with_offset(file_offset)
        })?;
        self.key = Some((file, file_offset));
        Ok((&self.grain, u64::from(stored_len)))
    }
}

/// Reads `[offset, offset + buf.len())` of a source into `buf` following `maps` (the
/// source's mappings of exactly that range): data is read, everything else zero-filled, so
/// `buf` may hold anything on entry. Compressed grains go through `grains`. Returns bytes read
/// from files.
pub(crate) fn fill_chunk(
    source: &dyn BlockSource,
    backend: &mut dyn ReadBackend,
    grains: &mut GrainCache,
    maps: &[Mapping],
    offset: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let outside = || Error::internal("mapping outside chunk");
    tiles(maps, offset, buf.len() as u64)?;
    let mut read = 0;
    for m in maps {
        let at = usize::try_from(m.virt - offset).map_err(|_| outside())?;
        let len = usize::try_from(m.len).map_err(|_| outside())?;
        let dst = buf.get_mut(at..at + len).ok_or_else(outside)?;
        let (file, file_offset) = match m.target {
            Target::Data { file, offset } | Target::Deflate { file, offset, .. } => (file, offset),
            Target::Zero | Target::Unallocated => {
                dst.fill(0);
                continue;
            }
        };
        let src = source
            .file(file)
            .ok_or_else(|| Error::internal("mapping names an unknown file"))?;
        if let Target::Deflate {
            stored_len,
            grain_len,
            skip,
            ..
        } = m.target
        {
            let (grain, n) =
                grains.grain(src, backend, file, file_offset, stored_len, grain_len)?;
            let skip = skip as usize;
            dst.copy_from_slice(grain.get(skip..skip + len).ok_or_else(outside)?);
            read += n;
        } else {
            backend.read_exact_at(src, dst, file_offset)?;
            read += m.len;
        }
    }
    Ok(read)
}

/// Checks that `maps` cover `[offset, offset + len)` exactly, in order: buffers are reused
/// without clearing, so a gap would leave another chunk's bytes in place.
fn tiles(maps: &[Mapping], offset: u64, len: u64) -> Result<()> {
    let mut at = offset;
    for m in maps {
        if m.virt != at {
            return Err(Error::internal("mappings leave a gap or overlap"));
        }
        at = at
            .checked_add(m.len)
            .ok_or_else(|| Error::internal("mapping past the disk"))?;
    }
    if at != offset + len {
        return Err(Error::internal("mappings do not cover the chunk"));
    }
    Ok(())
}

/// Whether a range's mappings hold any data to read.
pub(crate) fn has_data(maps: &[Mapping]) -> bool {
    maps.iter().any(|m| m.target.is_data())
}

/// Reads single chunks of a source again and tells their ids, as a snapshot records them
/// (the zero id for a chunk of zeros): a delta's sample, a resumed job's check.
#[derive(Default)]
pub(crate) struct ChunkProbe {
    maps: Vec<Mapping>,
    buf: Vec<u8>,
    grains: GrainCache,
}

impl ChunkProbe {
    /// The id of `[offset, offset + len)` of `source`, and the bytes read from files for it.
    pub(crate) fn id_at(
        &mut self,
        store: &Store,
        source: &dyn BlockSource,
        backend: &mut dyn ReadBackend,
        offset: u64,
        len: u64,
    ) -> Result<(Id, u64)> {
        self.maps.clear();
        source.map(offset, len, &mut self.maps)?;
        crate::image::coalesce(&mut self.maps);
        if !has_data(&self.maps) {
            return Ok((ZERO_ID, 0));
        }
        let buf_len = usize::try_from(len).map_err(|_| Error::internal("chunk too large"))?;
        self.buf.resize(buf_len, 0);
        let read = fill_chunk(
            source,
            backend,
            &mut self.grains,
            &self.maps,
            offset,
            &mut self.buf,
        )?;
        let id = if is_zero(&self.buf) {
            ZERO_ID
        } else {
            store.keys().chunk_id(&self.buf)
        };
        Ok((id, read))
    }
}

/// A chunk read from the source, on its way to a worker.
struct Work {
    idx: u64,
    buf: PooledBuf,
}

/// What a chunk turned out to be.
enum ChunkKind {
    /// All zeros (read and found so).
    Zero,
    Duplicate,
    New,
    /// Stored by an earlier run of this job (a position it made durable without recording
    /// it): new data of this snapshot, not stored again.
    Resumed,
}

enum Msg {
    Chunk {
        idx: u64,
        id: Id,
        len: u64,
        kind: ChunkKind,
    },
    /// A worker started a pack (with a multipart upload, or to be put whole).
    PackStarted {
        id: PackId,
        upload_id: Option<String>,
    },
    /// The store acknowledged a part, carrying these chunk records (offsets within the part).
    PartAcked {
        pack: PackId,
        part: Part,
        chunks: Vec<Entry>,
        /// The pack's last part (records and trailer): with every part before it, a resumed
        /// run completes the upload as it is.
        last: bool,
    },
    /// Consecutive positions `first..first + count` hold no data (the source maps them
    /// unallocated or zero): one message for a run, so that a huge thin disk costs little.
    Holes {
        first: u64,
        count: u64,
    },
    /// A pack is complete in the store.
    PackDone {
        id: PackId,
        entries: Vec<Entry>,
        bytes: u64,
        /// Put in one piece (its bytes were not reported as parts).
        whole: bool,
    },
    Failed(Error),
}

/// Chunks already stored, or claimed by a worker of this run.
struct Dedup<'a> {
    index: &'a ChunkIndex,
    /// Chunks in the packs the job's earlier runs made durable (indexed or not).
    earlier: HashSet<Id>,
    claimed: Mutex<HashSet<Id>>,
}

impl Dedup<'_> {
    /// Whether the caller must store the chunk (`New`), or it is stored or being stored
    /// (`Duplicate`), or an earlier run of the job stored it (`Resumed`).
    fn claim(&self, id: &Id) -> ChunkKind {
        if self.earlier.contains(id) {
            ChunkKind::Resumed
        } else if !self.index.contains(id)
            && self.claimed.lock().expect("dedup set lock").insert(*id)
        {
            ChunkKind::New
        } else {
            ChunkKind::Duplicate
        }
    }
}

/// Everything the stages share.
struct Shared<'a> {
    store: &'a Store,
    source: &'a dyn BlockSource,
    dedup: Dedup<'a>,
    counters: &'a Counters,
    chunk_size: u64,
    n_chunks: u64,
    plan: MemoryPlan,
    pack_mode: PackMode,
    /// Buffers packs (or parts) are built in: one per worker and one per uploader.
    pack_bufs: BufferPool,
    compression: bool,
    /// Positions a previous run of the job made durable (a bit each): not read again.
    skip: Vec<u64>,
    /// Upload bandwidth cap.
    bwlimit: Option<packer::RateLimit>,
    /// Pack ids the job database reserved, when the run has a job.
    pack_ids: Option<Receiver<PackId>>,
    /// Set on the first error so every stage winds down.
    stop: CancelToken,
    cancel: &'a CancelToken,
}

impl Shared<'_> {
    fn stopping(&self) -> bool {
        self.stop.is_cancelled() || self.cancel.is_cancelled()
    }

    /// Reports a stage's error to the collector and winds every stage down.
    fn fail(&self, msgs: &Sender<Msg>, e: Error) {
        self.stop.cancel();
        let _ = msgs.send(Msg::Failed(e));
    }

    fn chunk_len(&self, idx: u64) -> u64 {
        let off = idx * self.chunk_size;
        self.chunk_size.min(self.source.info().virtual_size - off)
    }
}

fn reader(
    sh: &Shared<'_>,
    mut backend: Box<dyn ReadBackend>,
    pool: &BufferPool,
    work: &Sender<Work>,
    msgs: &Sender<Msg>,
) {
    let mut maps = Vec::new();
    let mut grains = GrainCache::default();
    let mut holes = Holes::new(msgs);
    for idx in 0..sh.n_chunks {
        if sh.stopping() {
            return;
        }
        if sh.skip[usize::try_from(idx / 64).expect("position fits")] & (1 << (idx % 64)) != 0 {
            continue;
        }
        let (offset, len) = (idx * sh.chunk_size, sh.chunk_len(idx));
        match map_position(sh, idx, &mut maps, &mut holes) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                sh.fail(msgs, e);
                return;
            }
        }
        let mut buf = loop {
            if sh.stopping() {
                return;
            }
            if let Some(buf) = pool.get_timeout(Duration::from_millis(50)) {
                break buf;
            }
        };
        let len_usize = usize::try_from(len).expect("a chunk fits in memory");
        buf.set_len(len_usize);
        match fill_chunk(
            sh.source,
            backend.as_mut(),
            &mut grains,
            &maps,
            offset,
            &mut buf,
        ) {
            Ok(n) => Counters::add(&sh.counters.bytes_read, n),
            Err(e) => {
                sh.fail(msgs, e);
                return;
            }
        }
        if work.send(Work { idx, buf }).is_err() {
            return;
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

/// Descriptors of the source's files opened with `O_DIRECT`, by file index.
#[cfg(target_os = "linux")]
#[derive(Default)]
struct DirectFiles(Vec<Direct>);

#[cfg(target_os = "linux")]
#[derive(Default)]
enum Direct {
    #[default]
    Untried,
    Open(std::fs::File),
    /// The file system refuses `O_DIRECT`.
    Refused,
}

#[cfg(target_os = "linux")]
impl DirectFiles {
    fn fd(&mut self, index: usize, src: &crate::io::SourceFile) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        if self.0.len() <= index {
            self.0.resize_with(index + 1, Direct::default);
        }
        if matches!(self.0[index], Direct::Untried) {
            // Through the open descriptor, not the path: the very file the reader parsed.
            self.0[index] = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", src.file().as_raw_fd()))
                .map_or(Direct::Refused, Direct::Open);
        }
        match &self.0[index] {
            Direct::Open(f) => Some(f.as_raw_fd()),
            _ => None,
        }
    }
}

/// The reader on `io_uring`: keeps up to the ring's depth of chunks in flight and hands each
/// to the workers as its reads complete (in any order: positions travel with the chunks).
#[cfg(target_os = "linux")]
fn ring_reader(
    sh: &Shared<'_>,
    ring: crate::io::uring::ChunkRing,
    direct: bool,
    pool: &BufferPool,
    work: &Sender<Work>,
    msgs: &Sender<Msg>,
) {
    use crate::io::sys::DIRECT_ALIGN;
    use crate::io::uring::ChunkRead;
    use std::os::fd::AsRawFd;

    let mut direct_files = DirectFiles::default();
    // Declared after the descriptors it reads with, so dropped (waiting for the kernel)
    // before them, even on a panic.
    let mut ring = ring;
    match ring.register_pool(pool) {
        Ok(n) => tracing::debug!(buffers = n, "read buffers registered with io_uring"),
        Err(e) => tracing::debug!(error = %e, "read buffers not registered with io_uring"),
    }
    let mut maps = Vec::new();
    let mut reads = Vec::new();
    let mut sync = crate::io::Pread;
    let mut grains = GrainCache::default();
    let mut next = 0u64;
    let mut holes = Holes::new(msgs);
    // Hands one completed chunk on; false when the run must stop.
    let deliver = |ring: &mut crate::io::uring::ChunkRing, wait: bool| -> Result<bool> {
        let Some(done) = ring
            .complete(wait)
            .map_err(|e| Error::new(ErrorKind::Io, "io_uring failed").with_source(e))?
        else {
            return Ok(false);
        };
        match done.result {
            Ok(n) => Counters::add(&sh.counters.bytes_read, n),
            Err(f) => {
                let path = sh
                    .source
                    .file(f.file)
                    .map_or_else(std::path::PathBuf::new, |s| s.path().to_path_buf());
                let msg = if f.error.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the image ended before its expected size (was it truncated while reading?)"
                } else {
                    "reading the image"
                };
                return Err(Error::io(msg, &path, f.error).with_offset(f.offset));
            }
        }
        Ok(work
            .send(Work {
                idx: done.token,
                buf: done.buf,
            })
            .is_ok())
    };
    let result = (|| -> Result<()> {
        loop {
            if sh.stopping() {
                return Ok(());
            }
            // Queue chunks while the ring has room.
            let mut queued_any = false;
            while ring.has_room() && next < sh.n_chunks && !sh.stopping() {
                let idx = next;
                if sh.skip[usize::try_from(idx / 64).expect("position fits")] & (1 << (idx % 64))
                    != 0
                {
                    next += 1;
                    continue;
                }
                let (offset, len) = (idx * sh.chunk_size, sh.chunk_len(idx));
                if !map_position(sh, idx, &mut maps, &mut holes)? {
                    next += 1;
                    continue;
                }
                let Some(mut buf) =
                    pool.get_timeout(Duration::from_millis(if ring.in_flight() > 0 {
                        0
                    } else {
                        50
                    }))
                else {
                    break; // Buffers are in the ring: reap first.
                };
                next += 1;
                let len_usize = usize::try_from(len).expect("a chunk fits in memory");
                buf.set_len(len_usize);
                if maps
                    .iter()
                    .any(|m| matches!(m.target, Target::Deflate { .. }))
                {
                    // Compressed grains (streamOptimized): read and inflated here.
                    let n = fill_chunk(sh.source, &mut sync, &mut grains, &maps, offset, &mut buf)?;
                    Counters::add(&sh.counters.bytes_read, n);
                    if work.send(Work { idx, buf }).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                reads.clear();
                tiles(&maps, offset, len)?;
                let outside = || Error::internal("mapping outside chunk");
                for m in &maps {
                    let at = m
                        .virt
                        .checked_sub(offset)
                        .and_then(|a| usize::try_from(a).ok())
                        .ok_or_else(outside)?;
                    let mlen = usize::try_from(m.len).map_err(|_| outside())?;
                    if at.checked_add(mlen).is_none_or(|end| end > len_usize) {
                        return Err(outside());
                    }
                    match m.target {
                        Target::Data { file, offset: foff } => {
                            let src = sh
                                .source
                                .file(file)
                                .ok_or_else(|| Error::internal("mapping names an unknown file"))?;
                            let buffered = src.file().as_raw_fd();
                            let aligned = at % DIRECT_ALIGN == 0
                                && mlen % DIRECT_ALIGN == 0
                                && foff % DIRECT_ALIGN as u64 == 0;
                            let fd = if direct && aligned {
                                direct_files.fd(file, src).unwrap_or(buffered)
                            } else {
                                buffered
                            };
                            reads.push(ChunkRead {
                                fd,
                                fallback_fd: buffered,
                                file,
                                at,
                                len: mlen,
                                offset: foff,
                            });
                        }
                        _ => buf[at..at + mlen].fill(0),
                    }
                }
                ring.queue(idx, buf, &reads)
                    .map_err(|e| Error::new(ErrorKind::Io, "io_uring failed").with_source(e))?;
                queued_any = true;
            }
            if ring.in_flight() == 0 {
                if next >= sh.n_chunks {
                    return Ok(());
                }
                continue;
            }
            // Hand on what completed: wait for one unless more could be queued right away.
            let wait = !queued_any || !ring.has_room() || next >= sh.n_chunks;
            if !deliver(&mut ring, wait)? && wait {
                return Ok(());
            }
            while ring.in_flight() > 0 {
                if !deliver(&mut ring, false)? {
                    break;
                }
            }
        }
    })();
    if let Err(e) = result {
        sh.fail(msgs, e);
    }
    // Dropping the ring waits for every read still in the kernel.
    drop(ring);
}

fn worker(sh: &Shared<'_>, work: &Receiver<Work>, parts: &Sender<Outgoing>, msgs: &Sender<Msg>) {
    let mut pack: Option<OpenPack> = None;
    let result = (|| -> Result<()> {
        for Work { idx, buf } in work {
            if sh.stopping() {
                continue; // Drain so the reader is never stuck; drop the buffers.
            }
            let len = buf.len() as u64;
            if is_zero(&buf) {
                let _ = msgs.send(Msg::Chunk {
                    idx,
                    id: ZERO_ID,
                    len,
                    kind: ChunkKind::Zero,
                });
                continue;
            }
            let id = sh.store.keys().chunk_id(&buf);
            let kind = sh.dedup.claim(&id);
            if !matches!(kind, ChunkKind::New) {
                let _ = msgs.send(Msg::Chunk { idx, id, len, kind });
                continue;
            }
            let p = match &mut pack {
                Some(p) => p,
                None => pack.insert(OpenPack::start(sh, msgs)?),
            };
            let offset = p.next_offset();
            let before = p.buf.len();
            if !format::encode_blob(&p.sealer, &id, &buf, sh.compression, &mut p.buf)? {
                // Stored as it is: the chunk's one copy in user space, into the pack.
                Counters::add(&sh.counters.bytes_copied, len);
            }
            drop(buf); // Back to the pool before the (possibly slow) store write.
            p.entries.push(Entry {
                id,
                offset,
                stored_len: u32::try_from(p.buf.len() - before)
                    .map_err(|_| Error::internal("blob too large"))?,
                raw_len: u32::try_from(len).map_err(|_| Error::internal("chunk too large"))?,
            });
            let _ = msgs.send(Msg::Chunk {
                idx,
                id,
                len,
                kind: ChunkKind::New,
            });
            if p.after_add(sh, parts)? {
                let full = pack.take().expect("pack is open");
                full.finish(sh, parts)?;
            }
        }
        // At the end, or cancelled: a pack of complete chunks is worth keeping for the next
        // run. After an error, a multipart pack stays open for the job's next run to finish.
        if let Some(p) = pack.take()
            && !sh.stop.is_cancelled()
        {
            p.finish(sh, parts)?;
        }
        Ok(())
    })();
    if let Err(e) = result
        && e.kind() != ErrorKind::Cancelled
    {
        sh.fail(msgs, e);
    }
}

/// The collector's view of a manifest page being filled.
struct PageFill {
    ids: Vec<Id>,
    filled: usize,
}

/// Checkpoints of a replication that runs as a job (see [`crate::job::state`]).
struct Checkpoint {
    db: JobDb,
    job: String,
    _lock: crate::job::state::JobLock,
    /// Positions hashed but not yet written to the database.
    positions: Vec<(u64, Id)>,
}

impl Checkpoint {
    fn flush_positions(&mut self) -> Result<()> {
        self.db.record_positions(&self.job, &self.positions)?;
        self.positions.clear();
        Ok(())
    }

    /// Reserves a fresh pack id in the job database and hands it to the workers.
    fn reserve_pack_id(&self, ids: &Sender<PackId>) -> Result<()> {
        // The job's id, then 8 random bytes: an upload left open names the job it is of.
        let mut id: PackId = crate::store::crypto::random()?;
        if let Some(job) = crate::store::format::unhex::<8>(&self.job) {
            id[..8].copy_from_slice(&job);
        }
        self.db.reserve_pack(&self.job, &id)?;
        // (Were the queue full, the id would stay unused: a resumed run finds no such pack.)
        let _ = ids.try_send(id);
        Ok(())
    }
}

/// How long the store may acknowledge nothing, with parts in flight, before the run says so.
const STALL_WARNING: Duration = Duration::from_secs(30);

/// Makes a wait on the store visible: warns when nothing was acknowledged for
/// [`STALL_WARNING`] although parts are in flight (the SDK retries a stalled transfer after
/// its grace period and an unanswered request at the attempt timeout; this says why nothing
/// moves meanwhile).
struct Watchdog {
    written: u64,
    since: std::time::Instant,
    warned: Option<std::time::Instant>,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog {
            written: 0,
            since: std::time::Instant::now(),
            warned: None,
        }
    }

    fn check(&mut self, counters: &Counters, reporter: &Reporter<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        let written = counters.bytes_written.load(Relaxed);
        let in_flight = counters.parts_in_flight.load(Relaxed);
        let now = std::time::Instant::now();
        if written != self.written || in_flight == 0 {
            self.written = written;
            self.since = now;
            return;
        }
        let idle = now - self.since;
        if idle >= STALL_WARNING && self.warned.is_none_or(|w| now - w >= STALL_WARNING) {
            self.warned = Some(now);
            reporter.warn(format!(
                "the store has acknowledged nothing for {} s with {in_flight} part(s) in \
                 flight; stalled or unanswered requests are retried (see the log)",
                idle.as_secs()
            ));
        }
    }
}

/// A job opened for a run.
struct Opened {
    ck: Checkpoint,
    /// Positions already durable, with their chunk ids.
    done: Vec<(u64, Id)>,
    /// Chunk ids in the job's complete packs (durable, perhaps not yet indexed).
    durable: HashSet<Id>,
    resumed: bool,
}

/// The identity of every file `source` reads: its top file as opened, and the others
/// (chain parents, extents) as they are now.
fn job_source(source: &dyn BlockSource, plan: &str) -> Result<JobSource> {
    let top = source.fingerprint().clone();
    let mut others = Vec::new();
    for idx in 0..source.n_files() {
        let Some(file) = source.file(idx) else {
            continue;
        };
        let fingerprint = crate::image::util::fingerprint(file)?;
        if (fingerprint.device, fingerprint.inode) != (top.device, top.inode) {
            others.push(SourceFile {
                path: file.path().display().to_string(),
                fingerprint,
            });
        }
    }
    Ok(JobSource {
        top,
        others,
        plan: plan.to_owned(),
    })
}

/// Finds (or starts) the job of this replication, checks the source did not change under
/// it, and finishes what its last run left open. Returns the checkpoint and the positions
/// already durable.
fn open_job(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    plan_key: &str,
    dir: &std::path::Path,
    index: &ChunkIndex,
    reporter: &Reporter<'_>,
) -> Result<Opened> {
    let db = JobDb::open(dir)?;
    let path = source.opened_path().unwrap_or(std::path::Path::new(""));
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = JobKey {
        store: store.location(),
        store_id: store.config().store_id.clone(),
        source: abs.display().to_string(),
        disk: opts.disk_selector.clone(),
        chunk_size: store.chunk_size(),
    };
    let mut found = db.find_active(&key)?;
    if let Some(old) = found.as_ref().filter(|_| opts.restart) {
        db.abandon(&old.id, store.backend().as_ref())?;
        reporter.warn(format!(
            "--restart: job {} forgotten, starting over",
            old.id
        ));
        found = None;
    }
    let fp = job_source(source, plan_key)?;
    if let Some(old) = &found {
        let changed = old.fingerprint.changes(&fp);
        if !changed.is_empty() && opts.restart_if_changed {
            db.abandon(&old.id, store.backend().as_ref())?;
            reporter.warn(format!(
                "job {} saw another state of the source ({}): starting over",
                old.id,
                changed.join(", ")
            ));
            found = None;
        }
    }
    let (job, resumed) = if let Some(job) = found {
        let changed = job.fingerprint.changes(&fp);
        if !changed.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the source changed since job {} started ({}): resuming would mix two \
                     states of the disk; run with --restart to start over",
                    job.id,
                    changed.join(", ")
                ),
            )
            .with_path(path));
        }
        (job, true)
    } else {
        let job = db.create(&key, &fp)?;
        // Recorded in the store too, so that no host's cleanup aborts its uploads while it
        // may resume.
        store.record_job(&job.id, &key.source)?;
        (job, false)
    };
    let lock = db.lock(&job.id)?;
    let mut positions = Vec::new();
    let mut durable = HashSet::new();
    if resumed {
        db.start_run(&job.id)?;
        let finished = packer::finish_open_packs(store, &db, &job.id).map_err(|e| {
            let mut err = Error::new(
                e.kind(),
                format!(
                    "job {} cannot resume: {}; start it over (restart) or abandon it",
                    job.id,
                    e.message()
                ),
            );
            if let Some(o) = e.object() {
                err = err.with_object(o);
            }
            err.with_source(e)
        })?;
        if finished.lost_bytes > 0 {
            db.add_resent(&job.id, finished.lost_bytes)?;
        }
        positions = db
            .positions(&job.id)?
            .into_iter()
            .filter(|(_, id)| *id == ZERO_ID || finished.durable.contains(id) || index.contains(id))
            .filter(|(idx, _)| {
                *idx < source
                    .info()
                    .virtual_size
                    .div_ceil(u64::from(store.chunk_size()))
            })
            .collect();
        tracing::info!(
            job = job.id,
            positions = positions.len(),
            "resuming: positions already durable"
        );
        if let Err(e) = check_resume_sample(store, source, &job.id, &positions, reporter) {
            if !(opts.restart_if_changed && e.kind() == ErrorKind::Config) {
                return Err(e);
            }
            // Continuous replication starts a job over that saw another state of the disk.
            drop(lock);
            db.abandon(&job.id, store.backend().as_ref())?;
            reporter.warn(format!("{e}: starting over"));
            return open_job(store, source, opts, plan_key, dir, index, reporter);
        }
        durable = finished.durable;
    }
    Ok(Opened {
        ck: Checkpoint {
            db,
            job: job.id,
            _lock: lock,
            positions: Vec::new(),
        },
        done: positions,
        durable,
        resumed,
    })
}

/// Positions a resumed run reads again to check the source still holds what the job
/// recorded: 1% of them, at least 32 (all if fewer), at most 4096.
fn resume_sample_size(done: usize) -> usize {
    done.div_ceil(100).clamp(32, 4096).min(done)
}

/// Reads a sample of the positions a job recorded as durable and compares their chunk ids
/// with the records: a source whose identity cannot change with its content (a block device,
/// whose size and times stay the same through another node's writes) or that was written
/// behind its times' back must not be resumed into a snapshot of two states.
fn check_resume_sample(
    store: &Store,
    source: &dyn BlockSource,
    job: &str,
    done: &[(u64, Id)],
    reporter: &Reporter<'_>,
) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let want = resume_sample_size(done.len());
    let chunk = u64::from(store.chunk_size());
    let size = source.info().virtual_size;
    let mut backend = crate::io::Pread;
    let mut probe = ChunkProbe::default();
    let mut differ = 0usize;
    let mut first_differing = None;
    for k in 0..want {
        let (idx, recorded) = done[k * done.len() / want];
        let offset = idx * chunk;
        let len = chunk.min(size - offset);
        let (id, _) = probe.id_at(store, source, &mut backend, offset, len)?;
        if id != recorded {
            differ += 1;
            first_differing.get_or_insert(offset);
        }
    }
    tracing::info!(job, sampled = want, differ, "resume sample");
    if differ > 0 {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the source changed since job {job} started: {differ} of {want} positions read \
                 again to check it differ from what the job recorded (the first at byte {}); \
                 resuming would mix two states of the disk: start the job over (restart)",
                first_differing.unwrap_or_default()
            ),
        )
        .with_path(source.opened_path().unwrap_or(std::path::Path::new(""))));
    }
    reporter.tick();
    Ok(())
}

/// Takes the store's shared lock for `operation` (see `store::lock`), telling the observer
/// when a garbage collection that is deleting makes it wait.
pub(crate) fn shared_lock(
    store: &Store,
    operation: &str,
    cancel: &CancelToken,
    observer: &dyn Observer,
) -> Result<StoreLock> {
    StoreLock::shared(
        store.backend(),
        operation,
        &|| cancel.is_cancelled(),
        &mut |gc| {
            let msg = format!(
                "waiting for a garbage collection to finish deleting: {}",
                gc.describe()
            );
            tracing::info!(warning = %msg);
            observer.event(&Event::Warning(msg));
        },
    )
}

/// The shared lock of a replication, which also holds its disk (see
/// [`StoreLock::shared_disk`]), telling the observer what it waits for.
fn disk_lock(
    store: &Store,
    disk: &str,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<StoreLock> {
    StoreLock::shared_disk(
        store.backend(),
        "replicate",
        &store.disk_hash(disk),
        opts.wait,
        &|| opts.cancel.is_cancelled(),
        &mut |holder| {
            let msg = if holder.kind == crate::store::lock::LockKind::Exclusive {
                format!(
                    "waiting for a garbage collection to finish deleting: {}",
                    holder.describe()
                )
            } else {
                format!(
                    "disk {disk:?} is being replicated by another run ({}); waiting",
                    holder.describe()
                )
            };
            tracing::info!("{msg}");
            observer.event(&Event::Warning(msg));
        },
    )
}

/// The shared lock of a run that only reads the store (restore, verify): with read-only
/// credentials it cannot be written, and the run goes on without it, warned that a garbage
/// collection running meanwhile could make it fail (never damage anything).
pub(crate) fn reader_lock(
    store: &Store,
    operation: &str,
    cancel: &CancelToken,
    observer: &dyn Observer,
) -> Result<Option<StoreLock>> {
    match shared_lock(store, operation, cancel, observer) {
        Ok(lock) => Ok(Some(lock)),
        Err(e) if e.kind() == ErrorKind::AccessDenied => {
            let msg = format!(
                "cannot write a store lock ({e}): going on without one; a garbage collection \
                 running meanwhile could make this {operation} fail"
            );
            tracing::info!(warning = %msg);
            observer.event(&Event::Warning(msg));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Replicates a whole disk into the store as a new snapshot; the blocking entry point.
pub fn replicate(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<ReplicateReport> {
    let chunk_size = store.chunk_size() as usize;
    let rules = store.backend().multipart();
    if rules.is_none() && opts.part_size > 0 {
        return Err(Error::config(format!(
            "a part size applies to S3 stores; {} takes packs whole",
            store.location()
        )));
    }
    // Threads that take finished packs (or parts) from the workers: uploaders on a multipart
    // store, one pack writer on a store that takes packs whole.
    let uploads = match rules {
        None => 1,
        Some(_) if opts.upload_jobs == 0 => DEFAULT_UPLOAD_JOBS,
        Some(_) => opts.upload_jobs.clamp(1, 64),
    };
    // Workers never wait for the store (the writer or the uploaders do): one per core, by
    // default. Measured on 2 cores, local store: a third worker gave nothing (medians of 4
    // paired runs 2.56 s and 2.61 s).
    let plan_for = |budget| {
        plan_parts(
            budget,
            chunk_size,
            opts.workers,
            uploads,
            rules.map(|r| r.min_part),
            opts.part_size,
        )
    };
    let (budget, mut plan) = match opts.memory_budget {
        // A budget picked for the user must fit the store's chunk size (up to 16 MiB).
        0 => {
            let budget = default_memory_budget().max(min_memory_budget(
                chunk_size,
                opts.workers,
                uploads,
                rules.map(|r| r.min_part),
                opts.part_size,
            ));
            (budget, plan_for(budget)?)
        }
        b => (b, plan_for(b)?),
    };
    let pack_mode = match rules {
        None => PackMode::Whole,
        Some(r) => PackMode::Multipart {
            max_parts: r.max_parts.max(2),
        },
    };
    let info = source.info().clone();
    let (disk_name, identity) =
        disk::resolve_name(store, source, opts.disk_name.as_deref(), opts.same_disk)?;
    // Held from before the index is read until the manifest is written: a garbage collection
    // deletes nothing while it is live, and no other run replicates this disk meanwhile.
    let lock = disk_lock(store, &disk_name, opts, observer)?;
    // A run of another source may have taken the name between the look and the lock.
    disk::resolve_name(store, source, Some(&disk_name), opts.same_disk)?;
    let index = store.load_index()?;
    if let Some(e) = index.damaged.first() {
        // An index object that fails authentication was altered or damaged: going on would
        // store its chunks again and hide it (or, under a swapped config, write in clear).
        let mut err = Error::new(
            e.kind(),
            format!(
                "{e}; {} index object(s) of the store cannot be read: stopping (`blockferry \
                 verify --repair` rebuilds them from the packs)",
                index.damaged.len()
            ),
        );
        if let Some(o) = e.object() {
            err = err.with_object(o);
        }
        return Err(err);
    }
    let reporter = Reporter::start(observer, Phase::Replicating, info.virtual_size);
    if info.virtual_size == 0 {
        reporter.warn(format!(
            "{} is empty (a disk of 0 bytes): the snapshot holds nothing",
            source
                .opened_path()
                .unwrap_or(std::path::Path::new(""))
                .display()
        ));
    }
    let n_chunks = info.virtual_size.div_ceil(chunk_size as u64);
    let n_positions = usize::try_from(n_chunks)
        .map_err(|_| Error::new(ErrorKind::InvalidImage, "disk too large"))?;
    let source_path = source.opened_path().unwrap_or(std::path::Path::new(""));
    let delta = match &opts.delta {
        Some(d) => Some(delta::plan(
            store,
            source,
            &disk_name,
            d,
            opts.io_engine.backend().as_mut(),
            &reporter,
        )?),
        None => None,
    };
    let (mut ck, done, durable, resumed) = match &opts.job_state {
        Some(dir) => {
            let plan_key = delta
                .as_ref()
                .map_or_else(String::new, delta::DeltaPlan::key);
            let o = open_job(store, source, opts, &plan_key, dir, &index, &reporter)?;
            (Some(o.ck), o.done, o.durable, o.resumed)
        }
        None => (None, Vec::new(), HashSet::new(), false),
    };
    // Pack ids reserved in the job database before a worker can use them (one more each
    // time a worker takes one), so that a resumed run can find every pack this run put.
    // Never full: a worker takes an id before the collector hears of its pack.
    let (id_tx, id_rx) = bounded::<PackId>(plan.workers + 2);
    if let Some(ck) = &ck {
        for _ in 0..plan.workers + 2 {
            ck.reserve_pack_id(&id_tx)?;
        }
    }
    // A resumed delta's recorded positions are the ones it reads; any other (not expected)
    // is left to the delta's base, so that no position is placed twice.
    let done: Vec<(u64, Id)> = match &delta {
        None => done,
        Some(d) => done
            .into_iter()
            .filter(|(idx, _)| {
                let page = usize::try_from(idx / PAGE_ENTRIES as u64).unwrap_or(usize::MAX);
                !d.reuse_page.get(page).copied().unwrap_or(false)
                    && d.unchanged.binary_search_by_key(idx, |(i, _)| *i).is_err()
            })
            .collect(),
    };
    let mut skip = vec![0u64; n_positions.div_ceil(64)];
    let mut skip_position = |idx: u64| {
        skip[usize::try_from(idx / 64).expect("position fits")] |= 1 << (idx % 64);
    };
    for (idx, _) in &done {
        skip_position(*idx);
    }
    if let Some(d) = &delta {
        for (p, _) in d.reuse_page.iter().enumerate().filter(|(_, r)| **r) {
            let first = p as u64 * PAGE_ENTRIES as u64;
            for idx in first..(first + PAGE_ENTRIES as u64).min(n_chunks) {
                skip_position(idx);
            }
        }
        for (idx, _) in &d.unchanged {
            skip_position(*idx);
        }
    }
    let io_depth = match opts.io_depth {
        0 if opts.direct_io => DEFAULT_DIRECT_IO_DEPTH,
        0 => DEFAULT_IO_DEPTH,
        n => n.min(1024),
    };
    let engine = opts.io_engine.start(io_depth, &|m| reporter.warn(m))?;
    let _ = reporter.counters().io_engine.set(engine.name());
    if !matches!(engine, Engine::Pread) {
        // Chunks in flight on the ring, on top of those waiting for the workers, as far as
        // the budget allows.
        let room = budget.saturating_sub(plan.total) / chunk_size;
        let extra = io_depth.min(room);
        plan.read_bufs += extra;
        plan.total += extra * chunk_size;
    }
    let sh = Shared {
        store,
        source,
        dedup: Dedup {
            index: &index,
            // Chunks the job's earlier runs made durable count as stored.
            earlier: durable,
            claimed: Mutex::new(HashSet::new()),
        },
        counters: reporter.counters(),
        chunk_size: chunk_size as u64,
        n_chunks,
        plan,
        pack_mode,
        pack_bufs: BufferPool::new(plan.workers + uploads, plan.pack_capacity),
        compression: opts.compression,
        skip,
        bwlimit: opts.bwlimit.map(packer::RateLimit::new),
        pack_ids: ck.as_ref().map(|_| id_rx.clone()),
        stop: CancelToken::new(),
        cancel: &opts.cancel,
    };
    let n_pages = usize::try_from(sh.n_chunks.div_ceil(PAGE_ENTRIES as u64))
        .map_err(|_| Error::new(ErrorKind::InvalidImage, "disk too large"))?;
    tracing::info!(
        workers = plan.workers,
        uploads,
        read_bufs = plan.read_bufs,
        pack_target = plan.pack_target,
        planned = plan.total,
        "memory plan"
    );

    let pool = BufferPool::new(plan.read_bufs, chunk_size);
    let engine_name = engine.name();
    let (work_tx, work_rx) = bounded::<Work>(plan.read_bufs);
    let (msg_tx, msg_rx) = bounded::<Msg>(4 * plan.read_bufs + 4 * plan.workers + 4 * uploads);
    // A rendezvous: a part waits in its worker until an uploader takes it.
    let (part_tx, part_rx) = bounded::<Outgoing>(0);

    let mut stats = SnapshotStats::default();
    let mut pages: Vec<Option<String>> = vec![None; n_pages];
    let mut open_pages: BTreeMap<u64, PageFill> = BTreeMap::new();
    let mut pending_index: Vec<(PackId, Vec<Entry>)> = Vec::new();
    let mut open_uploads: BTreeMap<PackId, String> = BTreeMap::new();
    let mut packs_written = 0u64;
    let mut first_error: Option<Error> = None;
    let mut resumed_bytes = 0u64;

    // Places a position's chunk id in its manifest page; writes the page once full.
    let mut place =
        |idx: u64, id: Id, pages: &mut Vec<Option<String>>, write: bool| -> Result<()> {
            let page = idx / PAGE_ENTRIES as u64;
            let in_page = (n_chunks - page * PAGE_ENTRIES as u64).min(PAGE_ENTRIES as u64);
            let fill = open_pages.entry(page).or_insert_with(|| PageFill {
                ids: vec![ZERO_ID; usize::try_from(in_page).expect("page fits")],
                filled: 0,
            });
            fill.ids[usize::try_from(idx % PAGE_ENTRIES as u64).expect("slot fits")] = id;
            fill.filled += 1;
            if fill.filled == fill.ids.len() {
                let fill = open_pages.remove(&page).expect("page is open");
                if write {
                    let page_id = store.write_page(&fill.ids)?;
                    pages[usize::try_from(page).expect("page fits")] = page_id.map(|id| hex(&id));
                }
            }
            Ok(())
        };
    if let Some(d) = &delta {
        // What the delta takes from its base: whole pages, then single positions.
        let per_page = PAGE_ENTRIES as u64;
        for (p, _) in d.reuse_page.iter().enumerate().filter(|(_, r)| **r) {
            let first = p as u64 * per_page;
            let last = (first + per_page).min(n_chunks);
            let bytes = (last * sh.chunk_size).min(info.virtual_size) - first * sh.chunk_size;
            stats.bytes_unchanged += bytes;
            Counters::add(&sh.counters.bytes_done, bytes);
            Counters::add(&sh.counters.bytes_skipped, bytes);
            pages[p].clone_from(&d.base.pages[p]);
        }
        for (idx, id) in &d.unchanged {
            let len = sh.chunk_len(*idx);
            stats.bytes_unchanged += len;
            Counters::add(&sh.counters.bytes_done, len);
            Counters::add(&sh.counters.bytes_skipped, len);
            place(*idx, *id, &mut pages, true)?;
        }
    }
    // A position an earlier run of the job made durable counts as it did then: zero, new (a
    // chunk in one of the job's own packs), or deduplicated.
    let own = &sh.dedup.earlier;
    for (idx, id) in &done {
        let len = sh.chunk_len(*idx);
        resumed_bytes += len;
        if *id == ZERO_ID {
            stats.bytes_zero += len;
        } else if own.contains(id) {
            stats.bytes_new += len;
        } else {
            stats.bytes_deduplicated += len;
        }
        Counters::add(&sh.counters.bytes_done, len);
        Counters::add(&sh.counters.bytes_skipped, len);
        place(*idx, *id, &mut pages, true)?;
    }
    drop(done);

    let joined = thread::scope(|s| {
        let sh = &sh;
        let mut handles = Vec::new();
        {
            let (work_tx, msg_tx, pool) = (work_tx, msg_tx.clone(), &pool);
            let backend = opts.io_engine.backend();
            let direct = opts.direct_io;
            handles.push(s.spawn(move || match engine {
                #[cfg(target_os = "linux")]
                Engine::Uring(ring) => ring_reader(sh, *ring, direct, pool, &work_tx, &msg_tx),
                Engine::Pread => reader(sh, backend, pool, &work_tx, &msg_tx),
            }));
        }
        for _ in 0..plan.workers {
            let (work_rx, part_tx, msg_tx) = (work_rx.clone(), part_tx.clone(), msg_tx.clone());
            handles.push(s.spawn(move || worker(sh, &work_rx, &part_tx, &msg_tx)));
        }
        for _ in 0..uploads {
            let (part_rx, msg_tx) = (part_rx.clone(), msg_tx.clone());
            handles.push(s.spawn(move || packer::uploader(sh, &part_rx, &msg_tx)));
        }
        drop((work_rx, part_tx, part_rx, msg_tx));

        let mut watchdog = Watchdog::new();
        loop {
            let msg = match msg_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => msg,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    watchdog.check(sh.counters, &reporter);
                    reporter.tick();
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let step = (|| -> Result<()> {
                match msg {
                    Msg::Chunk { idx, id, len, kind } => {
                        match kind {
                            ChunkKind::Zero => stats.bytes_zero += len,
                            ChunkKind::Duplicate => stats.bytes_deduplicated += len,
                            ChunkKind::Resumed => stats.bytes_new += len,
                            ChunkKind::New => {
                                stats.bytes_new += len;
                                stats.chunks_stored += 1;
                            }
                        }
                        Counters::add(&sh.counters.bytes_done, len);
                        Counters::add(&sh.counters.bytes_zero, if id == ZERO_ID { len } else { 0 });
                        if matches!(kind, ChunkKind::Duplicate) {
                            Counters::add(&sh.counters.bytes_deduplicated, len);
                        }
                        if let Some(ck) = ck.as_mut() {
                            ck.positions.push((idx, id));
                            if ck.positions.len() >= POSITION_BATCH {
                                ck.flush_positions()?;
                            }
                        }
                        place(idx, id, &mut pages, first_error.is_none())?;
                    }
                    Msg::Holes { first, count } => {
                        let end = ((first + count) * sh.chunk_size).min(info.virtual_size);
                        let bytes = end - first * sh.chunk_size;
                        stats.bytes_zero += bytes;
                        Counters::add(&sh.counters.bytes_done, bytes);
                        Counters::add(&sh.counters.bytes_zero, bytes);
                        // Not recorded as positions: a resumed run maps them again, which
                        // reads nothing.
                        for idx in first..first + count {
                            place(idx, ZERO_ID, &mut pages, first_error.is_none())?;
                        }
                    }
                    Msg::PackStarted { id, upload_id } => {
                        if let Some(upload_id) = &upload_id {
                            open_uploads.insert(id, upload_id.clone());
                        }
                        if let Some(ck) = &ck {
                            if let Some(upload_id) = &upload_id {
                                ck.db.open_pack(&ck.job, &id, upload_id)?;
                            }
                            ck.reserve_pack_id(&id_tx)?;
                        }
                    }
                    Msg::PartAcked {
                        pack,
                        part,
                        chunks,
                        last,
                    } => {
                        stats.bytes_stored += part.size;
                        if let Some(ck) = ck.as_mut() {
                            // The positions of the part's chunks came before it.
                            ck.flush_positions()?;
                            ck.db.record_part(&ck.job, &pack, &part, &chunks, last)?;
                        }
                    }
                    Msg::PackDone {
                        id,
                        entries,
                        bytes,
                        whole,
                    } => {
                        packs_written += 1;
                        open_uploads.remove(&id);
                        if whole {
                            stats.bytes_stored += bytes;
                        }
                        // Queued for the index first: whatever fails next, a durable pack
                        // is indexed at the end of the run.
                        pending_index.push((id, entries));
                        if let Some(ck) = ck.as_mut() {
                            ck.flush_positions()?;
                            let (id, entries) = pending_index.last().expect("just pushed");
                            ck.db
                                .complete_pack(&ck.job, id, entries, whole.then_some(bytes))?;
                        }
                        if pending_index.len() >= INDEX_FLUSH_PACKS {
                            write_index(store, ck.as_ref(), &pending_index)?;
                            pending_index.clear();
                        }
                    }
                    Msg::Failed(e) => return Err(e),
                }
                Ok(())
            })();
            if let Err(e) = step {
                sh.stop.cancel();
                first_error.get_or_insert(e);
            }
            watchdog.check(sh.counters, &reporter);
            reporter.tick();
        }
        handles
            .into_iter()
            .map(thread::ScopedJoinHandle::join)
            .collect::<Vec<_>>()
    });
    if joined.iter().any(std::result::Result::is_err) {
        first_error.get_or_insert(Error::internal("a pipeline thread panicked"));
    }
    if let Some(ck) = ck.as_mut()
        && let Err(e) = ck.flush_positions()
    {
        first_error.get_or_insert(e);
    }
    if let Some(ck) = &ck {
        // Reserved ids no worker took are known to be unused.
        for id in id_rx.try_iter() {
            if let Err(e) = ck.db.drop_pack(&ck.job, &id) {
                first_error.get_or_insert(e);
            }
        }
    }
    // Index what is durable even when failing, so that the next run reuses it.
    if let Err(e) = write_index(store, ck.as_ref(), &pending_index) {
        first_error.get_or_insert(e);
    }
    if ck.is_none() {
        // Without a job to resume them, open uploads are only litter.
        for (pack, upload_id) in &open_uploads {
            let _ = store
                .backend()
                .abort_upload(&crate::store::pack_key(pack), upload_id);
        }
    }
    if let Some(e) = first_error {
        if let Some(ck) = &ck {
            let _ = ck.db.set_error(&ck.job, &e.to_string());
        }
        return Err(e);
    }
    if opts.cancel.is_cancelled() {
        return Err(Error::new(
            ErrorKind::Cancelled,
            if ck.is_some() {
                "replication cancelled; no snapshot was written (run it again to resume)"
            } else {
                "replication cancelled; no snapshot was written"
            },
        ));
    }
    if !open_pages.is_empty() {
        return Err(Error::internal(
            "chunk map incomplete at the end of the run",
        ));
    }
    if let Some(ck) = &ck {
        // Packs a previous run completed but did not index.
        let rest = ck.db.complete_packs(&ck.job, true)?;
        write_index(store, Some(ck), &rest)?;
    }
    if source_changed(source) {
        reporter.warn(format!(
            "{} changed while it was being read: the snapshot may not be consistent; \
             replicate from a snapshot or a stopped VM",
            source_path.display()
        ));
    }

    // The replicating phase ends here; committing (a few small writes) follows.
    let p = reporter.finish();
    stats.bytes_read = p.bytes_read;
    let committing = Reporter::start(observer, Phase::Committing, 0);
    // The disk's history now (this run holds the disk): this snapshot comes next.
    let history = store.disk_history(&disk_name)?;
    let previous = store.newest(&history)?.map(|s| s.id);
    let snapshot = Snapshot {
        id: Store::new_snapshot_id()?,
        created_unix_ms: crate::store::now_unix_ms(),
        seq: history.max_seq() + 1,
        previous,
        disk: DiskMeta {
            name: disk_name.clone(),
            source: identity.path.clone(),
            member: identity.member.clone(),
            chain_base: identity.base.clone(),
            format: info.format.to_owned(),
            virtual_size: info.virtual_size,
            logical_sector_size: info.logical_sector_size,
            physical_sector_size: info.physical_sector_size,
            allocated_bytes: info.allocated_bytes,
            fingerprint: source.fingerprint().clone(),
        },
        chunk_size: store.chunk_size(),
        page_entries: u32::try_from(PAGE_ENTRIES).expect("page size fits"),
        parent: delta.as_ref().map(|d| d.base.id.clone()),
        change_id: match &delta {
            Some(d) => d.change_id.clone(),
            // Without a change id given, an image's own identity (a child's delta checks
            // its parent link against it).
            None => opts
                .change_id
                .clone()
                .or_else(|| source.identity().map(|i| i.change_id())),
        },
        changes: delta.as_ref().map(|d| d.record.clone()),
        pages,
        stats: stats.clone(),
        tool: format!("blockferry {}", env!("CARGO_PKG_VERSION")),
    };
    lock.check()?;
    store.write_snapshot(&snapshot)?;
    if let Some(ck) = &ck {
        ck.db.finish(&ck.job, &snapshot.id)?;
        store.forget_job(&ck.job)?;
    }
    committing.finish();
    Ok(ReplicateReport {
        snapshot: snapshot.id,
        disk: disk_name,
        virtual_size: info.virtual_size,
        allocated_bytes: info.allocated_bytes,
        bytes_read: stats.bytes_read,
        bytes_zero: stats.bytes_zero,
        bytes_deduplicated: stats.bytes_deduplicated,
        bytes_new: stats.bytes_new,
        bytes_stored: stats.bytes_stored,
        bytes_copied: sh
            .counters
            .bytes_copied
            .load(std::sync::atomic::Ordering::Relaxed),
        chunks_total: sh.n_chunks,
        chunks_stored: stats.chunks_stored,
        packs_written,
        seconds: reporter.started().elapsed().as_secs_f64(),
        io_engine: engine_name,
        workers: plan.workers,
        uploads,
        memory_budget: budget as u64,
        memory_planned: plan.total as u64,
        bytes_unchanged: stats.bytes_unchanged,
        base: delta.as_ref().map(|d| d.base.id.clone()),
        changes: delta.as_ref().map(|d| d.record.clone()),
        job: ck.as_ref().map(|c| c.job.clone()),
        resumed,
        bytes_resumed: resumed_bytes,
    })
}

/// Writes an index object for complete packs and records them as indexed.
fn write_index(
    store: &Store,
    ck: Option<&Checkpoint>,
    packs: &[(PackId, Vec<Entry>)],
) -> Result<()> {
    store.write_index(packs)?;
    if let Some(ck) = ck {
        let ids: Vec<PackId> = packs.iter().map(|(id, _)| *id).collect();
        ck.db.set_indexed(&ck.job, &ids)?;
    }
    Ok(())
}

/// Whether the file the source was opened from changed size or modification time since
/// (its fingerprint is that file's, a VMDK's descriptor rather than its first extent).
fn source_changed(source: &dyn BlockSource) -> bool {
    use std::os::unix::fs::MetadataExt;
    let fp = source.fingerprint();
    source.opened_path().is_some_and(|path| {
        std::fs::metadata(path).is_ok_and(|m| {
            m.is_file()
                && (m.len() != fp.size
                    || m.mtime()
                        .saturating_mul(1_000_000_000)
                        .saturating_add(m.mtime_nsec())
                        != fp.modified_unix_ns)
        })
    })
}

#[cfg(test)]
mod tests;
