//! Export: a snapshot written out as an image a target platform imports.
//!
//! Every format but streamOptimized VMDK (`vmdk`, written in order) is a layout of the disk's bytes in the file
//! (blocks at offsets fixed before any data is written) plus metadata around them: the
//! export is a restore through that [`Layout`], with a restore's guarantees (pack ranges
//! read in order, the output under its name only once whole). Only allocated data is
//! written: blocks whose chunks are all zero stay unallocated (VHD, VHDX) or holes (raw,
//! fixed VHD), and zero runs inside allocated blocks stay holes of the sparse file.

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
    /// Cancels the export (the output is then deleted).
    pub cancel: CancelToken,
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
}

/// Exports snapshot `spec` (id, unique prefix, `DISK@latest`, or `latest`) to `out`.
pub fn export(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &ExportOptions,
    observer: &dyn Observer,
) -> Result<ExportReport> {
    let _lock = crate::store::lock::reader_lock(store, "export", &opts.cancel, observer)?;
    let snapshot = store.snapshot(spec)?;
    let size = snapshot.disk.virtual_size;
    let layout: Box<dyn Layout> = match opts.format {
        ExportFormat::Vmdk => return vmdk::export(store, &snapshot, out, opts, observer),
        ExportFormat::Raw => Box::new(Raw(size)),
        ExportFormat::VhdFixed => Box::new(vhd::Fixed::new(size)?),
        ExportFormat::Vhd => {
            let allocated = allocated_blocks(store, &snapshot, vhd::BLOCK_SIZE)?;
            Box::new(vhd::Dynamic::new(size, allocated)?)
        }
        ExportFormat::Vhdx => {
            let block = vhdx::block_size(snapshot.chunk_size);
            let allocated = allocated_blocks(store, &snapshot, block)?;
            Box::new(vhdx::Dynamic::new(size, block, allocated)?)
        }
    };
    let restore = RestoreOptions {
        workers: opts.workers,
        force: opts.force,
        salvage: false,
        cancel: opts.cancel.clone(),
    };
    let r = write_snapshot(store, &snapshot, out, layout.as_ref(), &restore, observer)?;
    Ok(ExportReport {
        snapshot: r.snapshot,
        disk: r.disk,
        format: opts.format,
        output: r.output,
        virtual_size: layout.disk_size(),
        file_size: layout.file_size(),
        bytes_written: r.bytes_written,
        seconds: r.seconds,
    })
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

/// [`Layout::place`] for a format of fixed-size blocks: `at[b]` is the file offset of block
/// `b`'s data, `None` for a block the file does not store.
fn place_in_blocks(
    at: &[Option<u64>],
    block: u64,
    virt: u64,
    len: usize,
    f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < len {
        let pos = virt + done as u64;
        let within = pos % block;
        let n = usize::try_from((block - within).min((len - done) as u64))
            .map_err(|_| Error::internal("a piece larger than memory"))?;
        let stored = usize::try_from(pos / block)
            .ok()
            .and_then(|b| at.get(b))
            .copied()
            .flatten();
        if let Some(offset) = stored {
            f(offset + within, done..done + n)?;
        }
        done += n;
    }
    Ok(())
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
