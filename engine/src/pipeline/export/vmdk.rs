//! streamOptimized VMDK (VMware's "Virtual Disk Format 5.0"; little-endian): what AWS VM
//! Import and vSphere's OVF deployment take. A header and the descriptor, then the disk in
//! order as deflated 64 KiB grains, each behind a marker naming its sector; after each run
//! of 512 grains their grain table; at the end the grain directory, a footer (the header
//! with the directory's offset) and an end-of-stream marker. All-zero grains are left out.
//!
//! Grain sizes are known only once deflated, so the file is written in order (not laid out
//! in advance like the other formats): chunks are read in disk order and each chunk's grains
//! deflated on the workers.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::ZlibEncoder;

use super::{ExportFormat, ExportOptions, ExportReport};
use crate::error::{Error, ErrorKind, Result};
use crate::job::{Counters, Observer, Phase, Reporter};
use crate::pipeline::output::Output;
use crate::store::format::ZERO_ID;
use crate::store::{Snapshot, Store};

const SECTOR: u64 = 512;
/// Grain size: 128 sectors, as VMware and qemu write.
const GRAIN_LEN: usize = 64 << 10;
const GRAIN: u64 = GRAIN_LEN as u64;
const GRAIN_SECTORS: u64 = GRAIN / SECTOR;
/// Grain-table entries per table.
const GT_LEN: usize = 512;
const GT_ENTRIES: u64 = GT_LEN as u64;
/// The header, descriptor and padding before the first grain (one grain's worth).
const OVERHEAD_SECTORS: u64 = GRAIN_SECTORS;
const DESCRIPTOR_LEN: usize = 1024;
const DESCRIPTOR_SECTORS: u64 = DESCRIPTOR_LEN as u64 / SECTOR;
const GD_AT_END: u64 = u64::MAX;
// Metadata marker types.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// The sparse extent header (also the footer, with the directory's offset).
fn header(capacity: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    // Valid newline detection, compressed grains, markers.
    h[8..12].copy_from_slice(&(1u32 | 1 << 16 | 1 << 17).to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
    h[36..44].copy_from_slice(&DESCRIPTOR_SECTORS.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes()); // entries per grain table
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&OVERHEAD_SECTORS.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&1u16.to_le_bytes()); // deflate
    h
}

/// The descriptor. Its content id is derived from the snapshot's: an export made again (a
/// resumed upload) is the same bytes.
fn descriptor(capacity: u64, name: &str, snapshot: &str) -> Result<Vec<u8>> {
    let digest = blake3::hash(format!("blockferry vmdk cid {snapshot}").as_bytes());
    let cid = u32::from_le_bytes(digest.as_bytes()[..4].try_into().expect("4 bytes"));
    // The geometry VMware gives large disks: 255 heads, 63 sectors per track.
    let cylinders = (capacity / (255 * 63)).clamp(1, 65535);
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\n# Extent description\nRW {capacity} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\n\
         ddb.toolsInstallType = \"0\"\n"
    );
    let mut d = text.into_bytes();
    if d.len() > DESCRIPTOR_LEN {
        return Err(Error::internal("the VMDK descriptor outgrew its sectors"));
    }
    d.resize(DESCRIPTOR_LEN, 0);
    Ok(d)
}

/// A metadata marker sector: `sectors` of metadata of `kind` follow.
fn marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Where a stream goes: bytes written at growing offsets (a gap reads as zeros).
pub(super) trait Sink {
    /// Writes `bytes` at `offset`, at or past the end of what was written.
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> Result<()>;
}

impl Sink for Output {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> Result<()> {
        Output::write_at(self, bytes, offset).map(drop)
    }
}

/// The stream being written: the sink, where the next sector goes, and the grain table
/// being filled.
struct Stream<'a> {
    sink: &'a mut dyn Sink,
    /// The next free sector.
    at: u64,
    /// The grain directory: each table's sector (0: none).
    gd: Vec<u32>,
    /// The table being filled, and its index.
    gt: Vec<u32>,
    gt_index: Option<u64>,
}

impl Stream<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.sink.write_at(bytes, self.at * SECTOR)?;
        self.at += (bytes.len() as u64).div_ceil(SECTOR);
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.at).map_err(|_| {
            Error::new(
                ErrorKind::Config,
                "the streamOptimized VMDK would pass 2 TiB of compressed data, more than its \
                 32-bit grain tables address",
            )
        })
    }

    /// Writes the grain table being filled, if any, and records it in the directory.
    fn flush_gt(&mut self) -> Result<()> {
        let Some(index) = self.gt_index.take() else {
            return Ok(());
        };
        let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.put(&marker((bytes.len() as u64).div_ceil(SECTOR), MARKER_GT))?;
        let at = self.sector()?;
        if let Some(slot) = usize::try_from(index).ok().and_then(|i| self.gd.get_mut(i)) {
            *slot = at;
        }
        self.put(&bytes)?;
        self.gt.iter_mut().for_each(|e| *e = 0);
        Ok(())
    }

    /// Writes grain number `grain`, deflated as `data`.
    fn grain(&mut self, grain: u64, data: &[u8]) -> Result<()> {
        let table = grain / GT_ENTRIES;
        if self.gt_index != Some(table) {
            self.flush_gt()?;
            self.gt_index = Some(table);
        }
        let at = self.sector()?;
        let mut record = Vec::with_capacity(12 + data.len());
        record.extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        record.extend_from_slice(
            &u32::try_from(data.len())
                .map_err(|_| Error::internal("a deflated grain over 4 GiB"))?
                .to_le_bytes(),
        );
        record.extend_from_slice(data);
        self.put(&record)?;
        let entry = usize::try_from(grain % GT_ENTRIES).expect("an index below 512");
        self.gt[entry] = at;
        Ok(())
    }
}

/// Deflates a grain as a zlib stream (what the format's compression algorithm 1 is).
fn deflate(grain: &[u8]) -> Result<Vec<u8>> {
    let mut z = ZlibEncoder::new(Vec::with_capacity(grain.len() / 2), Compression::default());
    z.write_all(grain)
        .and_then(|()| z.finish())
        .map_err(|e| Error::internal(format!("deflating a grain: {e}")))
}

/// Writes `snapshot` to `out` as a streamOptimized VMDK.
pub(super) fn export(
    store: &Store,
    snapshot: &Snapshot,
    out: &Path,
    opts: &ExportOptions,
    observer: &dyn Observer,
) -> Result<ExportReport> {
    let mut output = Output::create(out, 0, opts.force)?;
    if output.is_device() {
        return Err(Error::config(
            "a streamOptimized VMDK is a file; it cannot be written onto a device",
        )
        .with_path(out));
    }
    let name = out.file_name().map_or_else(
        || "disk.vmdk".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let reporter = Reporter::start(observer, Phase::Restoring, snapshot.disk.virtual_size);
    let file_size = write(store, snapshot, &name, &mut output, opts, &reporter)
        .map_err(|e| e.with_path(out))?;
    output.set_len(file_size)?;
    output.commit()?;
    let p = reporter.finish();
    Ok(ExportReport {
        output: out.display().to_string(),
        file_size,
        bytes_written: p.bytes_written,
        seconds: p.elapsed.as_secs_f64(),
        ..ExportReport::new(snapshot, ExportFormat::Vmdk, capacity_bytes(snapshot))
    })
}

/// The disk's size in the image: whole sectors.
pub(super) fn capacity_bytes(snapshot: &Snapshot) -> u64 {
    snapshot.disk.virtual_size.div_ceil(SECTOR) * SECTOR
}

/// The largest file a streamOptimized VMDK of `snapshot` can be: every grain stored, deflate
/// at its worst (a few bytes per block over the input), markers and tables.
#[cfg_attr(
    not(feature = "s3"),
    allow(dead_code, reason = "used by exports to S3")
)]
pub(super) fn max_file_size(snapshot: &Snapshot) -> u64 {
    let grains = snapshot.disk.virtual_size.div_ceil(GRAIN);
    let per_grain = GRAIN + GRAIN / 1000 + 64 + SECTOR;
    (OVERHEAD_SECTORS + 8) * SECTOR + grains * per_grain + grains.div_ceil(GT_ENTRIES) * 5 * SECTOR
}

/// Writes `snapshot` as a streamOptimized VMDK whose descriptor names the extent `name` to
/// `sink`, in order; returns the file's size.
pub(super) fn write(
    store: &Store,
    snapshot: &Snapshot,
    name: &str,
    sink: &mut dyn Sink,
    opts: &ExportOptions,
    reporter: &Reporter<'_>,
) -> Result<u64> {
    let size = snapshot.disk.virtual_size;
    let capacity = size.div_ceil(SECTOR);
    let index = store.load_index()?;
    let workers = crate::pipeline::worker_count(opts.workers);
    let counters = reporter.counters().clone();
    let tables = capacity.div_ceil(GRAIN_SECTORS).div_ceil(GT_ENTRIES);
    let mut s = Stream {
        sink,
        at: 0,
        gd: vec![0; usize::try_from(tables).map_err(|_| super::too_large())?],
        gt: vec![0; GT_LEN],
        gt_index: None,
    };
    s.put(&header(capacity, GD_AT_END))?;
    s.put(&descriptor(capacity, name, &snapshot.id)?)?;
    s.at = OVERHEAD_SECTORS;
    let chunk = u64::from(snapshot.chunk_size);
    let per_page = u64::from(snapshot.page_entries);
    let (mut record, mut data) = (Vec::new(), Vec::new());
    for page in 0..snapshot.pages.len() {
        let ids = match snapshot.page_id(page)? {
            Some(id) => store.read_page(&id)?,
            None => Vec::new(),
        };
        let first = page as u64 * per_page;
        let in_page = (snapshot.n_chunks() - first).min(per_page);
        for i in 0..in_page {
            if opts.cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Cancelled, "export cancelled"));
            }
            let offset = (first + i) * chunk;
            let len = chunk.min(size - offset);
            let id = usize::try_from(i)
                .ok()
                .and_then(|i| ids.get(i))
                .copied()
                .unwrap_or(ZERO_ID);
            if id == ZERO_ID {
                Counters::add(&counters.bytes_zero, len);
            } else {
                store
                    .read_chunk(&index, &id, &mut record, &mut data)
                    .map_err(|e| e.at_disk_offset(offset))?;
                if data.len() as u64 != len {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        "a chunk's length disagrees with its position in the snapshot",
                    )
                    .at_disk_offset(offset));
                }
                write_chunk(&mut s, &data, offset, workers, &counters)?;
            }
            Counters::add(&counters.bytes_done, len);
            reporter.tick();
        }
    }
    s.flush_gt()?;
    let gd: Vec<u8> = s.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
    s.put(&marker((gd.len() as u64).div_ceil(SECTOR), MARKER_GD))?;
    let gd_at = s.at;
    s.put(&gd)?;
    s.put(&marker(1, MARKER_FOOTER))?;
    s.put(&header(capacity, gd_at))?;
    s.put(&marker(0, MARKER_EOS))?;
    Ok(s.at * SECTOR)
}

/// Writes the grains of a chunk at disk `offset` that are not all zero, deflated on up to
/// `workers` threads.
fn write_chunk(
    s: &mut Stream<'_>,
    data: &[u8],
    offset: u64,
    workers: usize,
    counters: &Counters,
) -> Result<()> {
    // Grains start at multiples of the grain size (chunks are at least 64 KiB, a power of
    // two): the last of a disk may be short, and is padded.
    let grains: Vec<(u64, &[u8])> = data
        .chunks(GRAIN_LEN)
        .enumerate()
        .filter(|(_, g)| !crate::pipeline::is_zero(g))
        .map(|(i, g)| (offset / GRAIN + i as u64, g))
        .collect();
    // Worker `w` deflates grains w, w + n, w + 2n…; the results go back in order.
    let n = workers.clamp(1, grains.len().max(1));
    let mut deflated: Vec<Option<Vec<u8>>> = vec![None; grains.len()];
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..n)
            .map(|w| {
                let grains = &grains;
                scope.spawn(move || -> Result<Vec<(usize, Vec<u8>)>> {
                    let mut padded = Vec::new();
                    let mut out = Vec::new();
                    for (i, (_, g)) in grains.iter().enumerate().skip(w).step_by(n) {
                        let g = if g.len() as u64 == GRAIN {
                            *g
                        } else {
                            padded.clear();
                            padded.extend_from_slice(g);
                            padded.resize(GRAIN_LEN, 0);
                            &padded[..]
                        };
                        out.push((i, deflate(g)?));
                    }
                    Ok(out)
                })
            })
            .collect();
        for h in handles {
            let done = h
                .join()
                .map_err(|_| Error::internal("a deflate worker panicked"))??;
            for (i, z) in done {
                deflated[i] = Some(z);
            }
        }
        Ok(())
    })?;
    for ((grain, raw), z) in grains.iter().zip(deflated) {
        let z = z.ok_or_else(|| Error::internal("a grain was not deflated"))?;
        s.grain(*grain, &z)?;
        Counters::add(&counters.bytes_written, raw.len() as u64);
    }
    Ok(())
}
