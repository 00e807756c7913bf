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
mod restore;
mod verify;
mod walk;

pub use convert::{ConvertOptions, ConvertReport, convert};
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
use crate::io::{IoEngine, ReadBackend};
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::format::{
    self, ENTRY_BYTES, Entry, Id, PACK_FOOTER, PACK_HEADER, PAGE_ENTRIES, PackId, ZERO_ID, hex,
};
use crate::store::{ChunkIndex, DiskMeta, Snapshot, SnapshotStats, Store, crypto};

/// Default memory budget of a replication.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;
/// Largest pack a replication writes (before its trailer).
const MAX_PACK_BYTES: usize = 32 << 20;
/// Most chunks in one pack (bounds the trailer: 16 Ki × 48 bytes).
const MAX_PACK_ENTRIES: usize = 16 << 10;
/// An index object is written after this many packs (and at the end of a run).
const INDEX_FLUSH_PACKS: usize = 16;

/// Options of [`replicate`].
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Peak memory the pipeline may use for data in flight, in bytes.
    pub memory_budget: usize,
    /// Worker threads for hashing, compression and encryption; 0 means one per core.
    pub workers: usize,
    /// Compress chunks with lz4 (kept raw whenever that does not shrink them).
    pub compression: bool,
    /// Name recorded for the disk; defaults to the source's file name.
    pub disk_name: Option<String>,
    /// Read backend.
    pub io_engine: IoEngine,
    /// Cancels the run; nothing is committed then.
    pub cancel: CancelToken,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            memory_budget: DEFAULT_MEMORY_BUDGET,
            workers: 0,
            compression: true,
            disk_name: None,
            io_engine: IoEngine::default(),
            cancel: CancelToken::new(),
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
    /// The memory budget, and what the pipeline planned to use within it.
    pub memory_budget: u64,
    /// Bytes the pipeline's buffers can reach at most.
    pub memory_planned: u64,
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
    /// Capacity reserved for each worker's pack buffer.
    pub pack_capacity: usize,
    /// The total: `read_bufs × chunk + workers × pack_capacity`.
    pub total: usize,
}

/// Splits a memory budget between read buffers and pack buffers.
pub fn plan(budget: usize, chunk_size: usize, workers: usize) -> Result<MemoryPlan> {
    let workers = worker_count(workers);
    let blob = format::blob_bound(chunk_size);
    let pack_target =
        (budget / (4 * workers)).clamp(2 * chunk_size, MAX_PACK_BYTES.max(2 * chunk_size));
    let pack_capacity = pack_target + blob + MAX_PACK_ENTRIES * ENTRY_BYTES + 64;
    let fixed = workers * pack_capacity;
    let min_read_bufs = workers + 1;
    let want_read_bufs = 2 * workers + 2;
    let read_bufs = budget.saturating_sub(fixed) / chunk_size;
    if read_bufs < min_read_bufs {
        let need = fixed + min_read_bufs * chunk_size;
        return Err(Error::config(format!(
            "memory budget of {} MiB is too small for {} MiB chunks and {workers} workers \
             (needs at least {} MiB)",
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

/// Reads `[offset, offset + buf.len())` of a source into `buf` following `maps` (the
/// source's mappings of exactly that range): data is read, everything else zero-filled, so
/// `buf` may hold anything on entry. Returns bytes read from files.
pub(crate) fn fill_chunk(
    source: &dyn BlockSource,
    backend: &mut dyn ReadBackend,
    maps: &[Mapping],
    offset: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let outside = || Error::internal("mapping outside chunk");
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
            let mut packed = vec![0u8; stored_len as usize];
            backend.read_exact_at(src, &mut packed, file_offset)?;
            let mut grain = vec![0u8; grain_len as usize];
            crate::image::inflate_grain(&packed, &mut grain).map_err(|why| {
                Error::new(ErrorKind::InvalidImage, why)
                    .with_path(src.path())
                    .with_offset(file_offset)
            })?;
            let skip = skip as usize;
            dst.copy_from_slice(grain.get(skip..skip + len).ok_or_else(outside)?);
            read += u64::from(stored_len);
        } else {
            backend.read_exact_at(src, dst, file_offset)?;
            read += m.len;
        }
    }
    Ok(read)
}

/// Whether a range's mappings hold any data to read.
pub(crate) fn has_data(maps: &[Mapping]) -> bool {
    maps.iter().any(|m| m.target.is_data())
}

/// A chunk read from the source, on its way to a worker.
struct Work {
    idx: u64,
    buf: PooledBuf,
}

/// What a chunk turned out to be.
enum ChunkKind {
    Unallocated,
    Zero,
    Duplicate,
    New,
}

enum Msg {
    Chunk {
        idx: u64,
        id: Id,
        len: u64,
        kind: ChunkKind,
    },
    PackDone {
        id: PackId,
        entries: Vec<Entry>,
        bytes: u64,
    },
    Failed(Error),
}

/// Chunks already stored, or claimed by a worker of this run.
struct Dedup<'a> {
    index: &'a ChunkIndex,
    claimed: Mutex<HashSet<Id>>,
}

impl Dedup<'_> {
    /// True if this caller must store the chunk; false if it is stored or being stored.
    fn claim(&self, id: &Id) -> bool {
        !self.index.contains(id) && self.claimed.lock().expect("dedup set lock").insert(*id)
    }
}

/// A worker's pack being filled.
struct OpenPack {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<Entry>,
    sealer: crypto::Sealer,
}

impl OpenPack {
    fn start(store: &Store, buf: &mut Vec<u8>) -> Result<OpenPack> {
        let id: PackId = crypto::random()?;
        let mut b = std::mem::take(buf);
        b.clear();
        b.extend_from_slice(&format::pack_header(&id));
        Ok(OpenPack {
            id,
            buf: b,
            entries: Vec::new(),
            sealer: store.keys().pack_sealer(&id),
        })
    }

    fn blob_bytes(&self) -> usize {
        self.buf.len() - PACK_HEADER
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
    compression: bool,
    /// Set on the first error (or on cancel) so every stage winds down.
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
    for idx in 0..sh.n_chunks {
        if sh.stopping() {
            return;
        }
        let offset = idx * sh.chunk_size;
        let len = sh.chunk_len(idx);
        maps.clear();
        if let Err(e) = sh.source.map(offset, len, &mut maps) {
            sh.fail(msgs, e);
            return;
        }
        if !has_data(&maps) {
            let _ = msgs.send(Msg::Chunk {
                idx,
                id: ZERO_ID,
                len,
                kind: ChunkKind::Unallocated,
            });
            continue;
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
        buf.resize(len_usize, 0);
        match fill_chunk(sh.source, backend.as_mut(), &maps, offset, &mut buf) {
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

fn worker(sh: &Shared<'_>, work: &Receiver<Work>, msgs: &Sender<Msg>) {
    let mut spare = Vec::with_capacity(sh.plan.pack_capacity);
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
            if !sh.dedup.claim(&id) {
                let _ = msgs.send(Msg::Chunk {
                    idx,
                    id,
                    len,
                    kind: ChunkKind::Duplicate,
                });
                continue;
            }
            let p = match &mut pack {
                Some(p) => p,
                None => pack.insert(OpenPack::start(sh.store, &mut spare)?),
            };
            let offset = p.buf.len() as u64;
            format::encode_blob(&p.sealer, &id, &buf, sh.compression, &mut p.buf)?;
            drop(buf); // Back to the pool before the (possibly slow) store write.
            p.entries.push(Entry {
                id,
                offset,
                stored_len: u32::try_from(p.buf.len() as u64 - offset)
                    .map_err(|_| Error::internal("blob too large"))?,
                raw_len: u32::try_from(len).map_err(|_| Error::internal("chunk too large"))?,
            });
            let _ = msgs.send(Msg::Chunk {
                idx,
                id,
                len,
                kind: ChunkKind::New,
            });
            if p.blob_bytes() >= sh.plan.pack_target || p.entries.len() >= MAX_PACK_ENTRIES {
                let full = pack.take().expect("pack is open");
                flush_pack(sh, full, &mut spare, msgs)?;
            }
        }
        // Cancelled or not, a pack of complete chunks is worth keeping for the next run.
        if let Some(p) = pack.take() {
            flush_pack(sh, p, &mut spare, msgs)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        sh.fail(msgs, e);
    }
}

fn flush_pack(
    sh: &Shared<'_>,
    mut p: OpenPack,
    spare: &mut Vec<u8>,
    msgs: &Sender<Msg>,
) -> Result<()> {
    format::finish_pack(&p.sealer, &mut p.buf, &p.entries)?;
    debug_assert!(p.buf.len() <= sh.plan.pack_capacity + PACK_FOOTER);
    sh.store.put_pack(&p.id, &p.buf)?;
    let bytes = p.buf.len() as u64;
    Counters::add(&sh.counters.bytes_written, bytes);
    tracing::debug!(pack = %hex(&p.id), bytes, chunks = p.entries.len(), "pack stored");
    let _ = msgs.send(Msg::PackDone {
        id: p.id,
        entries: p.entries,
        bytes,
    });
    *spare = p.buf;
    Ok(())
}

/// The collector's view of a manifest page being filled.
struct PageFill {
    ids: Vec<Id>,
    filled: usize,
}

/// Replicates a whole disk into the store as a new snapshot; the blocking entry point.
pub fn replicate(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<ReplicateReport> {
    let chunk_size = store.chunk_size() as usize;
    let plan = plan(opts.memory_budget, chunk_size, opts.workers)?;
    let info = source.info().clone();
    let index = store.load_index()?;
    let reporter = Reporter::start(observer, Phase::Replicating, info.virtual_size);
    for e in &index.damaged {
        reporter.warn(format!("{e}; its chunks will be stored again"));
    }
    let sh = Shared {
        store,
        source,
        dedup: Dedup {
            index: &index,
            claimed: Mutex::new(HashSet::new()),
        },
        counters: reporter.counters(),
        chunk_size: chunk_size as u64,
        n_chunks: info.virtual_size.div_ceil(chunk_size as u64),
        plan,
        compression: opts.compression,
        stop: CancelToken::new(),
        cancel: &opts.cancel,
    };
    let n_pages = usize::try_from(sh.n_chunks.div_ceil(PAGE_ENTRIES as u64))
        .map_err(|_| Error::new(ErrorKind::InvalidImage, "disk too large"))?;
    tracing::info!(
        workers = plan.workers,
        read_bufs = plan.read_bufs,
        pack_target = plan.pack_target,
        planned = plan.total,
        "memory plan"
    );

    let pool = BufferPool::new(plan.read_bufs, chunk_size);
    let (work_tx, work_rx) = bounded::<Work>(plan.read_bufs);
    let (msg_tx, msg_rx) = bounded::<Msg>(4 * plan.read_bufs + 4 * plan.workers);

    let mut stats = SnapshotStats::default();
    let mut pages: Vec<Option<String>> = vec![None; n_pages];
    let mut open_pages: BTreeMap<u64, PageFill> = BTreeMap::new();
    let mut pending_index: Vec<(PackId, Vec<Entry>)> = Vec::new();
    let mut packs_written = 0u64;
    let mut first_error: Option<Error> = None;

    let joined = thread::scope(|s| {
        let sh = &sh;
        let mut handles = Vec::new();
        {
            let (work_tx, msg_tx, pool) = (work_tx, msg_tx.clone(), &pool);
            let backend = opts.io_engine.backend();
            handles.push(s.spawn(move || reader(sh, backend, pool, &work_tx, &msg_tx)));
        }
        for _ in 0..plan.workers {
            let (work_rx, msg_tx) = (work_rx.clone(), msg_tx.clone());
            handles.push(s.spawn(move || worker(sh, &work_rx, &msg_tx)));
        }
        drop((work_rx, msg_tx));

        for msg in &msg_rx {
            let step = (|| -> Result<()> {
                match msg {
                    Msg::Chunk { idx, id, len, kind } => {
                        match kind {
                            ChunkKind::Unallocated | ChunkKind::Zero => stats.bytes_zero += len,
                            ChunkKind::Duplicate => stats.bytes_deduplicated += len,
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
                        let page = idx / PAGE_ENTRIES as u64;
                        let in_page =
                            (sh.n_chunks - page * PAGE_ENTRIES as u64).min(PAGE_ENTRIES as u64);
                        let fill = open_pages.entry(page).or_insert_with(|| PageFill {
                            ids: vec![ZERO_ID; usize::try_from(in_page).expect("page fits")],
                            filled: 0,
                        });
                        fill.ids[usize::try_from(idx % PAGE_ENTRIES as u64).expect("slot fits")] =
                            id;
                        fill.filled += 1;
                        if fill.filled == fill.ids.len() {
                            let fill = open_pages.remove(&page).expect("page is open");
                            if first_error.is_none() {
                                let page_id = store.write_page(&fill.ids)?;
                                pages[usize::try_from(page).expect("page fits")] =
                                    page_id.map(|id| hex(&id));
                            }
                        }
                    }
                    Msg::PackDone { id, entries, bytes } => {
                        packs_written += 1;
                        stats.bytes_stored += bytes;
                        pending_index.push((id, entries));
                        if pending_index.len() >= INDEX_FLUSH_PACKS {
                            store.write_index(&pending_index)?;
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
    // Index what is durable even when failing, so that the next run reuses it.
    if let Err(e) = store.write_index(&pending_index) {
        first_error.get_or_insert(e);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if opts.cancel.is_cancelled() {
        return Err(Error::new(
            ErrorKind::Cancelled,
            "replication cancelled; no snapshot was written",
        ));
    }
    if !open_pages.is_empty() {
        return Err(Error::internal(
            "chunk map incomplete at the end of the run",
        ));
    }
    if source_changed(source) {
        reporter.warn(format!(
            "{} changed while it was being read: the snapshot may not be consistent; \
             replicate from a snapshot or a stopped VM",
            source_path(source).display()
        ));
    }

    let _ = Reporter::start(observer, Phase::Committing, 0);
    let mut p = sh.counters.progress(info.virtual_size, reporter.started());
    stats.bytes_read = p.bytes_read;
    let source_path = source_path(source);
    let disk_name = opts.disk_name.clone().unwrap_or_else(|| {
        source_path
            .file_name()
            .map_or_else(|| "disk".to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let snapshot = Snapshot {
        id: Store::new_snapshot_id()?,
        created_unix_ms: crate::store::now_unix_ms(),
        disk: DiskMeta {
            name: disk_name.clone(),
            source: source_path.display().to_string(),
            format: info.format.to_owned(),
            virtual_size: info.virtual_size,
            logical_sector_size: info.logical_sector_size,
            physical_sector_size: info.physical_sector_size,
            allocated_bytes: info.allocated_bytes,
            fingerprint: source.fingerprint().clone(),
        },
        chunk_size: store.chunk_size(),
        page_entries: u32::try_from(PAGE_ENTRIES).expect("page size fits"),
        parent: None,
        change_id: None,
        pages,
        stats: stats.clone(),
        tool: format!("blockferry {}", env!("CARGO_PKG_VERSION")),
    };
    store.write_snapshot(&snapshot)?;
    p = reporter.finish();
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
        chunks_total: sh.n_chunks,
        chunks_stored: stats.chunks_stored,
        packs_written,
        seconds: p.elapsed.as_secs_f64(),
        io_engine: opts.io_engine.name(),
        workers: plan.workers,
        memory_budget: opts.memory_budget as u64,
        memory_planned: plan.total as u64,
    })
}

/// The path of a source's top file.
fn source_path(source: &dyn BlockSource) -> &std::path::Path {
    source
        .file(0)
        .map_or(std::path::Path::new(""), |f| f.path())
}

/// Whether the source file's size or modification time moved since it was opened.
fn source_changed(source: &dyn BlockSource) -> bool {
    use std::os::unix::fs::MetadataExt;
    let fp = source.fingerprint();
    source.file(0).is_some_and(|f| {
        std::fs::metadata(f.path()).is_ok_and(|m| {
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
