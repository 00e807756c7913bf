//! VHDX (Hyper-V): fixed, dynamic and differencing disks.
//!
//! Layout ([MS-VHDX] v1.0; integers little-endian, GUIDs in Microsoft's mixed-endian form):
//!
//! ```text
//!   0       file identifier "vhdxfile"
//!   64 KiB  header 1 ┐ "head", CRC-32C, sequence number: the valid one with the
//!   128 KiB header 2 ┘ higher sequence number is current
//!   192 KiB region table 1 ┐ "regi", CRC-32C: where the BAT and metadata regions are
//!   256 KiB region table 2 ┘
//!   …       log, metadata region (file parameters, sizes, sector sizes, parent locator),
//!           BAT (u64 entries: state in bits 0-2, file offset in MiB from bit 20), blocks
//! ```
//!
//! The BAT interleaves one sector-bitmap entry after every `chunk_ratio` payload entries;
//! in a differencing disk a partially present block's bitmap says which sectors the child
//! holds (bit 0 of byte 0 = first sector).

use super::util::{self, ReadAt, invalid, read_struct};
use super::vhdx_log::{self, Overlay, Replayed};
use super::{BlockSource, Identity, ImageInfo, Mapping, ParentLink, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::io::SourceFile;
use crate::store::SourceFingerprint;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const HEADER_SIZE: u64 = 4 * KIB;
const HEADER_AT: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_TABLE_SIZE: u64 = 64 * KIB;
const REGION_TABLE_AT: [u64; 2] = [192 * KIB, 256 * KIB];
const MAX_REGION_ENTRIES: u32 = 2047;
const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest virtual size (the specification's limit).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// BAT bytes read at a time.
const BAT_PIECE: u64 = 8 * MIB;
/// Largest metadata item read.
const MAX_ITEM_BYTES: u64 = MIB;

// BAT states (MS-VHDX 2.5.1).
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const SB_PRESENT: u64 = 6;

/// A GUID as stored on disk (mixed-endian), from its text form.
pub(crate) fn guid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text
        .trim_matches(|c| c == '{' || c == '}')
        .chars()
        .filter(|&c| c != '-')
        .collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, o) in b.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    // Data1 (4 bytes), Data2 and Data3 (2 each) are little-endian on disk.
    b[..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn g16(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().expect("16 bytes")
}

/// CRC-32C of a structure whose checksum field (4 bytes at `field`) counts as zero.
fn crc_with_zero_field(bytes: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &bytes[field + 4..])
}

/// The current header's fields.
#[derive(Debug, Clone)]
struct Header {
    sequence: u64,
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    log_length: u32,
    log_offset: u64,
}

fn parse_header(b: &[u8]) -> Option<Header> {
    if &b[..4] != b"head" || le32(b, 4) != crc_with_zero_field(b, 4) || le16(b, 66) != 1 {
        return None;
    }
    Some(Header {
        sequence: le64(b, 8),
        data_write_guid: g16(b, 32),
        log_guid: g16(b, 48),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// The parsed metadata of a VHDX file (no payload read).
#[derive(Debug, Clone)]
pub struct VhdxLayout {
    virtual_size: u64,
    block_size: u64,
    logical_sector: u64,
    physical_sector: u64,
    has_parent: bool,
    /// Set on fixed disks: blocks stay allocated.
    leave_blocks_allocated: bool,
    chunk_ratio: u64,
    bat: Vec<u64>,
    data_write_guid: [u8; 16],
    parent: Option<ParentLink>,
    notes: Vec<String>,
    file_size: u64,
    /// Ranges of the file that no block may overlap (headers, region tables, regions, log).
    reserved: Vec<(u64, u64)>,
    /// The replayed log, through which metadata and sector bitmaps are read.
    overlay: Option<Overlay>,
}

struct Region {
    offset: u64,
    length: u64,
}

impl VhdxLayout {
    /// Parses headers, region table, metadata and BAT, checking every field.
    pub fn parse(r: &dyn ReadAt) -> Result<VhdxLayout> {
        let ident = read_struct(r, "VHDX file identifier", 0, 8, 8)?;
        if ident != b"vhdxfile" {
            return Err(invalid(
                r,
                "VHDX file identifier",
                0,
                "signature is not \"vhdxfile\"",
            ));
        }
        let mut notes = Vec::new();
        let header = current_header(r, &mut notes)?;
        let overlay = if header.log_guid == [0; 16] {
            None
        } else {
            let o = vhdx_log::replay(
                r,
                header.log_guid,
                header.log_offset,
                u64::from(header.log_length),
            )?;
            notes.push(format!(
                "the log held {} unapplied update(s) (unclean shutdown): replayed in memory, the file was not changed",
                o.entries
            ));
            Some(o)
        };
        let replayed;
        let meta_r: &dyn ReadAt = match &overlay {
            Some(o) => {
                replayed = Replayed {
                    inner: r,
                    overlay: o,
                };
                &replayed
            }
            None => r,
        };
        let regions = region_table(meta_r, &mut notes)?;
        let (bat_region, meta_region) = regions;
        let meta = Metadata::parse(meta_r, &meta_region)?;
        let mut reserved = vec![
            (0, MIB),
            (bat_region.offset, bat_region.offset + bat_region.length),
            (meta_region.offset, meta_region.offset + meta_region.length),
        ];
        if header.log_length > 0 {
            reserved.push((
                header.log_offset,
                header
                    .log_offset
                    .saturating_add(u64::from(header.log_length)),
            ));
        }
        let chunk_ratio = ((1u64 << 23) * meta.logical_sector) / meta.block_size;
        let payload_blocks = meta.virtual_size.div_ceil(meta.block_size);
        let sb_blocks = payload_blocks.div_ceil(chunk_ratio);
        let entries = if meta.has_parent {
            sb_blocks * (chunk_ratio + 1)
        } else {
            payload_blocks + payload_blocks.saturating_sub(1) / chunk_ratio
        };
        let bat_bytes = entries * 8;
        if bat_bytes > bat_region.length {
            return Err(invalid(
                r,
                "VHDX BAT region",
                bat_region.offset,
                format!(
                    "{} bytes cannot hold the {entries} entries the disk needs",
                    bat_region.length
                ),
            ));
        }
        // No cap of its own: the entries follow from the virtual size (at most the
        // specification's 64 TiB) and the block size (at least 1 MiB), so the BAT is at most
        // what the format allows (512 MiB for 64 TiB in 1 MiB blocks), and its region lies
        // inside the file (checked with the region table): a BAT is held only if the file
        // holds it. Read in pieces, so it is in memory once.
        let mut bat = Vec::with_capacity(
            usize::try_from(entries)
                .map_err(|_| invalid(r, "VHDX BAT", bat_region.offset, "too many entries"))?,
        );
        let mut at = 0;
        while at < bat_bytes {
            let n = BAT_PIECE.min(bat_bytes - at);
            let piece = read_struct(meta_r, "VHDX BAT", bat_region.offset + at, n, n)?;
            bat.extend(piece.chunks_exact(8).map(|c| le64(c, 0)));
            at += n;
        }
        let parent = if meta.has_parent {
            let (candidates, linkage) = meta.parent_locator.clone().ok_or_else(|| {
                invalid(
                    r,
                    "VHDX metadata",
                    meta_region.offset,
                    "a differencing disk without a parent locator",
                )
            })?;
            Some(ParentLink {
                candidates,
                identity: Identity::VhdxDataWriteGuid(linkage),
            })
        } else {
            None
        };
        let layout = VhdxLayout {
            virtual_size: meta.virtual_size,
            block_size: meta.block_size,
            logical_sector: meta.logical_sector,
            physical_sector: meta.physical_sector,
            has_parent: meta.has_parent,
            leave_blocks_allocated: meta.leave_blocks_allocated,
            chunk_ratio,
            bat,
            data_write_guid: header.data_write_guid,
            parent,
            notes,
            file_size: r.size(),
            reserved,
            overlay,
        };
        layout.check_bat(r, bat_region.offset)?;
        Ok(layout)
    }

    /// Checks every BAT entry: known state, and blocks inside the file clear of metadata.
    fn check_bat(&self, r: &dyn ReadAt, bat_at: u64) -> Result<()> {
        for (i, &e) in self.bat.iter().enumerate() {
            let at = bat_at + i as u64 * 8;
            let is_sb = (i as u64 + 1).is_multiple_of(self.chunk_ratio + 1);
            let state = e & 7;
            let (len, allocated) = if is_sb {
                match state {
                    0 => (0, false),
                    SB_PRESENT if self.has_parent => (MIB, true),
                    s => {
                        return Err(invalid(
                            r,
                            "VHDX BAT",
                            at,
                            format!("sector bitmap entry {i} has state {s}, invalid here"),
                        ));
                    }
                }
            } else {
                match state {
                    PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                        (0, false)
                    }
                    PAYLOAD_FULLY_PRESENT => (self.block_size, true),
                    PAYLOAD_PARTIALLY_PRESENT if self.has_parent => (self.block_size, true),
                    s => {
                        return Err(invalid(
                            r,
                            "VHDX BAT",
                            at,
                            format!("payload entry {i} has state {s}, invalid here"),
                        ));
                    }
                }
            };
            if !allocated {
                continue;
            }
            let start = (e >> 20) << 20;
            let end = start.saturating_add(len);
            if start < MIB || end > self.file_size {
                return Err(invalid(
                    r,
                    "VHDX BAT",
                    at,
                    format!("entry {i} points at {start}, outside the file's data area"),
                ));
            }
            if self.reserved.iter().any(|&(a, b)| start < b && a < end) {
                return Err(invalid(
                    r,
                    "VHDX BAT",
                    at,
                    format!("entry {i} at {start} overlaps the headers, log, metadata or BAT"),
                ));
            }
            if !is_sb && self.overlay.as_ref().is_some_and(|o| o.touches(start, end)) {
                return Err(Error::new(
                    ErrorKind::UnsupportedImage,
                    format!("the VHDX log rewrites payload block {i}; replaying data blocks is not supported"),
                )
                .with_path(r.path())
                .with_offset(at));
            }
        }
        Ok(())
    }

    /// Size of the virtual disk.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Maps `[offset, offset + len)`; sector bitmaps are read through `r`.
    pub fn map(&self, r: &dyn ReadAt, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        let end = util::check_range(offset, len, self.virtual_size, r.path())?;
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let stop = ((block + 1) * self.block_size).min(end);
            let entry = self.bat
                [usize::try_from(block + block / self.chunk_ratio).expect("BAT index fits")];
            let data_at = (entry >> 20) << 20;
            let piece = |target| Mapping {
                virt: pos,
                len: stop - pos,
                target,
            };
            match entry & 7 {
                PAYLOAD_FULLY_PRESENT => out.push(piece(Target::Data {
                    file: 0,
                    offset: data_at + in_block,
                })),
                // MS-VHDX 2.5.1.1: undefined and unmapped blocks read as zeros (or
                // arbitrary data) in every kind of disk, never as the parent's.
                PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNDEFINED => {
                    out.push(piece(Target::Zero));
                }
                PAYLOAD_PARTIALLY_PRESENT => self.map_partial(r, block, data_at, pos, stop, out)?,
                // Not present: zeros in a dynamic disk, the parent's data in a differencing one.
                _ => out.push(piece(Target::Unallocated)),
            }
            pos = stop;
        }
        Ok(())
    }

    /// Maps part of a partially present block by its sector bitmap.
    fn map_partial(
        &self,
        r: &dyn ReadAt,
        block: u64,
        data_at: u64,
        pos: u64,
        stop: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<()> {
        let chunk = block / self.chunk_ratio;
        let sb_entry = self.bat[usize::try_from(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
            .expect("BAT index fits")];
        if sb_entry & 7 != SB_PRESENT {
            return Err(invalid(
                r,
                "VHDX BAT",
                0,
                format!("block {block} is partially present but its sector bitmap is not"),
            ));
        }
        let sb_at = (sb_entry >> 20) << 20;
        let block_start = block * self.block_size;
        let first = (pos - block_start) / self.logical_sector;
        let last = (stop - block_start).div_ceil(self.logical_sector);
        let sectors_per_block = self.block_size / self.logical_sector;
        let bit0 = (block % self.chunk_ratio) * sectors_per_block + first;
        let byte0 = bit0 / 8;
        let n_bytes = (bit0 + (last - first)).div_ceil(8) - byte0;
        let bits = match &self.overlay {
            Some(o) => read_struct(
                &Replayed {
                    inner: r,
                    overlay: o,
                },
                "VHDX sector bitmap",
                sb_at + byte0,
                n_bytes,
                MIB,
            )?,
            None => read_struct(r, "VHDX sector bitmap", sb_at + byte0, n_bytes, MIB)?,
        };
        let present = |s: u64| {
            let bit = bit0 + (s - first) - byte0 * 8;
            bits[usize::try_from(bit / 8).expect("bitmap index")] & (1 << (bit % 8)) != 0
        };
        let mut at = pos;
        while at < stop {
            let s = (at - block_start) / self.logical_sector;
            let here = present(s);
            let mut next = s + 1;
            while next < last && present(next) == here {
                next += 1;
            }
            let run_end = (block_start + next * self.logical_sector).min(stop);
            let target = if here {
                Target::Data {
                    file: 0,
                    offset: data_at + (at - block_start),
                }
            } else {
                Target::Unallocated
            };
            out.push(Mapping {
                virt: at,
                len: run_end - at,
                target,
            });
            at = run_end;
        }
        Ok(())
    }

    /// Bytes in this file's present blocks (whole blocks; partially present ones counted whole).
    fn allocated(&self) -> u64 {
        let payload_blocks = self.virtual_size.div_ceil(self.block_size);
        (0..payload_blocks)
            .filter(|b| {
                matches!(
                    self.bat[usize::try_from(b + b / self.chunk_ratio).unwrap_or(usize::MAX)] & 7,
                    PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT
                )
            })
            .map(|b| self.block_size.min(self.virtual_size - b * self.block_size))
            .sum()
    }
}

fn current_header(r: &dyn ReadAt, notes: &mut Vec<String>) -> Result<Header> {
    let mut found: Vec<(usize, Header, Vec<u8>)> = Vec::new();
    for (i, &at) in HEADER_AT.iter().enumerate() {
        let b = read_struct(r, "VHDX header", at, HEADER_SIZE, HEADER_SIZE)?;
        if let Some(h) = parse_header(&b) {
            found.push((i, h, b));
        }
    }
    match found.as_slice() {
        [] => Err(invalid(
            r,
            "VHDX header",
            HEADER_AT[0],
            "neither header is valid (signature, CRC-32C or version)",
        )),
        [(i, h, _)] => {
            notes.push(format!(
                "header {} is damaged; header {} was used",
                2 - i,
                i + 1
            ));
            Ok(h.clone())
        }
        [(_, h1, b1), (_, h2, b2)] => {
            if h1.sequence == h2.sequence && b1 != b2 {
                return Err(invalid(
                    r,
                    "VHDX header",
                    HEADER_AT[1],
                    format!(
                        "both headers have sequence number {} but differ",
                        h1.sequence
                    ),
                ));
            }
            Ok(if h2.sequence > h1.sequence {
                h2.clone()
            } else {
                h1.clone()
            })
        }
        _ => unreachable!("at most two headers"),
    }
}

/// Reads the region table (the second copy if the first is damaged); returns BAT and metadata.
fn region_table(r: &dyn ReadAt, notes: &mut Vec<String>) -> Result<(Region, Region)> {
    let bat_guid = guid("2DC27766-F623-4200-9D64-115E9BFD4A08").expect("valid GUID");
    let meta_guid = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E").expect("valid GUID");
    let mut last_err = None;
    for (i, &at) in REGION_TABLE_AT.iter().enumerate() {
        let t = read_struct(
            r,
            "VHDX region table",
            at,
            REGION_TABLE_SIZE,
            REGION_TABLE_SIZE,
        )?;
        let result = (|| {
            if &t[..4] != b"regi" || le32(&t, 4) != crc_with_zero_field(&t, 4) {
                return Err(invalid(
                    r,
                    "VHDX region table",
                    at,
                    "bad signature or CRC-32C",
                ));
            }
            let count = le32(&t, 8);
            if count > MAX_REGION_ENTRIES {
                return Err(invalid(
                    r,
                    "VHDX region table",
                    at + 8,
                    format!("{count} entries, more than the 2047 allowed"),
                ));
            }
            let (mut bat, mut meta) = (None, None);
            let mut spans: Vec<(u64, u64)> = Vec::new();
            for e in 0..count as usize {
                let ent = &t[16 + e * 32..48 + e * 32];
                let ent_at = at + 16 + e as u64 * 32;
                let (id, offset, length, required) = (
                    g16(ent, 0),
                    le64(ent, 16),
                    u64::from(le32(ent, 24)),
                    le32(ent, 28) & 1 == 1,
                );
                if offset < MIB || offset % MIB != 0 || length % MIB != 0 || length == 0 {
                    return Err(invalid(
                        r,
                        "VHDX region table",
                        ent_at,
                        "region not aligned to 1 MiB, or empty",
                    ));
                }
                let end = offset
                    .checked_add(length)
                    .filter(|&e| e <= r.size())
                    .ok_or_else(|| {
                        invalid(
                            r,
                            "VHDX region table",
                            ent_at,
                            "region reaches past the end of the file",
                        )
                    })?;
                if spans.iter().any(|&(a, b)| offset < b && a < end) {
                    return Err(invalid(r, "VHDX region table", ent_at, "regions overlap"));
                }
                spans.push((offset, end));
                let slot = if id == bat_guid {
                    &mut bat
                } else if id == meta_guid {
                    &mut meta
                } else if required {
                    return Err(Error::new(
                        ErrorKind::UnsupportedImage,
                        "VHDX region table: a required region of an unknown kind",
                    )
                    .with_path(r.path())
                    .with_offset(ent_at));
                } else {
                    continue;
                };
                if slot.replace(Region { offset, length }).is_some() {
                    return Err(invalid(
                        r,
                        "VHDX region table",
                        ent_at,
                        "a region appears twice",
                    ));
                }
            }
            match (bat, meta) {
                (Some(b), Some(m)) => Ok((b, m)),
                _ => Err(invalid(
                    r,
                    "VHDX region table",
                    at,
                    "BAT or metadata region missing",
                )),
            }
        })();
        match result {
            Ok(v) => {
                if i == 1 {
                    notes.push("region table 1 is damaged; region table 2 was used".to_owned());
                }
                return Ok(v);
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("two tables were tried"))
}

/// The metadata items blockferry needs.
struct Metadata {
    block_size: u64,
    has_parent: bool,
    leave_blocks_allocated: bool,
    virtual_size: u64,
    logical_sector: u64,
    physical_sector: u64,
    parent_locator: Option<(Vec<String>, [u8; 16])>,
}

impl Metadata {
    fn parse(r: &dyn ReadAt, region: &Region) -> Result<Metadata> {
        let at = region.offset;
        let table = read_struct(r, "VHDX metadata table", at, 64 * KIB, 64 * KIB)?;
        if &table[..8] != b"metadata" {
            return Err(invalid(r, "VHDX metadata table", at, "bad signature"));
        }
        let count = le16(&table, 10);
        if count > MAX_METADATA_ENTRIES {
            return Err(invalid(
                r,
                "VHDX metadata table",
                at + 10,
                format!("{count} entries, more than the 2047 allowed"),
            ));
        }
        let ids = [
            ("file parameters", "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"),
            ("virtual disk size", "2FA54224-CD1B-4876-B211-5DBED83BF4B8"),
            ("virtual disk id", "BECA12AB-B2E6-4523-93EF-C309E000C746"),
            (
                "logical sector size",
                "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
            ),
            (
                "physical sector size",
                "CDA348C7-445D-4471-9CC9-E9885251C556",
            ),
            ("parent locator", "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"),
        ];
        let known: Vec<[u8; 16]> = ids
            .iter()
            .map(|(_, g)| guid(g).expect("valid GUID"))
            .collect();
        let mut items: [Option<Vec<u8>>; 6] = Default::default();
        let mut seen: Vec<[u8; 16]> = Vec::new();
        for e in 0..usize::from(count) {
            let ent = &table[32 + e * 32..64 + e * 32];
            let ent_at = at + 32 + e as u64 * 32;
            let (id, off, len, flags) = (
                g16(ent, 0),
                u64::from(le32(ent, 16)),
                u64::from(le32(ent, 20)),
                le32(ent, 24),
            );
            if seen.contains(&id) {
                return Err(invalid(
                    r,
                    "VHDX metadata table",
                    ent_at,
                    "an item appears twice",
                ));
            }
            seen.push(id);
            let Some(k) = known.iter().position(|g| *g == id) else {
                if flags & 4 != 0 {
                    return Err(Error::new(
                        ErrorKind::UnsupportedImage,
                        "VHDX metadata: a required item of an unknown kind",
                    )
                    .with_path(r.path())
                    .with_offset(ent_at));
                }
                continue;
            };
            if len == 0
                || off < 64 * KIB
                || off.checked_add(len).is_none_or(|end| end > region.length)
            {
                return Err(invalid(
                    r,
                    "VHDX metadata table",
                    ent_at,
                    format!("item {} lies outside the metadata region", ids[k].0),
                ));
            }
            items[k] = Some(read_struct(
                r,
                "VHDX metadata item",
                at + off,
                len,
                MAX_ITEM_BYTES,
            )?);
        }
        let need = |k: usize, min: usize| -> Result<&Vec<u8>> {
            items[k].as_ref().filter(|v| v.len() >= min).ok_or_else(|| {
                invalid(
                    r,
                    "VHDX metadata",
                    at,
                    format!("the {} item is missing or too short", ids[k].0),
                )
            })
        };
        let params = need(0, 8)?;
        let block_size = u64::from(le32(params, 0));
        let has_parent = le32(params, 4) & 2 != 0;
        let leave_blocks_allocated = le32(params, 4) & 1 != 0;
        let virtual_size = le64(need(1, 8)?, 0);
        need(2, 16)?;
        let logical_sector = u64::from(le32(need(3, 4)?, 0));
        let physical_sector = u64::from(le32(need(4, 4)?, 0));
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(invalid(
                r,
                "VHDX file parameters",
                at,
                format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
            ));
        }
        if !matches!(logical_sector, 512 | 4096) || !matches!(physical_sector, 512 | 4096) {
            return Err(invalid(
                r,
                "VHDX sector sizes",
                at,
                format!(
                    "logical {logical_sector} / physical {physical_sector}: only 512 and 4096 exist"
                ),
            ));
        }
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(logical_sector)
        {
            return Err(invalid(
                r,
                "VHDX virtual disk size",
                at,
                format!("{virtual_size} is not a multiple of the sector size up to 64 TiB"),
            ));
        }
        let parent_locator = match &items[5] {
            Some(item) if has_parent => Some(parse_parent_locator(r, item, at)?),
            _ => None,
        };
        Ok(Metadata {
            block_size,
            has_parent,
            leave_blocks_allocated,
            virtual_size,
            logical_sector,
            physical_sector,
            parent_locator,
        })
    }
}

/// Parses the parent locator item: candidate paths (most specific first) and the linkage GUID.
fn parse_parent_locator(r: &dyn ReadAt, item: &[u8], at: u64) -> Result<(Vec<String>, [u8; 16])> {
    let bad = |why: &str| invalid(r, "VHDX parent locator", at, why.to_owned());
    if item.len() < 20
        || g16(item, 0) != guid("B04AEFB7-D19E-4A81-B789-25B8E9445913").expect("valid GUID")
    {
        return Err(bad("unknown locator type"));
    }
    let count = usize::from(le16(item, 18));
    if 20 + count * 12 > item.len() {
        return Err(bad("more entries than the item holds"));
    }
    let text = |off: u32, len: u16| -> Result<String> {
        let (off, len) = (off as usize, usize::from(len));
        let bytes = item
            .get(off..off.saturating_add(len))
            .filter(|_| len % 2 == 0)
            .ok_or_else(|| bad("entry outside the item"))?;
        String::from_utf16(
            &bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )
        .map_err(|_| bad("entry is not UTF-16"))
    };
    let (mut linkage, mut relative, mut absolute, mut volume) = (None, None, None, None);
    for e in 0..count {
        let ent = &item[20 + e * 12..32 + e * 12];
        let key = text(le32(ent, 0), le16(ent, 8))?;
        let value = text(le32(ent, 4), le16(ent, 10))?;
        match key.as_str() {
            "parent_linkage" => {
                linkage = Some(guid(&value).ok_or_else(|| bad("parent_linkage is not a GUID"))?);
            }
            "relative_path" => relative = Some(value),
            "absolute_win32_path" => absolute = Some(value),
            "volume_path" => volume = Some(value),
            _ => {}
        }
    }
    let linkage = linkage.ok_or_else(|| bad("no parent_linkage"))?;
    let candidates: Vec<String> = [relative, absolute, volume].into_iter().flatten().collect();
    if candidates.is_empty() {
        return Err(bad("no parent path"));
    }
    Ok((candidates, linkage))
}

/// A VHDX image file.
#[derive(Debug)]
pub(crate) struct Vhdx {
    file: SourceFile,
    layout: VhdxLayout,
    info: ImageInfo,
    fingerprint: SourceFingerprint,
}

impl Vhdx {
    /// Opens a VHDX file read-only.
    pub(crate) fn open(file: SourceFile) -> Result<Vhdx> {
        let layout = VhdxLayout::parse(&file)?;
        let fixed = !layout.has_parent && layout.leave_blocks_allocated;
        let info = ImageInfo {
            format: "vhdx",
            subformat: if layout.has_parent {
                "differencing"
            } else if fixed {
                "fixed"
            } else {
                "dynamic"
            }
            .to_owned(),
            virtual_size: layout.virtual_size,
            logical_sector_size: u32::try_from(layout.logical_sector).expect("512 or 4096"),
            physical_sector_size: u32::try_from(layout.physical_sector).expect("512 or 4096"),
            allocated_bytes: layout.allocated(),
            notes: layout.notes.clone(),
        };
        let fingerprint = util::fingerprint(&file)?;
        Ok(Vhdx {
            file,
            layout,
            info,
            fingerprint,
        })
    }
}

impl BlockSource for Vhdx {
    fn info(&self) -> &ImageInfo {
        &self.info
    }

    fn n_files(&self) -> usize {
        1
    }

    fn file(&self, idx: usize) -> Option<&SourceFile> {
        (idx == 0).then_some(&self.file)
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        self.layout.map(&self.file, offset, len, out)
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        &self.fingerprint
    }

    fn parent_link(&self) -> Option<&ParentLink> {
        self.layout.parent.as_ref()
    }

    fn identity(&self) -> Option<Identity> {
        Some(Identity::VhdxDataWriteGuid(self.layout.data_write_guid))
    }
}
