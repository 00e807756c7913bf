//! Verify: every chunk of a snapshot decrypts and matches its id; optionally, the source
//! image still holds the same bytes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

use super::walk::{OnError, Walk, walk};
use super::{fill_chunk, has_data, is_zero, worker_count};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, BlockSource};
use crate::io::IoEngine;
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::format::{Id, PackId, ZERO_ID};
use crate::store::{RepairReport, Store};

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

struct State {
    record: Vec<u8>,
    data: Vec<u8>,
    source_buf: Vec<u8>,
    maps: Vec<crate::image::Mapping>,
    backend: Box<dyn crate::io::ReadBackend>,
    grains: super::GrainCache,
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
    let _lock = super::reader_lock(store, "verify", &opts.cancel, observer)?;
    let mut repaired = RepairReport::default();
    if opts.repair {
        (repaired.index_objects_replaced, repaired.packs_reindexed) = store.rebuild_index()?;
    }
    let snapshot = match store.snapshot(spec) {
        Ok(s) => s,
        // A manifest that cannot be read: recorded, so that a gc goes on without it.
        Err(e) if opts.repair && e.kind() == ErrorKind::Corrupt => {
            let id = store.snapshot_id(spec)?;
            store.record_damage(&[], std::slice::from_ref(&id))?;
            repaired.snapshots_recorded = 1;
            return Ok(VerifyReport {
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
            });
        }
        Err(e) => return Err(e),
    };
    let index = store.load_index()?;
    // Damaged chunk copies found, and whether a page of the snapshot is unreadable.
    let bad_copies: Mutex<Vec<(Id, PackId)>> = Mutex::new(Vec::new());
    let bad_page = std::sync::atomic::AtomicBool::new(false);
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
    let problems = Mutex::new((Vec::<Problem>::new(), 0u64));
    let report = |offset: Option<u64>, message: String| {
        let mut p = problems.lock().expect("problem list");
        p.1 += 1;
        if p.0.len() < MAX_PROBLEMS {
            p.0.push(Problem { offset, message });
        }
    };
    for e in &index.damaged {
        report(None, e.to_string());
    }
    let mut compare = source.as_deref();
    if let Some(src) = source.as_deref()
        && src.info().virtual_size != size
    {
        report(
            None,
            format!(
                "the image holds {} bytes, the snapshot {size}: not the same disk",
                src.info().virtual_size
            ),
        );
        compare = None;
    }
    let verified: Mutex<HashSet<Id>> = Mutex::new(HashSet::new());
    let chunks_checked = std::sync::atomic::AtomicU64::new(0);
    let counters = reporter.counters().clone();
    let chunk_cap = snapshot.chunk_size as usize;
    let spec = Walk {
        store,
        snapshot: &snapshot,
        workers: worker_count(opts.workers),
        cancel: &opts.cancel,
        reporter: &reporter,
        include_zero: compare.is_some(),
    };
    let fatal = |e: &Error| {
        matches!(
            e.kind(),
            ErrorKind::Cancelled | ErrorKind::Store | ErrorKind::Io
        )
    };
    let check = |st: &mut State, item: &super::walk::Item| -> Result<()> {
        if item.id != ZERO_ID && !verified.lock().expect("verified set").contains(&item.id) {
            store
                .read_chunk(&index, &item.id, &mut st.record, &mut st.data)
                .map_err(|e| {
                    if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound)
                        && let Some((pack, _)) = index.get(&item.id)
                    {
                        bad_copies.lock().expect("bad copies").push((item.id, pack));
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
            chunks_checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            verified.lock().expect("verified set").insert(item.id);
        }
        if let Some(src) = compare {
            st.maps.clear();
            src.map(item.offset, item.len as u64, &mut st.maps)?;
            let source_id = if has_data(&st.maps) {
                st.source_buf.resize(item.len, 0);
                let n = fill_chunk(
                    src,
                    st.backend.as_mut(),
                    &mut st.grains,
                    &st.maps,
                    item.offset,
                    &mut st.source_buf,
                )?;
                Counters::add(&counters.bytes_read, n);
                if is_zero(&st.source_buf) {
                    ZERO_ID
                } else {
                    store.keys().chunk_id(&st.source_buf)
                }
            } else {
                ZERO_ID
            };
            if source_id != item.id {
                return Err(Error::new(
                    ErrorKind::VerifyMismatch,
                    "the image differs from the snapshot in this chunk",
                )
                .with_offset(item.offset));
            }
        }
        Ok(())
    };
    let result = walk(
        &spec,
        &|| State {
            record: Vec::with_capacity(chunk_cap + 64),
            data: Vec::with_capacity(chunk_cap),
            source_buf: Vec::with_capacity(if compare.is_some() { chunk_cap } else { 0 }),
            maps: Vec::new(),
            backend: opts.io_engine.backend(),
            grains: super::GrainCache::default(),
        },
        &|st: &mut State, item| {
            let checked = check(st, item);
            match checked {
                // A problem with this chunk: listed at its disk offset, and the walk goes on.
                Err(e) if !fatal(&e) => {
                    report(Some(item.offset), e.to_string());
                    Ok(())
                }
                other => other,
            }
        },
        &|e| {
            if fatal(e) {
                OnError::Stop
            } else {
                // The walk's own problems: a page that cannot be read.
                if e.object()
                    .is_some_and(|o| o.starts_with("pages/") || o == "page")
                {
                    bad_page.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                report(None, e.to_string());
                OnError::Continue
            }
        },
    );
    result?;
    if opts.repair {
        let mut copies = bad_copies.into_inner().expect("bad copies");
        copies.sort_unstable();
        copies.dedup();
        let damaged_snapshot = bad_page.into_inner();
        let snapshots = if damaged_snapshot {
            vec![snapshot.id.clone()]
        } else {
            Vec::new()
        };
        store.record_damage(&copies, &snapshots)?;
        repaired.chunks_recorded = copies.len() as u64;
        repaired.snapshots_recorded = u64::from(damaged_snapshot);
    }
    let p = reporter.finish();
    let (mut problems, problems_total) = problems.into_inner().expect("problem list");
    problems.sort_by_key(|p| p.offset);
    Ok(VerifyReport {
        disk: snapshot.disk.name.clone(),
        snapshot: snapshot.id,
        virtual_size: size,
        chunks_checked: chunks_checked.into_inner(),
        bytes_checked: p.bytes_done,
        image_compared: compare.is_some(),
        problems,
        problems_total,
        repair: opts.repair.then_some(repaired),
        seconds: p.elapsed.as_secs_f64(),
    })
}
