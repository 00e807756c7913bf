//! VHD images (Microsoft's "Virtual Hard Disk Image Format Specification"; big-endian):
//! fixed (the disk, then a 512-byte footer) and dynamic (a footer copy, a dynamic header, a
//! block allocation table, and blocks of a sector bitmap and 2 MiB of data, then the footer).

use super::{random_id, vhd_timestamp};
use crate::error::{Error, Result};
use crate::pipeline::restore::Layout;

const SECTOR: u64 = 512;
const FOOTER: u64 = 512;
const DYN_HEADER: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Block size of a dynamic VHD: the specification's default, and Hyper-V's.
pub(super) const BLOCK_SIZE: u64 = 2 * MIB;
/// The block size as the dynamic header records it.
const BLOCK_SIZE_U32: u32 = 2 << 20;
const _: () = assert!(BLOCK_SIZE_U32 as u64 == BLOCK_SIZE);
/// A block's sector bitmap: a bit per sector, padded to a sector.
const BITMAP_LEN: usize = 512;
const BITMAP: u64 = BITMAP_LEN as u64;
const _: () = assert!(BITMAP == (BLOCK_SIZE / SECTOR / 8).div_ceil(SECTOR) * SECTOR);
/// The largest disk the format describes (its CHS geometry and 32-bit BAT entries allow
/// 2040 GiB; Azure and Hyper-V refuse more).
const MAX_DISK: u64 = 2040 << 30;

/// The disk-type field of the footer.
const FIXED: u32 = 2;
const DYNAMIC: u32 = 3;

/// One's complement of the byte sum (the footer's and dynamic header's checksum).
fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// Cylinders, heads and sectors per track for `size` bytes (the specification's
/// algorithm; a geometry smaller than the disk is what it yields for odd sizes, and the
/// current-size field says the rest).
fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / SECTOR).min(65535 * 16 * 255);
    let (spt, heads, cyl_x_heads);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cyl_x_heads = total / spt;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        spt = s;
        heads = h;
        cyl_x_heads = cth;
    }
    let cyls = cyl_x_heads / heads;
    (
        u16::try_from(cyls).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(u8::MAX),
        u8::try_from(spt).unwrap_or(u8::MAX),
    )
}

/// The 512-byte footer of a disk of `size` bytes.
fn footer(size: u64, disk_type: u32, data_offset: u64) -> Result<[u8; 512]> {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: the reserved bit, always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&vhd_timestamp().to_be_bytes());
    // Creator: not "vpc " or "qemu", whose images readers size by their CHS geometry
    // rather than by the current-size field.
    f[28..32].copy_from_slice(b"bfry");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&random_id()?);
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    Ok(f)
}

fn check_size(size: u64) -> Result<()> {
    if size > MAX_DISK {
        return Err(Error::config(format!(
            "a VHD holds at most 2040 GiB; this disk is {size} bytes (export it as vhdx, \
             vmdk or raw)"
        ))
        .with_setting("format"));
    }
    Ok(())
}

/// A fixed VHD: the disk, rounded up to a whole MiB, then the footer.
pub(super) struct Fixed {
    disk: u64,
    footer: [u8; 512],
}

impl Fixed {
    /// A fixed VHD of a disk of `size` bytes.
    pub(super) fn new(size: u64) -> Result<Fixed> {
        let disk = size.div_ceil(MIB) * MIB;
        check_size(disk)?;
        Ok(Fixed {
            disk,
            footer: footer(disk, FIXED, u64::MAX)?,
        })
    }
}

impl Layout for Fixed {
    fn file_size(&self) -> u64 {
        self.disk + FOOTER
    }

    fn disk_size(&self) -> u64 {
        self.disk
    }

    fn place(
        &self,
        virt: u64,
        len: usize,
        f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        f(virt, 0..len)
    }

    fn metadata(&self, w: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        w(self.disk, &self.footer)
    }

    fn disk_span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        range.start.min(self.disk)..range.end.min(self.disk)
    }
}

/// A dynamic VHD whose blocks with data are stored in disk order after the BAT.
pub(super) struct Dynamic {
    size: u64,
    footer: [u8; 512],
    header: [u8; 1024],
    bat: Vec<u8>,
    /// Where each block's data is, if stored.
    blocks: super::Blocks,
    data_start: u64,
    stored: u64,
}

impl Dynamic {
    /// A dynamic VHD of a disk of `size` bytes storing the blocks `allocated` says.
    pub(super) fn new(size: u64, allocated: Vec<bool>) -> Result<Dynamic> {
        let size = size.div_ceil(SECTOR) * SECTOR;
        check_size(size)?;
        let blocks = allocated.len() as u64;
        let bat_at = FOOTER + DYN_HEADER;
        let bat_bytes = (blocks * 4).div_ceil(SECTOR) * SECTOR;
        let data_start = bat_at + bat_bytes;
        let mut bat = vec![0xFF; usize::try_from(bat_bytes).map_err(|_| super::too_large())?];
        let mut at = Vec::with_capacity(allocated.len());
        let mut stored = 0u64;
        for (i, a) in allocated.into_iter().enumerate() {
            if !a {
                at.push(None);
                continue;
            }
            let block_at = data_start + stored * (BITMAP + BLOCK_SIZE);
            let sector = block_at / SECTOR;
            let sector = u32::try_from(sector)
                .map_err(|_| Error::config("the VHD's block table cannot address the disk"))?;
            bat[i * 4..i * 4 + 4].copy_from_slice(&sector.to_be_bytes());
            at.push(Some(block_at + BITMAP));
            stored += 1;
        }
        let mut header = [0u8; 1024];
        header[0..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: unused
        header[16..24].copy_from_slice(&bat_at.to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        header[28..32].copy_from_slice(
            &u32::try_from(blocks)
                .map_err(|_| super::too_large())?
                .to_be_bytes(),
        );
        header[32..36].copy_from_slice(&BLOCK_SIZE_U32.to_be_bytes());
        let sum = checksum(&header);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
        Ok(Dynamic {
            size,
            footer: footer(size, DYNAMIC, FOOTER)?,
            header,
            bat,
            blocks: super::Blocks::new(BLOCK_SIZE, at),
            data_start,
            stored,
        })
    }

    fn block_at(&self, rank: u64) -> u64 {
        self.data_start + rank * (BITMAP + BLOCK_SIZE)
    }
}

impl Layout for Dynamic {
    fn file_size(&self) -> u64 {
        self.block_at(self.stored) + FOOTER
    }

    fn disk_size(&self) -> u64 {
        self.size
    }

    fn place(
        &self,
        virt: u64,
        len: usize,
        f: &mut dyn FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        self.blocks.place(virt, len, f)
    }

    fn metadata(&self, w: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        self.metadata_in(0..u64::MAX, w)
    }

    fn metadata_in(
        &self,
        range: std::ops::Range<u64>,
        w: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        use crate::pipeline::restore::clipped;
        clipped(&range, 0, &self.footer, w)?;
        clipped(&range, FOOTER, &self.header, w)?;
        clipped(&range, FOOTER + DYN_HEADER, &self.bat, w)?;
        // Every sector of a stored block is present (zeros included): the bitmaps of the
        // blocks in the range only.
        let bitmap = [0xFFu8; BITMAP_LEN];
        let stride = BITMAP + BLOCK_SIZE;
        let first = range.start.saturating_sub(self.data_start) / stride;
        let last = range.end.saturating_sub(self.data_start).div_ceil(stride);
        for r in first..last.min(self.stored) {
            clipped(&range, self.block_at(r), &bitmap, w)?;
        }
        clipped(&range, self.block_at(self.stored), &self.footer, w)
    }

    fn disk_span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let span = self.blocks.span(range);
        span.start.min(self.size)..span.end.min(self.size)
    }
}
