//! Export to an object (`s3://bucket/key`): the image written as one multipart upload,
//! streamed (no temporary file), parts sent in parallel within a memory budget, resumable
//! through the job database (the upload and each part the store acknowledged are recorded;
//! a run of the same export continues the upload).
//!
//! Formats laid out in advance (raw, VHD, VHDX) are cut into parts by file offset, and each
//! part is filled on its own (its metadata, the chunks its disk span holds) by the thread that
//! sends it. A streamOptimized VMDK is made in order and cut into parts as it goes; a resumed
//! run makes it again and sends only the parts the store does not hold (checked against
//! their recorded checksums).
//!
//! A delta export (raw and fixed VHD, whose files place the disk at the same offsets whatever
//! its content) copies every part whose bytes did not change since a base export's snapshot
//! from the base object, by the store (`UploadPartCopy`, conditional on the base's ETag), and
//! sends only changed parts. The base is trusted only when its metadata names a snapshot of
//! this store in this format, its size is the image's, and its ETag is the one recorded when
//! this client wrote it (if it did); otherwise the export sends everything, with a warning.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::vmdk::{self, Sink};
use super::{ExportFormat, ExportOptions, ExportReport, changed_ranges, layout};
use crate::error::{Error, ErrorKind, Result};
use crate::io::sys::AlignedBuf;
use crate::job::export_state::ExportJob;
use crate::job::state::{JobDb, JobKey, JobLock};
use crate::job::{Counters, Observer, Phase, Reporter};
use crate::pipeline::restore::{Buffers, Job, Layout, Place, send_reads};
use crate::store::format::{Id, ZERO_ID};
use crate::store::s3::{S3Store, part_checksum};
use crate::store::{ChunkIndex, ObjectStore, Part, PartRules, Snapshot, Store};

const MIB: u64 = 1 << 20;
/// Part size unless configured (larger when an image needs more parts than the store takes).
const DEFAULT_PART: u64 = 16 * MIB;
/// Parts in flight at once unless configured.
const DEFAULT_UPLOADS: usize = 4;
/// Changed runs longer than this are sent as several parts by a delta export.
const DELTA_SEND_PART: u64 = 16 * MIB;
/// Memory a part's filler needs besides the part: a pack range read at once and a chunk.
const FILL_EXTRA: u64 = 8 * MIB;
/// The object's user metadata: which snapshot of which store, in which format.
const META_SNAPSHOT: &str = "blockferry-snapshot";
const META_FORMAT: &str = "blockferry-format";
const META_STORE: &str = "blockferry-store";

/// One part of the upload: a range of the file, sent, or copied from the base export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PartPlan {
    number: u32,
    range: Range<u64>,
    copy: bool,
    /// A sent part's first bytes that are instead copied from the base export into a
    /// staging object, with the rest sent as its last part; the part is then a copy of that
    /// object (see [`delta_parts`]). 0: the part is sent whole.
    staged: u64,
}

/// A previous export whose unchanged parts are copied.
struct Base {
    key: String,
    etag: String,
    snapshot: Snapshot,
}

/// How a run ended.
enum Outcome {
    Done(Box<ExportReport>),
    /// The base export changed while parts were copied from it.
    BaseChanged,
}

/// Exports `snapshot` to the object `url`.
pub(super) fn export(
    store: &Store,
    snapshot: &Snapshot,
    url: &str,
    opts: &ExportOptions,
    observer: &dyn Observer,
) -> Result<ExportReport> {
    let s3 = match &opts.s3 {
        Some(s3) => s3.clone(),
        None => store.backend().s3_options().cloned().unwrap_or_default(),
    };
    let (target, key) = S3Store::open_object(url, &s3)?;
    let rules = target
        .multipart()
        .ok_or_else(|| Error::internal("an S3 store without multipart uploads"))?;
    let layout = layout(store, snapshot, opts.format)?;
    let db = store.state_dir().map(JobDb::open).transpose()?;
    let reporter = Reporter::start(observer, Phase::Restoring, snapshot.disk.virtual_size);
    let x = ObjectExport {
        store,
        snapshot,
        target: &target,
        key: &key,
        url,
        opts,
        rules,
        db: db.map(Mutex::new),
        reporter: &reporter,
        index: store.load_index()?,
    };
    let base = x.base(layout.as_deref())?;
    let outcome = x.run(layout.as_deref(), base.as_ref())?;
    let mut report = match outcome {
        Outcome::Done(report) => *report,
        Outcome::BaseChanged => {
            reporter.warn(format!(
                "the base export changed while parts were copied from it: sending the whole \
                 image to {url}"
            ));
            match x.run(layout.as_deref(), None)? {
                Outcome::Done(report) => *report,
                Outcome::BaseChanged => return Err(Error::internal("a full export used a base")),
            }
        }
    };
    let p = reporter.finish();
    report.seconds = p.elapsed.as_secs_f64();
    report.bytes_written = p.bytes_written;
    Ok(report)
}

struct ObjectExport<'a> {
    store: &'a Store,
    snapshot: &'a Snapshot,
    target: &'a S3Store,
    key: &'a str,
    url: &'a str,
    opts: &'a ExportOptions,
    rules: PartRules,
    db: Option<Mutex<JobDb>>,
    reporter: &'a Reporter<'a>,
    index: ChunkIndex,
}

/// The upload a run writes to, and what it holds already.
struct Upload {
    id: String,
    job: Option<String>,
    /// Parts an earlier run had sent that the store still holds, by number.
    acked: HashMap<u32, Part>,
    _lock: Option<JobLock>,
}

/// What a run finds to write to.
enum Opened {
    Upload(Upload),
    /// A stopped run of the job completed the object (`head`, of `parts` parts).
    Done {
        job: String,
        head: crate::store::s3::ObjectHead,
        parts: u32,
        _lock: JobLock,
    },
}

/// What the senders did.
#[derive(Default)]
struct Progressed {
    parts: Mutex<Vec<Part>>,
    bytes_sent: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_resumed: AtomicU64,
    base_changed: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Progressed {
    /// Records the first error, then stops the others (which then fail as stopped).
    fn fail(&self, e: Error) {
        self.error.lock().expect("error slot").get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl ObjectExport<'_> {
    fn db<T>(&self, f: impl FnOnce(&JobDb) -> Result<T>) -> Result<Option<T>> {
        match &self.db {
            Some(db) => f(&db.lock().expect("job database")).map(Some),
            None => Ok(None),
        }
    }

    /// The base export of a delta, checked; `None` (with a warning) when it cannot be trusted.
    fn base(&self, layout: Option<&dyn Layout>) -> Result<Option<Base>> {
        if self.opts.base_export.is_none() && !self.opts.incremental {
            return Ok(None);
        }
        let format = self.opts.format;
        let Some(layout) =
            layout.filter(|_| matches!(format, ExportFormat::Raw | ExportFormat::VhdFixed))
        else {
            return Err(Error::config(format!(
                "a delta export copies unchanged parts at the same offsets, which only raw and \
                 vhd-fixed images keep; export {} in full",
                format.name()
            ))
            .with_setting("base_export"));
        };
        let (key, claimed) = match &self.opts.base_export {
            Some(spec) => {
                let (url, snap) = spec.rsplit_once('@').ok_or_else(|| {
                    Error::config(format!(
                        "{spec:?}: name the base export as s3://BUCKET/KEY@SNAPSHOT"
                    ))
                    .with_setting("base_export")
                })?;
                let (bucket, key) = url
                    .strip_prefix("s3://")
                    .and_then(|r| r.split_once('/'))
                    .ok_or_else(|| {
                        Error::config(format!("{url:?} is not an s3://BUCKET/KEY URL"))
                            .with_setting("base_export")
                    })?;
                let (target_bucket, _) = self
                    .url
                    .strip_prefix("s3://")
                    .and_then(|r| r.split_once('/'))
                    .unwrap_or_default();
                if bucket != target_bucket {
                    return Err(Error::config(format!(
                        "the base export {url} is in another bucket than {}: parts are copied \
                         within one bucket",
                        self.url
                    ))
                    .with_setting("base_export"));
                }
                (key.to_owned(), Some(self.store.snapshot(snap)?.id))
            }
            None => (self.key.to_owned(), None),
        };
        let base_url = format!(
            "s3://{}/{key}",
            self.url
                .strip_prefix("s3://")
                .and_then(|r| r.split_once('/'))
                .map_or("", |(b, _)| b)
        );
        let untrusted = |why: String| {
            self.reporter.warn(format!(
                "{base_url} cannot serve as the base export ({why}): sending the whole image"
            ));
            Ok(None)
        };
        let Some(head) = self.target.head(&key)? else {
            return untrusted("there is no such object".to_owned());
        };
        let meta = |k: &str| head.metadata.get(k).map(String::as_str).unwrap_or_default();
        if meta(META_FORMAT) != format.name() || meta(META_STORE) != self.store.config().store_id {
            return untrusted(format!(
                "it is not a {} export of this store: overwritten?",
                format.name()
            ));
        }
        let recorded = meta(META_SNAPSHOT).to_owned();
        if let Some(claimed) = &claimed
            && *claimed != recorded
        {
            return untrusted(format!("it holds snapshot {recorded}, not {claimed}"));
        }
        let snapshot = match self.store.snapshot(&recorded) {
            Ok(s) if s.id == recorded => s,
            Ok(_) | Err(_) => {
                return untrusted(format!("its snapshot {recorded} is not in the store"));
            }
        };
        if snapshot.disk.virtual_size != self.snapshot.disk.virtual_size
            || snapshot.chunk_size != self.snapshot.chunk_size
        {
            return untrusted(format!(
                "its snapshot {recorded} is of a disk of another size"
            ));
        }
        if head.size != layout.file_size() {
            return untrusted(format!(
                "it has {} bytes, not the {} of such an image",
                head.size,
                layout.file_size()
            ));
        }
        let record =
            self.db(|db| db.last_export(&self.store.config().store_id, &base_url, format.name()))?;
        if let Some(Some(record)) = record
            && record.snapshot == recorded
            && record.etag.as_deref().is_some_and(|e| e != head.etag)
        {
            return untrusted(
                "its ETag is not the one it had when this client wrote it: overwritten".to_owned(),
            );
        }
        Ok(Some(Base {
            key,
            etag: head.etag,
            snapshot,
        }))
    }

    /// One export: a plan of parts, the upload (resumed or new), the parts, the completion.
    fn run(&self, layout: Option<&dyn Layout>, base: Option<&Base>) -> Result<Outcome> {
        let uploads = match self.opts.upload_jobs {
            0 => DEFAULT_UPLOADS,
            n => n.clamp(1, 64),
        };
        let (plan, part, uploads, base) = if let Some(layout) = layout {
            let file = layout.file_size();
            let part = self.part_size(file)?;
            let uploads = self.fit(part, uploads, false)?;
            let delta = match base {
                Some(base) => self.delta_plan(layout, base)?,
                None => None,
            };
            // A delta that could not be planned sends everything: no base then.
            match delta {
                Some(plan) => (plan, part, uploads, base),
                None => (uniform_plan(file, part)?, part, uploads, None),
            }
        } else {
            let part = self.part_size(vmdk::max_file_size(self.snapshot))?;
            (Vec::new(), part, self.fit(part, uploads, true)?, None)
        };
        let plan_text = self.plan_text(&plan, part, base);
        let upload = match self.open_upload(&plan_text)? {
            Opened::Upload(upload) => upload,
            Opened::Done {
                job, head, parts, ..
            } => {
                // A stopped run completed the object and was killed before it recorded so.
                self.db(|db| db.finish_export(&job, &head.etag, head.size))?;
                self.sweep(&job, None)?;
                self.reporter.warn(format!(
                    "{} was already completed by the stopped run: nothing to send",
                    self.url
                ));
                let virtual_size = layout.map_or_else(
                    || vmdk::capacity_bytes(self.snapshot),
                    <dyn Layout>::disk_size,
                );
                return Ok(Outcome::Done(Box::new(ExportReport {
                    output: self.url.to_owned(),
                    file_size: head.size,
                    bytes_resumed: head.size,
                    parts,
                    job: Some(job),
                    resumed: true,
                    etag: Some(head.etag),
                    ..ExportReport::new(self.snapshot, self.opts.format, virtual_size)
                })));
            }
        };
        let sent = Progressed::default();
        let file_size = match layout {
            Some(layout) => {
                self.send_layout(layout, &plan, &upload, base, uploads, &sent);
                layout.file_size()
            }
            None => self.send_stream(part, &upload, uploads, &sent),
        };
        let failed = sent.error.lock().expect("error slot").take();
        if let Some(e) = failed.or_else(|| {
            self.opts
                .cancel
                .is_cancelled()
                .then(|| Error::new(ErrorKind::Cancelled, "export cancelled"))
        }) {
            return Err(self.stopped(&upload, e));
        }
        if sent.base_changed.load(Ordering::SeqCst) {
            self.target.abort_upload(self.key, &upload.id)?;
            if let Some(job) = &upload.job {
                self.db(|db| db.set_export_upload(job, "", ""))?;
            }
            return Ok(Outcome::BaseChanged);
        }
        let mut parts = sent.parts.into_inner().expect("parts");
        parts.sort_by_key(|p| p.number);
        let total: u64 = parts.iter().map(|p| p.size).sum();
        if total != file_size {
            return Err(self.stopped(
                &upload,
                Error::internal(format!("the parts hold {total} bytes, not {file_size}")),
            ));
        }
        self.target
            .complete_upload(self.key, &upload.id, &parts)
            .map_err(|e| self.stopped(&upload, e))?;
        let head = self.target.head(self.key)?.ok_or_else(|| {
            Error::new(ErrorKind::Store, "the completed object is not there").with_object(self.key)
        })?;
        if let Some(job) = &upload.job {
            self.db(|db| db.finish_export(job, &head.etag, head.size))?;
            self.sweep(job, None)?;
        }
        let virtual_size = layout.map_or_else(
            || vmdk::capacity_bytes(self.snapshot),
            <dyn Layout>::disk_size,
        );
        Ok(Outcome::Done(Box::new(ExportReport {
            output: self.url.to_owned(),
            file_size,
            bytes_sent: sent.bytes_sent.into_inner(),
            bytes_copied: sent.bytes_copied.into_inner(),
            bytes_resumed: sent.bytes_resumed.into_inner(),
            parts: u32::try_from(parts.len()).unwrap_or(u32::MAX),
            base: base.map(|b| b.snapshot.id.clone()),
            job: upload.job.clone(),
            resumed: !upload.acked.is_empty(),
            etag: Some(head.etag),
            ..ExportReport::new(self.snapshot, self.opts.format, virtual_size)
        })))
    }

    /// An error that stopped a run: recorded on its job, whose upload is kept to resume; an
    /// upload no job records is aborted (nothing could resume it).
    fn stopped(&self, upload: &Upload, e: Error) -> Error {
        match &upload.job {
            Some(job) => {
                let _ = self.db(|db| db.set_error(job, &e.to_string()));
            }
            None => {
                if let Err(abort) = self.target.abort_upload(self.key, &upload.id) {
                    tracing::warn!(error = %abort, "aborting the export's upload");
                }
            }
        }
        e
    }

    /// The part size: as configured, or [`DEFAULT_PART`] unless the image needs larger parts
    /// to stay within the store's part count.
    fn part_size(&self, file: u64) -> Result<u64> {
        let rules = self.rules;
        let need = file.div_ceil(u64::from(rules.max_parts)).div_ceil(MIB) * MIB;
        let part = match self.opts.part_size as u64 {
            0 => DEFAULT_PART.max(need).max(rules.min_part),
            p if p < rules.min_part || p > rules.max_part => {
                return Err(Error::config(format!(
                    "part size {p} is outside the store's {}..={} bytes",
                    rules.min_part, rules.max_part
                ))
                .with_setting("part_size"));
            }
            p if p < need => {
                return Err(Error::config(format!(
                    "parts of {p} bytes would be more than the store's {} for this image; \
                     use {need} or more",
                    rules.max_parts
                ))
                .with_setting("part_size"));
            }
            p => p,
        };
        Ok(part)
    }

    /// How many parts may be in flight within the memory budget (at least one).
    fn fit(&self, part: u64, uploads: usize, streaming: bool) -> Result<usize> {
        let budget = match self.opts.memory_budget {
            0 => crate::pipeline::default_memory_budget(),
            n => n,
        } as u64;
        let chunk = u64::from(self.snapshot.chunk_size);
        // Filling: each sender holds its part and a range being decoded. Streaming: parts
        // queued and in flight, the part being made, and the chunk being deflated.
        let (fixed, each) = if streaming {
            (part + 3 * chunk, 2 * part)
        } else {
            (0, part + FILL_EXTRA + 2 * chunk)
        };
        let fits = budget.saturating_sub(fixed) / each;
        if fits == 0 {
            return Err(Error::config(format!(
                "a memory budget of {budget} bytes does not hold one part of {part} bytes in \
                 flight; give {} or more",
                fixed + each
            ))
            .with_setting("memory_budget"));
        }
        Ok(uploads.min(usize::try_from(fits).unwrap_or(usize::MAX)))
    }

    /// A digest of what the parts are: a run with another plan does not continue an upload.
    fn plan_text(&self, plan: &[PartPlan], part: u64, base: Option<&Base>) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.opts.format.name().as_bytes());
        h.update(self.snapshot.id.as_bytes());
        h.update(&part.to_le_bytes());
        if plan.is_empty() {
            // Streamed: the bytes are made by this version's encoder.
            h.update(env!("CARGO_PKG_VERSION").as_bytes());
        }
        for p in plan {
            h.update(&p.range.start.to_le_bytes());
            h.update(&p.range.end.to_le_bytes());
            h.update(&[u8::from(p.copy)]);
            h.update(&p.staged.to_le_bytes());
        }
        if let Some(b) = base {
            h.update(b.key.as_bytes());
            h.update(b.etag.as_bytes());
        }
        format!("v2 {}", h.finalize().to_hex())
    }

    /// The upload to write to: a stopped run's of the same export and plan (with the parts
    /// the store still holds), else a new one, recorded before any part is sent.
    fn open_upload(&self, plan: &str) -> Result<Opened> {
        let store_id = self.store.config().store_id.clone();
        let format = self.opts.format.name();
        let metadata = HashMap::from([
            (META_SNAPSHOT.to_owned(), self.snapshot.id.clone()),
            (META_FORMAT.to_owned(), format.to_owned()),
            (META_STORE.to_owned(), store_id.clone()),
        ]);
        let Some(db) = &self.db else {
            let id = self.target.create_upload_with(self.key, &metadata)?;
            return Ok(Opened::Upload(Upload {
                id,
                job: None,
                acked: HashMap::new(),
                _lock: None,
            }));
        };
        let found = {
            let db = db.lock().expect("job database");
            db.find_export(&store_id, self.url, format, &self.snapshot.id)?
        };
        let resuming = found.is_some();
        let (job, export) = if let Some(found) = found {
            found
        } else {
            let key = JobKey {
                store: self.store.location(),
                store_id: store_id.clone(),
                source: self.url.to_owned(),
                disk: self.snapshot.disk.name.clone(),
                chunk_size: self.snapshot.chunk_size,
            };
            let export = ExportJob {
                target: self.url.to_owned(),
                format: format.to_owned(),
                snapshot: self.snapshot.id.clone(),
                plan: plan.to_owned(),
                upload_id: None,
                etag: None,
                size: 0,
            };
            let db = db.lock().expect("job database");
            (db.create_export(&key, &export)?, export)
        };
        let lock = db.lock().expect("job database").lock(&job.id)?;
        if resuming {
            self.db(|db| db.start_run(&job.id))?;
        }
        // The same plan's upload continues with the parts the store lists as recorded (an
        // upload of another plan is aborted by the sweep below).
        if let Some(id) = export.upload_id.filter(|id| !id.is_empty()) {
            match self.target.list_parts(self.key, &id) {
                Ok(_) if export.plan != plan => {}
                Ok(listed) => {
                    let recorded = self.db(|db| db.export_parts(&job.id))?.unwrap_or_default();
                    let acked: HashMap<u32, Part> = recorded
                        .into_iter()
                        .filter(|r| {
                            listed.iter().any(|l| {
                                l.number == r.number && l.etag == r.etag && l.size == r.size
                            })
                        })
                        .map(|p| (p.number, p))
                        .collect();
                    self.sweep(&job.id, Some(&id))?;
                    return Ok(Opened::Upload(Upload {
                        id,
                        job: Some(job.id),
                        acked,
                        _lock: Some(lock),
                    }));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    // Completed, and killed before it was recorded: the object says so (it is
                    // this store's export of this snapshot in this format, whatever the plan
                    // that made it).
                    if let Some(head) = self.target.head(self.key)?
                        && [
                            (META_SNAPSHOT, self.snapshot.id.as_str()),
                            (META_FORMAT, format),
                            (META_STORE, store_id.as_str()),
                        ]
                        .iter()
                        .all(|(k, v)| head.metadata.get(*k).map(String::as_str) == Some(*v))
                    {
                        let parts = self
                            .db(|db| db.export_parts(&job.id))?
                            .map_or(0, |p| u32::try_from(p.len()).unwrap_or(u32::MAX));
                        return Ok(Opened::Done {
                            job: job.id,
                            head,
                            parts,
                            _lock: lock,
                        });
                    }
                    if export.plan == plan {
                        self.reporter.warn(format!(
                            "the stopped export's upload to {} is gone (expired, or aborted): \
                             sending it anew",
                            self.url
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let id = self.target.create_upload_with(self.key, &metadata)?;
        self.db(|db| db.set_export_upload(&job.id, plan, &id))?;
        self.sweep(&job.id, Some(&id))?;
        Ok(Opened::Upload(Upload {
            id,
            job: Some(job.id),
            acked: HashMap::new(),
            _lock: Some(lock),
        }))
    }

    /// Aborts the uploads of the target key this job started and no longer uses (one whose
    /// id a kill kept from being recorded, or that of an earlier plan): every upload of the
    /// key started since the job was, but `keep`.
    fn sweep(&self, job: &str, keep: Option<&str>) -> Result<()> {
        let Some(record) = self.db(|db| db.get(job))? else {
            return Ok(());
        };
        // Clocks differ: a minute's slack before the job was recorded.
        let since = record.created_unix_ms.saturating_sub(60_000);
        for u in self.target.uploads_of(self.key)? {
            if Some(u.upload_id.as_str()) != keep && u.initiated_unix_ms.is_some_and(|t| t >= since)
            {
                tracing::info!(
                    key = self.key,
                    upload = u.upload_id,
                    "aborting an upload of this export that is not in use"
                );
                self.target.abort_upload(self.key, &u.upload_id)?;
            }
        }
        sweep_staging(self.target, self.key, since)
    }

    /// Records a part the store acknowledged.
    fn record(
        &self,
        upload: &Upload,
        part: &Part,
        sent_bytes: u64,
        sent: &Progressed,
    ) -> Result<()> {
        if let Some(job) = &upload.job {
            self.db(|db| db.record_export_part(job, part, sent_bytes))?;
        }
        sent.parts.lock().expect("parts").push(part.clone());
        Ok(())
    }

    /// Sends the parts of a laid-out image on `uploads` threads, each filling its part.
    fn send_layout(
        &self,
        layout: &dyn Layout,
        plan: &[PartPlan],
        upload: &Upload,
        base: Option<&Base>,
        uploads: usize,
        sent: &Progressed,
    ) {
        let next = AtomicUsize::new(0);
        let pages = PageCache::default();
        let counters = self.reporter.counters().clone();
        // Progress counts the disk: a part moves it by the share of the file it is.
        let file = layout.file_size().max(1);
        let disk = self.snapshot.disk.virtual_size;
        let advance = |range: &Range<u64>| {
            let share = u128::from(range.end - range.start) * u128::from(disk) / u128::from(file);
            Counters::add(
                &counters.bytes_done,
                u64::try_from(share).unwrap_or(u64::MAX),
            );
            self.reporter.tick();
        };
        std::thread::scope(|s| {
            for _ in 0..uploads.min(plan.len()).max(1) {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    let mut bufs = Buffers::default();
                    loop {
                        if sent.stop.load(Ordering::SeqCst) || self.opts.cancel.is_cancelled() {
                            return;
                        }
                        let Some(p) = plan.get(next.fetch_add(1, Ordering::SeqCst)) else {
                            return;
                        };
                        let len = p.range.end - p.range.start;
                        if let Some(a) = upload.acked.get(&p.number).filter(|a| a.size == len) {
                            sent.bytes_resumed.fetch_add(len, Ordering::SeqCst);
                            sent.parts.lock().expect("parts").push(a.clone());
                            advance(&p.range);
                            continue;
                        }
                        let done = if p.copy {
                            self.copy_part(p, upload, base, sent)
                        } else if p.staged > 0 {
                            self.stage_part(p, upload, base, sent, |range| {
                                self.fill(layout, range, &mut buf, &mut bufs, &pages)?;
                                Ok(bytes::Bytes::from(std::mem::take(&mut buf)))
                            })
                        } else {
                            self.fill(layout, p.range.clone(), &mut buf, &mut bufs, &pages)
                                .and_then(|()| {
                                    let data = bytes::Bytes::from(std::mem::take(&mut buf));
                                    let part = self
                                        .target
                                        .upload_part(self.key, &upload.id, p.number, data)?;
                                    self.record(upload, &part, len, sent)?;
                                    sent.bytes_sent.fetch_add(len, Ordering::SeqCst);
                                    Ok(())
                                })
                        };
                        match done {
                            Ok(()) => advance(&p.range),
                            Err(e) => {
                                sent.fail(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
    }

    /// Copies a part from the base export; a base that changed stops the run.
    fn copy_part(
        &self,
        p: &PartPlan,
        upload: &Upload,
        base: Option<&Base>,
        sent: &Progressed,
    ) -> Result<()> {
        let base = base.ok_or_else(|| Error::internal("a part copy without a base"))?;
        let copied = self.target.upload_part_copy(
            self.key,
            &upload.id,
            p.number,
            &base.key,
            p.range.clone(),
            &base.etag,
        )?;
        if let Some(part) = copied {
            self.record(upload, &part, 0, sent)?;
            sent.bytes_copied.fetch_add(part.size, Ordering::SeqCst);
        } else {
            sent.base_changed.store(true, Ordering::SeqCst);
            sent.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Makes a staged part (see [`delta_parts`]): a staging object beside the target holds
    /// the part's unchanged first bytes, copied from the base export, then its changed bytes,
    /// sent (`fill` makes them); the part is a copy of that object, which is then deleted. A
    /// base that changed stops the run as for a copied part.
    fn stage_part(
        &self,
        p: &PartPlan,
        upload: &Upload,
        base: Option<&Base>,
        sent: &Progressed,
        fill: impl FnOnce(Range<u64>) -> Result<bytes::Bytes>,
    ) -> Result<()> {
        let base = base.ok_or_else(|| Error::internal("a staged part without a base"))?;
        let stage = staging_key(self.key, p.number);
        let stage_upload = self.target.create_upload(&stage)?;
        let prefix = p.range.start..p.range.start + p.staged;
        let staged = (|| {
            let Some(first) = self.target.upload_part_copy(
                &stage,
                &stage_upload,
                1,
                &base.key,
                prefix.clone(),
                &base.etag,
            )?
            else {
                return Ok(false);
            };
            let data = fill(prefix.end..p.range.end)?;
            let second = self.target.upload_part(&stage, &stage_upload, 2, data)?;
            self.target
                .complete_upload(&stage, &stage_upload, &[first, second])?;
            Ok(true)
        })();
        match staged {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.target.abort_upload(&stage, &stage_upload);
                sent.base_changed.store(true, Ordering::SeqCst);
                sent.stop.store(true, Ordering::SeqCst);
                return Ok(());
            }
            Err(e) => {
                let _ = self.target.abort_upload(&stage, &stage_upload);
                return Err(e);
            }
        }
        let copied = self
            .target
            .head(&stage)?
            .map(|head| {
                self.target.upload_part_copy(
                    self.key,
                    &upload.id,
                    p.number,
                    &stage,
                    0..p.range.end - p.range.start,
                    &head.etag,
                )
            })
            .transpose()?
            .flatten();
        let _ = self.target.delete(&stage);
        let part = copied.ok_or_else(|| {
            Error::new(
                ErrorKind::Store,
                format!(
                    "the staging object of part {} changed or vanished before it was copied",
                    p.number
                ),
            )
            .with_object(&stage)
        })?;
        let sent_bytes = p.range.end - prefix.end;
        self.record(upload, &part, sent_bytes, sent)?;
        sent.bytes_sent.fetch_add(sent_bytes, Ordering::SeqCst);
        sent.bytes_copied.fetch_add(p.staged, Ordering::SeqCst);
        Ok(())
    }

    /// Fills `buf` with the file's bytes `range`: its metadata, and the chunks of the disk
    /// placed there (holes read as zeros).
    fn fill(
        &self,
        layout: &dyn Layout,
        range: Range<u64>,
        buf: &mut Vec<u8>,
        bufs: &mut Buffers,
        pages: &PageCache,
    ) -> Result<()> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::internal("a part larger than memory"))?;
        buf.clear();
        buf.resize(len, 0);
        layout.metadata_in(range.clone(), &mut |at, bytes| {
            let from = usize::try_from(at - range.start)
                .map_err(|_| Error::internal("metadata outside its part"))?;
            buf[from..from + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })?;
        let span = layout.disk_span(range.clone());
        if span.is_empty() {
            return Ok(());
        }
        let chunk = u64::from(self.snapshot.chunk_size);
        let size = self.snapshot.disk.virtual_size;
        let per_page = u64::from(self.snapshot.page_entries);
        let mut wanted: HashMap<Id, Vec<Place>, crate::store::IdHash> = HashMap::default();
        for c in span.start / chunk..span.end.div_ceil(chunk) {
            let ids = pages.get(
                self.store,
                self.snapshot,
                usize::try_from(c / per_page).map_err(|_| Error::internal("page index"))?,
            )?;
            let id = usize::try_from(c % per_page)
                .ok()
                .and_then(|i| ids.get(i))
                .copied()
                .unwrap_or(ZERO_ID);
            if id != ZERO_ID {
                let offset = c * chunk;
                let n = usize::try_from(chunk.min(size - offset))
                    .map_err(|_| Error::internal("a chunk larger than memory"))?;
                wanted.entry(id).or_default().push((offset, n));
            }
        }
        let jobs = RefCell::new(Vec::new());
        send_reads(self.store, &self.index, wanted, &|job, _| {
            jobs.borrow_mut().push(job);
            true
        });
        let out = Mutex::new(&mut buf[..]);
        let write = |bytes: &mut AlignedBuf, virt: u64| -> Result<()> {
            let bytes: &[u8] = bytes;
            let mut out = out.lock().expect("part buffer");
            let mut data = 0u64;
            layout.place(virt, bytes.len(), &mut |at, piece| {
                let piece_len = (piece.end - piece.start) as u64;
                let start = at.max(range.start);
                let end = (at + piece_len).min(range.end);
                if start < end {
                    let from = piece.start + usize::try_from(start - at).unwrap_or(0);
                    let to = piece.start + usize::try_from(end - at).unwrap_or(0);
                    let dst = usize::try_from(start - range.start).unwrap_or(0);
                    out[dst..dst + (to - from)].copy_from_slice(&bytes[from..to]);
                    data += (to - from) as u64;
                }
                Ok(())
            })?;
            Counters::add(&self.reporter.counters().bytes_written, data);
            Ok(())
        };
        let lost = |e: Error, places: &[Place]| -> Result<()> {
            Err(match places.first() {
                Some(&(offset, _)) => e.at_disk_offset(offset),
                None => e,
            })
        };
        for job in jobs.into_inner() {
            match job {
                Job::Range(r) => r.restore(self.store, bufs, &write, &lost)?,
                Job::Missing { error, places } => lost(error, &places)?,
                Job::Zero { .. } => {}
            }
        }
        Ok(())
    }

    /// Makes a streamOptimized VMDK in order, cut into parts of `part` bytes that `uploads`
    /// threads send; returns the file's size.
    fn send_stream(&self, part: u64, upload: &Upload, uploads: usize, sent: &Progressed) -> u64 {
        let (tx, rx) = crossbeam_channel::bounded::<(u32, Vec<u8>)>(uploads);
        let name = self
            .key
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("disk.vmdk")
            .to_owned();
        let mut size = 0;
        std::thread::scope(|s| {
            for _ in 0..uploads {
                let rx = rx.clone();
                s.spawn(move || {
                    for (number, data) in rx {
                        if sent.stop.load(Ordering::SeqCst) {
                            continue;
                        }
                        let len = data.len() as u64;
                        let done = self
                            .target
                            .upload_part(self.key, &upload.id, number, bytes::Bytes::from(data))
                            .and_then(|part| self.record(upload, &part, len, sent));
                        match done {
                            Ok(()) => {
                                sent.bytes_sent.fetch_add(len, Ordering::SeqCst);
                            }
                            Err(e) => sent.fail(e),
                        }
                    }
                });
            }
            drop(rx);
            let mut sink = PartSink {
                part: usize::try_from(part).unwrap_or(usize::MAX),
                buf: Vec::new(),
                start: 0,
                number: 0,
                tx,
                upload,
                sent,
            };
            let made = vmdk::write(
                self.store,
                self.snapshot,
                &name,
                &mut sink,
                self.opts,
                self.reporter,
            )
            .and_then(|file| sink.finish().map(|()| file));
            match made {
                Ok(file) => size = file,
                Err(e) => sent.fail(e),
            }
        });
        size
    }
}

/// The parts of a stream: bytes written in order, cut into parts handed to the senders (a
/// part a stopped run sent, that the store holds, is not sent again when this run's bytes
/// are the same).
struct PartSink<'a> {
    part: usize,
    buf: Vec<u8>,
    /// File offset of `buf`'s first byte.
    start: u64,
    /// The last part's number.
    number: u32,
    tx: crossbeam_channel::Sender<(u32, Vec<u8>)>,
    upload: &'a Upload,
    sent: &'a Progressed,
}

impl PartSink<'_> {
    fn emit(&mut self) -> Result<()> {
        if self.sent.stop.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Cancelled, "the export stopped"));
        }
        self.number += 1;
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part));
        self.start += data.len() as u64;
        if let Some(a) = self.upload.acked.get(&self.number) {
            if a.size == data.len() as u64 && a.crc32c == part_checksum(&data) {
                self.sent.bytes_resumed.fetch_add(a.size, Ordering::SeqCst);
                self.sent.parts.lock().expect("parts").push(a.clone());
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::Store,
                format!(
                    "part {} of the stopped export differs from what this run makes (another \
                     blockferry version made it?): abandon the job (blockferry jobs abandon) \
                     and export again",
                    self.number
                ),
            ));
        }
        self.tx
            .send((self.number, data))
            .map_err(|_| Error::new(ErrorKind::Cancelled, "the export stopped"))
    }

    /// Sends what is left (a whole image is at least one part).
    fn finish(&mut self) -> Result<()> {
        if !self.buf.is_empty() || self.number == 0 {
            self.emit()?;
        }
        Ok(())
    }
}

impl Sink for PartSink<'_> {
    fn write_at(&mut self, mut bytes: &[u8], offset: u64) -> Result<()> {
        let end = self.start + self.buf.len() as u64;
        let mut gap = offset
            .checked_sub(end)
            .ok_or_else(|| Error::internal("a stream written out of order"))?;
        while gap > 0 || !bytes.is_empty() {
            let room = self.part - self.buf.len();
            if gap > 0 {
                let n = usize::try_from(gap).unwrap_or(usize::MAX).min(room);
                self.buf.resize(self.buf.len() + n, 0);
                gap -= n as u64;
            } else {
                let n = bytes.len().min(room);
                self.buf.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
            }
            if self.buf.len() == self.part {
                self.emit()?;
            }
        }
        Ok(())
    }
}

/// The pages of a snapshot read last, shared by the senders (neighbouring parts read the
/// same page).
#[derive(Default)]
struct PageCache {
    pages: Mutex<Vec<(usize, Arc<Vec<Id>>)>>,
}

impl PageCache {
    const KEEP: usize = 8;

    fn get(&self, store: &Store, snapshot: &Snapshot, page: usize) -> Result<Arc<Vec<Id>>> {
        if let Some((_, ids)) = self
            .pages
            .lock()
            .expect("pages")
            .iter()
            .find(|(p, _)| *p == page)
        {
            return Ok(ids.clone());
        }
        let ids = Arc::new(match snapshot.page_id(page)? {
            Some(id) => store.read_page(&id)?,
            None => Vec::new(),
        });
        let mut pages = self.pages.lock().expect("pages");
        if pages.len() >= Self::KEEP {
            pages.remove(0);
        }
        pages.push((page, ids.clone()));
        Ok(ids)
    }
}

/// The staging object of part `number` of an export to `key`: beside it (where whoever may
/// write the target may write), deleted once the part is copied from it.
fn staging_key(key: &str, number: u32) -> String {
    format!("{key}{STAGING_SUFFIX}{number}")
}

/// What a staging object's key adds to the target's.
const STAGING_SUFFIX: &str = ".blockferry-part-";

/// Removes what staged parts of an export to `key` left behind (a run stopped while it
/// made one): the uploads of staging objects started since `since` (ms), and the objects.
pub(crate) fn sweep_staging(target: &S3Store, key: &str, since: u64) -> Result<()> {
    let prefix = format!("{key}{STAGING_SUFFIX}");
    for u in target.uploads_under(&prefix)? {
        if u.initiated_unix_ms.is_some_and(|t| t >= since) {
            target.abort_upload(&u.key, &u.upload_id)?;
        }
    }
    for stage in target.list(&prefix)? {
        target.delete(&stage)?;
    }
    Ok(())
}

/// Parts of `part` bytes covering a file of `file` bytes, all sent.
fn uniform_plan(file: u64, part: u64) -> Result<Vec<PartPlan>> {
    let mut plan = Vec::new();
    let mut at = 0;
    while at < file || plan.is_empty() {
        let end = (at + part).min(file);
        plan.push(PartPlan {
            number: u32::try_from(plan.len() + 1).map_err(|_| Error::internal("too many parts"))?,
            range: at..end,
            copy: false,
            staged: 0,
        });
        at = end;
        if file == 0 {
            break;
        }
    }
    Ok(plan)
}

impl ObjectExport<'_> {
    /// The parts of a delta export on `base`: changed file ranges sent, the rest copied;
    /// `None` (with a warning) when the changes need more parts than the store takes.
    fn delta_plan(&self, layout: &dyn Layout, base: &Base) -> Result<Option<Vec<PartPlan>>> {
        let mut changed = Vec::new();
        for r in changed_ranges(self.store, &base.snapshot, self.snapshot)? {
            let len = usize::try_from(r.end - r.start)
                .map_err(|_| Error::internal("a range larger than memory"))?;
            layout.place(r.start, len, &mut |at, piece| {
                changed.push(at..at + (piece.end - piece.start) as u64);
                Ok(())
            })?;
        }
        // Metadata is written anew (a fixed VHD's footer has a timestamp).
        layout.metadata(&mut |at, bytes| {
            changed.push(at..at + bytes.len() as u64);
            Ok(())
        })?;
        changed.sort_by_key(|r| r.start);
        let plan = delta_parts(layout.file_size(), &changed, self.rules);
        if plan.len() > self.rules.max_parts as usize {
            self.reporter.warn(format!(
                "the changes since snapshot {} are too scattered for one upload's {} parts: \
                 sending the whole image",
                base.snapshot.id, self.rules.max_parts
            ));
            return Ok(None);
        }
        Ok(Some(plan))
    }
}

/// The parts of a file of `file` bytes whose `changed` ranges (sorted by start) must be sent.
///
/// Changes closer than the store's smallest part are joined (the copy between them would be
/// too small); the rest of the file is copied, in parts of at most the store's largest. A run
/// of changes at least a smallest part long is sent as it is. A shorter one (the usual
/// delta: a few scattered chunks) would have to be sent widened to a smallest part; instead
/// its part is *staged*: the unchanged bytes before it are copied into a staging object
/// together with the changed bytes, sent as that object's last part (which may be of any
/// size), and the part is a copy of the staging object. Only a run that starts within a
/// smallest part of the file's start (nothing unchanged before it to stage) is widened.
fn delta_parts(file: u64, changed: &[Range<u64>], rules: PartRules) -> Vec<PartPlan> {
    let min = rules.min_part.max(1);
    // Runs of changes; each gap between two is a copy of at least a smallest part.
    let mut runs: Vec<Range<u64>> = Vec::new();
    for c in changed.iter().filter(|c| !c.is_empty()) {
        let c = c.start.min(file)..c.end.min(file);
        match runs.last_mut() {
            Some(last) if c.start < last.end + min => last.end = last.end.max(c.end),
            // Too close to the start to leave a copy before it.
            None if c.start < min => runs.push(0..c.end),
            _ => runs.push(c),
        }
    }
    // A short run at the start: widened to a smallest part, and joined with those the
    // widening brings too close.
    if let Some(first) = runs.first().cloned()
        && first.start == 0
        && first.end < min.min(file)
    {
        let mut joined = 0..min.min(file);
        let mut rest = runs.split_off(1).into_iter().peekable();
        while let Some(next) = rest.next_if(|r| r.start < joined.end + min) {
            joined.end = joined.end.max(next.end);
        }
        runs = std::iter::once(joined).chain(rest).collect();
    }
    let mut plan: Vec<PartPlan> = Vec::new();
    let push = |range: Range<u64>, copy: bool, plan: &mut Vec<PartPlan>| {
        let len = range.end - range.start;
        let most = if copy {
            rules.max_part
        } else {
            DELTA_SEND_PART.max(2 * min)
        };
        let n = len.div_ceil(most).max(1);
        for k in 0..n {
            let start = range.start + len * k / n;
            let end = range.start + len * (k + 1) / n;
            plan.push(PartPlan {
                number: u32::try_from(plan.len() + 1).unwrap_or(u32::MAX),
                range: start..end,
                copy,
                staged: 0,
            });
        }
    };
    let mut at = 0;
    for run in runs {
        let short = run.end - run.start < min && run.end < file;
        // The unchanged bytes staged before a short run: a smallest part, or the whole gap
        // when what it would leave to copy is smaller than that.
        let staged = if short {
            let gap = run.start - at;
            if gap >= 2 * min { min } else { gap }
        } else {
            0
        };
        let start = run.start - staged;
        if start > at {
            push(at..start, true, &mut plan);
        }
        if staged > 0 {
            plan.push(PartPlan {
                number: u32::try_from(plan.len() + 1).unwrap_or(u32::MAX),
                range: start..run.end,
                copy: false,
                staged,
            });
        } else {
            push(run.clone(), false, &mut plan);
        }
        at = run.end;
    }
    if at < file {
        push(at..file, true, &mut plan);
    }
    plan
}

#[cfg(test)]
mod tests;
