//! Replicate: a disk into the store as a new snapshot, in stages that run at once.
//!
//! ```text
//!  read (1 thread) ──Work(buf)──▶ work (N threads) ──Outgoing──▶ packer (uploads)
//!   map chunk, read into          zero? hash, dedup,             put packs, or parts
//!   a pooled buffer               lz4 + seal into the            of multipart uploads
//!        │                        worker's own pack                   │
//!        └────────────Msg─────────────────┴──────────Msg──────────────┘
//!                                         ▼
//!                    collect (calling thread): manifest pages, index objects,
//!                    job checkpoints; then the snapshot manifest (the commit point)
//! ```
//!
//! Every queue is bounded and every buffer is pooled or preallocated once, so peak memory is
//! [`plan`]'s figure whatever the disk size, plus the store's chunk index and a few pages.

mod collect;
mod packer;
pub(crate) mod plan;
mod read;
mod work;

use std::collections::HashSet;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use crossbeam_channel::bounded;
use serde::Serialize;

use super::delta::{self, DeltaOptions, DeltaPlan};
use super::disk;
use crate::error::Result;
use crate::image::BlockSource;
use crate::io::IoEngine;
use crate::io::buf::BufferPool;
use crate::job::resume::{self, Checkpoint, JobRequest};
use crate::job::{CancelToken, Observer, Phase, Reporter};
use crate::store::format::{Id, PAGE_ENTRIES};
use crate::store::lock::{StoreLock, disk_lock};
use crate::store::{ChunkIndex, DiskMeta, Snapshot, SourceIdentity, Store};
use collect::{Collector, Msg};
use packer::Outgoing;
use plan::Setup;
use read::Positions;
use work::{Dedup, Shared, Work};

pub(crate) use plan::worker_count;
pub use plan::{
    DEFAULT_DIRECT_IO_DEPTH, DEFAULT_IO_DEPTH, DEFAULT_MEMORY_BUDGET, default_memory_budget,
};

/// Options of [`replicate`].
// Switches of a call, not a state machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Peak memory the pipeline may use for data in flight, in bytes; 0 picks
    /// [`default_memory_budget`](plan::default_memory_budget).
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
    /// before failing with [`ErrorKind::Busy`](crate::ErrorKind::Busy).
    pub wait: Duration,
    /// Warn when the store has acknowledged nothing for this long while parts are in
    /// flight (the run goes on: the requests are retried).
    pub stall_warning: Duration,
    /// Read engine for the source's bulk reads.
    pub io_engine: IoEngine,
    /// Chunks in flight with `io_uring` (bounded by the memory budget's read buffers); 0
    /// picks [`DEFAULT_IO_DEPTH`](plan::DEFAULT_IO_DEPTH), or
    /// [`DEFAULT_DIRECT_IO_DEPTH`](plan::DEFAULT_DIRECT_IO_DEPTH) with `direct_io`.
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
    /// What the audit log calls the run: `replicate` (`delta` when it is one), or the
    /// caller's operation (`sync-cycle`, `cutover-delta`).
    pub audit_op: &'static str,
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
            stall_warning: Duration::from_secs(30),
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
            audit_op: "replicate",
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

/// Replicates a whole disk into the store as a new snapshot; the blocking entry point.
pub fn replicate(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<ReplicateReport> {
    let started = std::time::Instant::now();
    let result = replicate_run(store, source, opts, observer);
    let mut ev =
        crate::store::audit::AuditEvent::of_report("replicate", started, &result, "bytes_stored");
    ev.op = match (opts.audit_op, opts.delta.is_some()) {
        ("replicate", true) => "delta",
        (op, _) => op,
    };
    if ev.disk.is_none() {
        ev.disk = opts
            .disk_name
            .clone()
            .or_else(|| source.opened_path().map(|p| p.display().to_string()));
    }
    store.audited(&ev, result)
}

fn replicate_run(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<ReplicateReport> {
    let setup = Setup::new(store, opts)?;
    let info = source.info().clone();
    let (disk_name, identity, lock) = claim_disk(store, source, opts, observer)?;
    let index = store.load_index()?;
    index.refuse_damage()?;
    let reporter = Reporter::start(observer, Phase::Replicating, info.virtual_size);
    if info.virtual_size == 0 {
        reporter.warn(format!(
            "{} is empty (a disk of 0 bytes): the snapshot holds nothing",
            source_path(source).display()
        ));
    }
    let delta = opts
        .delta
        .as_ref()
        .map(|d| {
            let mut backend = opts.io_engine.backend();
            delta::plan(store, source, &disk_name, d, backend.as_mut(), &reporter)
        })
        .transpose()?;
    let resume = open_job(
        store,
        source,
        opts,
        (&disk_name, delta.as_ref()),
        &index,
        &reporter,
    )?;
    let engine = opts
        .io_engine
        .start(setup.io_depth, &|m| reporter.warn(m))?;
    let engine_name = engine.name();
    let _ = reporter.counters().io_engine.set(engine_name);
    let plan = setup.plan(&engine)?;
    let done = resumed_positions(resume.done, delta.as_ref());
    let mut collector = Collector::new(
        store,
        reporter.counters(),
        info.virtual_size,
        resume.ck,
        plan.workers,
    )?;
    let sh = Shared {
        store,
        source,
        dedup: Dedup {
            index: &index,
            // Chunks the job's earlier runs made durable count as stored.
            earlier: resume.durable,
            claimed: Mutex::new(HashSet::new()),
        },
        counters: reporter.counters(),
        chunk_size: u64::from(store.chunk_size()),
        n_chunks: info.virtual_size.div_ceil(u64::from(store.chunk_size())),
        plan,
        pack_mode: setup.pack_mode,
        pack_bufs: BufferPool::new(plan.workers + setup.uploads, plan.pack_capacity),
        compression: opts.compression,
        skip: not_read(info.virtual_size, store.chunk_size(), &done, delta.as_ref()),
        bwlimit: opts.bwlimit.map(packer::RateLimit::new),
        pack_ids: collector.pack_ids(),
        job: collector.ck.as_ref().map(|c| c.job.clone()),
        stop: CancelToken::new(),
        cancel: &opts.cancel,
    };
    if let Some(d) = &delta {
        collector.take_base(d)?;
    }
    collector.take_resumed(&done, &sh.dedup.earlier)?;
    drop(done);
    let panicked = run_stages(&sh, &setup, engine, opts, &mut collector, &reporter);
    collector.wind_up(panicked, &opts.cancel)?;
    if source_changed(source) {
        reporter.warn(format!(
            "{} changed while it was being read: the snapshot may not be consistent; \
             replicate from a snapshot or a stopped VM",
            source_path(source).display()
        ));
    }
    // The replicating phase ends here; committing (a few small writes) follows.
    collector.stats.bytes_read = reporter.finish().bytes_read;
    let committing = Reporter::start(observer, Phase::Committing, 0);
    let snapshot = commit(
        store,
        source,
        opts,
        (disk_name.as_str(), &identity),
        delta.as_ref(),
        &collector,
        &lock,
    )?;
    committing.finish();
    let stats = &collector.stats;
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
        packs_written: collector.packs_written,
        seconds: reporter.started().elapsed().as_secs_f64(),
        io_engine: engine_name,
        workers: plan.workers,
        uploads: setup.uploads,
        memory_budget: setup.budget as u64,
        memory_planned: plan.total as u64,
        bytes_unchanged: stats.bytes_unchanged,
        base: delta.as_ref().map(|d| d.base.id.clone()),
        changes: delta.as_ref().map(|d| d.record.clone()),
        job: collector.ck.as_ref().map(|c| c.job.clone()),
        resumed: resume.resumed,
        bytes_resumed: collector.resumed_bytes,
    })
}

/// The disk's name in the store and the source's identity, with the run's lock on the disk:
/// held from before the index is read until the manifest is written, so that a garbage
/// collection deletes nothing meanwhile and no other run replicates this disk.
fn claim_disk(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    observer: &dyn Observer,
) -> Result<(String, SourceIdentity, StoreLock)> {
    let (name, identity) =
        disk::resolve_name(store, source, opts.disk_name.as_deref(), opts.same_disk)?;
    let lock = disk_lock(store, &name, opts.wait, &opts.cancel, observer)?;
    // A run of another source may have taken the name between the look and the lock.
    disk::resolve_name(store, source, Some(&name), opts.same_disk)?;
    Ok((name, identity, lock))
}

/// What a run takes over from the earlier runs of its job (nothing without a job).
#[derive(Default)]
struct Resume {
    ck: Option<Checkpoint>,
    /// Positions already durable, with their chunk ids.
    done: Vec<(u64, Id)>,
    /// Chunk ids in the job's complete packs.
    durable: HashSet<Id>,
    resumed: bool,
}

/// Opens the run's job, when it has a job database (see [`crate::job::resume`]).
fn open_job(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    (disk_name, delta): (&str, Option<&DeltaPlan>),
    index: &ChunkIndex,
    reporter: &Reporter<'_>,
) -> Result<Resume> {
    let Some(dir) = &opts.job_state else {
        return Ok(Resume::default());
    };
    let plan_key = delta.map_or_else(String::new, DeltaPlan::key);
    let req = JobRequest {
        dir,
        disk_selector: &opts.disk_selector,
        disk_name,
        plan_key: &plan_key,
        restart: opts.restart,
        restart_if_changed: opts.restart_if_changed,
    };
    let o = resume::open_job(store, source, &req, index, reporter)?;
    Ok(Resume {
        ck: Some(o.ck),
        done: o.done,
        durable: o.durable,
        resumed: o.resumed,
    })
}

/// Runs the read, work and upload stages on their threads and the collector on this one,
/// until all have ended. Whether a thread panicked.
fn run_stages(
    sh: &Shared<'_>,
    setup: &Setup,
    engine: crate::io::Engine,
    opts: &ReplicateOptions,
    collector: &mut Collector<'_>,
    reporter: &Reporter<'_>,
) -> bool {
    let plan = sh.plan;
    tracing::info!(
        workers = plan.workers,
        uploads = setup.uploads,
        read_bufs = plan.read_bufs,
        pack_target = plan.pack_target,
        planned = plan.total,
        "memory plan"
    );
    let pool = BufferPool::new(plan.read_bufs, setup.chunk_size);
    let (work_tx, work_rx) = bounded::<Work>(plan.read_bufs);
    let (msg_tx, msg_rx) =
        bounded::<Msg>(4 * plan.read_bufs + 4 * plan.workers + 4 * setup.uploads);
    // A rendezvous: a part waits in its worker until an uploader takes it.
    let (part_tx, part_rx) = bounded::<Outgoing>(0);
    let joined = thread::scope(|s| {
        let mut handles = Vec::new();
        {
            let (msg_tx, pool) = (msg_tx.clone(), &pool);
            let backend = opts.io_engine.backend();
            let direct = opts.direct_io;
            handles.push(s.spawn(move || {
                read::run(sh, engine, backend, direct, pool, &work_tx, &msg_tx);
            }));
        }
        for _ in 0..plan.workers {
            let (work_rx, part_tx, msg_tx) = (work_rx.clone(), part_tx.clone(), msg_tx.clone());
            handles.push(s.spawn(move || work::run(sh, &work_rx, &part_tx, &msg_tx)));
        }
        for _ in 0..setup.uploads {
            let (part_rx, msg_tx) = (part_rx.clone(), msg_tx.clone());
            handles.push(s.spawn(move || packer::uploader(sh, &part_rx, &msg_tx)));
        }
        drop((work_rx, part_tx, part_rx, msg_tx));
        collector.run(&msg_rx, &sh.stop, opts.stall_warning, reporter);
        handles
            .into_iter()
            .map(thread::ScopedJoinHandle::join)
            .collect::<Vec<_>>()
    });
    joined.iter().any(std::result::Result::is_err)
}

/// The positions a resumed run takes from its earlier runs: with a delta, only those the
/// delta reads (any other is left to its base, so that no position is placed twice).
fn resumed_positions(done: Vec<(u64, Id)>, delta: Option<&DeltaPlan>) -> Vec<(u64, Id)> {
    let Some(d) = delta else {
        return done;
    };
    done.into_iter()
        .filter(|(idx, _)| {
            let page = usize::try_from(idx / PAGE_ENTRIES as u64).unwrap_or(usize::MAX);
            !d.reuse_page.get(page).copied().unwrap_or(false)
                && d.unchanged.binary_search_by_key(idx, |(i, _)| *i).is_err()
        })
        .collect()
}

/// The positions the run does not read: durable from an earlier run (`done`), or taken from
/// a delta's base.
fn not_read(
    size: u64,
    chunk_size: u32,
    done: &[(u64, Id)],
    delta: Option<&DeltaPlan>,
) -> Positions {
    let n_chunks = size.div_ceil(u64::from(chunk_size));
    let mut skip = Positions::new(n_chunks);
    for (idx, _) in done {
        skip.insert(*idx);
    }
    if let Some(d) = delta {
        let per_page = PAGE_ENTRIES as u64;
        for (p, _) in d.reuse_page.iter().enumerate().filter(|(_, r)| **r) {
            let first = p as u64 * per_page;
            for idx in first..(first + per_page).min(n_chunks) {
                skip.insert(idx);
            }
        }
        for (idx, _) in &d.unchanged {
            skip.insert(*idx);
        }
    }
    skip
}

/// Writes the snapshot manifest (the commit point) once the lock is known to be still held,
/// and closes the job.
fn commit(
    store: &Store,
    source: &dyn BlockSource,
    opts: &ReplicateOptions,
    (disk_name, identity): (&str, &SourceIdentity),
    delta: Option<&DeltaPlan>,
    collector: &Collector<'_>,
    lock: &StoreLock,
) -> Result<Snapshot> {
    let info = source.info();
    // The disk's history now (this run holds the disk): this snapshot comes next.
    let history = store.disk_history(disk_name)?;
    let previous = store.newest(&history)?.map(|s| s.id);
    let snapshot = Snapshot {
        id: Store::new_snapshot_id()?,
        created_unix_ms: crate::store::now_unix_ms(),
        seq: history.max_seq() + 1,
        previous,
        disk: DiskMeta {
            name: disk_name.to_owned(),
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
        parent: delta.map(|d| d.base.id.clone()),
        change_id: match delta {
            Some(d) => d.change_id.clone(),
            // Without a change id given, an image's own identity (a child's delta checks
            // its parent link against it).
            None => opts
                .change_id
                .clone()
                .or_else(|| source.identity().map(|i| i.change_id())),
        },
        changes: delta.map(|d| d.record.clone()),
        pages: collector.pages.clone(),
        stats: collector.stats.clone(),
        tool: format!("blockferry {}", env!("CARGO_PKG_VERSION")),
        job: collector.ck.as_ref().map(|c| c.job.clone()),
    };
    lock.check()?;
    store.write_snapshot(&snapshot)?;
    if let Some(ck) = &collector.ck {
        ck.db.finish(&ck.job, &snapshot.id)?;
        crate::job::journal::forget_job(store.backend().as_ref(), &ck.job)?;
    }
    Ok(snapshot)
}

fn source_path(source: &dyn BlockSource) -> &std::path::Path {
    source.opened_path().unwrap_or(std::path::Path::new(""))
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
