//! Restore: a snapshot back to a sparse file or a block device.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::output::{Output, Run};
use super::verify::Problem;
use crate::error::{Error, ErrorKind, Result};
use crate::io::sys::AlignedBuf;
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::format::{Id, PAGE_ENTRIES, PackId, PlainBuf, ZERO_ID, hex};
use crate::store::{ChunkIndex, ChunkLocation, Store};

/// Options of [`restore`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Replace an existing file, or write onto a block device (destroying what it holds).
    pub force: bool,
    /// Restore every chunk that can be read and list the others (left as zeros) instead of
    /// stopping at the first: the output is kept, and the report says what is missing.
    pub salvage: bool,
    /// Cancels the restore (a file output is then deleted; a device holds a partial disk).
    pub cancel: CancelToken,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// Its disk's name.
    pub disk: String,
    /// Where it was written.
    pub output: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Bytes left as holes (files) or written as zeros (devices): zero chunks, and zero
    /// blocks inside chunks with data. `bytes_written + bytes_zero + bytes_unreadable` is
    /// the virtual size.
    pub bytes_zero: u64,
    /// Bytes of chunks that could not be read (a salvage restore; zeros in the output).
    pub bytes_unreadable: u64,
    /// What could not be read, at which offset (the first 1000; `problems_total` counts all).
    pub unreadable: Vec<Problem>,
    /// Chunks that could not be read.
    pub problems_total: u64,
    /// Whether the output is a block device.
    pub block_device: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl RestoreReport {
    /// Whether every chunk was restored.
    pub fn complete(&self) -> bool {
        self.problems_total == 0
    }
}

/// Restores snapshot `spec` (id, unique prefix, `DISK@latest`, or `latest` when the store
/// holds one disk) to `out`.
pub fn restore(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &RestoreOptions,
    observer: &dyn Observer,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let result = restore_run(store, spec, out, opts, observer);
    let mut ev =
        crate::store::audit::AuditEvent::of_report("restore", started, &result, "bytes_written");
    if ev.snapshot.is_none() {
        ev.snapshot = Some(spec.to_owned());
    }
    ev.object = Some(out.display().to_string());
    store.audited_read(&ev, result)
}

fn restore_run(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &RestoreOptions,
    observer: &dyn Observer,
) -> Result<RestoreReport> {
    let _lock = crate::store::lock::reader_lock(store, "restore", &opts.cancel, observer)?;
    let snapshot = store.snapshot(spec)?;
    write_snapshot(
        store,
        &snapshot,
        out,
        &Raw(snapshot.disk.virtual_size),
        opts,
        observer,
    )
}

/// Where a disk's bytes go in an output file, and what else the file holds: the identity for
/// a raw disk; an image format's blocks and metadata for an export.
pub(crate) trait Layout: Sync {
    /// The output file's size.
    fn file_size(&self) -> u64;
    /// The disk's size as the file's format records it.
    fn disk_size(&self) -> u64;
    /// Calls `f` with the file offset of each piece of the disk's `[virt, virt + len)` that
    /// the file stores, and that piece as a range of `0..len` (pieces the file does not
    /// store, in unallocated blocks, read as zeros and are left out).
    fn place(
        &self,
        virt: u64,
        len: usize,
        f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()>;
    /// Writes the metadata the file holds besides the disk's bytes, with `w(offset, bytes)`.
    fn metadata(&self, w: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()>;
    /// The part of the metadata within the file's `range`, clipped to it (an export written
    /// part by part).
    fn metadata_in(
        &self,
        range: std::ops::Range<u64>,
        w: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.metadata(&mut |at, bytes| clipped(&range, at, bytes, w))
    }
    /// The smallest range of the disk whose pieces [`place`](Layout::place) puts in the
    /// file's `range` (empty if it puts none there). Layouts place the disk in order.
    #[cfg_attr(
        not(feature = "s3"),
        allow(dead_code, reason = "used by exports to S3")
    )]
    fn disk_span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64>;
}

/// Calls `w` with the part of `bytes` at file offset `at` that lies in `range`, if any.
pub(crate) fn clipped(
    range: &std::ops::Range<u64>,
    at: u64,
    bytes: &[u8],
    w: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let start = at.max(range.start);
    let end = (at + bytes.len() as u64).min(range.end);
    if start >= end {
        return Ok(());
    }
    let (from, to) = (
        usize::try_from(start - at).map_err(|_| Error::internal("metadata past memory"))?,
        usize::try_from(end - at).map_err(|_| Error::internal("metadata past memory"))?,
    );
    w(start, &bytes[from..to])
}

/// A raw disk of this many bytes: the file is the disk.
pub(crate) struct Raw(pub(crate) u64);

impl Layout for Raw {
    fn file_size(&self) -> u64 {
        self.0
    }

    fn disk_size(&self) -> u64 {
        self.0
    }

    fn place(
        &self,
        virt: u64,
        len: usize,
        f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        f(virt, 0..len)
    }

    fn metadata(&self, _: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        Ok(())
    }

    fn disk_span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        range.start.min(self.0)..range.end.min(self.0)
    }
}

/// Writes `snapshot` to `out` as `layout` places it (the restore of a raw disk, or an
/// export to an image format), with a restore's guarantees: the output appears under its
/// name only once whole, chunks are read pack range by pack range, salvage as asked.
pub(crate) fn write_snapshot(
    store: &Store,
    snapshot: &crate::store::Snapshot,
    out: &Path,
    layout: &dyn Layout,
    opts: &RestoreOptions,
    observer: &dyn Observer,
) -> Result<RestoreReport> {
    let snapshot = snapshot.clone();
    let index = store.load_index()?;
    let workers = super::worker_count(opts.workers);
    let size = snapshot.disk.virtual_size;
    let output = Output::create(out, layout.file_size(), opts.force)?;
    let device = output.is_device();
    let reporter = Reporter::start(observer, Phase::Restoring, size);
    let zeros = vec![
        0u8;
        if device {
            snapshot.chunk_size as usize
        } else {
            0
        }
    ];
    let counters = reporter.counters().clone();
    let unreadable = Mutex::new((Vec::<Problem>::new(), 0u64, 0u64));
    // One thread writes (see convert: concurrent writers spin in the kernel), from buffers
    // the workers fill: a worker goes on decoding while its chunk is written, and finds
    // the runs to write (not the zero blocks that stay holes) itself.
    let writer = Writer::new(workers);
    let runs_of = |bytes: &[u8], offset: u64| -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        let mut data = 0;
        layout.place(offset, bytes.len(), &mut |at, piece| {
            let from = runs.len();
            data += output.runs(&bytes[piece.clone()], at, &mut runs);
            for (_, r) in &mut runs[from..] {
                *r = r.start + piece.start..r.end + piece.start;
            }
            Ok(())
        })?;
        Counters::add(&counters.bytes_written, data);
        Counters::add(&counters.bytes_zero, bytes.len() as u64 - data);
        Ok(runs)
    };
    // A decoded chunk: its buffer goes to the writer (exchanged for a free one).
    let write = |buf: &mut AlignedBuf, offset: u64| -> Result<()> {
        let runs = runs_of(buf, offset)?;
        if runs.is_empty() {
            return Ok(());
        }
        writer.queue_buffer(buf, runs)
    };
    // Zeros onto a device: copied into a free buffer.
    let write_zeros = |len: usize, offset: u64| -> Result<()> {
        let runs = runs_of(&zeros[..len], offset)?;
        if runs.is_empty() {
            return Ok(());
        }
        writer.queue_copy(&zeros[..len], runs)
    };
    // A chunk that cannot be read: fatal, or (salvage) zeros in its place and a listed
    // problem (a device must not keep what it held there).
    let lost = |e: Error, places: &[Place]| -> Result<()> {
        if !(opts.salvage && salvageable(&e)) {
            return Err(match places.first() {
                Some(&(offset, _)) => e.at_disk_offset(offset),
                None => e,
            });
        }
        for &(offset, len) in places {
            if device {
                write_zeros(len, offset)?;
            }
            let mut u = unreadable.lock().expect("unreadable list");
            u.1 += 1;
            u.2 += len as u64;
            if u.0.len() < MAX_LISTED {
                u.0.push(Problem {
                    offset: Some(offset),
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    };
    let plan = Plan {
        store,
        snapshot: &snapshot,
        index: &index,
        cancel: &opts.cancel,
        reporter: &reporter,
    };
    let result = writer.run(&|bytes, runs| output.write_runs(bytes, runs), || {
        plan.run(workers, device, &|job, bufs| match job {
            Job::Zero { offset, len } => write_zeros(len, offset),
            Job::Range(range) => range.restore(store, bufs, &write, &lost),
            Job::Missing { error, places } => lost(error, &places),
        })
    });
    if let Err(e) = result {
        return Err(if e.kind() == ErrorKind::Cancelled {
            Error::new(
                ErrorKind::Cancelled,
                if device {
                    "restore cancelled; the device holds an incomplete disk"
                } else {
                    "restore cancelled; no output was written"
                },
            )
            .with_path(out)
        } else if device {
            Error::new(
                e.kind(),
                format!(
                    "{}; the device holds an incomplete disk (restore again, or use salvage \
                     to restore what can be read)",
                    e.message()
                ),
            )
            .with_path(out)
            .with_source(e)
        } else {
            e
        });
    }
    layout.metadata(&mut |at, bytes| output.write_at(bytes, at).map(|_| ()))?;
    output.commit()?;
    let p = reporter.finish();
    let (mut listed, problems_total, bytes_unreadable) =
        unreadable.into_inner().expect("unreadable list");
    listed.sort_by_key(|p| p.offset);
    Ok(RestoreReport {
        disk: snapshot.disk.name.clone(),
        snapshot: snapshot.id,
        output: out.display().to_string(),
        virtual_size: size,
        bytes_written: p.bytes_written,
        bytes_zero: p.bytes_zero,
        bytes_unreadable,
        unreadable: listed,
        problems_total,
        block_device: device,
        seconds: p.elapsed.as_secs_f64(),
    })
}

/// Writes runs of a buffer to the output.
type WriteRuns<'a> = dyn Fn(&[u8], &[Run]) -> Result<()> + Sync + 'a;

/// The thread that writes a restore's output, and the buffers queued for it: twice as many
/// as there are workers, so memory stays bounded.
struct Writer {
    queued: crossbeam_channel::Sender<Option<(AlignedBuf, Vec<Run>)>>,
    pending: crossbeam_channel::Receiver<Option<(AlignedBuf, Vec<Run>)>>,
    free: crossbeam_channel::Receiver<AlignedBuf>,
    recycle: crossbeam_channel::Sender<AlignedBuf>,
    failed: AtomicBool,
}

impl Writer {
    fn new(workers: usize) -> Writer {
        let n = 2 * workers.max(1);
        // The queue has room for every buffer and the end mark: sends never wait.
        let (queued, pending) = crossbeam_channel::bounded(n + 1);
        let (recycle, free) = crossbeam_channel::bounded(n);
        for _ in 0..n {
            // Allocated on first use.
            let _ = recycle.send(AlignedBuf::empty());
        }
        Writer {
            queued,
            pending,
            free,
            recycle,
            failed: AtomicBool::new(false),
        }
    }

    /// A free buffer, waited for.
    fn free_buffer(&self) -> Result<AlignedBuf> {
        let buf = self.free.recv().map_err(|_| Self::stopped())?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(Self::stopped());
        }
        Ok(buf)
    }

    fn stopped() -> Error {
        Error::new(ErrorKind::Cancelled, "the output writer stopped")
    }

    /// Queues the `runs` of `buf` to be written: the buffer goes to the writer, and a free
    /// one (waited for) takes its place.
    fn queue_buffer(&self, buf: &mut AlignedBuf, runs: Vec<Run>) -> Result<()> {
        let taken = std::mem::replace(buf, self.free_buffer()?);
        self.queued
            .send(Some((taken, runs)))
            .map_err(|_| Self::stopped())
    }

    /// Queues the `runs` of `bytes` to be written, copied into a free buffer.
    fn queue_copy(&self, bytes: &[u8], runs: Vec<Run>) -> Result<()> {
        let mut buf = self.free_buffer()?;
        PlainBuf::reset(&mut buf, bytes.len()).copy_from_slice(bytes);
        self.queued
            .send(Some((buf, runs)))
            .map_err(|_| Self::stopped())
    }

    /// Runs `work` (which queues writes) while a thread writes what is queued with `write`.
    /// The writer's error comes first (a worker only saw it stop); after one, the writer
    /// still takes what is queued, writing nothing, so that no worker waits for a buffer.
    fn run(&self, write: &WriteRuns<'_>, work: impl FnOnce() -> Result<()>) -> Result<()> {
        std::thread::scope(|s| {
            let written = s.spawn(|| -> Result<()> {
                let mut error = None;
                while let Ok(Some((buf, runs))) = self.pending.recv() {
                    if error.is_none()
                        && let Err(e) = write(&buf, &runs)
                    {
                        error = Some(e);
                        self.failed.store(true, Ordering::SeqCst);
                    }
                    // There is room for every buffer.
                    let _ = self.recycle.try_send(buf);
                }
                error.map_or(Ok(()), Err)
            });
            let worked = work();
            // The queue has room for the end mark.
            let _ = self.queued.send(None);
            let wrote = written
                .join()
                .unwrap_or_else(|_| Err(Error::internal("the output writer panicked")));
            wrote.and(worked)
        })
    }
}

/// Problems listed in a salvage report at most (all are counted).
const MAX_LISTED: usize = 1000;

/// Whether a salvage goes on past an error: damage to the chunk itself, not a failure of the
/// store, the output or the run.
fn salvageable(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound)
}

/// Bytes read in one ranged GET at most: neighbouring chunk records of a pack are read
/// together, so a restore from S3 makes a request per few megabytes, not per chunk.
const MAX_RANGE: u64 = 8 << 20;
/// A gap between two needed records read through rather than split into two requests.
const MAX_GAP: u64 = 256 << 10;

/// Where a chunk goes on the disk: offset and length.
pub(super) type Place = (u64, usize);

/// Writes a decoded chunk at a disk offset. It may take the buffer's bytes, leaving another
/// buffer (of any content) in its place.
pub(super) type Write<'a> = dyn Fn(&mut AlignedBuf, u64) -> Result<()> + Sync + 'a;

/// Deals with a chunk that cannot be read, given its places.
pub(super) type Lost<'a> = dyn Fn(Error, &[Place]) -> Result<()> + Sync + 'a;

/// A worker's buffers: a range as read, and a chunk decoded (aligned, for direct writes).
pub(super) struct Buffers {
    raw: Vec<u8>,
    data: AlignedBuf,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            raw: Vec::new(),
            data: AlignedBuf::empty(),
        }
    }
}

/// One chunk of a range: its id, its record, and its places.
struct Wanted {
    id: Id,
    loc: ChunkLocation,
    places: Vec<Place>,
}

/// What a restore worker does.
pub(super) enum Job {
    /// Zeros onto a device.
    Zero { offset: u64, len: usize },
    /// Records of one pack read with one ranged GET.
    Range(Range),
    /// Chunks that cannot be read: unknown to the index, or its record of them impossible.
    Missing { error: Error, places: Vec<Place> },
}

/// Neighbouring records of one pack, and where each chunk goes on the disk.
pub(super) struct Range {
    pack: PackId,
    start: u64,
    len: u64,
    chunks: Vec<Wanted>,
}

impl Range {
    /// Reads the range and writes each chunk where it goes; a range that cannot be read
    /// whole (a damaged or short pack) is read chunk by chunk, so that the damage is placed.
    pub(super) fn restore(
        &self,
        store: &Store,
        bufs: &mut Buffers,
        write: &Write<'_>,
        lost: &Lost<'_>,
    ) -> Result<()> {
        let Buffers { raw, data } = bufs;
        let key = crate::store::pack_key(&self.pack);
        let whole = usize::try_from(self.len)
            .map_err(|_| Error::internal("range too large"))
            .and_then(|len| store.backend().get_range(&key, self.start, len, raw));
        let whole = match whole {
            Ok(()) => true,
            Err(e) if salvageable(&e) => false,
            Err(e) => return Err(e),
        };
        // For a chunk at several places: the buffer the places before the last are copied
        // into (the write may take it, leaving a free one of the writer's in its place).
        let mut copy: Option<AlignedBuf> = None;
        for Wanted { id, loc, places } in &self.chunks {
            let decoded = (|| {
                store.check_location(&self.pack, loc)?;
                if whole {
                    let at = usize::try_from(loc.offset - self.start)
                        .map_err(|_| Error::internal("record outside its range"))?;
                    let end = at + loc.stored_len as usize;
                    let record = raw
                        .get_mut(at..end)
                        .ok_or_else(|| Error::internal("record outside its range"))?;
                    store.decode_chunk(&self.pack, loc, id, record, data)
                } else {
                    let mut record = Vec::new();
                    store.backend().get_range(
                        &key,
                        loc.offset,
                        loc.stored_len as usize,
                        &mut record,
                    )?;
                    store.decode_chunk(&self.pack, loc, id, &mut record, data)
                }
            })();
            if let Err(e) = decoded {
                lost(e, places)?;
                continue;
            }
            for (i, &(offset, len)) in places.iter().enumerate() {
                if data.len() != len {
                    lost(
                        Error::new(
                            ErrorKind::Corrupt,
                            "a chunk's length disagrees with its position in the snapshot",
                        ),
                        &[(offset, len)],
                    )?;
                    continue;
                }
                if i + 1 < places.len() {
                    let copy = copy.get_or_insert_with(|| AlignedBuf::new(len));
                    PlainBuf::reset(copy, len).copy_from_slice(data);
                    write(copy, offset)?;
                } else {
                    write(data, offset)?;
                }
            }
        }
        Ok(())
    }
}

/// A snapshot's chunk map turned into reads, page by page.
struct Plan<'a> {
    store: &'a Store,
    snapshot: &'a crate::store::Snapshot,
    index: &'a ChunkIndex,
    cancel: &'a CancelToken,
    reporter: &'a Reporter<'a>,
}

impl Plan<'_> {
    /// Plans each page (one at a time, so memory stays bounded) into jobs and has `workers`
    /// threads do them with `f`. Progress moves as jobs are done.
    fn run(
        &self,
        workers: usize,
        device: bool,
        f: &(dyn Fn(Job, &mut Buffers) -> Result<()> + Sync),
    ) -> Result<()> {
        let chunk = u64::from(self.snapshot.chunk_size);
        let size = self.snapshot.disk.virtual_size;
        let counters = self.reporter.counters().clone();
        let stop = CancelToken::new();
        let fatal: Mutex<Option<Error>> = Mutex::new(None);
        let (tx, rx) = crossbeam_channel::bounded::<(Job, u64)>(2 * workers);
        std::thread::scope(|s| {
            for _ in 0..workers.max(1) {
                let rx = rx.clone();
                let (stop, fatal, counters) = (&stop, &fatal, &counters);
                s.spawn(move || {
                    let mut bufs = Buffers::default();
                    for (job, bytes) in rx {
                        if stop.is_cancelled() || self.cancel.is_cancelled() {
                            continue;
                        }
                        if let Err(e) = f(job, &mut bufs) {
                            stop.cancel();
                            fatal.lock().expect("error slot").get_or_insert(e);
                        }
                        Counters::add(&counters.bytes_done, bytes);
                        self.reporter.tick();
                    }
                });
            }
            drop(rx);
            let planned = self.plan_pages(chunk, size, device, &counters, &stop, &tx);
            if let Err(e) = planned {
                stop.cancel();
                fatal.lock().expect("error slot").get_or_insert(e);
            }
            drop(tx);
        });
        if let Some(e) = fatal.into_inner().expect("error slot") {
            return Err(e);
        }
        if self.cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Cancelled, "cancelled"));
        }
        Ok(())
    }

    fn plan_pages(
        &self,
        chunk: u64,
        size: u64,
        device: bool,
        counters: &Counters,
        stop: &CancelToken,
        tx: &crossbeam_channel::Sender<(Job, u64)>,
    ) -> Result<()> {
        let send = |job: Job, bytes: u64| tx.send((job, bytes)).is_ok();
        for page_idx in 0..self.snapshot.pages.len() {
            if stop.is_cancelled() || self.cancel.is_cancelled() {
                return Ok(());
            }
            let first = page_idx as u64 * PAGE_ENTRIES as u64;
            let ids = match self.snapshot.page_id(page_idx)? {
                Some(id) => self
                    .store
                    .read_page(&id)
                    .map_err(|e| e.at_disk_offset(first * chunk))?,
                None => Vec::new(),
            };
            let in_page = (self.snapshot.n_chunks() - first).min(PAGE_ENTRIES as u64);
            if !ids.is_empty() && ids.len() as u64 != in_page {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    "a page's length disagrees with the snapshot's size",
                )
                .with_offset(first * chunk));
            }
            // Each distinct chunk of the page and where it goes.
            let mut wanted: HashMap<Id, Vec<Place>, crate::store::IdHash> = HashMap::default();
            for i in 0..in_page {
                let id = ids
                    .get(usize::try_from(i).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(ZERO_ID);
                let offset = (first + i) * chunk;
                let len = usize::try_from(chunk.min(size - offset)).expect("chunk fits in memory");
                if id != ZERO_ID {
                    wanted.entry(id).or_default().push((offset, len));
                } else if device {
                    if !send(Job::Zero { offset, len }, len as u64) {
                        return Ok(());
                    }
                } else {
                    Counters::add(&counters.bytes_zero, len as u64);
                    Counters::add(&counters.bytes_done, len as u64);
                }
            }
            if !send_reads(self.store, self.index, wanted, &send) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The chunks `wanted` (each distinct chunk and its places on the disk) as reads: by pack, in
/// record order, cut into ranges read with one GET each; chunks the index does not know, or
/// records impossibly, as missing. Sends each job with the disk bytes it covers; false if
/// the workers are gone.
pub(super) fn send_reads(
    store: &Store,
    index: &ChunkIndex,
    wanted: HashMap<Id, Vec<Place>, crate::store::IdHash>,
    send: &dyn Fn(Job, u64) -> bool,
) -> bool {
    let mut by_pack: HashMap<PackId, Vec<Wanted>> = HashMap::new();
    let mut missing = Vec::new();
    for (id, places) in wanted {
        match index.get(&id) {
            Some((pack, loc)) => {
                by_pack
                    .entry(pack)
                    .or_default()
                    .push(Wanted { id, loc, places });
            }
            None => missing.push((id, places)),
        }
    }
    for (id, places) in missing {
        let bytes = places.iter().map(|p| p.1 as u64).sum();
        let error = Error::new(
            ErrorKind::NotFound,
            format!("chunk {} is in no index of the store", hex(&id)),
        );
        if !send(Job::Missing { error, places }, bytes) {
            return false;
        }
    }
    let mut packs: Vec<_> = by_pack.into_iter().collect();
    packs.sort_by_key(|(pack, _)| *pack);
    for (pack, mut chunks) in packs {
        chunks.sort_by_key(|c| c.loc.offset);
        let mut range: Option<Range> = None;
        for c in chunks {
            // Checked before it sizes a read: an index entry must not make one huge.
            if let Err(error) = store.check_location(&pack, &c.loc) {
                let bytes = c.places.iter().map(|p| p.1 as u64).sum();
                let places = c.places;
                if !send(Job::Missing { error, places }, bytes) {
                    return false;
                }
                continue;
            }
            let (start, end) = (
                c.loc.offset,
                c.loc.offset.saturating_add(u64::from(c.loc.stored_len)),
            );
            if let Some(r) = range.as_mut()
                && start <= r.start + r.len + MAX_GAP
                && end - r.start <= MAX_RANGE
            {
                r.len = r.len.max(end - r.start);
                r.chunks.push(c);
                continue;
            }
            if let Some(r) = range.take()
                && !send_range(send, r)
            {
                return false;
            }
            range = Some(Range {
                pack,
                start,
                len: end - start,
                chunks: vec![c],
            });
        }
        if let Some(r) = range
            && !send_range(send, r)
        {
            return false;
        }
    }
    true
}

/// Sends a range with the virtual bytes it covers; false if the workers are gone.
fn send_range(send: &dyn Fn(Job, u64) -> bool, r: Range) -> bool {
    let bytes = r
        .chunks
        .iter()
        .flat_map(|c| c.places.iter().map(|p| p.1 as u64))
        .sum();
    send(Job::Range(r), bytes)
}
