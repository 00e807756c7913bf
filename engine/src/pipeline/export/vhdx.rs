//! Dynamic VHDX images ([MS-VHDX]; little-endian, CRC-32C checksums). The file: the type
//! identifier, two headers, two region tables, an empty log (1 MiB), the metadata region
//! (1 MiB), the block allocation table, then the blocks with data, each MiB-aligned.

use super::random_id;
use crate::error::{Error, Result};
use crate::image::vhdx_guid;
use crate::pipeline::restore::Layout;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const LOG_AT: u64 = MIB;
const LOG_LEN: u32 = 1 << 20;
/// A header's size.
const HEADER_LEN: usize = 4096;
/// A region table's size; also where the metadata items start in their region.
const TABLE_LEN: usize = 64 * 1024;
const METADATA_AT: u64 = 2 * MIB;
const METADATA_LEN: u32 = 1 << 20;
const BAT_AT: u64 = 3 * MIB;
const LOGICAL_SECTOR: u64 = 512;
const LOGICAL_SECTOR_U32: u32 = 512;
const PHYSICAL_SECTOR: u32 = 4096;
/// The largest disk the format describes.
const MAX_DISK: u64 = 64 << 40;
/// A block whose data is all in the file.
const PAYLOAD_FULLY_PRESENT: u64 = 6;

const BAT_REGION: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const METADATA_REGION: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const PAGE_83: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
const LOGICAL_SECTOR_SIZE: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const PHYSICAL_SECTOR_SIZE: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";

/// The block size of an export of a store with `chunk_size`: a chunk, at least the
/// format's smallest (1 MiB), so that a block is allocated only where a chunk has data.
pub(super) fn block_size(chunk_size: u32) -> u64 {
    u64::from(chunk_size)
        .max(MIB)
        .next_power_of_two()
        .min(256 * MIB)
}

fn guid(text: &str) -> [u8; 16] {
    vhdx_guid(text).expect("a well-formed GUID constant")
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Stores the CRC-32C of `buf` (computed with the field zero) at `field`.
fn seal(buf: &mut [u8], field: usize) {
    put(buf, field, &[0; 4]);
    let crc = crc32c::crc32c(buf);
    put(buf, field, &crc.to_le_bytes());
}

/// A dynamic VHDX whose blocks with data are stored in disk order after the BAT.
pub(super) struct Dynamic {
    size: u64,
    /// Where each block is, if stored.
    blocks: super::Blocks,
    end: u64,
    /// Everything before the blocks: identifier, headers, region tables, metadata, BAT.
    meta: Vec<(u64, Vec<u8>)>,
}

impl Dynamic {
    /// A VHDX of a disk of `size` bytes (rounded up to a whole sector) in blocks of `block`
    /// bytes, storing the blocks `allocated` says.
    pub(super) fn new(size: u64, block: u64, allocated: Vec<bool>) -> Result<Dynamic> {
        let size = size.div_ceil(LOGICAL_SECTOR) * LOGICAL_SECTOR;
        if size > MAX_DISK {
            return Err(Error::config("a VHDX holds at most 64 TiB").with_setting("format"));
        }
        let chunk_ratio = (1u64 << 23) * LOGICAL_SECTOR / block;
        let blocks = allocated.len() as u64;
        let entries = blocks + blocks.saturating_sub(1) / chunk_ratio;
        let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
        let mut bat = vec![0u8; usize::try_from(entries * 8).map_err(|_| super::too_large())?];
        let mut at = Vec::with_capacity(allocated.len());
        let mut next = BAT_AT + bat_len;
        for (i, a) in allocated.into_iter().enumerate() {
            if !a {
                at.push(None);
                continue;
            }
            let index = i as u64 + i as u64 / chunk_ratio;
            let slot = usize::try_from(index * 8).map_err(|_| super::too_large())?;
            put(
                &mut bat,
                slot,
                &(next | PAYLOAD_FULLY_PRESENT).to_le_bytes(),
            );
            at.push(Some(next));
            next += block;
        }
        let mut meta = vec![(0, identifier()), (BAT_AT, bat)];
        let (file_write, data_write) = (random_id()?, random_id()?);
        for (seq, offset) in [(1u64, 64 * KIB), (2, 128 * KIB)] {
            meta.push((offset, header(seq, &file_write, &data_write)));
        }
        let regions = region_table(
            u32::try_from(bat_len)
                .map_err(|_| Error::config("the VHDX block table does not fit its region"))?,
        );
        meta.push((192 * KIB, regions.clone()));
        meta.push((256 * KIB, regions));
        let block32 =
            u32::try_from(block).map_err(|_| Error::internal("a VHDX block size over 4 GiB"))?;
        meta.push((METADATA_AT, metadata(size, block32, &random_id()?)));
        Ok(Dynamic {
            size,
            blocks: super::Blocks::new(block, at),
            end: next,
            meta,
        })
    }
}

/// The file type identifier: a signature and the creator, in UTF-16.
fn identifier() -> Vec<u8> {
    let mut b = vec![0u8; 8 + 512];
    put(&mut b, 0, b"vhdxfile");
    let creator = concat!("blockferry ", env!("CARGO_PKG_VERSION"));
    for (i, unit) in creator.encode_utf16().enumerate() {
        put(&mut b, 8 + 2 * i, &unit.to_le_bytes());
    }
    b
}

fn header(seq: u64, file_write: &[u8; 16], data_write: &[u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    put(&mut h, 0, b"head");
    put(&mut h, 8, &seq.to_le_bytes());
    put(&mut h, 16, file_write);
    put(&mut h, 32, data_write);
    // Log GUID (48) zero: no log to replay. Log version 0, version 1.
    put(&mut h, 66, &1u16.to_le_bytes());
    put(&mut h, 68, &LOG_LEN.to_le_bytes());
    put(&mut h, 72, &LOG_AT.to_le_bytes());
    seal(&mut h, 4);
    h
}

fn region_table(bat_len: u32) -> Vec<u8> {
    let mut r = vec![0u8; TABLE_LEN];
    put(&mut r, 0, b"regi");
    put(&mut r, 8, &2u32.to_le_bytes());
    for (i, (id, offset, len)) in [
        (BAT_REGION, BAT_AT, bat_len),
        (METADATA_REGION, METADATA_AT, METADATA_LEN),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + 32 * i;
        put(&mut r, e, &guid(id));
        put(&mut r, e + 16, &offset.to_le_bytes());
        put(&mut r, e + 24, &len.to_le_bytes());
        put(&mut r, e + 28, &1u32.to_le_bytes()); // required
    }
    seal(&mut r, 4);
    r
}

fn metadata(size: u64, block: u32, disk_id: &[u8; 16]) -> Vec<u8> {
    const REQUIRED: u32 = 4;
    const VIRTUAL_DISK: u32 = 2;
    let mut params = block.to_le_bytes().to_vec();
    params.extend_from_slice(&0u32.to_le_bytes()); // no parent; blocks may be unallocated
    let items: [(&str, Vec<u8>, u32); 5] = [
        (FILE_PARAMETERS, params, REQUIRED),
        (
            VIRTUAL_DISK_SIZE,
            size.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
        (PAGE_83, disk_id.to_vec(), REQUIRED | VIRTUAL_DISK),
        (
            LOGICAL_SECTOR_SIZE,
            LOGICAL_SECTOR_U32.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
    ];
    // Items start past the table, 64 bytes apart (each is at most 16).
    let mut m = vec![0u8; TABLE_LEN + 64 * items.len()];
    put(&mut m, 0, b"metadata");
    put(&mut m, 10, &5u16.to_le_bytes());
    let mut offset = 64 * 1024u32;
    for (i, (id, value, flags)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        let at = offset as usize;
        put(&mut m, e, &guid(id));
        put(&mut m, e + 16, &offset.to_le_bytes());
        let len = u32::try_from(value.len()).expect("a metadata item of at most 16 bytes");
        put(&mut m, e + 20, &len.to_le_bytes());
        put(&mut m, e + 24, &flags.to_le_bytes());
        put(&mut m, at, value);
        offset += 64;
    }
    m
}

impl Layout for Dynamic {
    fn file_size(&self) -> u64 {
        self.end
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

    fn disk_span(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let span = self.blocks.span(range);
        span.start.min(self.size)..span.end.min(self.size)
    }

    fn metadata(&self, w: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        for (at, bytes) in &self.meta {
            w(*at, bytes)?;
        }
        Ok(())
    }
}
