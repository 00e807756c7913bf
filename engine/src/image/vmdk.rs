//! VMDK (VMware): descriptors and their extents.
//!
//! A VMDK disk is a text descriptor (a file of its own, or embedded in a sparse extent) that
//! lists extents in order: `RW <sectors> <TYPE> "<file>" [<offset>]`. Types read here:
//!
//! - `FLAT`, `VMFS`: raw bytes in a file at an offset (holes in the file read as zero);
//! - `ZERO`: no file, zeros;
//! - `SPARSE`: a hosted sparse extent ("KDMV" header, grain directory → grain tables →
//!   grains; streamOptimized extents hold deflate-compressed grains and keep their header
//!   in a footer);
//! - `VMFSSPARSE`: an ESXi snapshot delta (`COWD` header).
//!
//! Unallocated grains come from the parent named by `parentFileNameHint`, whose `CID` must
//! equal the child's `parentCID`. All metadata integers are little-endian; offsets in
//! sparse headers and tables count 512-byte sectors.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::util::{self, ReadAt, invalid, read_struct};
use super::{
    BlockSource, Identity, ImageInfo, Mapping, OpenOptions, ParentLink, Target, resolve_path,
};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{SourceFile, sys};
use crate::store::SourceFingerprint;

const SECTOR: u64 = 512;
/// Largest descriptor read.
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Most extents in one descriptor.
const MAX_EXTENTS: usize = 4096;
/// Largest grain accepted (the format allows up to 64 MiB; VMware writes 64 KiB).
const MAX_GRAIN: u64 = 64 << 20;
/// Largest grain directory read (4 Mi tables).
const MAX_GD_BYTES: u64 = 16 << 20;
/// Most grain-directory entries held for all the extents of one disk together (256 MiB).
const MAX_TOTAL_GD_ENTRIES: usize = 32 << 20;
/// Largest virtual size.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// `gdOffset` meaning "in the footer" (streamOptimized).
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Length in sectors.
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `ZERO`, `VMFS`, `VMFSSPARSE`, …
    pub kind: String,
    /// The extent's file, as written.
    pub file: Option<String>,
    /// Offset in sectors into the file (flat extents).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`: changes whenever the disk is written.
    pub cid: Option<u32>,
    /// `parentCID`: the parent's CID when the child was made; `None` without a parent.
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// Extents in disk order.
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// Parses descriptor text; `r` and `at` locate it for error messages.
    pub fn parse(r: &dyn ReadAt, at: u64, text: &[u8]) -> Result<Descriptor> {
        let bad = |why: String| invalid(r, "VMDK descriptor", at, why);
        let text = std::str::from_utf8(text.split(|&b| b == 0).next().unwrap_or_default())
            .map_err(|_| bad("not UTF-8 text".to_owned()))?;
        let (mut cid, mut parent_cid, mut create_type, mut parent_hint) = (None, None, None, None);
        let mut extents = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or_default();
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if extents.len() >= MAX_EXTENTS {
                    return Err(bad(format!("more than {MAX_EXTENTS} extents")));
                }
                extents.push(
                    parse_extent_line(line).map_err(|why| bad(format!("line {}: {why}", n + 1)))?,
                );
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            let hex = |v: &str| {
                u32::from_str_radix(v, 16)
                    .map_err(|_| bad(format!("line {}: {v:?} is not a hex CID", n + 1)))
            };
            match key.trim() {
                "CID" => cid = Some(hex(value)?),
                "parentCID" => parent_cid = Some(hex(value)?).filter(|&c| c != 0xffff_ffff),
                "createType" if create_type.replace(value.to_owned()).is_some() => {
                    return Err(bad("createType appears twice".to_owned()));
                }
                "parentFileNameHint" => parent_hint = Some(value.to_owned()),
                _ => {}
            }
        }
        let create_type = create_type.ok_or_else(|| bad("no createType".to_owned()))?;
        if extents.is_empty() {
            return Err(bad("no extents".to_owned()));
        }
        Ok(Descriptor {
            cid,
            parent_cid,
            create_type,
            parent_hint,
            extents,
        })
    }
}

fn parse_extent_line(line: &str) -> std::result::Result<ExtentLine, String> {
    let mut parts = line.splitn(3, char::is_whitespace);
    let access = parts.next().unwrap_or_default().to_owned();
    let rest = parts.next().unwrap_or_default();
    let sectors: u64 = rest
        .parse()
        .map_err(|_| format!("{rest:?} is not a sector count"))?;
    let rest = parts.next().unwrap_or_default().trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let rest = rest.trim();
    let (file, offset) = if let Some(q) = rest.strip_prefix('"') {
        let end = q.find('"').ok_or("unterminated file name")?;
        let after = q[end + 1..].trim();
        let offset = if after.is_empty() {
            0
        } else {
            after
                .parse()
                .map_err(|_| format!("{after:?} is not an offset"))?
        };
        (Some(q[..end].to_owned()), offset)
    } else {
        (None, 0)
    };
    if sectors == 0 || sectors > MAX_VIRTUAL_SIZE / SECTOR {
        return Err(format!("extent of {sectors} sectors"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind: kind.to_owned(),
        file,
        offset,
    })
}

/// A sparse extent's layout: hosted (`KDMV`) or ESXi delta (`COWD`).
#[derive(Debug)]
pub struct SparseLayout {
    /// Bytes the extent covers.
    pub capacity: u64,
    grain: u64,
    gtes_per_gt: u64,
    /// Grain directory: table sectors (hosted, COWD) or tagged table indexes (`SEsparse`).
    gd: Vec<u64>,
    /// `SEsparse` geometry, for the extents that have it.
    se: Option<SeSparse>,
    compressed: bool,
    zero_grain: bool,
    /// First sector a grain may start at (after the metadata), for uncompressed extents.
    data_start: u64,
    /// The embedded descriptor, if any (offset, bytes).
    pub descriptor: Option<(u64, Vec<u8>)>,
    /// The last grain table read (index, entries): maps walk one table many times.
    cache: Mutex<Option<(u64, Vec<u64>)>>,
    /// The unclean-shutdown flag.
    unclean: bool,
}

/// Where an `SEsparse` extent keeps its grain tables and grains (sectors).
#[derive(Debug, Clone, Copy)]
struct SeSparse {
    tables_at: u64,
    table_sectors: u64,
    grains_at: u64,
}

/// `SEsparse` constant-header magic and version (ESXi 6.5+ snapshot deltas).
const SESPARSE_MAGIC: u64 = 0xcafe_babe;
const SESPARSE_VERSION: u64 = 0x2_0000_0001;
const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;

impl SparseLayout {
    /// Parses a sparse extent's header and grain directory.
    pub fn parse(r: &dyn ReadAt) -> Result<SparseLayout> {
        let head = read_struct(r, "VMDK sparse header", 0, SECTOR, SECTOR)?;
        if le64(&head, 0) == SESPARSE_MAGIC {
            return Self::parse_sesparse(r, &head);
        }
        match &head[..4] {
            b"KDMV" => Self::parse_hosted(r, &head),
            b"COWD" => Self::parse_cowd(r, &head),
            _ => Err(invalid(
                r,
                "VMDK sparse header",
                0,
                "no KDMV or COWD signature",
            )),
        }
    }

    fn parse_hosted(r: &dyn ReadAt, head: &[u8]) -> Result<SparseLayout> {
        let mut h = head.to_vec();
        let mut h_at = 0;
        if le64(&h, 56) == GD_AT_END {
            // streamOptimized: the real header is in the footer, 1 KiB before the end.
            h_at = r
                .size()
                .checked_sub(1024)
                .ok_or_else(|| invalid(r, "VMDK footer", 0, "file too short for a footer"))?;
            h = read_struct(r, "VMDK footer", h_at, SECTOR, SECTOR)?;
            if &h[..4] != b"KDMV" {
                return Err(invalid(
                    r,
                    "VMDK footer",
                    h_at,
                    "no KDMV signature in the footer",
                ));
            }
        }
        let bad = |at: u64, why: String| invalid(r, "VMDK sparse header", h_at + at, why);
        let version = le32(&h, 4);
        if !(1..=3).contains(&version) {
            return Err(bad(4, format!("unknown version {version}")));
        }
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12)
            .checked_mul(SECTOR)
            .filter(|&c| c <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| bad(12, "capacity out of range".to_owned()))?;
        let grain_sectors = le64(&h, 20);
        let grain = grain_sectors.saturating_mul(SECTOR);
        if !grain_sectors.is_power_of_two() || grain_sectors < 8 || grain > MAX_GRAIN {
            return Err(bad(
                20,
                format!("grain of {grain_sectors} sectors is not a power of two from 8 to 64 MiB"),
            ));
        }
        let gtes_per_gt = u64::from(le32(&h, 44));
        if gtes_per_gt != 512 {
            return Err(bad(
                44,
                format!("{gtes_per_gt} entries per grain table (must be 512)"),
            ));
        }
        let compressed = flags & FLAG_COMPRESSED != 0;
        if compressed && u16::from_le_bytes([h[77], h[78]]) != 1 {
            return Err(Error::new(
                ErrorKind::UnsupportedImage,
                "VMDK: compression other than deflate",
            )
            .with_path(r.path())
            .with_offset(h_at + 77));
        }
        let gd_offset = le64(&h, 56);
        let rgd_offset = le64(&h, 48);
        let gd_at = if gd_offset == 0 || gd_offset == GD_AT_END {
            rgd_offset
        } else {
            gd_offset
        };
        let gt_count = capacity.div_ceil(grain * gtes_per_gt);
        let gd = read_table(r, "VMDK grain directory", gd_at, gt_count, 4)?;
        let descriptor = match (le64(&h, 28), le64(&h, 36)) {
            (0, _) | (_, 0) => None,
            (off, size) => {
                let at = off
                    .checked_mul(SECTOR)
                    .ok_or_else(|| bad(28, "descriptor offset out of range".to_owned()))?;
                Some((
                    at,
                    read_struct(
                        r,
                        "VMDK embedded descriptor",
                        at,
                        size.saturating_mul(SECTOR),
                        MAX_DESCRIPTOR,
                    )?,
                ))
            }
        };
        Ok(SparseLayout {
            unclean: h[72] != 0,
            capacity,
            grain,
            gtes_per_gt,
            gd,
            se: None,
            compressed,
            zero_grain: flags & FLAG_ZERO_GRAIN != 0,
            data_start: if compressed { 1 } else { le64(&h, 64).max(1) },
            descriptor,
            cache: Mutex::new(None),
        })
    }

    fn parse_cowd(r: &dyn ReadAt, h: &[u8]) -> Result<SparseLayout> {
        let bad = |at: u64, why: String| invalid(r, "VMDK COWD header", at, why);
        if le32(h, 4) != 1 {
            return Err(bad(4, format!("unknown version {}", le32(h, 4))));
        }
        let capacity = u64::from(le32(h, 12)) * SECTOR;
        let grain_sectors = u64::from(le32(h, 16));
        if !grain_sectors.is_power_of_two() || grain_sectors * SECTOR > MAX_GRAIN {
            return Err(bad(
                16,
                format!("grain of {grain_sectors} sectors is not a power of two up to 64 MiB"),
            ));
        }
        let grain = grain_sectors * SECTOR;
        let gtes_per_gt = 4096;
        let gd_at = u64::from(le32(h, 20));
        let gd_entries = u64::from(le32(h, 24));
        let need = capacity.div_ceil(grain * gtes_per_gt);
        if gd_entries < need {
            return Err(bad(
                24,
                format!(
                    "{gd_entries} grain directory entries cannot cover the {need} the capacity needs"
                ),
            ));
        }
        let gd = read_table(r, "VMDK grain directory", gd_at, need, 4)?;
        Ok(SparseLayout {
            capacity,
            grain,
            gtes_per_gt,
            gd,
            se: None,
            compressed: false,
            zero_grain: false,
            data_start: 1,
            descriptor: None,
            cache: Mutex::new(None),
            unclean: false,
        })
    }

    /// Maps `[offset, end)` of the extent read on its own (fuzzing, tests): file index 0.
    pub fn map_extent(
        &self,
        r: &dyn ReadAt,
        offset: u64,
        end: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<()> {
        if end > self.capacity || offset > end {
            return Err(invalid(
                r,
                "VMDK sparse extent",
                0,
                "range beyond the extent",
            ));
        }
        self.map(r, 0, offset, end, 0, out)
    }

    /// An `SEsparse` extent: constant header (u64 fields), volatile header, a grain
    /// directory of tagged table indexes, 4096-entry grain tables of tagged grain numbers.
    fn parse_sesparse(r: &dyn ReadAt, h: &[u8]) -> Result<SparseLayout> {
        let bad = |at: u64, why: String| invalid(r, "VMDK SEsparse header", at, why);
        if le64(h, 8) != SESPARSE_VERSION {
            return Err(bad(8, format!("unknown version {:#x}", le64(h, 8))));
        }
        let (grain_sectors, table_sectors) = (le64(h, 24), le64(h, 32));
        if grain_sectors != 8
            || table_sectors != 64
            || le64(h, 40) != 0
            || (48..80).step_by(8).any(|f| le64(h, f) != 0)
        {
            return Err(bad(
                24,
                "grain size, table size, flags or reserved fields differ from the format's"
                    .to_owned(),
            ));
        }
        let capacity = le64(h, 16)
            .checked_mul(SECTOR)
            .filter(|&c| c <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| bad(16, "capacity out of range".to_owned()))?;
        let volatile = read_struct(
            r,
            "VMDK SEsparse volatile header",
            le64(h, 80).saturating_mul(SECTOR),
            32,
            32,
        )?;
        if le64(&volatile, 0) != SESPARSE_VOLATILE_MAGIC {
            return Err(bad(
                80,
                "the volatile header has no valid signature".to_owned(),
            ));
        }
        if le64(&volatile, 24) != 0 {
            return Err(Error::new(ErrorKind::UnsupportedImage, "VMDK SEsparse: the journal must be replayed first (the snapshot was not closed cleanly)")
                .with_path(r.path())
                .with_offset(le64(h, 80) * SECTOR));
        }
        let grain = grain_sectors * SECTOR;
        let gtes_per_gt = table_sectors * SECTOR / 8;
        let need = capacity.div_ceil(grain * gtes_per_gt);
        if le64(h, 136).saturating_mul(SECTOR / 8) < need {
            return Err(bad(
                136,
                format!("the grain directory cannot cover the {need} tables the capacity needs"),
            ));
        }
        let gd = read_table(r, "VMDK SEsparse grain directory", le64(h, 128), need, 8)?;
        Ok(SparseLayout {
            capacity,
            grain,
            gtes_per_gt,
            gd,
            se: Some(SeSparse {
                tables_at: le64(h, 144),
                table_sectors,
                grains_at: le64(h, 192),
            }),
            compressed: false,
            zero_grain: false,
            data_start: 1,
            descriptor: None,
            cache: Mutex::new(None),
            unclean: false,
        })
    }

    /// Where grain table `idx` is (sector, entry size), or `None` when its directory entry
    /// is 0 (all unallocated).
    fn table_at(&self, r: &dyn ReadAt, idx: u64) -> Result<Option<(u64, u64)>> {
        let gd_entry = self.gd[usize::try_from(idx).expect("GD index fits")];
        if gd_entry == 0 {
            return Ok(None);
        }
        Ok(Some(match self.se {
            Some(se) => {
                if gd_entry >> 60 != 1 {
                    return Err(invalid(
                        r,
                        "VMDK SEsparse grain directory",
                        0,
                        format!("entry {idx} has an unknown type {:#x}", gd_entry >> 60),
                    ));
                }
                let n = gd_entry & 0xffff_ffff;
                (
                    se.tables_at
                        .saturating_add(n.saturating_mul(se.table_sectors)),
                    8,
                )
            }
            None => (gd_entry, 4),
        }))
    }

    /// The grain table `idx`, or `None` when its directory entry is 0 (all unallocated).
    fn table(&self, r: &dyn ReadAt, idx: u64) -> Result<Option<Vec<u64>>> {
        let Some((sector, entry_bytes)) = self.table_at(r, idx)? else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().expect("grain table cache");
        if let Some((i, t)) = cache.as_ref()
            && *i == idx
        {
            return Ok(Some(t.clone()));
        }
        let t = read_table(r, "VMDK grain table", sector, self.gtes_per_gt, entry_bytes)?;
        *cache = Some((idx, t.clone()));
        Ok(Some(t))
    }

    /// Maps `[offset, end)` of the extent (offsets relative to its start). `file` is this
    /// extent's file index.
    fn map(
        &self,
        r: &dyn ReadAt,
        file: usize,
        offset: u64,
        end: u64,
        virt0: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<()> {
        let mut pos = offset;
        while pos < end {
            let grain_no = pos / self.grain;
            let in_grain = pos % self.grain;
            let table_idx = grain_no / self.gtes_per_gt;
            let table = self.table(r, table_idx)?;
            // Walk this table while it lasts.
            let table_end = ((table_idx + 1) * self.gtes_per_gt * self.grain).min(end);
            let Some(table) = table else {
                out.push(Mapping {
                    virt: virt0 + pos,
                    len: table_end - pos,
                    target: Target::Unallocated,
                });
                pos = table_end;
                continue;
            };
            let mut g = grain_no;
            let mut at = pos;
            let mut in_g = in_grain;
            while at < table_end {
                let stop = ((g + 1) * self.grain).min(table_end);
                let gte = table[usize::try_from(g % self.gtes_per_gt).expect("GT index fits")];
                let target = self.grain_target(r, file, g, gte, in_g)?;
                out.push(Mapping {
                    virt: virt0 + at,
                    len: stop - at,
                    target,
                });
                at = stop;
                g += 1;
                in_g = 0;
            }
            pos = table_end;
        }
        Ok(())
    }

    fn grain_target(
        &self,
        r: &dyn ReadAt,
        file: usize,
        g: u64,
        gte: u64,
        in_grain: u64,
    ) -> Result<Target> {
        if let Some(se) = self.se {
            return self.sesparse_target(r, se, file, g, gte, in_grain);
        }
        match gte {
            0 => return Ok(Target::Unallocated),
            1 if self.zero_grain => return Ok(Target::Zero),
            _ => {}
        }
        let bad = |why: &str| {
            invalid(
                r,
                "VMDK grain table",
                gte * SECTOR,
                format!("grain {g}: {why}"),
            )
        };
        if gte < self.data_start {
            return Err(bad("points into the extent's metadata"));
        }
        let at = gte * SECTOR;
        if !self.compressed {
            // `at` comes from a u32 sector number: no overflow below.
            if at + self.grain.min(self.capacity - g * self.grain) > r.size() {
                return Err(bad("points past the end of the file"));
            }
            return Ok(Target::Data {
                file,
                offset: at + in_grain,
            });
        }
        let marker = read_struct(r, "VMDK compressed grain", at, 12, 12)?;
        let lba = le64(&marker, 0);
        let size = le32(&marker, 8);
        if lba != g * (self.grain / SECTOR) {
            return Err(bad(&format!("the grain marker says sector {lba}")));
        }
        if u64::from(size) > self.grain * 2 + 4096 || at + 12 + u64::from(size) > r.size() {
            return Err(bad(
                "compressed grain larger than possible or past the end of the file",
            ));
        }
        Ok(Target::Deflate {
            file,
            offset: at + 12,
            stored_len: size,
            grain_len: u32::try_from(self.grain.min(self.capacity - g * self.grain))
                .expect("grain ≤ 64 MiB"),
            skip: u32::try_from(in_grain).expect("in a grain"),
        })
    }

    /// An `SEsparse` grain entry: type in the top nibble (0 unallocated, 1 unmapped, 2 zero,
    /// 3 allocated); an allocated grain's number is split across bits 48-59 (low 12 bits) and
    /// 0-47 (the rest).
    fn sesparse_target(
        &self,
        r: &dyn ReadAt,
        se: SeSparse,
        file: usize,
        g: u64,
        gte: u64,
        in_grain: u64,
    ) -> Result<Target> {
        let bad = |why: String| {
            invalid(
                r,
                "VMDK SEsparse grain table",
                0,
                format!("grain {g}: {why}"),
            )
        };
        match gte >> 60 {
            0 if gte == 0 => Ok(Target::Unallocated),
            1 | 2 => Ok(Target::Zero),
            3 => {
                let cluster = ((gte >> 48) & 0xfff) | ((gte & 0xffff_ffff_ffff) << 12);
                let at = se
                    .grains_at
                    .checked_add(
                        cluster
                            .checked_mul(self.grain / SECTOR)
                            .ok_or_else(|| bad("grain number out of range".to_owned()))?,
                    )
                    .and_then(|s| s.checked_mul(SECTOR))
                    .ok_or_else(|| bad("grain number out of range".to_owned()))?;
                if at.checked_add(self.grain).is_none_or(|end| end > r.size()) {
                    return Err(bad(format!(
                        "grain at {at} reaches past the end of the file"
                    )));
                }
                Ok(Target::Data {
                    file,
                    offset: at + in_grain,
                })
            }
            t => Err(bad(format!("unknown entry type {t:#x}"))),
        }
    }

    /// Bytes of allocated grains (zero grains excluded), checking every table on the way.
    ///
    /// A table that several directory entries share is scanned once (for uncompressed
    /// extents, where a grain's validity does not depend on its position), so the work is
    /// bounded by the file's tables, not by the capacity its header claims.
    fn allocated(&self, r: &dyn ReadAt) -> Result<u64> {
        let mut total = 0;
        let mut seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let full_tables = self.capacity / (self.gtes_per_gt * self.grain);
        for t in 0..self.gd.len() as u64 {
            let Some((sector, _)) = self.table_at(r, t)? else {
                continue;
            };
            let whole = t < full_tables;
            if whole
                && !self.compressed
                && let Some(&n) = seen.get(&sector)
            {
                total += n * self.grain;
                continue;
            }
            let table = self.table(r, t)?.expect("the directory entry is set");
            let mut n = 0;
            for (i, &gte) in table.iter().enumerate() {
                let g = t * self.gtes_per_gt + i as u64;
                if g * self.grain >= self.capacity {
                    break;
                }
                if self.grain_target(r, 0, g, gte, 0)?.is_data() {
                    n += 1;
                    total += self.grain.min(self.capacity - g * self.grain);
                }
            }
            if whole {
                seen.insert(sector, n);
            }
        }
        Ok(total)
    }
}

/// Reads `n` entries of `entry_bytes` (4 or 8) at sector `sector`.
fn read_table(
    r: &dyn ReadAt,
    what: &str,
    sector: u64,
    n: u64,
    entry_bytes: u64,
) -> Result<Vec<u64>> {
    let at = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| invalid(r, what, 0, "offset out of range"))?;
    if sector == 0 {
        return Err(invalid(r, what, 0, "offset 0 (the header)"));
    }
    let raw = read_struct(r, what, at, n.saturating_mul(entry_bytes), MAX_GD_BYTES)?;
    Ok(if entry_bytes == 8 {
        raw.chunks_exact(8).map(|c| le64(c, 0)).collect()
    } else {
        raw.chunks_exact(4).map(|c| u64::from(le32(c, 0))).collect()
    })
}

/// Inflates a streamOptimized grain (zlib stream) into `out`, which must hold exactly the
/// grain; refuses streams that inflate to more (a zip bomb cannot allocate).
pub fn inflate_grain(data: &[u8], out: &mut [u8]) -> std::result::Result<(), &'static str> {
    let mut z = flate2::Decompress::new(true);
    match z.decompress(data, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => {}
        Ok(_) => return Err("the compressed grain inflates to more than a grain, or is cut short"),
        Err(_) => return Err("the compressed grain is not a valid deflate stream"),
    }
    // A short grain (the tail of the last one) is zero-filled.
    let n = out.len();
    let done = usize::try_from(z.total_out()).unwrap_or(n).min(n);
    out[done..].fill(0);
    Ok(())
}

/// One extent of an opened disk.
#[derive(Debug)]
enum Extent {
    Flat {
        file: usize,
        offset: u64,
        data: Vec<(u64, u64)>,
    },
    Zero,
    /// A sparse extent at `[base, base + len)` of its file (`base` > 0 inside an OVA).
    Sparse {
        file: usize,
        base: u64,
        len: u64,
        layout: SparseLayout,
    },
}

/// A VMDK disk: a descriptor and its extents.
#[derive(Debug)]
pub(crate) struct Vmdk {
    /// The file it was opened from (its descriptor, or its one sparse file, or an OVA).
    path: PathBuf,
    /// The member of an OVA it is, if it is one.
    member: Option<String>,
    files: Vec<SourceFile>,
    /// (start byte, length, extent) in disk order.
    extents: Vec<(u64, u64, Extent)>,
    info: ImageInfo,
    fingerprint: SourceFingerprint,
    parent: Option<ParentLink>,
    cid: Option<u32>,
}

impl Vmdk {
    /// Opens a VMDK from its descriptor file or from a sparse extent (embedded descriptor,
    /// or a bare extent without one).
    pub(crate) fn open(file: SourceFile, opts: &OpenOptions) -> Result<Vmdk> {
        let len = file.len();
        Vmdk::open_window(file, 0, len, opts)
    }

    /// Opens a VMDK stored at `[base, base + len)` of `file` (a disk inside an OVA); such a
    /// disk must be self-contained (one sparse or streamOptimized extent).
    pub(crate) fn open_window(
        file: SourceFile,
        base: u64,
        len: u64,
        opts: &OpenOptions,
    ) -> Result<Vmdk> {
        let window = Window {
            file: &file,
            base,
            len,
        };
        let mut head = vec![0u8; usize::try_from(len.min(8)).unwrap_or(0)];
        window.read_exact_at(&mut head, 0)?;
        let sesparse = head.len() == 8 && le64(&head, 0) == SESPARSE_MAGIC;
        head.truncate(4);
        let folder = match file.path().parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        };
        let fingerprint = util::fingerprint(&file)?;
        let file_path = file.path().to_path_buf();
        let (descriptor, first): (Descriptor, Option<(SourceFile, SparseLayout)>) = if head
            == b"KDMV"
            || head == b"COWD"
            || sesparse
        {
            let layout = SparseLayout::parse(&window)?;
            let d = match &layout.descriptor {
                Some((at, text)) => Descriptor::parse(&window, *at, text)?,
                None => Descriptor {
                    cid: None,
                    parent_cid: None,
                    create_type: if sesparse {
                        "seSparse"
                    } else if head == b"COWD" {
                        "vmfsSparse"
                    } else {
                        "monolithicSparse"
                    }
                    .to_owned(),
                    parent_hint: None,
                    extents: vec![ExtentLine {
                        access: "RW".to_owned(),
                        sectors: layout.capacity / SECTOR,
                        kind: if sesparse {
                            "SESPARSE"
                        } else if head == b"COWD" {
                            "VMFSSPARSE"
                        } else {
                            "SPARSE"
                        }
                        .to_owned(),
                        file: None,
                        offset: 0,
                    }],
                },
            };
            (d, Some((file, layout)))
        } else {
            if base != 0 {
                return Err(Error::new(
                        ErrorKind::UnsupportedImage,
                        "a VMDK descriptor inside a container: only self-contained sparse disks are read there",
                    )
                    .with_path(file.path()));
            }
            let text = read_struct(&window, "VMDK descriptor", 0, len, MAX_DESCRIPTOR)?;
            (Descriptor::parse(&window, 0, &text)?, None)
        };
        let path = file_path.clone();
        let mut vmdk =
            Self::from_descriptor(&descriptor, first, (base, len), &folder, opts, fingerprint)?;
        vmdk.path = path;
        Ok(vmdk)
    }

    fn from_descriptor(
        d: &Descriptor,
        mut first: Option<(SourceFile, SparseLayout)>,
        (first_base, first_len): (u64, u64),
        folder: &Path,
        opts: &OpenOptions,
        fingerprint: SourceFingerprint,
    ) -> Result<Vmdk> {
        let top_path = first.as_ref().map(|(f, _)| f.path().to_path_buf());
        if !CREATE_TYPES.contains(&d.create_type.as_str()) {
            return Err(Error::new(
                ErrorKind::UnsupportedImage,
                format!("VMDK createType {:?} is not supported", d.create_type),
            )
            .with_path(top_path.as_deref().unwrap_or(folder)));
        }
        let mut files: Vec<SourceFile> = Vec::new();
        let mut extents = Vec::new();
        let mut start = 0u64;
        let mut allocated = 0u64;
        let mut gd_entries = 0usize;
        let mut notes = Vec::new();
        for line in &d.extents {
            let len = line.sectors * SECTOR;
            if line.access == "NOACCESS" {
                return Err(
                    Error::new(ErrorKind::UnsupportedImage, "VMDK extent marked NOACCESS")
                        .with_path(folder),
                );
            }
            let extent = match line.kind.as_str() {
                "ZERO" => Extent::Zero,
                "SPARSE" | "VMFSSPARSE" | "SESPARSE" => {
                    // The sparse file we were opened on serves the extent that names it.
                    // Inside a container, or in a single-file disk that was renamed (its
                    // embedded descriptor still names the old file), the opened file is the
                    // extent whatever it was called, as VMware and qemu read it.
                    let single_file = matches!(
                        d.create_type.as_str(),
                        "monolithicSparse" | "streamOptimized"
                    );
                    let names_first = first.as_ref().is_some_and(|(f, _)| {
                        first_base != 0
                            || single_file
                            || line.file.as_deref().is_none_or(|n| {
                                let base = n.rsplit(['/', '\\']).next().unwrap_or(n);
                                f.path().file_name().is_some_and(|own| own == base)
                            })
                    });
                    let (file, layout, base, win) = if names_first {
                        let (f, l) = first.take().expect("checked above");
                        (f, l, first_base, first_len)
                    } else {
                        let file = open_extent(folder, line, opts, first_base != 0)?;
                        let layout = SparseLayout::parse(&file)?;
                        let win = file.len();
                        (file, layout, 0, win)
                    };
                    let window = Window {
                        file: &file,
                        base,
                        len: win,
                    };
                    gd_entries += layout.gd.len();
                    notes.extend(check_layout(&window, &layout, len, gd_entries)?);
                    allocated += layout.allocated(&window)?;
                    files.push(file);
                    Extent::Sparse {
                        file: files.len() - 1,
                        base,
                        len: win,
                        layout,
                    }
                }
                "FLAT" | "VMFS" => {
                    let file = open_extent(folder, line, opts, first_base != 0)?;
                    let (offset, data) = flat_extent(&file, line.offset, len)?;
                    allocated += data.iter().map(|e| e.1).sum::<u64>();
                    files.push(file);
                    Extent::Flat {
                        file: files.len() - 1,
                        offset,
                        data,
                    }
                }
                other => {
                    return Err(Error::new(
                        ErrorKind::UnsupportedImage,
                        format!("VMDK extent type {other} is not supported"),
                    )
                    .with_path(folder));
                }
            };
            extents.push((start, len, extent));
            start = start
                .checked_add(len)
                .filter(|&s| s <= MAX_VIRTUAL_SIZE)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidImage,
                        "VMDK extents add up to more than 64 TiB",
                    )
                    .with_path(folder)
                })?;
        }
        let parent = match (d.parent_cid, &d.parent_hint) {
            (Some(cid), Some(hint)) => Some(ParentLink {
                candidates: vec![hint.clone()],
                identity: Identity::VmdkCid(cid),
            }),
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorKind::InvalidImage,
                    "VMDK child (parentCID set) without parentFileNameHint",
                )
                .with_path(folder));
            }
            _ => None,
        };
        let info = ImageInfo {
            format: "vmdk",
            subformat: d.create_type.clone(),
            virtual_size: start,
            logical_sector_size: 512,
            physical_sector_size: 512,
            allocated_bytes: allocated,
            notes,
        };
        Ok(Vmdk {
            path: PathBuf::new(),
            member: None,
            files,
            extents,
            info,
            fingerprint,
            parent,
            cid: d.cid,
        })
    }
}

/// The `createType`s blockferry reads.
const CREATE_TYPES: [&str; 12] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
    "vmfsSparse",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "seSparse",
    "custom",
];

/// Checks a sparse extent's header against its descriptor line (`len` bytes) and the grain
/// directory entries of all extents so far; returns a note for an unclean shutdown.
fn check_layout(
    window: &Window<'_>,
    layout: &SparseLayout,
    len: u64,
    gd_entries: usize,
) -> Result<Option<String>> {
    if layout.capacity < len {
        return Err(invalid(
            window,
            "VMDK sparse header",
            12,
            "capacity smaller than the descriptor's extent",
        ));
    }
    if gd_entries > MAX_TOTAL_GD_ENTRIES {
        return Err(invalid(
            window,
            "VMDK descriptor",
            0,
            "the extents' grain directories together exceed what blockferry holds in memory",
        ));
    }
    Ok(layout.unclean.then(|| {
        format!(
            "{}: the unclean-shutdown flag is set",
            window.file.path().display()
        )
    }))
}

/// A flat extent of `len` bytes at sector `sector` of `file`: its byte offset, and its
/// allocated ranges (offsets within the extent).
fn flat_extent(file: &SourceFile, sector: u64, len: u64) -> Result<(u64, Vec<(u64, u64)>)> {
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| invalid(file, "VMDK descriptor", 0, "extent offset out of range"))?;
    if offset.checked_add(len).is_none_or(|e| e > file.len()) {
        return Err(invalid(
            file,
            "VMDK flat extent",
            offset,
            format!("the descriptor says {len} bytes from here, the file is shorter"),
        ));
    }
    let data = sys::data_extents(file.file(), offset + len, 1 << 20)
        .map_err(|e| Error::io("finding the extent's allocated ranges", file.path(), e))?
        .into_iter()
        .filter_map(|(o, l)| {
            let (s, e) = (o.max(offset), (o + l).min(offset + len));
            (s < e).then(|| (s - offset, e - s))
        })
        .collect();
    Ok((offset, data))
}

impl Vmdk {
    /// Adds a note for `info` (an OVA adds which of its disks this is).
    pub(crate) fn add_note(&mut self, note: String) {
        self.info.notes.push(note);
    }

    /// Records which member of a multi-disk file (an OVA) this disk is.
    pub(crate) fn set_member(&mut self, member: &str) {
        self.member = Some(member.to_owned());
    }
}

/// Part of a file read as a file of its own (a disk inside a tar).
struct Window<'a> {
    file: &'a SourceFile,
    base: u64,
    len: u64,
}

impl ReadAt for Window<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(
                Error::new(ErrorKind::InvalidImage, "read past the end of the disk")
                    .with_path(self.file.path())
                    .with_offset(self.base.saturating_add(offset)),
            );
        }
        self.file.read_exact_at(buf, self.base + offset)
    }

    fn size(&self) -> u64 {
        self.len
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Opens the file an extent line names, confined to the descriptor's folder. A disk read
/// from inside a container (an OVA) must be self-contained: it may name no other file.
fn open_extent(
    folder: &Path,
    line: &ExtentLine,
    opts: &OpenOptions,
    in_container: bool,
) -> Result<SourceFile> {
    if in_container {
        return Err(Error::new(
            ErrorKind::UnsupportedImage,
            "a disk inside a container names other extent files",
        )
        .with_path(folder));
    }
    let name = line.file.as_deref().ok_or_else(|| {
        Error::new(ErrorKind::InvalidImage, "VMDK extent without a file name").with_path(folder)
    })?;
    let path = resolve_path(folder, name, opts).map_err(|e| {
        if e.kind() == ErrorKind::Io {
            Error::new(
                ErrorKind::NotFound,
                format!("VMDK extent file {name:?} not found"),
            )
            .with_path(folder)
        } else {
            e
        }
    })?;
    SourceFile::open(&path)
}

impl BlockSource for Vmdk {
    fn info(&self) -> &ImageInfo {
        &self.info
    }

    fn n_files(&self) -> usize {
        self.files.len()
    }

    fn file(&self, idx: usize) -> Option<&SourceFile> {
        self.files.get(idx)
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        let path = self.files.first().map_or(Path::new(""), |f| f.path());
        let end = util::check_range(offset, len, self.info.virtual_size, path)?;
        let first = self.extents.partition_point(|(s, l, _)| s + l <= offset);
        for (start, elen, extent) in &self.extents[first..] {
            if *start >= end {
                break;
            }
            let (from, to) = (offset.max(*start) - start, end.min(start + elen) - start);
            match extent {
                Extent::Zero => out.push(Mapping {
                    virt: start + from,
                    len: to - from,
                    target: Target::Zero,
                }),
                Extent::Flat {
                    file,
                    offset: base,
                    data,
                } => {
                    let at = out.len();
                    util::map_extents(data, from, to, *file, *base, out);
                    for m in &mut out[at..] {
                        m.virt += start;
                    }
                }
                Extent::Sparse {
                    file,
                    base,
                    len,
                    layout,
                } => {
                    let at = out.len();
                    let window = Window {
                        file: &self.files[*file],
                        base: *base,
                        len: *len,
                    };
                    layout.map(&window, *file, from, to, *start, out)?;
                    if *base != 0 {
                        for m in &mut out[at..] {
                            if let Target::Data { offset, .. } | Target::Deflate { offset, .. } =
                                &mut m.target
                            {
                                *offset += base;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn opened_path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        &self.fingerprint
    }

    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }

    fn identity(&self) -> Option<Identity> {
        self.cid.map(Identity::VmdkCid)
    }
}
