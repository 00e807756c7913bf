//! Raw disk images: regular files (sparse or not) and block devices.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{BlockSource, ImageInfo, Mapping, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{SourceFile, sys};
use crate::store::SourceFingerprint;

/// Most data extents kept for one file; past this the tail is treated as data (still
/// correct, holes there are just read). 1 Mi extents cost 16 MiB.
const MAX_EXTENTS: usize = 1 << 20;

/// A raw image: virtual offset = file offset; allocation from `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug)]
pub struct RawImage {
    files: [SourceFile; 1],
    info: ImageInfo,
    /// Sorted, disjoint data extents `(offset, len)`; everything else is a hole.
    extents: Vec<(u64, u64)>,
    fingerprint: SourceFingerprint,
}

impl RawImage {
    /// Opens a regular file or block device read-only.
    pub fn open(path: &Path) -> Result<RawImage> {
        let file = SourceFile::open(path)?;
        let meta = file
            .file()
            .metadata()
            .map_err(|e| Error::io("reading image metadata", path, e))?;
        let ft = meta.file_type();
        let (size, logical, physical, extents) = if ft.is_block_device() {
            let size = sys::block_device_size(file.file())
                .map_err(|e| Error::io("reading the block device size", path, e))?;
            let (l, p) = sys::block_device_sectors(file.file()).unwrap_or((512, 512));
            (size, l, p, vec![(0, size)])
        } else if ft.is_file() {
            let size = meta.len();
            let extents = sys::data_extents(file.file(), size, MAX_EXTENTS)
                .map_err(|e| Error::io("finding the image's allocated ranges", path, e))?;
            (size, 512, 512, extents)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                "not a regular file or block device",
            )
            .with_path(path));
        };
        if size > i64::MAX as u64 {
            return Err(
                Error::new(ErrorKind::InvalidImage, "image size out of range").with_path(path),
            );
        }
        let allocated_bytes = extents.iter().map(|e| e.1).sum();
        let fingerprint = SourceFingerprint {
            size,
            modified_unix_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            device: meta.dev(),
            inode: meta.ino(),
        };
        Ok(RawImage {
            files: [file],
            info: ImageInfo {
                format: "raw",
                virtual_size: size,
                logical_sector_size: logical,
                physical_sector_size: physical,
                allocated_bytes,
            },
            extents,
            fingerprint,
        })
    }
}

impl BlockSource for RawImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }

    fn files(&self) -> &[SourceFile] {
        &self.files
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.info.virtual_size)
            .ok_or_else(|| {
                Error::internal("range beyond the end of the disk")
                    .with_path(self.files[0].path())
                    .with_offset(offset)
            })?;
        // First extent that ends after `offset`.
        let mut i = self.extents.partition_point(|&(o, l)| o + l <= offset);
        let mut pos = offset;
        while pos < end {
            match self.extents.get(i) {
                Some(&(o, l)) if o < end => {
                    if o > pos {
                        out.push(Mapping {
                            virt: pos,
                            len: o - pos,
                            target: Target::Unallocated,
                        });
                        pos = o;
                    }
                    let stop = (o + l).min(end);
                    out.push(Mapping {
                        virt: pos,
                        len: stop - pos,
                        target: Target::Data {
                            file: 0,
                            offset: pos,
                        },
                    });
                    pos = stop;
                    i += 1;
                }
                _ => {
                    out.push(Mapping {
                        virt: pos,
                        len: end - pos,
                        target: Target::Unallocated,
                    });
                    pos = end;
                }
            }
        }
        Ok(())
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        &self.fingerprint
    }
}
