//! A replication as a job: finding or starting it, checking that the source did not change
//! under it, finishing what its last run left open, and the checkpoints a run records (see
//! [`state`](super::state) for the database).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use crossbeam_channel::Sender;

use super::Reporter;
use super::journal;
use super::state::{JobDb, JobKey, JobLock, JobRecord, JobSource, OpenPack, SourceFile};
use crate::error::{Error, ErrorKind, Result};
use crate::image::BlockSource;
use crate::pipeline::ChunkProbe;
use crate::store::format::{self, Entry, Id, PackId, ZERO_ID, hex};
use crate::store::{ChunkIndex, Part, Store};

/// What identifies a replication's job, besides its store and source, and how to treat an
/// unfinished run of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobRequest<'a> {
    /// Folder of the job database.
    pub(crate) dir: &'a Path,
    /// Which disk of a multi-disk source.
    pub(crate) disk_selector: &'a str,
    /// The disk's name in the store.
    pub(crate) disk_name: &'a str,
    /// What the run reads (a delta's plan key; empty for a full copy).
    pub(crate) plan_key: &'a str,
    /// Start over even if an unfinished run exists.
    pub(crate) restart: bool,
    /// Start over (with a warning) when an unfinished run saw another state of the source.
    pub(crate) restart_if_changed: bool,
}

/// How often at most a run writes the positions it found to the store's journal of the job
/// (a position not journaled is read again by another host that resumes the job, not sent
/// again): every second in a run's first minute, then every ten (a long run writes a record
/// every ten seconds, which its end deletes).
fn journal_positions_every(running: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(if running.as_secs() < 60 { 1 } else { 10 })
}

/// Checkpoints of a replication that runs as a job (see [`state`](super::state)).
pub(crate) struct Checkpoint {
    pub(crate) db: JobDb,
    pub(crate) job: String,
    _lock: JobLock,
    /// Positions hashed but not yet written to the database.
    pub(crate) positions: Vec<(u64, Id)>,
    /// Positions written to the database but not yet to the store's journal.
    unjournaled: Vec<(u64, Id)>,
    journaled_at: std::time::Instant,
    started: std::time::Instant,
}

impl Checkpoint {
    /// Writes the positions found since the last call to the database, and to the store's
    /// journal of the job when its time came (see [`journal_positions_every`]), or `force`.
    pub(crate) fn flush_positions(&mut self, store: &Store, force: bool) -> Result<()> {
        self.db.record_positions(&self.job, &self.positions)?;
        self.unjournaled.append(&mut self.positions);
        if force
            || self.unjournaled.len() >= super::state::POSITION_BATCH
            || self.journaled_at.elapsed() >= journal_positions_every(self.started.elapsed())
        {
            journal::record_positions(store, &self.job, &self.unjournaled)?;
            self.unjournaled.clear();
            self.journaled_at = std::time::Instant::now();
        }
        Ok(())
    }

    /// Reserves a fresh pack id in the job database and hands it to the workers.
    pub(crate) fn reserve_pack_id(&self, ids: &Sender<PackId>) -> Result<()> {
        // The job's id, then 8 random bytes: an upload left open names the job it is of.
        let mut id: PackId = crate::store::crypto::random()?;
        if let Some(job) = format::unhex::<8>(&self.job) {
            id[..8].copy_from_slice(&job);
        }
        self.db.reserve_pack(&self.job, &id)?;
        // (Were the queue full, the id would stay unused: a resumed run finds no such pack.)
        let _ = ids.try_send(id);
        Ok(())
    }
}

/// A job opened for a run.
pub(crate) struct Opened {
    pub(crate) ck: Checkpoint,
    /// Positions already durable, with their chunk ids.
    pub(crate) done: Vec<(u64, Id)>,
    /// Chunk ids in the job's complete packs (durable, perhaps not yet indexed).
    pub(crate) durable: HashSet<Id>,
    pub(crate) resumed: bool,
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
pub(crate) fn open_job(
    store: &Store,
    source: &dyn BlockSource,
    req: &JobRequest<'_>,
    index: &ChunkIndex,
    reporter: &Reporter<'_>,
) -> Result<Opened> {
    let db = JobDb::open(req.dir)?;
    let path = source.opened_path().unwrap_or(std::path::Path::new(""));
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = JobKey {
        store: store.location(),
        store_id: store.config().store_id.clone(),
        source: abs.display().to_string(),
        disk: req.disk_selector.to_owned(),
        chunk_size: store.chunk_size(),
    };
    let fp = job_source(source, req.plan_key)?;
    let mut found = db.find_active(&key)?;
    if let Some(old) = &found
        && !journal::is_recorded(store, &old.id)?
    {
        reporter.warn(format!(
            "job {} was finished or abandoned by another host (the store no longer records \
             it): starting a new job",
            old.id
        ));
        db.delete(&old.id)?;
        found = None;
    }
    if found.is_none() {
        found = import_job(store, &db, (&key, req.disk_name), &fp, reporter)?;
    }
    if let Some(old) = found.as_ref().filter(|_| req.restart) {
        db.abandon(&old.id, store.backend().as_ref())?;
        reporter.warn(format!(
            "job {} forgotten on request (restart), starting over",
            old.id
        ));
        found = None;
    }
    if let Some(old) = &found {
        let changed = old.fingerprint.changes(&fp);
        if !changed.is_empty() && req.restart_if_changed {
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
                     states of the disk: start the job over (restart)",
                    job.id,
                    changed.join(", ")
                ),
            )
            .with_setting("restart")
            .with_path(path));
        }
        (job, true)
    } else {
        let job = db.create(&key, &fp)?;
        // Recorded in the store too, so that no host's cleanup aborts its uploads while it
        // may resume, and any host can resume it.
        journal::record_job(store, &job.id, &key, &fp)?;
        (job, false)
    };
    let lock = db.lock(&job.id)?;
    let mut positions = Vec::new();
    let mut durable = HashSet::new();
    if resumed {
        db.start_run(&job.id)?;
        let finished = finish_open_packs(store, &db, &job.id).map_err(|e| {
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
            if !(req.restart_if_changed && e.kind() == ErrorKind::Config) {
                return Err(e);
            }
            // Continuous replication starts a job over that saw another state of the disk.
            drop(lock);
            db.abandon(&job.id, store.backend().as_ref())?;
            reporter.warn(format!("{e}: starting over"));
            return open_job(store, source, req, index, reporter);
        }
        durable = finished.durable;
    }
    Ok(Opened {
        ck: Checkpoint {
            db,
            job: job.id,
            _lock: lock,
            positions: Vec::new(),
            unjournaled: Vec::new(),
            journaled_at: std::time::Instant::now(),
            started: std::time::Instant::now(),
        },
        done: positions,
        durable,
        resumed,
    })
}

/// Takes over an unfinished job for `key` that the store records (started on another host,
/// or with another state folder) into the local database `db`, from its journal: its
/// positions, its open uploads with their acknowledged parts, and its packs in the store
/// (see [`journal`]). The source's files are taken to be the job's if they have the same
/// paths, sizes and modification times (device and inode numbers are each host's own); the
/// resume sample checks their content.
fn import_job(
    store: &Store,
    db: &JobDb,
    (key, disk_name): (&JobKey, &str),
    now: &JobSource,
    reporter: &Reporter<'_>,
) -> Result<Option<JobRecord>> {
    let candidates = journal::find_recorded(store, key)?;
    if candidates.is_empty() {
        return Ok(None);
    }
    let newest = store.latest_of(disk_name)?.and_then(|s| s.job);
    let mut record = None;
    for r in candidates {
        let (known, finished) = match db.get(&r.job) {
            Ok(job) => (true, job.state == super::state::JobState::Done),
            Err(e) if e.kind() == ErrorKind::NotFound => (false, newest.as_deref() == Some(&r.job)),
            Err(e) => return Err(e),
        };
        if finished {
            // The job committed (here, or its snapshot is the disk's newest): its record
            // outlived a failure to forget it.
            journal::forget_job(store.backend().as_ref(), &r.job)?;
        } else if !known {
            record = Some(r);
            break;
        }
    }
    let Some(record) = record else {
        return Ok(None);
    };
    let Some(was) = record.fingerprint.clone() else {
        return Ok(None);
    };
    let same_file = |was: &crate::store::SourceFingerprint,
                     now: &crate::store::SourceFingerprint| {
        crate::store::SourceFingerprint {
            device: now.device,
            inode: now.inode,
            ..was.clone()
        }
    };
    let fp = JobSource {
        top: same_file(&was.top, &now.top),
        others: was
            .others
            .iter()
            .map(|f| match now.others.iter().find(|n| n.path == f.path) {
                Some(n) => SourceFile {
                    path: f.path.clone(),
                    fingerprint: same_file(&f.fingerprint, &n.fingerprint),
                },
                None => f.clone(),
            })
            .collect(),
        plan: was.plan,
    };
    // Everything read from the store first: a failure leaves this database as it was.
    let content = journal::read_journal(store, &record.job)?;
    let uploads = journal::job_uploads(store, &record.job)?;
    let packs = journal::job_packs(store, &record.job)?;
    let job = db.adopt(&record.job, key, &fp)?;
    db.record_positions(&job.id, &content.positions)?;
    for (pack, upload) in &content.uploads {
        db.open_pack(&job.id, pack, &upload.upload_id)?;
        for (part, chunks, last) in upload.parts.values() {
            db.record_part(&job.id, pack, part, chunks, *last)?;
        }
    }
    // Uploads without an acknowledged part hold nothing to keep: they are aborted; packs the
    // store holds whole are adopted from their trailers.
    for (pack, upload_id) in uploads {
        if !content.uploads.contains_key(&pack) {
            db.open_pack(&job.id, &pack, &upload_id)?;
        }
    }
    for pack in packs {
        if !content.uploads.contains_key(&pack) {
            db.reserve_pack(&job.id, &pack)?;
        }
    }
    let msg = format!(
        "resuming job {} from the store's journal (started on {}): {} positions and {} open \
         uploads recorded{}",
        job.id,
        record.host.as_deref().unwrap_or("another host"),
        content.positions.len(),
        content.uploads.len(),
        if content.unreadable > 0 {
            format!(
                ", {} records unreadable (what they describe is sent again)",
                content.unreadable
            )
        } else {
            String::new()
        }
    );
    if content.unreadable > 0 {
        reporter.warn(msg);
    } else {
        reporter.note(msg);
    }
    Ok(Some(job))
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
        .with_setting("restart")
        .with_path(source.opened_path().unwrap_or(std::path::Path::new(""))));
    }
    reporter.tick();
    Ok(())
}

/// What finishing a job's open packs found.
#[derive(Debug, Default)]
struct Finished {
    /// Chunk ids now durable in complete packs.
    durable: HashSet<Id>,
    /// Bytes of acknowledged parts that were lost and will be sent again.
    lost_bytes: u64,
}

/// Adopts a pack of `job` that may be complete in the store although the database does not
/// say so (the run stopped between the store's answer and the database write): reads its
/// trailer and records it complete. False if the store has no such (valid) pack.
fn adopt(store: &Store, db: &JobDb, job: &str, pack: &PackId, whole: bool) -> Result<bool> {
    match store.read_pack_entries(pack) {
        Ok((entries, size)) => {
            tracing::info!(pack = %hex(pack), chunks = entries.len(), "found a pack the last run completed without recording it");
            db.complete_pack(job, pack, &entries, whole.then_some(size))?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == ErrorKind::Corrupt => {
            tracing::warn!(pack = %hex(pack), error = %e, "a pack of the last run is damaged; its chunks will be sent again");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Brings the packs a stopped run of `job` left unfinished to an end, and returns the chunk
/// ids of every complete pack of the job:
/// - a reserved pack id is looked for in the store (a whole pack put just before the stop)
///   and adopted if there, forgotten if not;
/// - an open multipart upload is completed from the parts the database recorded and the
///   store still holds (checked with a paginated ListParts), as its durable parts plus a
///   trailer part; one the store already completed is adopted; one without its first part
///   is aborted (nothing of it was durable).
fn finish_open_packs(store: &Store, db: &JobDb, job: &str) -> Result<Finished> {
    let backend = store.backend();
    let mut out = Finished::default();
    for pack in db.reserved_packs(job)? {
        if !adopt(store, db, job, &pack, true)? {
            db.drop_pack(job, &pack)?;
        }
    }
    for open in db.open_packs(job)? {
        finish_upload(store, db, job, &open, &mut out)?;
    }
    for (pack, entries) in db.complete_packs(job, false)? {
        // A garbage collection that ran while the job was stopped deletes the packs no
        // snapshot references, which a stopped job's packs are: their chunks are sent again.
        match backend.size(&crate::store::pack_key(&pack)) {
            Ok(_) => out.durable.extend(entries.iter().map(|e| e.id)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tracing::warn!(pack = %hex(&pack), "a pack of the job is gone from the store (garbage collected while the job was stopped); its chunks will be sent again");
                db.drop_pack(job, &pack)?;
                out.lost_bytes += entries.iter().map(|e| u64::from(e.stored_len)).sum::<u64>();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Brings one open multipart upload of `job` to an end (see [`finish_open_packs`]).
fn finish_upload(
    store: &Store,
    db: &JobDb,
    job: &str,
    open: &OpenPack,
    out: &mut Finished,
) -> Result<()> {
    let backend = store.backend();
    let key = crate::store::pack_key(&open.pack);
    let recorded: u64 = open.parts.iter().map(|(p, _)| p.size).sum();
    let held = match backend.list_parts(&key, &open.upload_id) {
        Ok(held) => held,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Completed by the last run (its answer lost to the stop), or aborted.
            if !adopt(store, db, job, &open.pack, false)? {
                tracing::warn!(pack = %hex(&open.pack), "an open upload of the job is gone from the store; its chunks will be sent again");
                db.drop_pack(job, &open.pack)?;
                out.lost_bytes += recorded;
            }
            return Ok(());
        }
        // The store's list of the upload's parts cannot be had (an answer the client
        // cannot read, a service that lacks ListParts or refuses it): without it no part
        // can be trusted, so the pack is given up and its chunks sent again.
        Err(e) if matches!(e.kind(), ErrorKind::Store | ErrorKind::AccessDenied) => {
            tracing::warn!(
                pack = %hex(&open.pack),
                "the parts of an open upload cannot be listed ({e}); its chunks will be \
                 sent again"
            );
            if let Err(a) = backend.abort_upload(&key, &open.upload_id) {
                tracing::warn!(pack = %hex(&open.pack), "could not abort the upload: {a}");
            }
            db.drop_pack(job, &open.pack)?;
            out.lost_bytes += recorded;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let held: BTreeMap<u32, Part> = held.into_iter().map(|p| (p.number, p)).collect();
    let trim = |s: &str| s.trim_matches('"').to_owned();
    let durable: Vec<&(Part, Vec<Entry>)> = open
        .parts
        .iter()
        .filter(|(p, _)| {
            held.get(&p.number)
                .is_some_and(|h| h.size == p.size && trim(&h.etag) == trim(&p.etag))
        })
        .collect();
    let whole = open.last_part.is_some_and(|n| {
        durable.len() == open.parts.len() && durable.last().is_some_and(|(p, _)| p.number == n)
    });
    // The last part holds a trailer of every record: usable only with every part before
    // it; otherwise a new trailer follows the parts that are left.
    let durable: Vec<&(Part, Vec<Entry>)> = if whole {
        durable
    } else {
        durable
            .into_iter()
            .filter(|(p, _)| Some(p.number) != open.last_part)
            .collect()
    };
    let durable_bytes: u64 = durable.iter().map(|(p, _)| p.size).sum();
    out.lost_bytes += recorded - durable_bytes;
    if durable.first().is_none_or(|(p, _)| p.number != 1) {
        backend.abort_upload(&key, &open.upload_id)?;
        db.drop_pack(job, &open.pack)?;
        return Ok(());
    }
    let mut entries = Vec::new();
    let mut base = 0u64;
    let mut parts = Vec::new();
    let mut damaged = false;
    for (part, chunks) in &durable {
        for e in chunks {
            match base.checked_add(e.offset) {
                Some(offset) => entries.push(Entry { offset, ..*e }),
                None => damaged = true,
            }
        }
        base = base.saturating_add(part.size);
        parts.push(part.clone());
    }
    // A new trailer part follows the last durable part (replacing any later part the
    // store holds).
    let number = durable.last().map_or(0, |(p, _)| p.number).checked_add(1);
    let Some(number) = number.filter(|_| !damaged) else {
        tracing::warn!(pack = %hex(&open.pack), "damaged part records in the job database; the pack's chunks will be sent again");
        backend.abort_upload(&key, &open.upload_id)?;
        db.drop_pack(job, &open.pack)?;
        out.lost_bytes += durable_bytes;
        return Ok(());
    };
    let completed = if whole {
        // Every part, the last with its trailer, is in the store: complete it as it is.
        backend.complete_upload(&key, &open.upload_id, &parts)
    } else {
        let sealer = store.keys().pack_sealer(&open.pack);
        let mut last = Vec::new();
        format::append_trailer(
            &sealer,
            &format::pack_header(&open.pack),
            &entries,
            &mut last,
        )?;
        backend
            .upload_part(&key, &open.upload_id, number, Bytes::from(last))
            .and_then(|trailer| {
                parts.push(trailer);
                backend.complete_upload(&key, &open.upload_id, &parts)
            })
    };
    if let Err(e) = completed {
        // A pack that cannot be completed must not block the job for ever: give it up
        // (if the store can be told) and send its chunks again.
        // (Completed after all, its answer lost? A failed look counts as not found.)
        if adopt(store, db, job, &open.pack, false).unwrap_or(false) {
            return Ok(());
        }
        if backend.abort_upload(&key, &open.upload_id).is_err() {
            return Err(e);
        }
        tracing::warn!(pack = %hex(&open.pack), error = %e, "an open pack of the last run could not be completed; its chunks will be sent again");
        db.drop_pack(job, &open.pack)?;
        out.lost_bytes += durable_bytes;
        return Ok(());
    }
    tracing::info!(
        pack = %hex(&open.pack),
        parts = parts.len(),
        chunks = entries.len(),
        "completed a pack the last run left open"
    );
    db.complete_pack(job, &open.pack, &entries, None)?;
    Ok(())
}
