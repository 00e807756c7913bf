//! VHD (Virtual PC / Hyper-V legacy): fixed, dynamic and differencing disks.
//!
//! Layout (Microsoft "Virtual Hard Disk Image Format Specification"; all fields big-endian):
//! a 512-byte footer at the end of the file (and a copy at offset 0 for dynamic disks);
//! dynamic and differencing disks add a 1024-byte dynamic header, a block allocation table
//! (BAT) of u32 sector numbers, and blocks of `sector bitmap | data`. In a differencing disk
//! the bitmap says which sectors the child holds; the rest comes from the parent.

use super::util::{self, ReadAt, be32, be64, check_struct, invalid, read_struct};
use super::{BlockSource, Identity, ImageInfo, Mapping, ParentLink, Target};
use crate::error::Result;
use crate::io::{SourceFile, sys};
use crate::store::SourceFingerprint;

const FOOTER: u64 = 512;
const DYN_HEADER: u64 = 1024;
const SECTOR: u64 = 512;
const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Largest virtual size accepted (the format's own limit is 2040 GiB; qemu goes further).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Largest BAT read: what the largest disk accepted needs in blocks of 512 KiB, the smallest
/// Hyper-V makes (128 Mi entries; 2 MiB blocks, the default, need a quarter of it).
const MAX_BAT_BYTES: u64 = MAX_VIRTUAL_SIZE / (512 << 10) * 4;
/// BAT bytes read at a time.
const BAT_PIECE: u64 = 8 << 20;
/// Largest parent locator read.
const MAX_LOCATOR_BYTES: u64 = 64 << 10;

/// Disk types of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

/// The parsed metadata of a VHD file (no data read).
#[derive(Debug, Clone)]
pub struct VhdLayout {
    disk_type: DiskType,
    virtual_size: u64,
    unique_id: [u8; 16],
    /// Dynamic and differencing disks: block size, BAT (sector numbers), sector-bitmap bytes.
    block_size: u64,
    bat: Vec<u32>,
    bitmap_bytes: u64,
    parent: Option<ParentLink>,
    notes: Vec<String>,
}

fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

fn valid_footer(f: &[u8]) -> bool {
    f.starts_with(b"conectix") && be32(f, 64) == checksum(f, 64)
}

impl VhdLayout {
    /// Parses footer, dynamic header, BAT and parent locators, checking every field.
    pub fn parse(r: &dyn ReadAt) -> Result<VhdLayout> {
        let size = r.size();
        if size < FOOTER {
            return Err(invalid(
                r,
                "VHD footer",
                0,
                "file shorter than the 512-byte footer",
            ));
        }
        let mut notes = Vec::new();
        let end_footer = read_struct(r, "VHD footer", size - FOOTER, FOOTER, FOOTER)?;
        let footer = if valid_footer(&end_footer) {
            end_footer
        } else {
            let copy = read_struct(r, "VHD footer copy", 0, FOOTER, FOOTER)?;
            if !valid_footer(&copy) {
                let why = if end_footer.starts_with(b"conectix") {
                    "checksum mismatch (and no valid copy at the start of the file)"
                } else {
                    "no footer at the end of the file (and no valid copy at the start)"
                };
                return Err(invalid(r, "VHD footer", size - FOOTER, why));
            }
            notes.push(
                "the footer at the end is damaged or missing; the copy at the start was used"
                    .to_owned(),
            );
            copy
        };
        let at = size - FOOTER;
        if be32(&footer, 12) >> 16 != 1 {
            return Err(invalid(
                r,
                "VHD footer",
                at + 12,
                format!("unsupported format version {:#x}", be32(&footer, 12)),
            ));
        }
        let disk_type = match be32(&footer, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(invalid(
                    r,
                    "VHD footer",
                    at + 60,
                    format!("unknown disk type {t}"),
                ));
            }
        };
        let current_size = be64(&footer, 48);
        let (cyls, heads, spt) = (
            u64::from(u16::from_be_bytes([footer[56], footer[57]])),
            u64::from(footer[58]),
            u64::from(footer[59]),
        );
        // As qemu does: images from Virtual PC (and qemu's own before `force_size`, which
        // match) present their CHS geometry to the guest; every other creator (Hyper-V,
        // disk2vhd, XenServer, blockferry's exports…) presents `current_size`.
        let creator = &footer[28..32];
        let use_chs = matches!(creator, b"vpc " | b"qemu");
        let chs_size = cyls * heads * spt * SECTOR;
        let virtual_size = if use_chs && chs_size > 0 && chs_size <= current_size {
            if chs_size != current_size {
                notes.push(format!(
                    "the disk geometry gives {chs_size} bytes where the footer says {current_size}: \
                     using the geometry, as the creating tool presents it"
                ));
            }
            chs_size
        } else {
            current_size
        };
        if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % SECTOR != 0 {
            return Err(invalid(
                r,
                "VHD footer",
                at + 48,
                format!("invalid virtual size {virtual_size}"),
            ));
        }
        if footer[84] != 0 {
            notes.push(
                "the saved-state flag is set: the VM was saved (hibernated) with this disk"
                    .to_owned(),
            );
        }
        let unique_id: [u8; 16] = footer[68..84].try_into().expect("16 bytes");
        let mut layout = VhdLayout {
            disk_type,
            virtual_size,
            unique_id,
            block_size: 0,
            bat: Vec::new(),
            bitmap_bytes: 0,
            parent: None,
            notes,
        };
        if disk_type == DiskType::Fixed {
            if virtual_size > size - FOOTER {
                return Err(invalid(
                    r,
                    "VHD footer",
                    at + 48,
                    format!(
                        "a fixed disk of {virtual_size} bytes needs a larger file ({size} bytes)"
                    ),
                ));
            }
            return Ok(layout);
        }
        layout.parse_dynamic(r, &footer)?;
        Ok(layout)
    }

    fn parse_dynamic(&mut self, r: &dyn ReadAt, footer: &[u8]) -> Result<()> {
        let hdr_at = be64(footer, 16);
        let hdr = read_struct(r, "VHD dynamic header", hdr_at, DYN_HEADER, DYN_HEADER)?;
        if !hdr.starts_with(b"cxsparse") {
            return Err(invalid(r, "VHD dynamic header", hdr_at, "bad cookie"));
        }
        if be32(&hdr, 36) != checksum(&hdr, 36) {
            return Err(invalid(
                r,
                "VHD dynamic header",
                hdr_at + 36,
                "checksum mismatch",
            ));
        }
        let table_at = be64(&hdr, 16);
        let max_entries = u64::from(be32(&hdr, 28));
        let block_size = u64::from(be32(&hdr, 32));
        if !block_size.is_power_of_two() || !(SECTOR..=(256 << 20)).contains(&block_size) {
            return Err(invalid(
                r,
                "VHD dynamic header",
                hdr_at + 32,
                format!("block size {block_size} is not a power of two from 512 bytes to 256 MiB"),
            ));
        }
        let n_blocks = self.virtual_size.div_ceil(block_size);
        if max_entries < n_blocks {
            return Err(invalid(
                r,
                "VHD dynamic header",
                hdr_at + 28,
                format!("{max_entries} table entries cannot cover {n_blocks} blocks of the disk"),
            ));
        }
        let bat_bytes = n_blocks * 4;
        // Checked whole, then read in pieces so that it is in memory once.
        check_struct(
            r,
            "VHD block allocation table",
            table_at,
            bat_bytes,
            MAX_BAT_BYTES,
        )?;
        self.bat = Vec::with_capacity(usize::try_from(n_blocks).map_err(|_| {
            invalid(
                r,
                "VHD block allocation table",
                table_at,
                "too many entries",
            )
        })?);
        let mut at = 0;
        while at < bat_bytes {
            let n = BAT_PIECE.min(bat_bytes - at);
            let piece = read_struct(r, "VHD block allocation table", table_at + at, n, n)?;
            self.bat.extend(
                piece
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))),
            );
            at += n;
        }
        self.block_size = block_size;
        self.bitmap_bytes = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        // Every allocated block must lie in the file, clear of the header and the BAT.
        let file_end = r.size();
        let reserved = [
            (hdr_at, hdr_at + DYN_HEADER),
            (table_at, table_at + bat_bytes),
        ];
        for (i, &sector) in self.bat.iter().enumerate() {
            if sector == UNALLOCATED {
                continue;
            }
            let start = u64::from(sector) * SECTOR;
            let end = start + self.bitmap_bytes + block_size;
            let entry_at = table_at + i as u64 * 4;
            if end > file_end {
                return Err(invalid(
                    r,
                    "VHD block allocation table",
                    entry_at,
                    format!("block {i} at {start} reaches past the end of the file"),
                ));
            }
            if start < FOOTER || reserved.iter().any(|&(a, b)| start < b && a < end) {
                return Err(invalid(
                    r,
                    "VHD block allocation table",
                    entry_at,
                    format!("block {i} at {start} overlaps the file's headers or table"),
                ));
            }
        }
        if self.disk_type == DiskType::Differencing {
            self.parent = Some(parse_parent(r, &hdr, hdr_at)?);
        }
        Ok(())
    }

    /// Size of the virtual disk.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Maps `[offset, offset + len)`. Fixed disks map 1:1 through `extents` (the file's
    /// data extents); differencing disks read sector bitmaps through `r`.
    pub fn map(
        &self,
        r: &dyn ReadAt,
        offset: u64,
        len: u64,
        extents: &[(u64, u64)],
        out: &mut Vec<Mapping>,
    ) -> Result<()> {
        let end = util::check_range(offset, len, self.virtual_size, r.path())?;
        if self.disk_type == DiskType::Fixed {
            util::map_extents(extents, offset, end, 0, 0, out);
            return Ok(());
        }
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let stop = ((block + 1) * self.block_size).min(end);
            let sector = self.bat[usize::try_from(block).expect("BAT index fits")];
            if sector == UNALLOCATED {
                out.push(Mapping {
                    virt: pos,
                    len: stop - pos,
                    target: Target::Unallocated,
                });
            } else {
                let block_at = u64::from(sector) * SECTOR;
                let data_at = block_at + self.bitmap_bytes;
                if self.disk_type == DiskType::Dynamic {
                    out.push(Mapping {
                        virt: pos,
                        len: stop - pos,
                        target: Target::Data {
                            file: 0,
                            offset: data_at + in_block,
                        },
                    });
                } else {
                    let bitmap = read_struct(
                        r,
                        "VHD sector bitmap",
                        block_at,
                        self.bitmap_bytes,
                        self.bitmap_bytes,
                    )?;
                    map_bitmap(&bitmap, pos - in_block, in_block, stop - pos, data_at, out);
                }
            }
            pos = stop;
        }
        Ok(())
    }

    /// Bytes held by allocated blocks (fixed: the caller counts file extents).
    fn allocated(&self) -> u64 {
        self.bat
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s != UNALLOCATED)
            .map(|(i, _)| {
                self.block_size
                    .min(self.virtual_size - i as u64 * self.block_size)
            })
            .sum()
    }
}

/// Maps the `[in_block, in_block + len)` part of a block at `block_virt` by its sector bitmap:
/// set bits are in the child (at `data_at`), clear bits come from the parent.
fn map_bitmap(
    bitmap: &[u8],
    block_virt: u64,
    in_block: u64,
    len: u64,
    data_at: u64,
    out: &mut Vec<Mapping>,
) {
    let present = |sector: u64| {
        bitmap[usize::try_from(sector / 8).expect("bitmap index")] & (0x80 >> (sector % 8)) != 0
    };
    let end = in_block + len;
    let mut pos = in_block;
    while pos < end {
        let here = present(pos / SECTOR);
        let mut stop = ((pos / SECTOR) + 1) * SECTOR;
        while stop < end && present(stop / SECTOR) == here {
            stop += SECTOR;
        }
        let stop = stop.min(end);
        let target = if here {
            Target::Data {
                file: 0,
                offset: data_at + pos,
            }
        } else {
            Target::Unallocated
        };
        out.push(Mapping {
            virt: block_virt + pos,
            len: stop - pos,
            target,
        });
        pos = stop;
    }
}

/// Platform codes of parent locators.
const W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
const MACX: u32 = u32::from_be_bytes(*b"MacX");

fn parse_parent(r: &dyn ReadAt, hdr: &[u8], hdr_at: u64) -> Result<ParentLink> {
    let parent_id: [u8; 16] = hdr[40..56].try_into().expect("16 bytes");
    let name = util::utf16_until_nul(
        hdr[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    );
    let mut by_kind: [Vec<String>; 3] = Default::default();
    for i in 0..8 {
        let e = &hdr[576 + i * 24..600 + i * 24];
        let code = be32(e, 0);
        let len = u64::from(be32(e, 8));
        let at = be64(e, 16);
        let slot = match code {
            W2RU => 0,
            W2KU => 1,
            MACX => 2,
            _ => continue,
        };
        let entry_at = hdr_at + 576 + i as u64 * 24;
        let data = read_struct(r, "VHD parent locator", at, len, MAX_LOCATOR_BYTES)
            .map_err(|e| e.with_offset(entry_at))?;
        let text = if code == MACX {
            String::from_utf8(data).ok().map(|s| {
                s.trim_start_matches("file://")
                    .trim_end_matches('\0')
                    .to_owned()
            })
        } else {
            util::utf16_until_nul(
                data.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            )
        };
        match text {
            Some(t) if !t.is_empty() => by_kind[slot].push(t),
            _ => {
                return Err(invalid(
                    r,
                    "VHD parent locator",
                    entry_at,
                    "the path is not valid text",
                ));
            }
        }
    }
    let [relative, absolute, mac] = by_kind;
    let mut candidates: Vec<String> = relative.into_iter().chain(absolute).collect();
    candidates.extend(name.filter(|n| !n.is_empty()));
    candidates.extend(mac);
    if candidates.is_empty() {
        return Err(invalid(
            r,
            "VHD dynamic header",
            hdr_at + 576,
            "a differencing disk with no parent locator",
        ));
    }
    Ok(ParentLink {
        candidates,
        identity: Identity::VhdUniqueId(parent_id),
    })
}

/// A VHD image file.
#[derive(Debug)]
pub(crate) struct Vhd {
    file: SourceFile,
    layout: VhdLayout,
    info: ImageInfo,
    /// Fixed disks: the file's data extents within the virtual size.
    extents: Vec<(u64, u64)>,
    fingerprint: SourceFingerprint,
}

impl Vhd {
    /// Opens a VHD file read-only.
    pub(crate) fn open(file: SourceFile) -> Result<Vhd> {
        let layout = VhdLayout::parse(&file)?;
        let extents = if layout.disk_type == DiskType::Fixed {
            sys::data_extents(file.file(), layout.virtual_size, 1 << 20).map_err(|e| {
                crate::error::Error::io("finding the image's allocated ranges", file.path(), e)
            })?
        } else {
            Vec::new()
        };
        let allocated_bytes = if layout.disk_type == DiskType::Fixed {
            extents.iter().map(|e| e.1).sum()
        } else {
            layout.allocated()
        };
        let info = ImageInfo {
            format: "vhd",
            subformat: match layout.disk_type {
                DiskType::Fixed => "fixed",
                DiskType::Dynamic => "dynamic",
                DiskType::Differencing => "differencing",
            }
            .to_owned(),
            virtual_size: layout.virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            allocated_bytes,
            notes: layout.notes.clone(),
        };
        let fingerprint = util::fingerprint(&file)?;
        Ok(Vhd {
            file,
            layout,
            info,
            extents,
            fingerprint,
        })
    }
}

impl BlockSource for Vhd {
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
        self.layout.map(&self.file, offset, len, &self.extents, out)
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        &self.fingerprint
    }

    fn parent_link(&self) -> Option<&ParentLink> {
        self.layout.parent.as_ref()
    }

    fn identity(&self) -> Option<Identity> {
        Some(Identity::VhdUniqueId(self.layout.unique_id))
    }
}
