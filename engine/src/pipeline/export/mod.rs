//! Export: a snapshot written out as an image a target platform imports.
//!
//! Every format but streamOptimized VMDK (`vmdk`, written in order) is a layout of the disk's bytes in the file
//! (blocks at offsets fixed before any data is written) plus metadata around them: the
//! export is a restore through that [`Layout`], with a restore's guarantees (pack ranges
//! read in order, the output under its name only once whole). Only allocated data is
//! written: blocks whose chunks are all zero stay unallocated (VHD, VHDX) or holes (raw,
//! fixed VHD), and zero runs inside allocated blocks stay holes of the sparse file.

#[cfg(feature = "s3")]
mod object;
#[cfg(feature = "s3")]
pub(crate) use object::sweep_staging;
mod vhd;
mod vhdx;
mod vmdk;

use std::path::Path;

use serde::Serialize;

use super::restore::{Layout, Raw, RestoreOptions, write_snapshot};
use crate::error::{Error, Result};
use crate::job::{CancelToken, Observer};
use crate::store::format::ZERO_ID;
use crate::store::{Snapshot, Store};

/// The image formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    /// A raw disk, sparse.
    Raw,
    /// A streamOptimized VMDK (what AWS VM Import and vSphere's OVF deployment take).
    Vmdk,
    /// A dynamic VHDX (what Hyper-V takes).
    Vhdx,
    /// A dynamic VHD.
    Vhd,
    /// A fixed VHD whose virtual size is rounded up to a whole MiB (what Azure takes).
    VhdFixed,
}

impl ExportFormat {
    /// Every format, by name.
    pub const ALL: [ExportFormat; 5] = [
        ExportFormat::Raw,
        ExportFormat::Vmdk,
        ExportFormat::Vhdx,
        ExportFormat::Vhd,
        ExportFormat::VhdFixed,
    ];

    /// The format's name (`raw`, `vhdx`, `vhd`, `vhd-fixed`).
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhdx => "vhdx",
            ExportFormat::Vhd => "vhd",
            ExportFormat::VhdFixed => "vhd-fixed",
        }
    }

    /// The format called `name`.
    pub fn from_name(name: &str) -> Result<ExportFormat> {
        ExportFormat::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = ExportFormat::ALL.iter().map(|f| f.name()).collect();
                Error::config(format!(
                    "unknown export format {name:?}: one of {}",
                    names.join(", ")
                ))
                .with_setting("format")
            })
    }
}

/// Options of [`export`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The image format.
    pub format: ExportFormat,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Replace an existing file, or write onto a block device (destroying what it holds).
    pub force: bool,
    /// Cancels the export (a file output is then deleted; an upload is left to resume).
    pub cancel: CancelToken,
    /// To an object: memory the export may use for parts in flight (0: the default
    /// replication's, [`default_memory_budget`](crate::default_memory_budget)).
    pub memory_budget: usize,
    /// To an object: parts uploaded at once (0: 4).
    pub upload_jobs: usize,
    /// To an object: the part size in bytes (0: chosen from the image's size).
    pub part_size: usize,
    /// To an object: how to reach S3 (the target may be another bucket than the store's);
    /// `None`: as the store was reached when it is on S3, else the standard AWS chain.
    pub s3: Option<crate::store::S3Options>,
    /// To an object, raw or vhd-fixed: a previous export to copy unchanged parts from, by
    /// the store (`s3://bucket/key@SNAPSHOT`, the object holding that snapshot's export in
    /// this format, in the target's bucket).
    pub base_export: Option<String>,
    /// To an object, raw or vhd-fixed: take the object the export replaces as its base when
    /// it is an export of an earlier snapshot of the disk in this format (its metadata says
    /// so, and its ETag is the one recorded when it was written).
    pub incremental: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: ExportFormat::Raw,
            workers: 0,
            force: false,
            cancel: CancelToken::new(),
            memory_budget: 0,
            upload_jobs: 0,
            part_size: 0,
            s3: None,
            base_export: None,
            incremental: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The snapshot exported.
    pub snapshot: String,
    /// Its disk's name.
    pub disk: String,
    /// The image format.
    pub format: ExportFormat,
    /// Where it was written.
    pub output: String,
    /// The disk's size in the image (a fixed VHD's is rounded up to a whole MiB).
    pub virtual_size: u64,
    /// The image file's size (sparse: only data and metadata take space).
    pub file_size: u64,
    /// Bytes of the disk's data written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// To an object: bytes sent in this run (parts uploaded, zeros included).
    pub bytes_sent: u64,
    /// To an object: bytes the store copied from the base export instead.
    pub bytes_copied: u64,
    /// To an object: bytes of parts an earlier, stopped run had sent (not sent again).
    pub bytes_resumed: u64,
    /// To an object: the multipart upload's parts.
    pub parts: u32,
    /// To an object: the snapshot of the base export parts were copied from, if any.
    pub base: Option<String>,
    /// To an object: the job in the job database (resumable until done).
    pub job: Option<String>,
    /// To an object: whether this run continued a stopped one.
    pub resumed: bool,
    /// To an object: the object's ETag.
    pub etag: Option<String>,
}

impl ExportReport {
    /// A report of nothing written yet.
    fn new(snapshot: &Snapshot, format: ExportFormat, virtual_size: u64) -> ExportReport {
        ExportReport {
            snapshot: snapshot.id.clone(),
            disk: snapshot.disk.name.clone(),
            format,
            output: String::new(),
            virtual_size,
            file_size: 0,
            bytes_written: 0,
            seconds: 0.0,
            bytes_sent: 0,
            bytes_copied: 0,
            bytes_resumed: 0,
            parts: 0,
            base: None,
            job: None,
            resumed: false,
            etag: None,
        }
    }
}

/// Exports snapshot `spec` (id, unique prefix, `DISK@latest`, or `latest`) to `out`: a file
/// or device, or, when `out` reads `s3://bucket/key`, an object written as one multipart
/// upload (resumable while the store is opened with a state folder; see [`ExportOptions`]
/// for delta exports).
pub fn export(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &ExportOptions,
    observer: &dyn Observer,
) -> Result<ExportReport> {
    let started = std::time::Instant::now();
    let result = export_run(store, spec, out, opts, observer);
    let mut ev =
        crate::store::audit::AuditEvent::of_report("export", started, &result, "bytes_written");
    if ev.snapshot.is_none() {
        ev.snapshot = Some(spec.to_owned());
    }
    ev.object = Some(out.display().to_string());
    store.audited_read(&ev, result)
}

fn export_run(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &ExportOptions,
    observer: &dyn Observer,
) -> Result<ExportReport> {
    let _lock = crate::store::lock::reader_lock(store, "export", &opts.cancel, observer)?;
    let snapshot = store.snapshot(spec)?;
    if let Some(url) = out.to_str().filter(|o| o.starts_with("s3://")) {
        #[cfg(feature = "s3")]
        return object::export(store, &snapshot, url, opts, observer);
        #[cfg(not(feature = "s3"))]
        return Err(Error::config(format!(
            "{url}: this build of blockferry has no S3 support"
        )));
    }
    if opts.base_export.is_some() || opts.incremental {
        return Err(Error::config(
            "a delta export (a base export, or incremental) writes to an object, s3://BUCKET/KEY",
        )
        .with_setting("base_export"));
    }
    let Some(layout) = layout(store, &snapshot, opts.format)? else {
        return vmdk::export(store, &snapshot, out, opts, observer);
    };
    let restore = RestoreOptions {
        workers: opts.workers,
        force: opts.force,
        salvage: false,
        cancel: opts.cancel.clone(),
    };
    let r = write_snapshot(store, &snapshot, out, layout.as_ref(), &restore, observer)?;
    Ok(ExportReport {
        output: r.output,
        file_size: layout.file_size(),
        bytes_written: r.bytes_written,
        seconds: r.seconds,
        ..ExportReport::new(&snapshot, opts.format, layout.disk_size())
    })
}

/// The layout of `format`'s file: its blocks with data at offsets fixed before writing;
/// `None` for streamOptimized VMDK, written in order.
fn layout(
    store: &Store,
    snapshot: &Snapshot,
    format: ExportFormat,
) -> Result<Option<Box<dyn Layout>>> {
    let size = snapshot.disk.virtual_size;
    Ok(Some(match format {
        ExportFormat::Vmdk => return Ok(None),
        ExportFormat::Raw => Box::new(Raw(size)),
        ExportFormat::VhdFixed => Box::new(vhd::Fixed::new(size)?),
        ExportFormat::Vhd => {
            let allocated = allocated_blocks(store, snapshot, vhd::BLOCK_SIZE)?;
            Box::new(vhd::Dynamic::new(size, allocated)?)
        }
        ExportFormat::Vhdx => {
            let block = vhdx::block_size(snapshot.chunk_size);
            let allocated = allocated_blocks(store, snapshot, block)?;
            Box::new(vhdx::Dynamic::new(size, block, allocated)?)
        }
    }))
}

/// Which blocks of `block_size` bytes hold a chunk with data (the others read as zeros and
/// stay unallocated in the image). Reads the snapshot's pages, not its chunks.
fn allocated_blocks(store: &Store, snapshot: &Snapshot, block_size: u64) -> Result<Vec<bool>> {
    let size = snapshot.disk.virtual_size;
    let chunk = u64::from(snapshot.chunk_size);
    let blocks = size.div_ceil(block_size);
    let mut allocated = vec![false; usize::try_from(blocks).map_err(|_| too_large())?];
    let per_page = u64::from(snapshot.page_entries);
    for page in 0..snapshot.pages.len() {
        let Some(id) = snapshot.page_id(page)? else {
            continue;
        };
        let first = page as u64 * per_page;
        for (i, chunk_id) in store.read_page(&id)?.iter().enumerate() {
            if *chunk_id == ZERO_ID {
                continue;
            }
            let start = (first + i as u64) * chunk;
            let end = (start + chunk).min(size);
            for b in start / block_size..end.div_ceil(block_size) {
                if let Some(slot) = usize::try_from(b).ok().and_then(|b| allocated.get_mut(b)) {
                    *slot = true;
                }
            }
        }
    }
    Ok(allocated)
}

/// The blocks of a format of fixed-size blocks stored in disk order: where each block's
/// data is in the file, if stored.
struct Blocks {
    block: u64,
    /// For each block, the file offset of its data if stored.
    at: Vec<Option<u64>>,
    /// The stored blocks, in disk (and file) order.
    #[cfg_attr(
        not(feature = "s3"),
        allow(dead_code, reason = "used by exports to S3")
    )]
    stored: Vec<u64>,
}

impl Blocks {
    /// `at[b]` is the file offset of block `b`'s data, `None` for a block the file does not
    /// store; offsets grow with `b`.
    fn new(block: u64, at: Vec<Option<u64>>) -> Blocks {
        let stored = at
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_some())
            .map(|(b, _)| b as u64)
            .collect();
        Blocks { block, at, stored }
    }

    fn at(&self, b: u64) -> Option<u64> {
        usize::try_from(b)
            .ok()
            .and_then(|b| self.at.get(b))
            .copied()
            .flatten()
    }

    /// [`Layout::place`].
    fn place(
        &self,
        virt: u64,
        len: usize,
        f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let block = self.block;
        let mut done = 0usize;
        while done < len {
            let pos = virt + done as u64;
            let within = pos % block;
            let n = usize::try_from((block - within).min((len - done) as u64))
                .map_err(|_| Error::internal("a piece larger than memory"))?;
            if let Some(offset) = self.at(pos / block) {
                f(offset + within, done..done + n)?;
            }
            done += n;
        }
        Ok(())
    }

    /// [`Layout::disk_span`] (not clipped to the disk's size).
    #[cfg_attr(
        not(feature = "s3"),
        allow(dead_code, reason = "used by exports to S3")
    )]
    fn span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        // Stored blocks' data offsets grow with their rank: the first whose data ends past
        // the range's start, and the first that starts at or past its end.
        let data = |rank: usize| self.at(self.stored[rank]).unwrap_or(0);
        let first = partition_point(self.stored.len(), |r| data(r) + self.block <= range.start);
        let end = partition_point(self.stored.len(), |r| data(r) < range.end);
        if first >= end {
            return 0..0;
        }
        self.stored[first] * self.block..(self.stored[end - 1] + 1) * self.block
    }
}

/// The first of `0..n` for which `pred` is false (`pred` true then false over `0..n`).
#[cfg_attr(
    not(feature = "s3"),
    allow(dead_code, reason = "used by exports to S3")
)]
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The disk ranges whose chunks differ between two snapshots of one disk (pages that are the
/// same object are not read).
pub(crate) fn changed_ranges(
    store: &Store,
    old: &Snapshot,
    new: &Snapshot,
) -> Result<Vec<std::ops::Range<u64>>> {
    let chunk = u64::from(new.chunk_size);
    let size = new.disk.virtual_size;
    let per_page = u64::from(new.page_entries);
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let read = |s: &Snapshot, page: usize| -> Result<Vec<crate::store::format::Id>> {
        match s.page_id(page)? {
            Some(id) => store.read_page(&id),
            None => Ok(Vec::new()),
        }
    };
    for page in 0..new.pages.len() {
        if old.pages.get(page) == new.pages.get(page) {
            continue;
        }
        let (a, b) = (read(old, page)?, read(new, page)?);
        let first = page as u64 * per_page;
        let in_page = (new.n_chunks() - first).min(per_page);
        for i in 0..usize::try_from(in_page).unwrap_or(usize::MAX) {
            let x = a.get(i).copied().unwrap_or(ZERO_ID);
            let y = b.get(i).copied().unwrap_or(ZERO_ID);
            if x == y {
                continue;
            }
            let start = (first + i as u64) * chunk;
            let end = (start + chunk).min(size);
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
    }
    Ok(out)
}

fn too_large() -> Error {
    Error::config("the disk is too large for this machine's address space")
}

/// Seconds since 2000-01-01 00:00:00 UTC (the VHD footer's timestamp).
fn vhd_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(946_684_800)).unwrap_or(u32::MAX)
}

/// 16 random bytes (image and write identifiers), as a version-4 GUID.
fn random_id() -> Result<[u8; 16]> {
    let mut id: [u8; 16] = crate::store::crypto::random()?;
    id[7] = (id[7] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}
