//! Garbage collection: deletes the packs, pages and index objects no snapshot needs, and
//! repacks packs that are mostly garbage, safely beside running replications.
//!
//! ```text
//!  gc lock ─ mark (every snapshot's pages and chunks) ─ list index/, packs/, pages/
//!    ─ plan (a home pack for each live chunk; dead packs; packs to repack)
//!    ─ repack (live records re-sealed into new packs)               ← beside other users
//!  exclusive lock (waits for the other users to finish; new ones wait)
//!    ─ mark the snapshots written meanwhile, keep what they need
//!    ─ write the new index ─ delete old index objects, dead packs, dead pages
//! ```
//!
//! Why a running replication cannot lose a chunk (docs/FORMAT.md, "Locks and garbage
//! collection"):
//! nothing is deleted while any other lock is live, and a replication holds its lock from
//! before it reads the index until after its manifest is written. So by the time the gc
//! deletes, every replication that could have deduplicated against a chunk has either written
//! its manifest (which the gc reads again and keeps everything for) or died (its lock is
//! stale, and its next run checks that its packs still exist). Objects the gc did not see in
//! its listing (written after it started) are never touched.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::format::{self, Entry, Id, MAX_PACK_BYTES, PackId, ZERO_ID, hex, unhex};
use crate::store::lock::{LockInfo, StoreLock};
use crate::store::{IdHash, Snapshot, Store, pack_key};

/// Default share of unused bytes left in packs, of the live bytes.
pub(crate) const DEFAULT_MAX_UNUSED: f64 = 0.05;
/// Default wait for the store's other users before giving up.
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(30 * 60);
/// Most entries in one index object the gc writes (48 MiB of entries).
const INDEX_ENTRIES: usize = 1 << 20;
/// Largest span read from a pack in one request while repacking.
const REPACK_READ: u64 = 8 << 20;

/// How a garbage collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Repack the packs with the most unused bytes until at most this share of the live bytes
    /// is left unused (0 repacks every pack with garbage; 1 repacks none).
    pub max_unused: f64,
    /// How long to wait for the store's other users (replications, restores, verifies) to
    /// finish before deleting; new ones wait for the gc meanwhile.
    pub wait: Duration,
    /// Plan only: report what would be deleted and repacked, change nothing.
    pub dry_run: bool,
    /// Stops the collection before it deletes anything.
    pub cancel: CancelToken,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            max_unused: DEFAULT_MAX_UNUSED,
            wait: DEFAULT_WAIT,
            dry_run: false,
            cancel: CancelToken::new(),
        }
    }
}

/// What a garbage collection did (or would do, dry).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Snapshots whose data was kept.
    pub snapshots: usize,
    /// Distinct chunks they reference.
    pub chunks_live: u64,
    /// Referenced chunks found in no pack (damage: run verify).
    pub chunks_missing: u64,
    /// Chunks that snapshots reference whose only copies are recorded as damaged (the gc
    /// goes on; a replication of the disk stores them again).
    pub chunks_damaged: u64,
    /// Packs in the store when the gc started.
    pub packs_before: u64,
    /// Packs deleted because no snapshot needs any of their chunks.
    pub packs_deleted: u64,
    /// Packs whose live chunks were moved into new packs, then deleted.
    pub packs_repacked: u64,
    /// New packs written by the repack.
    pub packs_written: u64,
    /// Packs left alone because their chunk list could not be read.
    pub packs_unreadable: u64,
    /// Pages (manifest pieces) deleted.
    pub pages_deleted: u64,
    /// Index objects replaced by the new index.
    pub index_objects_replaced: u64,
    /// Bytes of packs, pages and index objects when the gc started.
    pub bytes_before: u64,
    /// The same after it (planned, on a dry run).
    pub bytes_after: u64,
    /// Bytes of chunk records moved by the repack.
    pub bytes_repacked: u64,
    /// Bytes no snapshot needs that stay in packs (within `max_unused`).
    pub bytes_unused_left: u64,
    /// Time spent waiting for the store's other users, in milliseconds.
    pub waited_ms: u64,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

/// One pack as the gc knows it.
struct Pack {
    id: PackId,
    size: u64,
    entries: Vec<Entry>,
    /// Bytes of the records whose chunk lives here.
    live_bytes: u64,
    fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    /// No live chunk: delete.
    Delete,
    /// Live chunks move to new packs: delete after.
    Repack,
    /// Written by this gc.
    New,
}

/// What the snapshots reference.
#[derive(Default)]
struct Marks {
    snapshots: HashSet<String>,
    pages: HashSet<Id, IdHash>,
    chunks: HashSet<Id, IdHash>,
}

impl Marks {
    /// Marks a snapshot's pages and chunks; returns the chunks it marked first.
    fn add(&mut self, store: &Store, snap: &Snapshot) -> Result<Vec<Id>> {
        let mut fresh = Vec::new();
        if !self.snapshots.insert(snap.id.clone()) {
            return Ok(fresh);
        }
        for i in 0..snap.pages.len() {
            let Some(page) = snap.page_id(i)? else {
                continue;
            };
            if !self.pages.insert(page) {
                continue;
            }
            for id in store.read_page(&page)? {
                if id != ZERO_ID && self.chunks.insert(id) {
                    fresh.push(id);
                }
            }
        }
        Ok(fresh)
    }
}

/// Reads every snapshot, refusing to go on if one cannot be read (its chunks are unknown)
/// unless a damage record lists it. A manifest deleted between the listing and its read (a
/// prune) is left out, and so is every snapshot recorded as damaged.
fn all_snapshots(store: &Store, damage: &crate::store::Damage) -> Result<Vec<Snapshot>> {
    let (snaps, bad) = store.snapshots()?;
    let recorded = |e: &Error| {
        e.object()
            .and_then(|o| o.rsplit(['/', '-']).next())
            .is_some_and(|id| damage.snapshots.contains(id))
    };
    let snaps = snaps
        .into_iter()
        .filter(|s| !damage.snapshots.contains(&s.id))
        .collect();
    if let Some(e) = bad
        .into_iter()
        .find(|e| e.kind() != ErrorKind::NotFound && !recorded(e))
    {
        return Err(Error::new(
            e.kind(),
            format!(
                "a snapshot manifest cannot be read, so what it references is unknown: \
                 nothing was deleted ({e}); restore it from a copy, forget it, or record it \
                 as damaged (`blockferry verify --repair`) first"
            ),
        ));
    }
    Ok(snaps)
}

/// An object listed with its size.
type Listed = (String, u64);

/// What a gc found: the marks of the snapshots, the packs of the store, and where each live
/// chunk lives.
struct Plan {
    marks: Marks,
    packs: Vec<Pack>,
    /// Live chunk → index of its pack in `packs`.
    home: HashMap<Id, usize, IdHash>,
}

/// Reads the store's packs and chooses each live chunk's home; counts in `report` the live
/// chunks no pack holds (missing, or recorded as damaged).
fn plan(
    store: &Store,
    damage: &crate::store::Damage,
    marks: Marks,
    (index_keys, pack_list): (&[Listed], &[Listed]),
    report: &mut GcReport,
) -> Result<Plan> {
    let mut packs = read_packs(store, index_keys, pack_list, report)?;
    // Damaged copies are no chunk's home (nor listed in the new index).
    let damaged_ids: HashSet<Id> = damage.chunks.iter().map(|(id, _)| *id).collect();
    for p in &mut packs {
        let pack = p.id;
        p.entries.retain(|e| !damage.chunk(&e.id, &pack));
    }
    let home = choose_homes(&mut packs, &marks.chunks);
    // Chunks the snapshots reference that no pack of the store holds: damage. Unless it is
    // recorded (then the snapshots that need them are known to be damaged), a gc changes
    // nothing (a dry run reports it).
    let (recorded_missing, missing): (Vec<&Id>, Vec<&Id>) = marks
        .chunks
        .iter()
        .filter(|id| !home.contains_key(*id))
        .partition(|id| damaged_ids.contains(*id));
    report.chunks_missing = missing.len() as u64;
    report.chunks_damaged = recorded_missing.len() as u64;
    Ok(Plan { marks, packs, home })
}

/// Deletes what no snapshot of `store` references; see the module documentation.
pub fn gc(store: &Store, opts: &GcOptions, observer: &dyn Observer) -> Result<GcReport> {
    let started = std::time::Instant::now();
    let result = gc_run(store, opts, observer);
    if opts.dry_run {
        // It changed nothing and proves nothing: no record.
        return result;
    }
    let mut ev =
        crate::store::audit::AuditEvent::of_report("gc", started, &result, "bytes_repacked");
    if let Ok(r) = &result {
        ev.bytes = Some(r.bytes_before.saturating_sub(r.bytes_after));
    }
    store.audited(&ev, result)
}

fn gc_run(store: &Store, opts: &GcOptions, observer: &dyn Observer) -> Result<GcReport> {
    if !(0.0..=1.0).contains(&opts.max_unused) {
        return Err(Error::config("max_unused is a share from 0 to 1"));
    }
    let backend = store.backend();
    let lock = StoreLock::gc(backend)?;
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };

    // The snapshots first: every object they reference was durable before them, so it is in
    // the listings that follow. Then what the store holds; objects written after the listing
    // are never touched. Index objects before packs: a pack an index lists existed before it.
    let damage = store.damage()?;
    let mut marks = Marks::default();
    for s in all_snapshots(store, &damage)? {
        marks.add(store, &s)?;
    }
    let index_keys = backend.list_sized("index/")?;
    let pack_list = backend.list_sized("packs/")?;
    let page_list = backend.list_sized("pages/")?;
    report.bytes_before = [&index_keys, &pack_list, &page_list]
        .iter()
        .flat_map(|l| l.iter().map(|(_, n)| n))
        .sum();
    report.packs_before = pack_list.len() as u64;

    let mut plan = plan(
        store,
        &damage,
        marks,
        (&index_keys, &pack_list),
        &mut report,
    )?;
    if report.chunks_missing > 0 && !opts.dry_run {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{} chunks that snapshots reference are in no pack of the store: it is \
                 damaged, and the gc changed nothing; run `blockferry verify` on each snapshot \
                 (and `gc --dry-run` for the figures)",
                report.chunks_missing
            ),
        ));
    }
    plan_repack(&mut plan.packs, opts.max_unused);

    let repack_bytes: u64 = plan
        .packs
        .iter()
        .filter(|p| p.fate == Fate::Repack)
        .map(|p| p.live_bytes)
        .sum();
    let reporter = Reporter::start(observer, Phase::Collecting, repack_bytes);
    if !opts.dry_run {
        let prepared = prepare(store, &lock, opts, &mut plan, &index_keys, &reporter)
            .map(|waited| report.waited_ms = waited);
        if let Err(e) = prepared {
            // The packs this gc wrote are in no index: nothing can reference them.
            for p in plan.packs.iter().filter(|p| p.fate == Fate::New) {
                if let Err(d) = backend.delete(&pack_key(&p.id)) {
                    tracing::warn!("could not remove a pack this gc wrote: {d}");
                }
            }
            return Err(e);
        }
    }

    // The plan's (or the result's) figures.
    let deleted_pages: Vec<&String> = page_list
        .iter()
        .filter(|(key, _)| page_of_key(key).is_some_and(|id| !plan.marks.pages.contains(&id)))
        .map(|(key, _)| key)
        .collect();
    let kept_pages: u64 = page_list
        .iter()
        .filter(|(key, _)| page_of_key(key).is_some_and(|id| plan.marks.pages.contains(&id)))
        .map(|(_, n)| n)
        .sum();
    report.pages_deleted = deleted_pages.len() as u64;
    report.index_objects_replaced = index_keys.len() as u64;
    tally(&mut report, &plan, kept_pages, opts.dry_run);
    if report.chunks_missing > 0 {
        reporter.warn(format!(
            "{} chunks that snapshots reference are in no pack of the store: it is damaged; \
             run `blockferry verify` on each snapshot",
            report.chunks_missing
        ));
    }
    if opts.dry_run {
        drop(lock);
        return Ok(report);
    }

    let doomed: Vec<String> = index_keys
        .iter()
        .map(|(key, _)| key.clone())
        .chain(
            plan.packs
                .iter()
                .filter(|p| matches!(p.fate, Fate::Delete | Fate::Repack))
                .map(|p| pack_key(&p.id)),
        )
        .chain(deleted_pages.iter().map(|k| (*k).clone()))
        .chain(crate::job::journal::orphan_records(backend.as_ref())?)
        .collect();
    commit(store, &lock, &plan.packs, &doomed)?;
    let fresh_index = backend.list_sized("index/")?;
    report.bytes_after = plan
        .packs
        .iter()
        .filter(|p| matches!(p.fate, Fate::Keep | Fate::New))
        .map(|p| p.size)
        .sum::<u64>()
        + kept_pages
        + fresh_index.iter().map(|(_, n)| n).sum::<u64>();
    reporter.finish();
    drop(lock);
    Ok(report)
}

/// Repacks, then takes the lock exclusive and keeps what snapshots written meanwhile need.
/// Returns how long it waited for the lock, in milliseconds.
fn prepare(
    store: &Store,
    lock: &StoreLock,
    opts: &GcOptions,
    plan: &mut Plan,
    index_keys: &[(String, u64)],
    reporter: &Reporter<'_>,
) -> Result<u64> {
    repack(
        store,
        &mut plan.packs,
        &mut plan.home,
        &opts.cancel,
        reporter,
    )?;
    if opts.cancel.is_cancelled() {
        return Err(cancelled());
    }
    let started = Instant::now();
    lock.exclusive(opts.wait, &|| opts.cancel.is_cancelled(), &mut |others| {
        let list: Vec<String> = others.iter().map(LockInfo::describe).collect();
        reporter.warn(format!(
            "waiting for {} other users of the store to finish: {}",
            others.len(),
            list.join("; ")
        ));
    })?;
    let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    keep_what_new_snapshots_need(
        store,
        &mut plan.marks,
        &mut plan.packs,
        &mut plan.home,
        index_keys,
    )?;
    if opts.cancel.is_cancelled() {
        return Err(cancelled());
    }
    Ok(waited)
}

/// The report's figures of what `plan` keeps, deletes and writes.
fn tally(report: &mut GcReport, plan: &Plan, kept_pages: u64, dry_run: bool) {
    report.chunks_live = plan.marks.chunks.len() as u64;
    report.snapshots = plan.marks.snapshots.len();
    let mut after = 0u64;
    for p in &plan.packs {
        match p.fate {
            Fate::Delete => report.packs_deleted += 1,
            Fate::Repack => {
                report.packs_repacked += 1;
                report.bytes_repacked += p.live_bytes;
            }
            Fate::New => report.packs_written += 1,
            Fate::Keep => {}
        }
        match p.fate {
            Fate::Keep | Fate::New => {
                after += p.size;
                report.bytes_unused_left += p.size.saturating_sub(p.live_bytes + overhead(p));
            }
            Fate::Repack if dry_run => after += p.live_bytes + overhead(p),
            _ => {}
        }
    }
    let index_entries: u64 = plan
        .packs
        .iter()
        .filter(|p| matches!(p.fate, Fate::Keep | Fate::New))
        .map(|p| p.entries.len() as u64)
        .sum();
    report.bytes_after = after + kept_pages + index_entries * format::ENTRY_BYTES as u64;
}

/// Commits a gc: the new index first (every pack kept or written), then the deletions, so a
/// reader never finds a chunk only in an index that names a deleted pack. Deletions go in
/// batches, each after checking the lock is still ours (one taken for stale by another gc,
/// or lost while deleting, lets others in: stop at once).
fn commit(store: &Store, lock: &StoreLock, packs: &[Pack], doomed: &[String]) -> Result<()> {
    let keep: Vec<&Pack> = packs
        .iter()
        .filter(|p| matches!(p.fate, Fate::Keep | Fate::New))
        .collect();
    let sizes: Vec<usize> = keep.iter().map(|p| p.entries.len()).collect();
    for range in batches(&sizes) {
        let batch: Vec<(PackId, Vec<Entry>)> = keep[range]
            .iter()
            .map(|p| (p.id, p.entries.clone()))
            .collect();
        store.write_index(&batch)?;
    }
    for batch in doomed.chunks(DELETE_BATCH) {
        lock.check()?;
        for key in batch {
            store.backend().delete(key)?;
        }
    }
    Ok(())
}

/// Objects a gc deletes between two checks of its lock.
const DELETE_BATCH: usize = 64;

fn cancelled() -> Error {
    Error::new(
        ErrorKind::Cancelled,
        "garbage collection cancelled before it deleted anything",
    )
}

/// Bytes of a pack that are neither live records nor dead ones: header, trailer, footer.
fn overhead(p: &Pack) -> u64 {
    (format::PACK_HEADER
        + format::PACK_FOOTER
        + format::BLOB_OVERHEAD
        + p.entries.len() * format::ENTRY_BYTES) as u64
}

/// Splits packs (by their entry counts) into index objects of at most [`INDEX_ENTRIES`]
/// entries; a larger pack goes alone.
fn batches(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut n) = (0, 0);
    for (i, len) in sizes.iter().enumerate() {
        if n > 0 && n + len > INDEX_ENTRIES {
            out.push(start..i);
            (start, n) = (i, 0);
        }
        n += len;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

fn pack_of_key(key: &str) -> Option<PackId> {
    unhex::<16>(key.rsplit('/').next()?)
}

fn page_of_key(key: &str) -> Option<Id> {
    unhex::<32>(key.rsplit('/').next()?)
}

/// Every listed pack with its entries: from the index objects, else from its trailer.
fn read_packs(
    store: &Store,
    index_keys: &[(String, u64)],
    pack_list: &[(String, u64)],
    report: &mut GcReport,
) -> Result<Vec<Pack>> {
    let listed: HashMap<PackId, u64> = pack_list
        .iter()
        .filter_map(|(key, size)| Some((pack_of_key(key)?, *size)))
        .collect();
    let mut packs = Vec::with_capacity(listed.len());
    let mut seen = HashSet::new();
    let new_pack = |id, size, entries| Pack {
        id,
        size,
        entries,
        live_bytes: 0,
        fate: Fate::Keep,
    };
    for (key, _) in index_keys {
        match store.read_index_object(key) {
            Ok(list) => {
                for (id, entries) in list {
                    match listed.get(&id) {
                        Some(size) if seen.insert(id) => packs.push(new_pack(id, *size, entries)),
                        Some(_) => {}
                        None => tracing::warn!(
                            object = key,
                            pack = hex(&id),
                            "the index names a pack the store does not hold"
                        ),
                    }
                }
            }
            // Damaged: its packs are read from their trailers below, and the new index
            // replaces it.
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                tracing::warn!("an index object is damaged: {e}");
            }
            // Anything else (access, a newer format version) stops the gc.
            Err(e) => return Err(e),
        }
    }
    for (key, _) in pack_list {
        let Some(id) = pack_of_key(key) else {
            continue;
        };
        if seen.contains(&id) {
            continue;
        }
        match store.read_pack_entries(&id) {
            Ok((entries, size)) => {
                seen.insert(id);
                packs.push(new_pack(id, size, entries));
            }
            // Gone since the listing.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                tracing::warn!("leaving alone a pack whose chunk list cannot be read: {e}");
                report.packs_unreadable += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(packs)
}

/// Gives each live chunk one home pack (the first that holds it) and counts each pack's live
/// bytes. Returns chunk id → index in `packs`.
fn choose_homes(packs: &mut [Pack], live: &HashSet<Id, IdHash>) -> HashMap<Id, usize, IdHash> {
    let mut home = HashMap::with_capacity_and_hasher(live.len(), IdHash::default());
    for (i, p) in packs.iter_mut().enumerate() {
        for e in &p.entries {
            if live.contains(&e.id) && !home.contains_key(&e.id) {
                home.insert(e.id, i);
                p.live_bytes += u64::from(e.stored_len);
            }
        }
    }
    home
}

/// Marks packs with no live chunk for deletion, and the packs with the most unused bytes
/// for repacking until the unused bytes left are at most `max_unused` of the live bytes.
fn plan_repack(packs: &mut [Pack], max_unused: f64) {
    let unused = |p: &Pack| p.size.saturating_sub(p.live_bytes + overhead(p));
    let mut partial = Vec::new();
    let mut live_total = 0u64;
    let mut unused_total = 0u64;
    for (i, p) in packs.iter_mut().enumerate() {
        if p.live_bytes == 0 {
            p.fate = Fate::Delete;
        } else {
            live_total += p.live_bytes;
            unused_total += unused(p);
            partial.push(i);
        }
    }
    partial.sort_by_key(|i| std::cmp::Reverse(unused(&packs[*i])));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let allowed = (live_total as f64 * max_unused) as u64;
    for i in partial {
        if unused_total <= allowed || unused(&packs[i]) == 0 {
            break;
        }
        unused_total -= unused(&packs[i]);
        packs[i].fate = Fate::Repack;
    }
}

/// A new pack being filled by the repack.
struct NewPack {
    id: PackId,
    sealer: crate::store::crypto::Sealer,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

/// Moves live chunk records into new packs of up to [`MAX_PACK_BYTES`].
struct Repacker<'s> {
    store: &'s Store,
    max_raw: usize,
    current: Option<NewPack>,
    written: Vec<Pack>,
    span: Vec<u8>,
}

impl Repacker<'_> {
    /// Writes the pack being filled.
    fn flush(&mut self) -> Result<()> {
        let Some(np) = self.current.take() else {
            return Ok(());
        };
        let mut bytes = np.bytes;
        format::finish_pack(&np.sealer, &mut bytes, &np.entries)?;
        self.store.put_pack(&np.id, &bytes)?;
        let live_bytes = np.entries.iter().map(|e| u64::from(e.stored_len)).sum();
        self.written.push(Pack {
            id: np.id,
            size: bytes.len() as u64,
            entries: np.entries,
            live_bytes,
            fate: Fate::New,
        });
        Ok(())
    }

    /// The pack to append a record of `len` bytes to, starting one if needed.
    fn target(&mut self, len: usize) -> Result<&mut NewPack> {
        let full = self.current.as_ref().is_some_and(|np| {
            np.bytes.len() + len > MAX_PACK_BYTES || np.entries.len() >= format::MAX_PACK_CHUNKS
        });
        if full {
            self.flush()?;
        }
        if self.current.is_none() {
            let id: PackId = crate::store::crypto::random()?;
            let mut bytes = Vec::with_capacity(MAX_PACK_BYTES + (1 << 20));
            bytes.extend_from_slice(&format::pack_header(&id));
            self.current = Some(NewPack {
                id,
                sealer: self.store.keys().pack_sealer(&id),
                bytes,
                entries: Vec::new(),
            });
        }
        Ok(self.current.as_mut().expect("a pack is open"))
    }

    /// Moves the records `live` (sorted by offset) of pack `id`.
    fn move_records(&mut self, id: &PackId, live: &[Entry], reporter: &Reporter<'_>) -> Result<()> {
        let key = pack_key(id);
        let from = self.store.keys().pack_sealer(id);
        let mut at = 0;
        while at < live.len() {
            // One read for a run of records that lie close together.
            let first = live[at].offset;
            let mut end = at;
            let mut span_end = first;
            while end < live.len() {
                let e = &live[end];
                let e_end = e.offset.saturating_add(u64::from(e.stored_len));
                if end > at
                    && (e_end - first > REPACK_READ || e.offset > span_end.saturating_add(64 << 10))
                {
                    break;
                }
                span_end = span_end.max(e_end);
                end += 1;
            }
            let len = span_end - first;
            if len > REPACK_READ + format::blob_bound(self.max_raw) as u64 {
                return Err(Error::corrupt(
                    &key,
                    "the index claims a chunk record larger than any chunk",
                )
                .with_offset(first));
            }
            let mut span = std::mem::take(&mut self.span);
            let len = usize::try_from(len).expect("bounded above");
            self.store
                .backend()
                .get_range(&key, first, len, &mut span)?;
            for e in &live[at..end] {
                let rel = usize::try_from(e.offset - first).expect("inside the span");
                let rec = &mut span[rel..rel + e.stored_len as usize];
                let max_raw = self.max_raw;
                let np = self.target(rec.len())?;
                let offset = np.bytes.len() as u64;
                format::reseal_blob(
                    &from,
                    &np.sealer,
                    &e.id,
                    rec,
                    max_raw,
                    &key,
                    e.offset,
                    &mut np.bytes,
                )?;
                let stored_len = u32::try_from(np.bytes.len() as u64 - offset)
                    .map_err(|_| Error::internal("record longer than u32"))?;
                np.entries.push(Entry {
                    id: e.id,
                    offset,
                    stored_len,
                    raw_len: e.raw_len,
                });
                Counters::add(&reporter.counters().bytes_done, u64::from(e.stored_len));
                reporter.tick();
            }
            self.span = span;
            at = end;
        }
        Ok(())
    }
}

/// Moves the live records of every pack planned for repacking into new packs. A pack with a
/// damaged record is kept as it is (its copies so far are harmless duplicates), so that
/// verify still finds the damage where it is.
fn repack(
    store: &Store,
    packs: &mut Vec<Pack>,
    home: &mut HashMap<Id, usize, IdHash>,
    cancel: &CancelToken,
    reporter: &Reporter<'_>,
) -> Result<()> {
    let mut r = Repacker {
        store,
        max_raw: store.chunk_size() as usize,
        current: None,
        written: Vec::new(),
        span: Vec::new(),
    };
    let moved = move_live_records(&mut r, packs, home, cancel, reporter).and_then(|()| r.flush());
    for p in r.written {
        let i = packs.len();
        for e in &p.entries {
            if home
                .get(&e.id)
                .is_some_and(|h| packs[*h].fate == Fate::Repack)
            {
                home.insert(e.id, i);
            }
        }
        packs.push(p);
    }
    moved
}

fn move_live_records(
    r: &mut Repacker<'_>,
    packs: &mut [Pack],
    home: &HashMap<Id, usize, IdHash>,
    cancel: &CancelToken,
    reporter: &Reporter<'_>,
) -> Result<()> {
    for (pi, pack) in packs.iter_mut().enumerate() {
        if pack.fate != Fate::Repack {
            continue;
        }
        if cancel.is_cancelled() {
            break;
        }
        let mut live: Vec<Entry> = pack
            .entries
            .iter()
            .filter(|e| home.get(&e.id) == Some(&pi))
            .copied()
            .collect();
        live.sort_by_key(|e| e.offset);
        match r.move_records(&pack.id, &live, reporter) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                reporter.warn(format!("a pack is damaged and is kept as it is: {e}"));
                pack.fate = Fate::Keep;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// With the store to itself: marks the snapshots written since the gc started and keeps every
/// pack they need that was planned for deletion; keeps also packs that index objects written
/// meanwhile name.
fn keep_what_new_snapshots_need(
    store: &Store,
    marks: &mut Marks,
    packs: &mut [Pack],
    home: &mut HashMap<Id, usize, IdHash>,
    index_keys: &[(String, u64)],
) -> Result<()> {
    let mut wanted: HashSet<Id, IdHash> = HashSet::default();
    for s in all_snapshots(store, &store.damage()?)? {
        for id in marks.add(store, &s)? {
            if !home.contains_key(&id) {
                wanted.insert(id);
            }
        }
    }
    let old: HashSet<&str> = index_keys.iter().map(|(k, _)| k.as_str()).collect();
    let mut named: HashSet<PackId> = HashSet::new();
    for key in store.backend().list("index/")? {
        if !old.contains(key.as_str()) {
            for (id, _) in store.read_index_object(&key)? {
                named.insert(id);
            }
        }
    }
    for (i, p) in packs.iter_mut().enumerate() {
        if !matches!(p.fate, Fate::Delete | Fate::Repack) {
            continue;
        }
        if named.contains(&p.id) || p.entries.iter().any(|e| wanted.contains(&e.id)) {
            tracing::info!(
                pack = hex(&p.id),
                "kept: a snapshot written meanwhile needs it"
            );
            p.fate = Fate::Keep;
            for e in &p.entries {
                if wanted.remove(&e.id) {
                    home.insert(e.id, i);
                    p.live_bytes += u64::from(e.stored_len);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
