//! Cutover: the end of a migration, run by itself. Sync cycles keep the store and the target
//! (a raw file, or an object) close to the live source; after each one the final delta's
//! duration is predicted from the recent cycles (each covered the changes made while the one
//! before ran, as the final delta will) and weighed against the downtime allowed. When it is
//! a go (or asked for now): the pre-hook stops the source, the final delta is taken, the
//! chunks it wrote and a sample of the others are read back, the target is brought to the
//! final snapshot (only what changed), optionally booted, and the post-hook starts the
//! target. Anything failing after the pre-hook started runs the rollback hook (restart the
//! source); everything stays resumable, and a cutover run again continues.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::export::{ExportFormat, ExportOptions, changed_ranges, export};
use super::sync::{ContinuousReplication, SyncRequest};
use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Event, Observer};
use crate::store::format::ZERO_ID;
use crate::store::{Snapshot, Store};

/// Cycles whose durations predict the final delta's.
const RECENT: usize = 3;

/// What a cutover does.
#[derive(Debug, Clone)]
pub struct CutoverRequest {
    /// The live source, its changes, and each cycle's replication.
    pub sync: SyncRequest,
    /// The downtime allowed: a cutover starts when the prediction is within it.
    pub max_downtime: Duration,
    /// Cut over now, whatever the prediction.
    pub now: bool,
    /// The pause between sync cycles.
    pub interval: Duration,
    /// Cycles run at most before giving up (no go).
    pub max_cycles: u64,
    /// Stops (or freezes) the source: a shell command.
    pub pre_hook: Option<String>,
    /// Starts the target (launch it, switch DNS…): a shell command, with the result in its
    /// environment (`BLOCKFERRY_SNAPSHOT`, `BLOCKFERRY_TARGET`, …).
    pub post_hook: Option<String>,
    /// Restarts the source when anything after the pre-hook failed.
    pub rollback_hook: Option<String>,
    /// How long each hook may take.
    pub hook_timeout: Duration,
    /// The target: a raw file, or `s3://bucket/key`.
    pub to: String,
    /// The target's image format (a file target is raw).
    pub format: ExportFormat,
    /// How the export to an object goes (S3 settings, parts).
    pub export: ExportOptions,
    /// Boot the final snapshot before the post-hook (a failed boot rolls back).
    pub boot_test: Option<crate::boot::BootTestOptions>,
    /// Share of the chunks the final delta did not write that are read back too.
    pub verify_sample: f64,
    /// Cancels the cutover (before the pre-hook: it just stops; after: it rolls back).
    pub cancel: CancelToken,
}

/// One step of a cutover.
#[derive(Debug, Clone, Serialize)]
pub struct CutoverStep {
    /// `sync`, `pre-hook`, `final-delta`, `verify`, `export`, `boot-test`, `post-hook`,
    /// `rollback-hook`.
    pub name: String,
    /// Start, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// End, ms since the Unix epoch.
    pub ended_unix_ms: u64,
    /// Its duration.
    pub seconds: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// What it did, or why it failed.
    pub detail: String,
}

/// What a cutover did.
#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    /// `completed`, `rolled-back` (failed after the pre-hook; the source restarted) or
    /// `failed` (before the pre-hook; nothing stopped).
    pub outcome: String,
    /// Every step, in order.
    pub steps: Vec<CutoverStep>,
    /// Sync cycles run before the cutover.
    pub cycles: u64,
    /// The downtime predicted when the cutover started, in seconds.
    pub predicted_downtime_seconds: Option<f64>,
    /// The downtime measured: pre-hook start to post-hook end (to the failure, if any).
    pub measured_downtime_seconds: Option<f64>,
    /// The data lost had the source died when the cutover started: the age of the newest
    /// snapshot then, in seconds.
    pub rpo_seconds: Option<f64>,
    /// The final snapshot.
    pub snapshot: Option<String>,
    /// Bytes the final delta stored.
    pub final_delta_bytes: u64,
    /// Chunks read back after the final delta, and whether all were intact.
    pub verified_chunks: u64,
    /// Whether the read back found every chunk intact.
    pub verified: bool,
    /// Where the target is.
    pub target: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Runs a cutover of `req.sync.image` into `store` and out to `req.to`. The report is
/// returned whatever the outcome; an error is for what stopped it before any step ran.
pub fn cutover(
    store: &Arc<Store>,
    req: &CutoverRequest,
    observer: &dyn Observer,
) -> Result<CutoverReport> {
    let started = std::time::Instant::now();
    let result = cutover_run(store, req, observer);
    let mut ev = crate::store::audit::AuditEvent::of_report("cutover", started, &result, "");
    ev.object = Some(req.to.clone());
    store.audited(&ev, result)
}

fn cutover_run(
    store: &Arc<Store>,
    req: &CutoverRequest,
    observer: &dyn Observer,
) -> Result<CutoverReport> {
    if req.format != ExportFormat::Raw && !req.to.starts_with("s3://") {
        return Err(Error::config(
            "a cutover to a file writes a raw disk (only what changed, each cycle); give \
             s3://BUCKET/KEY for another format",
        )
        .with_setting("format"));
    }
    let mut sync = ContinuousReplication::new(store, req.sync.clone())?;
    let mut run = Run {
        store,
        req,
        observer,
        report: CutoverReport {
            outcome: "failed".to_owned(),
            steps: Vec::new(),
            cycles: 0,
            predicted_downtime_seconds: None,
            measured_downtime_seconds: None,
            rpo_seconds: None,
            snapshot: None,
            final_delta_bytes: 0,
            verified_chunks: 0,
            verified: false,
            target: req.to.clone(),
            error: None,
        },
        recent: Vec::new(),
    };
    // Sync until the prediction is a go.
    loop {
        if req.cancel.is_cancelled() {
            run.report.error = Some("cancelled before the cutover".to_owned());
            return Ok(run.report);
        }
        let synced = run.step("sync", |run| {
            let t = Instant::now();
            let cycle = sync.cycle(run.store, None, &req.cancel, run.observer)?;
            let stored = cycle.report.as_ref().map_or(0, |r| r.bytes_stored);
            let snapshot = run.latest(&sync)?;
            let updated = run.update_target(&snapshot)?;
            let secs = t.elapsed().as_secs_f64();
            run.recent.push(secs);
            Ok(format!(
                "cycle {}: snapshot {}, {stored} bytes stored, target {updated}, {secs:.2}s",
                cycle.status.cycle, snapshot.id
            ))
        });
        if let Err(e) = synced {
            run.report.error = Some(e.to_string());
            return Ok(run.report);
        }
        run.report.cycles += 1;
        let predicted = run.predict();
        let go = req.now || (run.report.cycles >= 2 && predicted <= req.max_downtime.as_secs_f64());
        run.observer.event(&Event::Note(format!(
            "cutover: downtime predicted {predicted:.1}s (allowed {:.1}s): {}",
            req.max_downtime.as_secs_f64(),
            if go { "go" } else { "no go yet" }
        )));
        run.report.predicted_downtime_seconds = Some(predicted);
        if go {
            break;
        }
        if run.report.cycles >= req.max_cycles {
            run.report.error = Some(format!(
                "no go after {} cycles: the downtime predicted ({predicted:.1}s) stays above \
                 the {:.1}s allowed",
                run.report.cycles,
                req.max_downtime.as_secs_f64()
            ));
            return Ok(run.report);
        }
        let pause = Instant::now();
        while pause.elapsed() < req.interval && !req.cancel.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    run.report.rpo_seconds = sync.status().lag_seconds;
    // The cutover: from here, a failure rolls back.
    let down = Instant::now();
    let result = run.cut(&mut sync);
    run.report.measured_downtime_seconds = Some(down.elapsed().as_secs_f64());
    match result {
        Ok(()) => "completed".clone_into(&mut run.report.outcome),
        Err(e) => {
            run.report.error = Some(e.to_string());
            let rolled = run.step("rollback-hook", |run| {
                run.hook(
                    req.rollback_hook.as_deref(),
                    &[("BLOCKFERRY_ERROR", &e.to_string())],
                )
            });
            run.report.outcome = if rolled.is_ok() {
                "rolled-back".to_owned()
            } else {
                "failed".to_owned()
            };
        }
    }
    Ok(run.report)
}

struct Run<'a> {
    store: &'a Arc<Store>,
    req: &'a CutoverRequest,
    observer: &'a dyn Observer,
    report: CutoverReport,
    /// Durations of the sync cycles (target update included).
    recent: Vec<f64>,
}

impl Run<'_> {
    /// Runs a step and records it.
    fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<String>) -> Result<String> {
        let started = now_ms();
        let t = Instant::now();
        let result = f(self);
        let step = CutoverStep {
            name: name.to_owned(),
            started_unix_ms: started,
            ended_unix_ms: now_ms(),
            seconds: t.elapsed().as_secs_f64(),
            ok: result.is_ok(),
            detail: match &result {
                Ok(d) => d.clone(),
                Err(e) => e.to_string(),
            },
        };
        self.observer.event(&Event::Note(format!(
            "cutover step {name}: {} ({:.2}s)",
            step.detail, step.seconds
        )));
        self.report.steps.push(step);
        result
    }

    /// The downtime the final delta will take: as long as the recent cycles took (each
    /// covered what changed while the one before ran, as the final delta covers what
    /// changed since the last cycle), the first (a full copy) left out when there are more.
    fn predict(&self) -> f64 {
        let steady = if self.recent.len() > 1 {
            &self.recent[1..]
        } else {
            &self.recent[..]
        };
        let last = &steady[steady.len().saturating_sub(RECENT)..];
        if last.is_empty() {
            return f64::INFINITY;
        }
        last.iter().sum::<f64>() / f64::from(u32::try_from(last.len()).unwrap_or(u32::MAX))
    }

    fn latest(&self, sync: &ContinuousReplication) -> Result<Snapshot> {
        self.store.latest_of(sync.disk())?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "the disk has no snapshot after a sync cycle",
            )
        })
    }

    fn cut(&mut self, sync: &mut ContinuousReplication) -> Result<()> {
        let req = self.req;
        self.step("pre-hook", |run| run.hook(req.pre_hook.as_deref(), &[]))?;
        let before = self.latest(sync).ok();
        self.step("final-delta", |run| {
            let cycle = sync.cycle(run.store, None, &req.cancel, run.observer)?;
            let report = cycle.report.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    "the final cycle had no changes to take",
                )
            })?;
            run.report.final_delta_bytes = report.bytes_stored;
            run.report.snapshot = Some(report.snapshot.clone());
            Ok(format!(
                "snapshot {}: {} bytes read, {} stored",
                report.snapshot, report.bytes_read, report.bytes_stored
            ))
        })?;
        let snapshot = self.latest(sync)?;
        self.step("verify", |run| {
            let (checked, ok) =
                verify_written(run.store, before.as_ref(), &snapshot, req.verify_sample)?;
            run.report.verified_chunks = checked;
            run.report.verified = ok;
            if ok {
                Ok(format!("{checked} chunks read back intact"))
            } else {
                Err(Error::new(
                    ErrorKind::VerifyMismatch,
                    "a chunk the final delta wrote does not read back",
                ))
            }
        })?;
        self.step("export", |run| run.update_target(&snapshot))?;
        if let Some(boot) = &req.boot_test {
            self.step("boot-test", |run| {
                let r = crate::boot::boot_test(run.store, &snapshot.id, boot, run.observer)?;
                if r.passed {
                    Ok(r.reason)
                } else {
                    Err(Error::new(
                        ErrorKind::VerifyMismatch,
                        format!("the boot test failed: {}", r.reason),
                    ))
                }
            })?;
        }
        let id = snapshot.id.clone();
        let disk = snapshot.disk.name.clone();
        self.step("post-hook", |run| {
            run.hook(
                req.post_hook.as_deref(),
                &[
                    ("BLOCKFERRY_SNAPSHOT", &id),
                    ("BLOCKFERRY_DISK", &disk),
                    ("BLOCKFERRY_TARGET", &req.to),
                    ("BLOCKFERRY_FORMAT", req.format.name()),
                ],
            )
        })?;
        Ok(())
    }

    /// Runs a hook (`sh -c`), within the hook timeout.
    fn hook(&self, cmd: Option<&str>, env: &[(&str, &str)]) -> Result<String> {
        let Some(cmd) = cmd else {
            return Ok("none".to_owned());
        };
        let mut child = Command::new("sh")
            .args(["-c", cmd])
            .envs(env.iter().copied())
            .env("BLOCKFERRY_STORE", self.store.location())
            .spawn()
            .map_err(|e| Error::io("running a hook", Path::new("sh"), e))?;
        let t = Instant::now();
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::io("waiting for a hook", Path::new("sh"), e))?
            {
                return if status.success() {
                    Ok(format!("`{cmd}` succeeded"))
                } else {
                    Err(Error::new(
                        ErrorKind::Io,
                        format!("the hook `{cmd}` failed ({status})"),
                    ))
                };
            }
            if t.elapsed() > self.req.hook_timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the hook `{cmd}` did not end within {}s",
                        self.req.hook_timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Brings the target to `snapshot`: an object by a (delta) export, a raw file by writing
    /// the chunks that changed since the snapshot it holds.
    fn update_target(&self, snapshot: &Snapshot) -> Result<String> {
        if self.req.to.starts_with("s3://") {
            let mut opts = self.req.export.clone();
            opts.format = self.req.format;
            opts.incremental =
                matches!(self.req.format, ExportFormat::Raw | ExportFormat::VhdFixed);
            let r = export(
                self.store,
                &snapshot.id,
                Path::new(&self.req.to),
                &opts,
                self.observer,
            )?;
            return Ok(format!(
                "{} bytes sent, {} copied",
                r.bytes_sent, r.bytes_copied
            ));
        }
        update_file(self.store, snapshot, Path::new(&self.req.to))
    }
}

/// What a raw file target holds, beside it (`TARGET.blockferry`): its snapshot, and the one
/// an update was bringing it to when it stopped.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileState {
    snapshot: Option<String>,
    updating_to: Option<String>,
}

fn state_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".blockferry");
    target.with_file_name(name)
}

fn save_state(target: &Path, state: &FileState) -> Result<()> {
    let path = state_path(target);
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(state).map_err(|e| Error::internal(format!("{e}")))?;
    std::fs::write(&tmp, json).map_err(|e| Error::io("writing the target's state", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("writing the target's state", &path, e))
}

/// Brings a raw file to `snapshot`: chunks that changed since the snapshot it holds (and
/// since the one an interrupted update was writing) are written, zero chunks punched; a file
/// with no (known) snapshot is written whole.
fn update_file(store: &Store, snapshot: &Snapshot, target: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;
    let state: FileState = std::fs::read(state_path(target))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let known = |id: &Option<String>| -> Option<Snapshot> {
        id.as_ref()
            .and_then(|id| store.snapshot(id).ok())
            .filter(|s| s.disk.virtual_size == snapshot.disk.virtual_size && target.exists())
    };
    let (base, partial) = (known(&state.snapshot), known(&state.updating_to));
    if state.snapshot.as_deref() == Some(&snapshot.id)
        && state.updating_to.is_none()
        && base.is_some()
    {
        return Ok("already at this snapshot".to_owned());
    }
    save_state(
        target,
        &FileState {
            snapshot: base.as_ref().map(|b| b.id.clone()),
            updating_to: Some(snapshot.id.clone()),
        },
    )?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(target)
        .map_err(|e| Error::io("opening the target", target, e))?;
    file.set_len(snapshot.disk.virtual_size)
        .map_err(|e| Error::io("sizing the target", target, e))?;
    let mut ranges = match &base {
        Some(b) => changed_ranges(store, b, snapshot)?,
        None => vec![std::ops::Range {
            start: 0,
            end: snapshot.disk.virtual_size,
        }],
    };
    if let (Some(b), Some(p)) = (&base, &partial) {
        ranges.extend(changed_ranges(store, b, p)?);
    }
    let index = store.load_index()?;
    let chunk = u64::from(snapshot.chunk_size);
    let mut pages = super::PageCache::new(store, snapshot);
    let (mut record, mut data) = (Vec::new(), Vec::new());
    let zeros = vec![0u8; usize::try_from(chunk).unwrap_or(0)];
    let mut written = 0u64;
    let mut done = std::collections::HashSet::new();
    for r in ranges {
        for c in r.start / chunk..r.end.div_ceil(chunk) {
            if !done.insert(c) {
                continue;
            }
            let id = pages.id(c)?;
            let at = c * chunk;
            let len = usize::try_from(chunk.min(snapshot.disk.virtual_size - at)).unwrap_or(0);
            let bytes: &[u8] = if id == ZERO_ID {
                &zeros[..len]
            } else {
                store.read_chunk(&index, &id, &mut record, &mut data)?;
                &data
            };
            file.write_all_at(bytes, at)
                .map_err(|e| Error::io("writing the target", target, e))?;
            written += bytes.len() as u64;
        }
    }
    file.sync_all()
        .map_err(|e| Error::io("flushing the target", target, e))?;
    save_state(
        target,
        &FileState {
            snapshot: Some(snapshot.id.clone()),
            updating_to: None,
        },
    )?;
    Ok(format!("{written} bytes written"))
}

/// Reads back the chunks `snapshot` has that `base` did not (all of them without a base),
/// and a share `sample` of the others; (chunks read, all intact).
fn verify_written(
    store: &Store,
    base: Option<&Snapshot>,
    snapshot: &Snapshot,
    sample: f64,
) -> Result<(u64, bool)> {
    let index = store.load_index()?;
    let chunk = u64::from(snapshot.chunk_size);
    let per_page = u64::from(snapshot.page_entries);
    let changed = match base {
        Some(b) => changed_ranges(store, b, snapshot)?,
        None => vec![std::ops::Range {
            start: 0,
            end: snapshot.disk.virtual_size,
        }],
    };
    // The ranges are sorted and disjoint: the last one starting before the chunk's end.
    let is_changed = |c: u64| {
        let i = changed.partition_point(|r| r.start < (c + 1) * chunk);
        i > 0 && changed[i - 1].end > c * chunk
    };
    let want = super::delta::sample_size(snapshot.n_chunks(), sample);
    let every = snapshot
        .n_chunks()
        .checked_div(want)
        .map_or(u64::MAX, |n| n.max(1));
    let (mut record, mut data) = (Vec::new(), Vec::new());
    let mut checked = 0;
    for page in 0..snapshot.pages.len() {
        let Some(pid) = snapshot.page_id(page)? else {
            continue;
        };
        let ids = store.read_page(&pid)?;
        for (i, id) in ids.iter().enumerate() {
            let c = page as u64 * per_page + i as u64;
            if *id == ZERO_ID || !(is_changed(c) || c.is_multiple_of(every)) {
                continue;
            }
            if store
                .read_chunk(&index, id, &mut record, &mut data)
                .is_err()
            {
                return Ok((checked + 1, false));
            }
            checked += 1;
        }
    }
    Ok((checked, true))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
