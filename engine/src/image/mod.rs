//! Disk-image readers behind one trait, [`BlockSource`].
//!
//! A reader parses metadata and answers *where* each virtual range lives ([`Mapping`]): data in
//! one of its files at some offset, zero, or unallocated. The bulk data itself is read by the
//! `io` engine, so readers stay free of I/O strategy and of `unsafe`. Formats are detected by
//! content, never by file extension.

#![forbid(unsafe_code)]

mod raw;

pub use raw::RawImage;

use std::fmt::Debug;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::io::SourceFile;
use crate::store::SourceFingerprint;

/// What every reader knows about its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format name (`raw`, …).
    pub format: &'static str,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Bytes that hold (or may hold) data; the rest is known to be zero.
    pub allocated_bytes: u64,
}

/// Where a virtual range's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Stored in `files()[file]` starting at `offset`.
    Data {
        /// Index into [`BlockSource::files`].
        file: usize,
        /// Byte offset in that file.
        offset: u64,
    },
    /// Known to read as zeros (allocated as zero).
    Zero,
    /// Not allocated: reads as zeros (or, in a chain, from the parent once resolved).
    Unallocated,
}

/// One piece of a virtual range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Virtual offset of the piece.
    pub virt: u64,
    /// Length of the piece in bytes.
    pub len: u64,
    /// Where its bytes are.
    pub target: Target,
}

/// A readable virtual disk.
///
/// Contract: `map` covers exactly the range asked for, in order, with no gaps; ranges must lie
/// within `info().virtual_size`. Implementations never panic on malformed images and never
/// write to their files.
pub trait BlockSource: Send + Sync + Debug {
    /// Size, sectors, format.
    fn info(&self) -> &ImageInfo;
    /// The files `Target::Data` refers to, opened read-only.
    fn files(&self) -> &[SourceFile];
    /// Appends the mappings of `[offset, offset + len)` to `out`.
    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()>;
    /// The identity of the source when it was opened.
    fn fingerprint(&self) -> &SourceFingerprint;
}

/// Formats recognised by their signature but not readable yet; refusing them beats copying
/// their container bytes as if they were a raw disk.
fn sniff_unsupported(path: &Path) -> Result<Option<&'static str>> {
    let mut head = [0u8; 512];
    let mut f = File::open(path).map_err(|e| Error::io("cannot open the image", path, e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading the image header", path, e)),
        }
    }
    let head = &head[..n];
    let kind = if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        Some("VMDK")
    } else if head.starts_with(b"# Disk DescriptorFile") {
        Some("VMDK descriptor")
    } else if head.starts_with(b"vhdxfile") {
        Some("VHDX")
    } else if head.starts_with(b"conectix") {
        Some("VHD")
    } else if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.len() >= 8
        && u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) == 0xcafe_babe
    {
        Some("VMDK SEsparse")
    } else {
        None
    };
    Ok(kind)
}

/// Opens a disk image, detecting its format by content.
pub fn open(path: &Path) -> Result<Box<dyn BlockSource>> {
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::metadata(path)
        .map_err(|e| Error::io("cannot open the image", path, e))?
        .file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            "not a regular file or block device",
        )
        .with_path(path));
    }
    if let Some(kind) = sniff_unsupported(path)? {
        return Err(Error::new(
            ErrorKind::UnsupportedImage,
            format!("this is a {kind} image, which this version of blockferry cannot read yet"),
        )
        .with_path(path));
    }
    Ok(Box::new(RawImage::open(path)?))
}

/// Opens a file or block device as a raw disk, without format detection.
pub fn open_raw(path: &Path) -> Result<Box<dyn BlockSource>> {
    Ok(Box::new(RawImage::open(path)?))
}
