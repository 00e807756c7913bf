//! Verify: every chunk of a snapshot decrypts and matches its id; optionally, the source
//! image still holds the same bytes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use super::walk::{Item, OnError, Walk, walk};
use super::{ChunkProbe, worker_count};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, BlockSource};
use crate::io::IoEngine;
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::format::{Id, PackId, ZERO_ID};
use crate::store::{ChunkIndex, RepairReport, Store};

/// Problems listed in a report at most (all are counted).
const MAX_PROBLEMS: usize = 1000;

/// Options of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Also compare the snapshot with this image.
    pub image: Option<PathBuf>,
    /// With an OVA as `image`: which of its disks.
    pub ova_disk: Option<String>,
    /// Follow the image's parent and extent paths outside its folder.
    pub allow_outside_folder: bool,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Read backend for the image.
    pub io_engine: IoEngine,
    /// Repair what can be repaired: index objects that cannot be read are rebuilt from the
    /// packs first, and the damaged chunk copies found (or the snapshot, if its manifest or
    /// a page cannot be read) are recorded as damaged, so that the next replication of a disk
    /// holding that data stores it again and a garbage collection is not stopped by them.
    pub repair: bool,
    /// Cancels the verification.
    pub cancel: CancelToken,
}

/// One thing wrong, at a virtual offset of the snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Virtual offset of the chunk (or page) concerned.
    pub offset: Option<u64>,
    /// What is wrong, with the object concerned.
    pub message: String,
}

/// What a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The snapshot checked.
    pub snapshot: String,
    /// Its disk's name.
    pub disk: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Distinct stored chunks decrypted and checked against their ids.
    pub chunks_checked: u64,
    /// Virtual bytes covered by the check.
    pub bytes_checked: u64,
    /// Whether the source image was compared too.
    pub image_compared: bool,
    /// Problems found (the first 1000; `problems_total` counts them all).
    pub problems: Vec<Problem>,
    /// What a repair did, if one was asked for.
    pub repair: Option<RepairReport>,
    /// Number of problems found.
    pub problems_total: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl VerifyReport {
    /// Whether the snapshot checked out.
    pub fn ok(&self) -> bool {
        self.problems_total == 0
    }
}

/// A worker's buffers.
struct State {
    record: Vec<u8>,
    data: Vec<u8>,
    probe: ChunkProbe,
    backend: Box<dyn crate::io::ReadBackend>,
}

/// What the workers of one verification share.
struct Checker<'a> {
    store: &'a Store,
    index: ChunkIndex,
    /// The image to compare with, when it can be.
    compare: Option<&'a dyn BlockSource>,
    counters: &'a Counters,
    /// Stored chunks already checked.
    verified: Mutex<HashSet<Id>>,
    chunks_checked: AtomicU64,
    /// Damaged chunk copies found.
    bad_copies: Mutex<Vec<(Id, PackId)>>,
    /// Whether a page of the snapshot cannot be read.
    bad_page: AtomicBool,
    /// The first problems, and how many there were.
    problems: Mutex<(Vec<Problem>, u64)>,
}

impl Checker<'_> {
    fn report(&self, offset: Option<u64>, message: String) {
        let mut p = self.problems.lock().expect("problem list");
        p.1 += 1;
        if p.0.len() < MAX_PROBLEMS {
            p.0.push(Problem { offset, message });
        }
    }

    /// Checks one position: its stored chunk (once per chunk) and the image's bytes there.
    fn check(&self, st: &mut State, item: &Item) -> Result<()> {
        let seen = |id| self.verified.lock().expect("verified set").contains(id);
        if item.id != ZERO_ID && !seen(&item.id) {
            self.store
                .read_chunk_strict(&self.index, &item.id, &mut st.record, &mut st.data)
                .map_err(|e| {
                    if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound)
                        && let Some((pack, _)) = self.index.get(&item.id)
                    {
                        self.bad_copies
                            .lock()
                            .expect("bad copies")
                            .push((item.id, pack));
                    }
                    e.at_disk_offset(item.offset)
                })?;
            if st.data.len() != item.len {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    "a chunk's length disagrees with its position in the snapshot",
                )
                .with_offset(item.offset));
            }
            self.chunks_checked.fetch_add(1, Ordering::Relaxed);
            self.verified.lock().expect("verified set").insert(item.id);
        }
        if let Some(src) = self.compare {
            let (source_id, read) = st.probe.id_at(
                self.store,
                src,
                st.backend.as_mut(),
                item.offset,
                item.len as u64,
            )?;
            Counters::add(&self.counters.bytes_read, read);
            if source_id != item.id {
                return Err(Error::new(
                    ErrorKind::VerifyMismatch,
                    "the image differs from the snapshot in this chunk",
                )
                .with_offset(item.offset));
            }
        }
        Ok(())
    }

    /// Records what a repair found: the damaged copies, and the snapshot if a page of it
    /// cannot be read.
    fn record_damage(&self, snapshot: &str, repaired: &mut RepairReport) -> Result<()> {
        let mut copies = std::mem::take(&mut *self.bad_copies.lock().expect("bad copies"));
        copies.sort_unstable();
        copies.dedup();
        let damaged_snapshot = self.bad_page.load(Ordering::Relaxed);
        let snapshots = if damaged_snapshot {
            vec![snapshot.to_owned()]
        } else {
            Vec::new()
        };
        self.store.record_damage(&copies, &snapshots)?;
        repaired.chunks_recorded = copies.len() as u64;
        repaired.snapshots_recorded = u64::from(damaged_snapshot);
        Ok(())
    }
}

/// Whether an error stops a verification (rather than being listed as a problem).
fn fatal(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Cancelled | ErrorKind::Store | ErrorKind::Io
    )
}

/// Checks snapshot `spec`: every chunk it references is present, authentic and matches its
/// id; with `opts.image`, the image's bytes match the snapshot's. Problems are collected,
/// not fatal: the report lists them, and [`VerifyReport::ok`] says whether there were any.
pub fn verify(
    store: &Store,
    spec: &str,
    opts: &VerifyOptions,
    observer: &dyn Observer,
) -> Result<VerifyReport> {
    let started = std::time::Instant::now();
    let result = verify_run(store, spec, opts, observer);
    let mut ev =
        crate::store::audit::AuditEvent::of_report("verify", started, &result, "bytes_checked");
    if ev.snapshot.is_none() {
        ev.snapshot = Some(spec.to_owned());
    }
    store.audited_read(&ev, result)
}

fn verify_run(
    store: &Store,
    spec: &str,
    opts: &VerifyOptions,
    observer: &dyn Observer,
) -> Result<VerifyReport> {
    let _lock = crate::store::lock::reader_lock(store, "verify", &opts.cancel, observer)?;
    let mut repaired = RepairReport::default();
    if opts.repair {
        (repaired.index_objects_replaced, repaired.packs_reindexed) = store.rebuild_index()?;
    }
    let snapshot = match store.snapshot(spec) {
        Ok(s) => s,
        // A manifest that cannot be read: recorded, so that a gc goes on without it.
        Err(e) if opts.repair && e.kind() == ErrorKind::Corrupt => {
            return unreadable_manifest(store, spec, &e, repaired);
        }
        Err(e) => return Err(e),
    };
    let index = store.load_index()?;
    let image_opts = image::OpenOptions {
        ova_disk: opts.ova_disk.clone(),
        allow_outside_folder: opts.allow_outside_folder,
        ..image::OpenOptions::default()
    };
    let source: Option<Box<dyn BlockSource>> = opts
        .image
        .as_deref()
        .map(|p| image::open_with(p, &image_opts))
        .transpose()?;
    let size = snapshot.disk.virtual_size;
    let reporter = Reporter::start(observer, Phase::Verifying, size);
    let mut checker = Checker {
        store,
        index,
        compare: source.as_deref(),
        counters: reporter.counters(),
        verified: Mutex::new(HashSet::new()),
        chunks_checked: AtomicU64::new(0),
        bad_copies: Mutex::new(Vec::new()),
        bad_page: AtomicBool::new(false),
        problems: Mutex::new((Vec::new(), 0)),
    };
    for e in &checker.index.damaged {
        checker.report(None, e.to_string());
    }
    if let Some(src) = checker.compare
        && src.info().virtual_size != size
    {
        checker.report(
            None,
            format!(
                "the image holds {} bytes, the snapshot {size}: not the same disk",
                src.info().virtual_size
            ),
        );
        checker.compare = None;
    }
    let chunk_cap = snapshot.chunk_size as usize;
    let spec = Walk {
        store,
        snapshot: &snapshot,
        workers: worker_count(opts.workers),
        cancel: &opts.cancel,
        reporter: &reporter,
        include_zero: checker.compare.is_some(),
    };
    walk(
        &spec,
        &|| State {
            record: Vec::with_capacity(chunk_cap + 64),
            data: Vec::with_capacity(chunk_cap),
            probe: ChunkProbe::default(),
            backend: opts.io_engine.backend(),
        },
        &|st: &mut State, item| match checker.check(st, item) {
            // A problem with this chunk: listed at its disk offset, and the walk goes on.
            Err(e) if !fatal(&e) => {
                checker.report(Some(item.offset), e.to_string());
                Ok(())
            }
            other => other,
        },
        &|e| {
            if fatal(e) {
                return OnError::Stop;
            }
            // The walk's own problems: a page that cannot be read.
            if e.object()
                .is_some_and(|o| o.starts_with("pages/") || o == "page")
            {
                checker.bad_page.store(true, Ordering::Relaxed);
            }
            checker.report(None, e.to_string());
            OnError::Continue
        },
    )?;
    if opts.repair {
        checker.record_damage(&snapshot.id, &mut repaired)?;
    }
    let p = reporter.finish();
    let (mut problems, problems_total) = checker.problems.into_inner().expect("problem list");
    problems.sort_by_key(|p| p.offset);
    Ok(VerifyReport {
        disk: snapshot.disk.name.clone(),
        snapshot: snapshot.id,
        virtual_size: size,
        chunks_checked: checker.chunks_checked.into_inner(),
        bytes_checked: p.bytes_done,
        image_compared: checker.compare.is_some(),
        problems,
        problems_total,
        repair: opts.repair.then_some(repaired),
        seconds: p.elapsed.as_secs_f64(),
    })
}

/// The report of a repair that found the snapshot's manifest unreadable: it is recorded as
/// damaged, so that a gc goes on without it.
fn unreadable_manifest(
    store: &Store,
    spec: &str,
    e: &Error,
    mut repaired: RepairReport,
) -> Result<VerifyReport> {
    let id = store.snapshot_id(spec)?;
    store.record_damage(&[], std::slice::from_ref(&id))?;
    repaired.snapshots_recorded = 1;
    Ok(VerifyReport {
        snapshot: id,
        disk: String::new(),
        virtual_size: 0,
        chunks_checked: 0,
        bytes_checked: 0,
        image_compared: false,
        problems: vec![Problem {
            offset: None,
            message: e.to_string(),
        }],
        problems_total: 1,
        repair: Some(repaired),
        seconds: 0.0,
    })
}
