//! Delta snapshots: a base snapshot plus what changed since it.
//!
//! [`plan`] decides what a delta reads. A change list is trusted only if it follows the base
//! (its change id is the one the base recorded; a reset, a `*` or another disk fall back to
//! comparing every chunk by id) and if a rotating sample of the chunks it calls unchanged
//! still hash to the base's ids (else the tracking missed writes: warn, compare everything).
//! The plan then takes every page without a change whole from the base (not even read), and
//! the unchanged positions of the other pages from the base's pages.

use crate::changes::{ChangeFormat, ChangeList};
use crate::error::{Error, ErrorKind, Result};
use crate::image::BlockSource;
use crate::io::ReadBackend;
use crate::job::{Counters, Reporter};
use crate::store::format::{Id, PAGE_ENTRIES, ZERO_ID};
use crate::store::{ChangeRecord, Snapshot, Store};

/// Where a delta's changes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Read every chunk and keep what differs from the base by id (no change tracking).
    Hash,
    /// A change-tracking list (VMware CBT, Hyper-V RCT, extents).
    List(ChangeList),
}

/// Which snapshot a delta builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRef {
    /// The newest snapshot of the disk being replicated (by the name the replication records
    /// it under), whatever other disks the store holds.
    LatestOfDisk,
    /// A snapshot named by its id, a unique prefix of it, or `DISK@latest`.
    Snapshot(String),
}

impl BaseRef {
    /// `latest` (the disk's newest snapshot) or a snapshot's name.
    pub fn parse(name: &str) -> BaseRef {
        if name == "latest" {
            BaseRef::LatestOfDisk
        } else {
            BaseRef::Snapshot(name.to_owned())
        }
    }
}

/// Where the changes of a delta come from, as a caller names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeSource {
    /// Read every chunk and keep what differs from the base by id (no change tracking).
    Hash,
    /// The image is a snapshot-chain child (a VMDK delta, a differencing VHDX/VHD) joined to
    /// its parent: what it holds is what changed since the parent.
    Chain,
    /// A change list in a file (VMware CBT JSON, Hyper-V RCT, extents); `format` `None`
    /// detects it.
    File {
        /// The list.
        path: std::path::PathBuf,
        /// Its format, if not detected.
        format: Option<ChangeFormat>,
    },
    /// A change list in memory, as a file would hold it.
    Data {
        /// The list's bytes.
        bytes: Vec<u8>,
        /// Its format, if not detected.
        format: Option<ChangeFormat>,
    },
    /// Changed byte ranges (offset, length) the caller holds (from pyVmomi's
    /// `QueryChangedDiskAreas`, say), taken against `base_change_id`.
    Extents {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
        /// The change id the ranges were taken against, checked against the base's; `None`
        /// trusts them without that check.
        base_change_id: Option<String>,
        /// The source's change id now, recorded in the snapshot.
        new_change_id: Option<String>,
    },
}

impl ChangeSource {
    /// `hash`, `chain`, or the path of a list file.
    pub fn from_name(name: &str, format: Option<ChangeFormat>) -> ChangeSource {
        match name {
            "hash" => ChangeSource::Hash,
            "chain" => ChangeSource::Chain,
            path => ChangeSource::File {
                path: path.into(),
                format,
            },
        }
    }

    /// Reads the changes for `source`, the image the delta reads.
    pub fn load(&self, source: &dyn BlockSource) -> Result<Changes> {
        let size = source.info().virtual_size;
        Ok(match self {
            ChangeSource::Hash => Changes::Hash,
            ChangeSource::Chain => Changes::List(ChangeList::from_chain(source)?),
            ChangeSource::File { path, format } => {
                Changes::List(ChangeList::read(path, *format, size)?)
            }
            ChangeSource::Data { bytes, format } => {
                Changes::List(ChangeList::parse(bytes, *format, size)?)
            }
            ChangeSource::Extents {
                ranges,
                base_change_id,
                new_change_id,
            } => Changes::List(ChangeList::from_ranges(
                ranges,
                base_change_id.clone(),
                new_change_id.clone(),
                size,
            )?),
        })
    }
}

/// What makes a replication a delta, as a caller asks for it: validated and loaded once by
/// [`DeltaRequest::resolve`], whichever front end it comes from.
#[derive(Debug, Clone)]
pub struct DeltaRequest {
    /// The snapshot to build on; `None` makes a full copy.
    pub base: Option<BaseRef>,
    /// What changed since the base.
    pub changes: Option<ChangeSource>,
    /// See [`DeltaOptions::verify_sample`].
    pub verify_sample: f64,
    /// See [`DeltaOptions::change_id`].
    pub change_id: Option<String>,
}

impl Default for DeltaRequest {
    fn default() -> Self {
        DeltaRequest {
            base: None,
            changes: None,
            verify_sample: DEFAULT_VERIFY_SAMPLE,
            change_id: None,
        }
    }
}

impl DeltaRequest {
    /// Checks the request and loads its changes for `source`: the delta's options, or `None`
    /// for a full copy.
    pub fn resolve(&self, source: &dyn BlockSource) -> Result<Option<DeltaOptions>> {
        if !(0.0..=1.0).contains(&self.verify_sample) {
            return Err(
                Error::config("the verify sample is a share from 0 to 1 (0% to 100%)")
                    .with_setting("verify_sample"),
            );
        }
        match (&self.base, &self.changes) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(Error::config(
                "changes need a base snapshot to make a delta on",
            )
            .with_setting("base")),
            (Some(_), None) => Err(Error::config(
                "a delta needs a source of changes: a change list, hash (compare every chunk), \
                 or the image's snapshot chain",
            )
            .with_setting("changes")),
            (Some(base), Some(changes)) => Ok(Some(DeltaOptions {
                base: base.clone(),
                changes: changes.load(source)?,
                verify_sample: self.verify_sample,
                change_id: self.change_id.clone(),
            })),
        }
    }
}

/// What makes a replication a delta on a base snapshot.
#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// The base snapshot.
    pub base: BaseRef,
    /// What changed since the base.
    pub changes: Changes,
    /// Share of the chunks a list calls unchanged that each delta reads to check the list
    /// (0 to 1; 0 disables the check). The sample rotates, so successive deltas cover the disk.
    pub verify_sample: f64,
    /// The source's change id now (VMware `changeId`, Hyper-V RCT id), recorded in the
    /// snapshot so that the next delta can be checked against it; else the list's own.
    pub change_id: Option<String>,
}

/// The default share of unchanged chunks a delta reads to check its change list.
pub const DEFAULT_VERIFY_SAMPLE: f64 = 0.01;

/// What a delta reads and what it takes from its base.
pub(super) struct DeltaPlan {
    pub(super) base: Snapshot,
    /// Per page: take the base's page whole (nothing of it is read).
    pub(super) reuse_page: Vec<bool>,
    /// Positions taken from the base, with their ids, in the pages not reused whole.
    pub(super) unchanged: Vec<(u64, Id)>,
    pub(super) record: ChangeRecord,
    pub(super) change_id: Option<String>,
}

impl DeltaPlan {
    /// Identifies the plan within a job: a resumed run must make the same delta.
    pub(super) fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (p, reuse) in self.reuse_page.iter().enumerate() {
            if *reuse {
                h.update(&(p as u64).to_le_bytes());
            }
        }
        for (idx, _) in &self.unchanged {
            h.update(&idx.to_le_bytes());
        }
        h.update(format!("{:?}", self.record).as_bytes());
        format!(
            "delta on {}: {}",
            self.base.id,
            &h.finalize().to_hex()[..16]
        )
    }
}

/// The newest snapshot of the disk named `disk` (for a base of `latest`).
fn latest_of(store: &Store, disk: &str) -> Result<Snapshot> {
    store.latest_of(disk)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("the store has no snapshot of disk {disk:?} to base a delta on"),
        )
    })
}

/// Why a chain's parent may not be the state `base` copied: an image identity (VHD unique id,
/// VMDK CID, VHDX data write GUID) does not change with every write, so the parent's file
/// must also be as the base saw it.
fn parent_changed(source: &dyn BlockSource, base: &Snapshot) -> Option<String> {
    let top = source.top_layer()?;
    let Some(parent) = source.file(top.n_files()) else {
        return Some("the chain's parent file is not known".to_owned());
    };
    let now = match crate::image::util::fingerprint(parent) {
        Ok(f) => f,
        Err(e) => return Some(format!("the chain's parent cannot be checked: {e}")),
    };
    let was = &base.disk.fingerprint;
    (now.size != was.size
        || now.modified_unix_ns != was.modified_unix_ns
        || (now.device, now.inode) != (was.device, was.inode))
        .then(|| {
            format!(
                "the chain's parent {} is not the file base snapshot {} copied (changed or \
                 replaced since)",
                parent.path().display(),
                base.id
            )
        })
}

/// Why a change list cannot be trusted to follow `base`, if it cannot.
fn distrust(list: &ChangeList, base: &Snapshot) -> Option<String> {
    let Some(listed) = list.base_change_id.as_deref() else {
        // A tracking list must say what it was taken against; an extent list from another
        // tool is trusted as it is (the verify sample still checks it).
        return match list.format {
            ChangeFormat::VmwareCbt | ChangeFormat::HypervRct => Some(format!(
                "the {} list does not say which change id it was taken against (add {} to it)",
                list.format.name(),
                if list.format == ChangeFormat::VmwareCbt {
                    "\"changeId\""
                } else {
                    "\"TargetRctId\""
                }
            )),
            ChangeFormat::Extents | ChangeFormat::Chain => None,
        };
    };
    if list.all_allocated() {
        return Some("the list names every allocated area (change id *), not changes".to_owned());
    }
    let what = match list.format {
        ChangeFormat::HypervRct => "RCT id",
        _ => "change id",
    };
    let Some(recorded) = base.change_id.as_deref() else {
        return Some(format!(
            "the list was taken against {what} {listed:?} but base snapshot {} records none \
             (record the source's change id when replicating so that deltas can be checked)",
            base.id
        ));
    };
    if listed == recorded {
        return None;
    }
    let identity = |id: &str| {
        ["vmdk-cid:", "vhdx-data-write:", "vhd-uid:"]
            .iter()
            .any(|p| id.starts_with(p))
    };
    if identity(listed) != identity(recorded) {
        return Some(format!(
            "the list was taken against {what} {listed:?} but base snapshot {} records {recorded:?}, \
             an id of another kind (record the source's change id when replicating so that deltas can be checked)",
            base.id
        ));
    }
    // VMware change ids are `<tracking epoch>/<sequence>`, Hyper-V RCT ids
    // `rctX:<epoch>:<sequence>`: a new epoch means the tracking was reset.
    let epoch = |id: &str| -> String {
        match id.rsplit_once(['/', ':']) {
            Some((head, _)) => head.to_owned(),
            None => id.to_owned(),
        }
    };
    if epoch(listed) == epoch(recorded) {
        Some(format!(
            "the list was taken against {what} {listed:?} but base snapshot {} is at {recorded:?}",
            base.id
        ))
    } else {
        Some(format!(
            "change tracking was reset: the list's {what} {listed:?} is of another tracking \
             epoch than base snapshot {}'s {recorded:?}",
            base.id
        ))
    }
}

/// Decides what a delta of `source` on `opts.base` reads. `disk` is the disk's name.
pub(super) fn plan(
    store: &Store,
    source: &dyn BlockSource,
    disk: &str,
    opts: &DeltaOptions,
    backend: &mut dyn ReadBackend,
    reporter: &Reporter<'_>,
) -> Result<DeltaPlan> {
    let base = match &opts.base {
        BaseRef::LatestOfDisk => latest_of(store, disk)?,
        BaseRef::Snapshot(name) => store.snapshot(name)?,
    };
    let size = source.info().virtual_size;
    let chunk = u64::from(store.chunk_size());
    if base.chunk_size != store.chunk_size() {
        return Err(Error::internal(
            "base snapshot's chunk size is not the store's",
        ));
    }
    if !(0.0..=1.0).contains(&opts.verify_sample) {
        return Err(
            Error::config("the verify sample is a share from 0 to 1 (0% to 100%)")
                .with_setting("verify_sample"),
        );
    }
    let mut record = ChangeRecord {
        source: "hash".to_owned(),
        ..ChangeRecord::default()
    };
    let mut change_id = opts.change_id.clone();
    let mut fallback = None;
    if base.disk.virtual_size != size {
        fallback = Some(format!(
            "base snapshot {} is of a disk of {} bytes, this one has {size}",
            base.id, base.disk.virtual_size
        ));
    } else if base.disk.name != disk {
        fallback = Some(format!(
            "base snapshot {} is of disk {:?}, this is {disk:?}",
            base.id, base.disk.name
        ));
    }
    let mut list = None;
    if let Changes::List(l) = &opts.changes {
        l.format.name().clone_into(&mut record.source);
        record.base_change_id.clone_from(&l.base_change_id);
        record.bytes_listed = l.extents.bytes();
        match (&change_id, &l.new_change_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::config(format!(
                    "the change id given ({a:?}) disagrees with the list's new change id {b:?}"
                ))
                .with_setting("change_id"));
            }
            (None, Some(b)) => change_id = Some(b.clone()),
            _ => {}
        }
        if fallback.is_none() {
            fallback = distrust(l, &base);
        }
        if fallback.is_none() && l.format == ChangeFormat::Chain {
            fallback = parent_changed(source, &base);
        }
        if fallback.is_none() {
            list = Some(l);
        }
    }
    // The disk's chunk positions and pages (the base's, unless the disk was resized: then
    // nothing is taken from the base).
    let n = size.div_ceil(chunk);
    let n_pages = usize::try_from(n.div_ceil(PAGE_ENTRIES as u64))
        .map_err(|_| Error::internal("disk too large"))?;
    // Changed chunk positions, as sorted disjoint ranges.
    let changed_ranges = list
        .map(|l| l.extents.chunk_ranges(chunk))
        .unwrap_or_default();
    let changed = |idx: u64| {
        let i = changed_ranges.partition_point(|r| r.end <= idx);
        changed_ranges.get(i).is_some_and(|r| r.start <= idx)
    };
    let mut pages = PageCache::new(store, &base);
    if let Some(l) = list {
        let taken = sample(
            store,
            source,
            backend,
            (&base, &mut pages),
            &changed,
            opts.verify_sample,
            &mut record,
            reporter,
        )?;
        if record.sample_mismatches > 0 {
            reporter.warn(format!(
                "CHANGE TRACKING MISSED WRITES: {} of {taken} sampled chunks the {} list calls \
                 unchanged differ from base snapshot {}; comparing every chunk instead \
                 (recorded in the snapshot)",
                record.sample_mismatches,
                l.format.name(),
                base.id
            ));
            fallback = Some(format!(
                "{} sampled chunks differed from the base",
                record.sample_mismatches
            ));
        }
    }
    if let Some(why) = &fallback {
        if matches!(opts.changes, Changes::List(_)) && record.sample_mismatches == 0 {
            reporter.warn(format!(
                "not using the change list: {why}; comparing every chunk"
            ));
        }
        record.fallback = Some(why.clone());
    }
    if fallback.is_some() || list.is_none() {
        // Every position is read and compared by id (dedup does the rest); nothing is taken
        // from the base.
        return Ok(DeltaPlan {
            reuse_page: vec![false; n_pages],
            unchanged: Vec::new(),
            record,
            change_id,
            base,
        });
    }
    let mut reuse_page = vec![false; n_pages];
    let mut unchanged = Vec::new();
    let per_page = PAGE_ENTRIES as u64;
    for (p, reuse) in (0u64..).zip(reuse_page.iter_mut()) {
        let (first, last) = (p * per_page, ((p + 1) * per_page).min(n));
        let i = changed_ranges.partition_point(|r| r.end <= first);
        if changed_ranges.get(i).is_none_or(|r| r.start >= last) {
            *reuse = true;
            continue;
        }
        for idx in first..last {
            if !changed(idx) {
                unchanged.push((idx, pages.id(idx)?));
            }
        }
    }
    Ok(DeltaPlan {
        base,
        reuse_page,
        unchanged,
        record,
        change_id,
    })
}

/// Reads a sample of the positions a change list calls unchanged, from where the base's
/// sample ended, and counts in `record` those that differ from the base. Returns how many
/// were read.
#[allow(clippy::too_many_arguments)]
fn sample(
    store: &Store,
    source: &dyn BlockSource,
    backend: &mut dyn ReadBackend,
    (base, pages): (&Snapshot, &mut PageCache<'_>),
    changed: &dyn Fn(u64) -> bool,
    share: f64,
    record: &mut ChangeRecord,
    reporter: &Reporter<'_>,
) -> Result<u64> {
    let size = source.info().virtual_size;
    let chunk = u64::from(store.chunk_size());
    let n = size.div_ceil(chunk);
    let want = sample_size(n, share);
    let start = base.changes.as_ref().map_or(0, |c| c.sample_next) % n.max(1);
    let mut taken = 0u64;
    let mut probe = super::ChunkProbe::default();
    let mut idx = start;
    while taken < want && n > 0 {
        if !changed(idx) {
            taken += 1;
            let expected = pages.id(idx)?;
            let offset = idx * chunk;
            let len = chunk.min(size - offset);
            let (id, read) = probe.id_at(store, source, backend, offset, len)?;
            Counters::add(&reporter.counters().bytes_read, read);
            if id != expected {
                record.sample_mismatches += 1;
            }
        }
        idx = (idx + 1) % n;
        if idx == start {
            break;
        }
    }
    record.sample_chunks = taken;
    record.sample_next = idx;
    Ok(taken)
}

/// Positions in a sample of `share` (0 to 1) of `n`, rounded up.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // checked range; a share needs no exactness
pub(super) fn sample_size(n: u64, share: f64) -> u64 {
    ((n as f64 * share.clamp(0.0, 1.0)).ceil() as u64).min(n)
}

/// A snapshot's pages of chunk ids, one loaded at a time (checked against the snapshot's
/// size).
pub(crate) struct PageCache<'a> {
    store: &'a Store,
    base: &'a Snapshot,
    loaded: Option<(usize, Vec<Id>)>,
}

impl<'a> PageCache<'a> {
    pub(crate) fn new(store: &'a Store, base: &'a Snapshot) -> PageCache<'a> {
        PageCache {
            store,
            base,
            loaded: None,
        }
    }

    /// The chunk id at position `idx`.
    pub(crate) fn id(&mut self, idx: u64) -> Result<Id> {
        let page = usize::try_from(idx / PAGE_ENTRIES as u64).expect("page fits");
        let slot = usize::try_from(idx % PAGE_ENTRIES as u64).expect("slot fits");
        if self.loaded.as_ref().is_none_or(|(p, _)| *p != page) {
            let ids = match self.base.page_id(page)? {
                None => Vec::new(),
                Some(id) => {
                    let ids = self.store.read_page(&id)?;
                    let expected = (self.base.n_chunks() - (page * PAGE_ENTRIES) as u64)
                        .min(PAGE_ENTRIES as u64);
                    if ids.len() as u64 != expected {
                        return Err(Error::corrupt(
                            "snapshot",
                            format!(
                                "page {page} of snapshot {} has {} ids, not {expected}",
                                self.base.id,
                                ids.len()
                            ),
                        ));
                    }
                    ids
                }
            };
            self.loaded = Some((page, ids));
        }
        let (_, ids) = self.loaded.as_ref().expect("just loaded");
        Ok(ids.get(slot).copied().unwrap_or(ZERO_ID))
    }
}
