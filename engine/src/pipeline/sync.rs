//! Continuous replication: cycles of deltas on a disk's newest snapshot, each an ordinary
//! resumable replication (a killed cycle is picked up by the next). The first cycle (the disk
//! has no snapshot yet) is a full copy. The caller owns the loop (its timing, signals, and a
//! changes command if it runs one); this module owns what a cycle is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::delta::{BaseRef, Changes, DeltaOptions};
use super::{ReplicateOptions, ReplicateReport};
use crate::changes::{ChangeFormat, ChangeList};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, BlockSource};
use crate::job::{CancelToken, Observer};
use crate::store::{Snapshot, Store};

/// Where each cycle takes its changes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncChanges {
    /// Read the whole disk every cycle and keep what differs by chunk id.
    Hash,
    /// The image is a snapshot-chain child whose allocation is what changed.
    Chain,
    /// A folder where change lists are dropped (write a dot file, then rename it): a cycle
    /// takes every list waiting, oldest by name first, as one, and moves them to `DIR/done/`
    /// once its snapshot is written. No list, no cycle.
    Folder {
        /// The folder.
        dir: PathBuf,
        /// The lists' format, if not detected.
        format: Option<ChangeFormat>,
    },
    /// The caller gives each cycle's list (the output of a command run against
    /// [`ContinuousReplication::base`], say) to [`ContinuousReplication::cycle`].
    Given {
        /// The lists' format, if not detected.
        format: Option<ChangeFormat>,
    },
}

/// What a continuous replication replicates, and how.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// The disk image, opened again every cycle.
    pub image: PathBuf,
    /// How to open it.
    pub open: image::OpenOptions,
    /// The disk's name in the store (default: as a replication of the image names it).
    pub name: Option<String>,
    /// Where each cycle's changes come from.
    pub changes: SyncChanges,
    /// See [`DeltaOptions::verify_sample`] (for change lists).
    pub verify_sample: f64,
    /// Everything else of each cycle's replication (memory, workers, job folder, …); its
    /// disk name, delta and change id are the cycle's own.
    pub replicate: ReplicateOptions,
}

/// The base of the next cycle, as a command that prints its change list needs it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleBase {
    /// The disk's newest snapshot, if it has one.
    pub snapshot: Option<String>,
    /// The change id that snapshot recorded.
    pub change_id: Option<String>,
    /// The disk's size now.
    pub disk_size: u64,
}

/// Where a continuous replication stands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStatus {
    /// Cycles run so far (the last one included).
    pub cycle: u64,
    /// The replication lag (RPO): seconds since the view of the disk the newest snapshot
    /// holds was taken.
    pub lag_seconds: Option<f64>,
    /// When that view was taken, ms since the Unix epoch.
    pub last_success_unix_ms: Option<u64>,
}

/// What one cycle did.
#[derive(Debug, Clone, Serialize)]
pub struct SyncCycle {
    /// Where the replication stands after it.
    #[serde(flatten)]
    pub status: SyncStatus,
    /// The cycle's replication; `None` when it had nothing to do (no list was dropped).
    pub report: Option<ReplicateReport>,
}

/// A continuous replication of one disk: call [`ContinuousReplication::cycle`] as often as wanted.
#[derive(Debug)]
pub struct ContinuousReplication {
    req: SyncRequest,
    disk: String,
    cycle: u64,
    /// When the newest snapshot's view of the disk was taken (wall clock, and monotonic).
    last_success: Option<(SystemTime, Instant)>,
}

impl ContinuousReplication {
    /// Checks the request and finds the disk's name; the lag starts from the disk's newest
    /// snapshot, if it has one.
    pub fn new(store: &Store, req: SyncRequest) -> Result<ContinuousReplication> {
        if !(0.0..=1.0).contains(&req.verify_sample) {
            return Err(
                Error::config("the verify sample is a share from 0 to 1 (0% to 100%)")
                    .with_setting("verify_sample"),
            );
        }
        let disk = match &req.name {
            Some(name) => name.clone(),
            None => super::disk_name(store, open(&req)?.as_ref(), None)?,
        };
        let last_success = store.latest_of(&disk)?.and_then(|s| {
            let at = UNIX_EPOCH + Duration::from_millis(s.created_unix_ms);
            let age = SystemTime::now().duration_since(at).unwrap_or_default();
            Some((at, Instant::now().checked_sub(age)?))
        });
        Ok(ContinuousReplication {
            req,
            disk,
            cycle: 0,
            last_success,
        })
    }

    /// The disk's name in the store.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Where the replication stands.
    pub fn status(&self) -> SyncStatus {
        SyncStatus {
            cycle: self.cycle,
            lag_seconds: self.last_success.map(|(_, at)| at.elapsed().as_secs_f64()),
            last_success_unix_ms: self.last_success.map(|(t, _)| {
                t.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
        }
    }

    /// The base the next cycle builds on.
    pub fn base(&self, store: &Store) -> Result<CycleBase> {
        let base = store.latest_of(&self.disk)?;
        Ok(CycleBase {
            change_id: base.as_ref().and_then(|b| b.change_id.clone()),
            snapshot: base.map(|b| b.id),
            disk_size: open(&self.req)?.info().virtual_size,
        })
    }

    /// Runs one cycle: takes the changes, then replicates (a delta on the disk's newest
    /// snapshot, or a full copy when it has none). `given` is the cycle's list with
    /// [`SyncChanges::Given`] (taken against [`ContinuousReplication::base`]), and must be `None` otherwise.
    pub fn cycle(
        &mut self,
        store: &Store,
        given: Option<&[u8]>,
        cancel: &CancelToken,
        observer: &dyn Observer,
    ) -> Result<SyncCycle> {
        self.cycle += 1;
        let started = (SystemTime::now(), Instant::now());
        let report = self.replicate(store, given, cancel, observer)?;
        if report.is_some() {
            self.last_success = Some(started);
        }
        Ok(SyncCycle {
            status: self.status(),
            report,
        })
    }

    /// Counts a cycle that failed before it could run (the caller's change source failed),
    /// and returns where the replication stands.
    pub fn fail_cycle(&mut self) -> SyncStatus {
        self.cycle += 1;
        self.status()
    }

    fn replicate(
        &self,
        store: &Store,
        given: Option<&[u8]>,
        cancel: &CancelToken,
        observer: &dyn Observer,
    ) -> Result<Option<ReplicateReport>> {
        let size = open(&self.req)?.info().virtual_size;
        let base = store.latest_of(&self.disk)?;
        let (changes, files) = self.changes(given, size)?;
        // Opened after the changes were taken (a command may have just snapshotted the disk):
        // the state read is the one the list describes.
        let source = open(&self.req)?;
        if source.info().virtual_size != size {
            return Err(Error::new(
                ErrorKind::InvalidChangeList,
                "the disk changed size while its change list was taken",
            )
            .with_path(&self.req.image));
        }
        let changes = match changes {
            Some(Pending::Chain) => Some(Changes::List(ChangeList::from_chain(source.as_ref())?)),
            Some(Pending::Ready(c)) => Some(c),
            None if base.is_some() => return Ok(None),
            None => None,
        };
        let (delta, change_id) = delta(base.as_ref(), changes, self.req.verify_sample);
        let opts = ReplicateOptions {
            disk_name: Some(self.disk.clone()),
            cancel: cancel.clone(),
            restart_if_changed: true,
            delta,
            change_id,
            audit_op: "sync-cycle",
            ..self.req.replicate.clone()
        };
        let report = super::replicate(store, source.as_ref(), &opts, observer)?;
        // Only now, with the snapshot durable. (Stopped before this, the next cycle takes
        // these lists again with any newer ones: more is read than needed, nothing missed.)
        for file in files {
            let done = file.parent().unwrap_or(Path::new(".")).join("done");
            std::fs::create_dir_all(&done)
                .map_err(|e| Error::io("creating the folder of taken lists", &done, e))?;
            let to = done.join(file.file_name().unwrap_or_default());
            std::fs::rename(&file, &to)
                .map_err(|e| Error::io("moving a taken change list", &file, e))?;
        }
        Ok(Some(report))
    }

    /// This cycle's changes (`None`: no list dropped) and the dropped files they came from.
    fn changes(&self, given: Option<&[u8]>, size: u64) -> Result<(Option<Pending>, Vec<PathBuf>)> {
        let not_given = |what: &str| {
            Error::config(format!(
                "a cycle's change list is {what} (it comes from the sync's change source)"
            ))
            .with_setting("changes")
        };
        match (&self.req.changes, given) {
            (SyncChanges::Given { format }, Some(bytes)) => Ok((
                Some(Pending::Ready(Changes::List(ChangeList::parse(
                    bytes, *format, size,
                )?))),
                Vec::new(),
            )),
            (SyncChanges::Given { .. }, None) => Err(not_given("missing")),
            (_, Some(_)) => Err(not_given("given, but not taken")),
            (SyncChanges::Hash, None) => Ok((Some(Pending::Ready(Changes::Hash)), Vec::new())),
            (SyncChanges::Chain, None) => Ok((Some(Pending::Chain), Vec::new())),
            (SyncChanges::Folder { dir, format }, None) => {
                let files = pending_files(dir)?;
                if files.is_empty() {
                    return Ok((None, files));
                }
                let list = merge_lists(&files, *format, size)?;
                Ok((Some(Pending::Ready(Changes::List(list))), files))
            }
        }
    }
}

/// A cycle's changes before the image is opened for the replication.
enum Pending {
    Ready(Changes),
    /// Read from the chain of the image as opened for the replication.
    Chain,
}

fn open(req: &SyncRequest) -> Result<Box<dyn BlockSource>> {
    image::open_with(&req.image, &req.open)
}

/// A cycle's delta on `base` (a full copy without one), and the change id to record.
fn delta(
    base: Option<&Snapshot>,
    changes: Option<Changes>,
    verify_sample: f64,
) -> (Option<DeltaOptions>, Option<String>) {
    let new_id = match &changes {
        Some(Changes::List(l)) => l.new_change_id.clone(),
        _ => None,
    };
    match (base, changes) {
        // The first copy needs no list; it records the list's change id, if any.
        (None, _) | (Some(_), None) => (None, new_id),
        (Some(b), Some(changes)) => (
            Some(DeltaOptions {
                base: BaseRef::Snapshot(b.id.clone()),
                changes,
                verify_sample,
                change_id: None,
            }),
            new_id,
        ),
    }
}

/// The change lists waiting in `dir`, oldest (by name) first; dot files (lists still being
/// written) and folders are skipped.
fn pending_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = |e| Error::io("reading the folder of change lists", dir, e);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let name = entry.file_name();
        if entry.file_type().map_err(read)?.is_file() && !name.to_string_lossy().starts_with('.') {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// All waiting lists as one: the union of their extents, from the first one's base to the
/// last one's new change id (each must follow the one before, when they say).
fn merge_lists(files: &[PathBuf], format: Option<ChangeFormat>, size: u64) -> Result<ChangeList> {
    let mut merged: Option<ChangeList> = None;
    for file in files {
        if std::fs::metadata(file).is_ok_and(|m| m.len() == 0) {
            return Err(Error::new(
                ErrorKind::InvalidChangeList,
                "the change list is empty: drop lists whole (write a dot file, then rename it)",
            )
            .with_path(file));
        }
        let list = ChangeList::read(file, format, size)?;
        merged = Some(match merged {
            None => list,
            Some(mut m) => {
                if let (Some(prev), Some(base)) = (&m.new_change_id, &list.base_change_id)
                    && prev != base
                {
                    return Err(Error::new(
                        ErrorKind::InvalidChangeList,
                        format!(
                            "the list was taken against change id {base:?}, but the list \
                             before it ends at {prev:?}"
                        ),
                    )
                    .with_path(file));
                }
                if m.format != list.format {
                    m.format = ChangeFormat::Extents;
                }
                m.extents = m.extents.union(&list.extents);
                m.new_change_id = list.new_change_id.or(m.new_change_id);
                m
            }
        });
    }
    merged.ok_or_else(|| Error::internal("no change list"))
}
