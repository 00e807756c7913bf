//! The collect stage, on the calling thread: it hears of every chunk position and pack,
//! fills the manifest pages, writes index objects, records the job's checkpoints, and at the
//! end writes the snapshot manifest (the commit point, last).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::delta::DeltaPlan;
use super::work::ChunkKind;
use crate::error::{Error, Result};
use crate::job::resume::Checkpoint;
use crate::job::state::POSITION_BATCH;
use crate::job::{CancelToken, Counters, Reporter};
use crate::store::format::{Entry, Id, PAGE_ENTRIES, PackId, ZERO_ID, hex};
use crate::store::{Part, SnapshotStats, Store};

/// An index object is written after this many packs (and at the end of a run).
const INDEX_FLUSH_PACKS: usize = 16;

/// What the other stages tell the collector.
pub(super) enum Msg {
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

/// The collector's view of a manifest page being filled.
struct PageFill {
    ids: Vec<Id>,
    filled: usize,
}

/// The collector: what a run has placed, stored and recorded so far.
pub(super) struct Collector<'a> {
    store: &'a Store,
    counters: &'a Counters,
    chunk_size: u64,
    n_chunks: u64,
    virtual_size: u64,
    /// The job's checkpoints, when the run is a job.
    pub(super) ck: Option<Checkpoint>,
    /// Pack ids reserved for the workers (see [`Checkpoint::reserve_pack_id`]).
    ids: (Sender<PackId>, Receiver<PackId>),
    pub(super) stats: SnapshotStats,
    /// Manifest pages written (or taken from a delta's base), by page.
    pub(super) pages: Vec<Option<String>>,
    open_pages: BTreeMap<u64, PageFill>,
    /// Complete packs not yet in an index object.
    pending_index: Vec<(PackId, Vec<Entry>)>,
    open_uploads: BTreeMap<PackId, String>,
    pub(super) packs_written: u64,
    /// Bytes an earlier run of the job made durable.
    pub(super) resumed_bytes: u64,
    first_error: Option<Error>,
}

impl<'a> Collector<'a> {
    pub(super) fn new(
        store: &'a Store,
        counters: &'a Counters,
        virtual_size: u64,
        ck: Option<Checkpoint>,
        workers: usize,
    ) -> Result<Collector<'a>> {
        // Pack ids reserved in the job database before a worker can use them (one more each
        // time a worker takes one), so that a resumed run can find every pack this run put.
        // Never full: a worker takes an id before the collector hears of its pack.
        let ids = crossbeam_channel::bounded::<PackId>(workers + 2);
        if let Some(ck) = &ck {
            for _ in 0..workers + 2 {
                ck.reserve_pack_id(&ids.0)?;
            }
        }
        let chunk_size = u64::from(store.chunk_size());
        let n_chunks = virtual_size.div_ceil(chunk_size);
        let n_pages = usize::try_from(n_chunks.div_ceil(PAGE_ENTRIES as u64))
            .map_err(|_| Error::new(crate::error::ErrorKind::InvalidImage, "disk too large"))?;
        Ok(Collector {
            store,
            counters,
            chunk_size,
            n_chunks,
            virtual_size,
            ck,
            ids,
            stats: SnapshotStats::default(),
            pages: vec![None; n_pages],
            open_pages: BTreeMap::new(),
            pending_index: Vec::new(),
            open_uploads: BTreeMap::new(),
            packs_written: 0,
            resumed_bytes: 0,
            first_error: None,
        })
    }

    /// The ids reserved for the workers' packs, when the run is a job.
    pub(super) fn pack_ids(&self) -> Option<Receiver<PackId>> {
        self.ck.as_ref().map(|_| self.ids.1.clone())
    }

    fn chunk_len(&self, idx: u64) -> u64 {
        self.chunk_size
            .min(self.virtual_size - idx * self.chunk_size)
    }

    /// Counts `bytes` as done without reading them.
    fn skipped(&self, bytes: u64) {
        Counters::add(&self.counters.bytes_done, bytes);
        Counters::add(&self.counters.bytes_skipped, bytes);
    }

    /// Places a position's chunk id in its manifest page; writes the page once full (unless
    /// the run already failed).
    fn place(&mut self, idx: u64, id: Id) -> Result<()> {
        let per_page = PAGE_ENTRIES as u64;
        let page = idx / per_page;
        let in_page = (self.n_chunks - page * per_page).min(per_page);
        let fill = self.open_pages.entry(page).or_insert_with(|| PageFill {
            ids: vec![ZERO_ID; usize::try_from(in_page).expect("page fits")],
            filled: 0,
        });
        fill.ids[usize::try_from(idx % per_page).expect("slot fits")] = id;
        fill.filled += 1;
        if fill.filled == fill.ids.len() {
            let fill = self.open_pages.remove(&page).expect("page is open");
            if self.first_error.is_none() {
                let page_id = self.store.write_page(&fill.ids)?;
                self.pages[usize::try_from(page).expect("page fits")] = page_id.map(|id| hex(&id));
            }
        }
        Ok(())
    }

    /// Takes what a delta reuses from its base: whole pages, then single positions.
    pub(super) fn take_base(&mut self, d: &DeltaPlan) -> Result<()> {
        let per_page = PAGE_ENTRIES as u64;
        for (p, _) in d.reuse_page.iter().enumerate().filter(|(_, r)| **r) {
            let first = p as u64 * per_page;
            let last = (first + per_page).min(self.n_chunks);
            let bytes = (last * self.chunk_size).min(self.virtual_size) - first * self.chunk_size;
            self.stats.bytes_unchanged += bytes;
            self.skipped(bytes);
            self.pages[p].clone_from(&d.base.pages[p]);
        }
        for (idx, id) in &d.unchanged {
            let len = self.chunk_len(*idx);
            self.stats.bytes_unchanged += len;
            self.skipped(len);
            self.place(*idx, *id)?;
        }
        Ok(())
    }

    /// Takes the positions an earlier run of the job made durable, counted as they were then:
    /// zero, new (a chunk in one of the job's own packs, `own`), or deduplicated.
    pub(super) fn take_resumed(&mut self, done: &[(u64, Id)], own: &HashSet<Id>) -> Result<()> {
        for (idx, id) in done {
            let len = self.chunk_len(*idx);
            self.resumed_bytes += len;
            if *id == ZERO_ID {
                self.stats.bytes_zero += len;
            } else if own.contains(id) {
                self.stats.bytes_new += len;
            } else {
                self.stats.bytes_deduplicated += len;
            }
            self.skipped(len);
            self.place(*idx, *id)?;
        }
        Ok(())
    }

    /// Takes messages until every other stage has hung up. The first error stops the run
    /// (through `stop`); later messages are still taken so that nothing durable is lost.
    pub(super) fn run(
        &mut self,
        msgs: &Receiver<Msg>,
        stop: &CancelToken,
        stall_warning: Duration,
        reporter: &Reporter<'_>,
    ) {
        let mut watchdog = Watchdog::new(stall_warning);
        loop {
            match msgs.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => {
                    if let Err(e) = self.take(msg) {
                        stop.cancel();
                        self.first_error.get_or_insert(e);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            watchdog.check(self.counters, reporter);
            reporter.tick();
        }
    }

    fn take(&mut self, msg: Msg) -> Result<()> {
        match msg {
            Msg::Chunk { idx, id, len, kind } => self.chunk(idx, id, len, &kind),
            Msg::Holes { first, count } => self.holes(first, count),
            Msg::PackStarted { id, upload_id } => self.pack_started(id, upload_id.as_deref()),
            Msg::PartAcked {
                pack,
                part,
                chunks,
                last,
            } => self.part_acked(&pack, &part, &chunks, last),
            Msg::PackDone {
                id,
                entries,
                bytes,
                whole,
            } => self.pack_done(id, entries, bytes, whole),
            Msg::Failed(e) => Err(e),
        }
    }

    fn chunk(&mut self, idx: u64, id: Id, len: u64, kind: &ChunkKind) -> Result<()> {
        match kind {
            ChunkKind::Zero => self.stats.bytes_zero += len,
            ChunkKind::Duplicate => self.stats.bytes_deduplicated += len,
            ChunkKind::Resumed => self.stats.bytes_new += len,
            ChunkKind::New => {
                self.stats.bytes_new += len;
                self.stats.chunks_stored += 1;
            }
        }
        Counters::add(&self.counters.bytes_done, len);
        Counters::add(
            &self.counters.bytes_zero,
            if id == ZERO_ID { len } else { 0 },
        );
        if matches!(kind, ChunkKind::Duplicate) {
            Counters::add(&self.counters.bytes_deduplicated, len);
        }
        if let Some(ck) = self.ck.as_mut() {
            ck.positions.push((idx, id));
            if ck.positions.len() >= POSITION_BATCH {
                ck.flush_positions(self.store, false)?;
            }
        }
        self.place(idx, id)
    }

    fn holes(&mut self, first: u64, count: u64) -> Result<()> {
        let end = ((first + count) * self.chunk_size).min(self.virtual_size);
        let bytes = end - first * self.chunk_size;
        self.stats.bytes_zero += bytes;
        Counters::add(&self.counters.bytes_done, bytes);
        Counters::add(&self.counters.bytes_zero, bytes);
        // Not recorded as positions: a resumed run maps them again, which reads nothing.
        for idx in first..first + count {
            self.place(idx, ZERO_ID)?;
        }
        Ok(())
    }

    fn pack_started(&mut self, id: PackId, upload_id: Option<&str>) -> Result<()> {
        if let Some(upload_id) = upload_id {
            self.open_uploads.insert(id, upload_id.to_owned());
        }
        if let Some(ck) = &self.ck {
            if let Some(upload_id) = upload_id {
                ck.db.open_pack(&ck.job, &id, upload_id)?;
            }
            ck.reserve_pack_id(&self.ids.0)?;
        }
        Ok(())
    }

    fn part_acked(
        &mut self,
        pack: &PackId,
        part: &Part,
        chunks: &[Entry],
        last: bool,
    ) -> Result<()> {
        self.stats.bytes_stored += part.size;
        if let Some(ck) = self.ck.as_mut() {
            // The positions of the part's chunks came before it.
            ck.flush_positions(self.store, false)?;
            ck.db.record_part(&ck.job, pack, part, chunks, last)?;
        }
        Ok(())
    }

    fn pack_done(
        &mut self,
        id: PackId,
        entries: Vec<Entry>,
        bytes: u64,
        whole: bool,
    ) -> Result<()> {
        self.packs_written += 1;
        self.open_uploads.remove(&id);
        if whole {
            self.stats.bytes_stored += bytes;
        }
        // Queued for the index first: whatever fails next, a durable pack is indexed at the
        // end of the run.
        self.pending_index.push((id, entries));
        if let Some(ck) = self.ck.as_mut() {
            ck.flush_positions(self.store, false)?;
            let (id, entries) = self.pending_index.last().expect("just pushed");
            ck.db
                .complete_pack(&ck.job, id, entries, whole.then_some(bytes))?;
        }
        if self.pending_index.len() >= INDEX_FLUSH_PACKS {
            write_index(self.store, self.ck.as_ref(), &self.pending_index)?;
            self.pending_index.clear();
        }
        Ok(())
    }

    /// After every other stage ended: records and indexes what is durable (even when the run
    /// failed, so that the next run reuses it), then says whether the run may commit.
    pub(super) fn wind_up(&mut self, panicked: bool, cancel: &CancelToken) -> Result<()> {
        if panicked {
            self.first_error
                .get_or_insert(Error::internal("a pipeline thread panicked"));
        }
        if let Some(ck) = self.ck.as_mut()
            && let Err(e) = ck.flush_positions(self.store, true)
        {
            self.first_error.get_or_insert(e);
        }
        if let Some(ck) = &self.ck {
            // Reserved ids no worker took are known to be unused.
            for id in self.ids.1.try_iter() {
                if let Err(e) = ck.db.drop_pack(&ck.job, &id) {
                    self.first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = write_index(self.store, self.ck.as_ref(), &self.pending_index) {
            self.first_error.get_or_insert(e);
        }
        if self.ck.is_none() {
            // Without a job to resume them, open uploads are only litter.
            for (pack, upload_id) in &self.open_uploads {
                let _ = self
                    .store
                    .backend()
                    .abort_upload(&crate::store::pack_key(pack), upload_id);
            }
        }
        if let Some(e) = self.first_error.take() {
            if let Some(ck) = &self.ck {
                let _ = ck.db.set_error(&ck.job, &e.to_string());
            }
            return Err(e);
        }
        if cancel.is_cancelled() {
            return Err(Error::new(
                crate::error::ErrorKind::Cancelled,
                if self.ck.is_some() {
                    "replication cancelled; no snapshot was written (run it again to resume)"
                } else {
                    "replication cancelled; no snapshot was written"
                },
            ));
        }
        if !self.open_pages.is_empty() {
            return Err(Error::internal(
                "chunk map incomplete at the end of the run",
            ));
        }
        if let Some(ck) = &self.ck {
            // Packs a previous run completed but did not index.
            let rest = ck.db.complete_packs(&ck.job, true)?;
            write_index(self.store, Some(ck), &rest)?;
        }
        Ok(())
    }
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

/// Makes a wait on the store visible: warns when nothing was acknowledged for `after`
/// although parts are in flight (the SDK retries a stalled transfer after its grace period
/// and an unanswered request at the attempt timeout; this says why nothing moves meanwhile).
struct Watchdog {
    after: Duration,
    written: u64,
    since: std::time::Instant,
    warned: Option<std::time::Instant>,
}

impl Watchdog {
    fn new(after: Duration) -> Watchdog {
        Watchdog {
            after,
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
        if idle >= self.after && self.warned.is_none_or(|w| now - w >= self.after) {
            self.warned = Some(now);
            reporter.warn(format!(
                "the store has acknowledged nothing for {} s with {in_flight} part(s) in \
                 flight; stalled or unanswered requests are retried (see the log)",
                idle.as_secs()
            ));
        }
    }
}
