//! Raw disk images: regular files (sparse or not) and block devices.

use std::os::unix::fs::FileTypeExt;

use super::{BlockSource, ImageInfo, Mapping, util};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{SourceFile, sys};
use crate::store::SourceFingerprint;

/// Most data extents kept for one file; past this the tail is treated as data (still
/// correct, holes there are just read). 1 Mi extents cost 16 MiB.
const MAX_EXTENTS: usize = 1 << 20;

/// A raw image: virtual offset = file offset; allocation from `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug)]
pub(crate) struct RawImage {
    file: SourceFile,
    info: ImageInfo,
    /// Sorted, disjoint data extents `(offset, len)`; everything else is a hole.
    extents: Vec<(u64, u64)>,
    fingerprint: SourceFingerprint,
}

impl RawImage {
    /// A raw image over an open file.
    pub(crate) fn from_file(file: SourceFile) -> Result<RawImage> {
        let path = file.path().to_path_buf();
        let meta = file
            .file()
            .metadata()
            .map_err(|e| Error::io("reading image metadata", &path, e))?;
        let ft = meta.file_type();
        let size = file.len();
        let (logical, physical, extents) = if ft.is_block_device() {
            let (l, p) = sys::block_device_sectors(file.file()).unwrap_or((512, 512));
            (l, p, vec![(0, size)])
        } else if ft.is_file() {
            let extents = sys::data_extents(file.file(), size, MAX_EXTENTS)
                .map_err(|e| Error::io("finding the image's allocated ranges", &path, e))?;
            (512, 512, extents)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                "not a regular file or block device",
            )
            .with_path(&path));
        };
        if size > i64::MAX as u64 {
            return Err(
                Error::new(ErrorKind::InvalidImage, "image size out of range").with_path(&path),
            );
        }
        let allocated_bytes = extents.iter().map(|e| e.1).sum();
        let fingerprint = util::fingerprint(&file)?;
        Ok(RawImage {
            file,
            info: ImageInfo {
                format: "raw",
                subformat: if ft.is_block_device() {
                    "block device"
                } else {
                    "file"
                }
                .to_owned(),
                virtual_size: size,
                logical_sector_size: logical,
                physical_sector_size: physical,
                allocated_bytes,
                notes: Vec::new(),
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

    fn n_files(&self) -> usize {
        1
    }

    fn file(&self, idx: usize) -> Option<&SourceFile> {
        (idx == 0).then_some(&self.file)
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        let end = util::check_range(offset, len, self.info.virtual_size, self.file.path())?;
        util::map_extents(&self.extents, offset, end, 0, 0, out);
        Ok(())
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        &self.fingerprint
    }
}
