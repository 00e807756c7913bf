//! Metadata reads for format readers: [`ReadAt`] over files or memory, with every read of a
//! structure checked against the file's size and a cap, and errors that name file, structure
//! and offset.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::io::SourceFile;

/// Random-access reads of an image file's metadata.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Size of the file in bytes.
    fn size(&self) -> u64;
    /// The file's path, for messages.
    fn path(&self) -> &Path;
}

impl ReadAt for SourceFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self.file(), buf, offset)
            .map_err(|e| Error::io("reading image metadata", self.path(), e).with_offset(offset))
    }

    fn size(&self) -> u64 {
        self.len()
    }

    fn path(&self) -> &Path {
        SourceFile::path(self)
    }
}

/// An image held in memory (fuzzing, tests).
#[derive(Debug, Clone)]
pub struct MemFile {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl MemFile {
    /// Wraps bytes; `name` appears in error messages.
    pub fn new(name: &str, bytes: Vec<u8>) -> MemFile {
        MemFile {
            bytes,
            path: PathBuf::from(name),
        }
    }
}

impl ReadAt for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| s.checked_add(buf.len()).map(|e| (s, e)))
            .and_then(|(s, e)| self.bytes.get(s..e))
            .ok_or_else(|| {
                Error::new(ErrorKind::InvalidImage, "read past the end of the image")
                    .with_path(&self.path)
                    .with_offset(offset)
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// An [`ErrorKind::InvalidImage`] error naming file, structure and offset.
pub(crate) fn invalid(
    r: &dyn ReadAt,
    structure: &str,
    offset: u64,
    why: impl Into<String>,
) -> Error {
    Error::new(
        ErrorKind::InvalidImage,
        format!("{structure}: {}", why.into()),
    )
    .with_path(r.path())
    .with_offset(offset)
}

/// Reads `len` bytes of a structure at `offset`, checking that it lies within the file and
/// that `len` is under `cap` (a guard against hostile size fields).
pub(crate) fn read_struct(
    r: &dyn ReadAt,
    structure: &str,
    offset: u64,
    len: u64,
    cap: u64,
) -> Result<Vec<u8>> {
    check_struct(r, structure, offset, len, cap)?;
    let mut buf =
        vec![0u8; usize::try_from(len).map_err(|_| invalid(r, structure, offset, "too large"))?];
    r.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Checks that a structure of `len` bytes at `offset` is at most `cap` bytes and lies inside
/// the file, as [`read_struct`] does before it allocates.
pub(crate) fn check_struct(
    r: &dyn ReadAt,
    structure: &str,
    offset: u64,
    len: u64,
    cap: u64,
) -> Result<()> {
    if len > cap {
        return Err(invalid(
            r,
            structure,
            offset,
            format!("{len} bytes is more than the {cap} allowed"),
        ));
    }
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > r.size()) {
        return Err(invalid(
            r,
            structure,
            offset,
            format!(
                "{len} bytes at this offset reach past the end of the file ({} bytes)",
                r.size()
            ),
        ));
    }
    Ok(())
}

/// Big-endian u32 at `at` (the caller has checked the length).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Big-endian u64 at `at`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes UTF-16 code units (from `units`), stopping at the first NUL.
pub(crate) fn utf16_until_nul(units: impl Iterator<Item = u16>) -> Option<String> {
    let units: Vec<u16> = units.take_while(|&u| u != 0).collect();
    String::from_utf16(&units).ok()
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes; returns the end.
pub(crate) fn check_range(offset: u64, len: u64, size: u64, path: &Path) -> Result<u64> {
    offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            Error::internal("range beyond the end of the disk")
                .with_path(path)
                .with_offset(offset)
        })
}

/// A source file's identity now: size, modification time, device and inode.
pub(crate) fn fingerprint(file: &SourceFile) -> Result<crate::store::SourceFingerprint> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file
        .file()
        .metadata()
        .map_err(|e| Error::io("reading image metadata", file.path(), e))?;
    // A block device node's times say nothing of its content (udev touches them, writes by
    // another node or a mounted file system do not): its content is what a resumed job
    // checks, by reading a sample again.
    let modified_unix_ns = if meta.file_type().is_block_device() {
        0
    } else {
        meta.mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec())
    };
    Ok(crate::store::SourceFingerprint {
        size: file.len(),
        modified_unix_ns,
        device: meta.dev(),
        inode: meta.ino(),
    })
}

/// Maps `[offset, end)` of a disk whose data lives 1:1 in file `file` at `base + virt`, where
/// only `extents` (sorted, disjoint `(offset, len)` in virtual terms) hold data.
pub(crate) fn map_extents(
    extents: &[(u64, u64)],
    offset: u64,
    end: u64,
    file: usize,
    base: u64,
    out: &mut Vec<super::Mapping>,
) {
    use super::{Mapping, Target};
    let mut i = extents.partition_point(|&(o, l)| o + l <= offset);
    let mut pos = offset;
    while pos < end {
        match extents.get(i) {
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
                        file,
                        offset: base + pos,
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
}
