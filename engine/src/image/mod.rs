//! Disk-image readers behind one trait, [`BlockSource`].
//!
//! A reader parses metadata and answers *where* each virtual range lives ([`Mapping`]): data in
//! one of its files at some offset, zero, or unallocated. The bulk data itself is read by the
//! `io` engine, so readers stay free of I/O strategy and of `unsafe`. Formats are detected by
//! content, never by file extension.
//!
//! ```text
//!   open(path) ── detect ──▶ RawImage | Vhd | …        one file each, metadata via ReadAt
//!                  │ parent_link()?
//!                  ▼
//!               Chain(child, open(parent))             unallocated in child → parent
//! ```
//!
//! Paths found inside images (parent locators, descriptor extents) are resolved by
//! [`resolve_path`]: inside the image's folder unless [`OpenOptions::allow_outside_folder`].

#![forbid(unsafe_code)]

mod chain;
pub mod discover;
pub mod ova;
pub mod ovf;
mod raw;
pub(crate) mod util;
mod vhd;
mod vhdx;
mod vhdx_log;
mod vmdk;

pub(crate) use chain::Chain;
pub(crate) use raw::RawImage;
pub use util::{MemFile, ReadAt};
pub(crate) use vhd::Vhd;
pub use vhd::VhdLayout;
pub use vhdx::VhdxLayout;
pub(crate) use vhdx::{Vhdx, guid as vhdx_guid};
pub(crate) use vmdk::Vmdk;
pub use vmdk::{Descriptor, ExtentLine, SparseLayout, inflate_grain};

use std::fmt::Debug;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::io::SourceFile;
use crate::store::SourceFingerprint;

/// What every reader knows about its disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// Format name (`raw`, `vhd`, …).
    pub format: &'static str,
    /// Subformat (`fixed`, `dynamic`, `differencing`, …), empty when the format has none.
    pub subformat: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Bytes that hold (or may hold) data in this image and its parents; the rest reads as zero.
    pub allocated_bytes: u64,
    /// Anything unusual a user should know (an unclean-shutdown flag, a repaired header…).
    pub notes: Vec<String>,
}

/// Where a virtual range's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Stored in `file(file)` starting at `offset`.
    Data {
        /// Index for [`BlockSource::file`].
        file: usize,
        /// Byte offset in that file.
        offset: u64,
    },
    /// A deflate-compressed grain (VMDK streamOptimized): `stored_len` bytes at `offset` of
    /// `file` inflate (see [`inflate_grain`]) to `grain_len` bytes, of which this piece
    /// starts at `skip`.
    Deflate {
        /// Index for [`BlockSource::file`].
        file: usize,
        /// Offset of the compressed bytes in that file.
        offset: u64,
        /// Compressed length.
        stored_len: u32,
        /// Length of the inflated grain.
        grain_len: u32,
        /// Where this piece starts in the inflated grain.
        skip: u32,
    },
    /// Known to read as zeros (allocated as zero).
    Zero,
    /// Not allocated: reads as zeros (or, in a chain, from the parent once resolved).
    Unallocated,
}

impl Target {
    /// Whether the piece's bytes are read from a file (plain or compressed).
    pub fn is_data(&self) -> bool {
        matches!(self, Target::Data { .. } | Target::Deflate { .. })
    }

    /// The file index, for targets that read a file.
    pub fn file_mut(&mut self) -> Option<&mut usize> {
        match self {
            Target::Data { file, .. } | Target::Deflate { file, .. } => Some(file),
            Target::Zero | Target::Unallocated => None,
        }
    }
}

/// Merges neighbouring mappings that continue each other ([`Mapping::continued_by`]), so
/// that a chunk of 16 grains stored one after the other is one read instead of 16. Mappings
/// must be in order, as [`BlockSource::map`] gives them.
pub(crate) fn coalesce(maps: &mut Vec<Mapping>) {
    let mut out = 0;
    for i in 0..maps.len() {
        let m = maps[i];
        if out > 0 && maps[out - 1].continued_by(&m) {
            maps[out - 1].len += m.len;
            continue;
        }
        maps[out] = m;
        out += 1;
    }
    maps.truncate(out);
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

impl Mapping {
    /// Whether `next` starts where this piece ends and continues it: the same kind, and for
    /// data the next bytes of the same file (offsets from an image are untrusted: an overflow
    /// continues nothing).
    pub fn continued_by(&self, next: &Mapping) -> bool {
        self.virt.checked_add(self.len) == Some(next.virt)
            && match (self.target, next.target) {
                (
                    Target::Data {
                        file: f1,
                        offset: o1,
                    },
                    Target::Data {
                        file: f2,
                        offset: o2,
                    },
                ) => f1 == f2 && o1.checked_add(self.len) == Some(o2),
                (Target::Zero, Target::Zero) | (Target::Unallocated, Target::Unallocated) => true,
                _ => false,
            }
    }
}

/// One image file of a chain, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: &'static str,
    /// Its subformat.
    pub subformat: String,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Anything unusual about it.
    pub notes: Vec<String>,
}

/// What identifies an image as the parent a child was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// VHD footer unique id.
    VhdUniqueId([u8; 16]),
    /// VHDX data write GUID (a child records it as `parent_linkage`).
    VhdxDataWriteGuid([u8; 16]),
    /// VMDK content id (`CID`; a child records it as `parentCID`).
    VmdkCid(u32),
}

impl Identity {
    /// The identity as a change id: what a snapshot of this image records, and what a child's
    /// `--changes-from-chain` delta expects its base to have recorded.
    pub fn change_id(&self) -> String {
        match self {
            Identity::VhdUniqueId(id) => format!("vhd-uid:{}", crate::store::format::hex(id)),
            Identity::VhdxDataWriteGuid(id) => {
                format!("vhdx-data-write:{}", crate::store::format::hex(id))
            }
            Identity::VmdkCid(cid) => format!("vmdk-cid:{cid:08x}"),
        }
    }
}

/// A child's reference to its parent: where to look, and what the parent must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// Paths recorded in the child, most specific first, as stored (possibly Windows-style).
    pub candidates: Vec<String>,
    /// The parent's identity as the child recorded it.
    pub identity: Identity,
}

/// What `info` shows of an image: the disk, and each file of its chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Description {
    /// The disk (of the whole chain; format and subformat of the top file).
    #[serde(flatten)]
    pub info: ImageInfo,
    /// The chain's files, top first.
    pub chain: Vec<LayerDescription>,
    /// What identifies the image to a child (a change id), if its format has an identity.
    pub change_id: Option<String>,
}

/// One file of a [`Description`]'s chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerDescription {
    /// The file (lossy UTF-8).
    pub file: String,
    /// Its format.
    pub format: &'static str,
    /// Its subformat.
    pub subformat: String,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Anything unusual about it.
    pub notes: Vec<String>,
}

/// Describes an open image (what `info` prints).
pub fn describe(src: &dyn BlockSource) -> Description {
    Description {
        info: src.info().clone(),
        chain: src
            .layers()
            .into_iter()
            .map(|l| LayerDescription {
                file: l.path.to_string_lossy().into_owned(),
                format: l.format,
                subformat: l.subformat,
                virtual_size: l.virtual_size,
                notes: l.notes,
            })
            .collect(),
        change_id: src.identity().map(|id| id.change_id()),
    }
}

/// A readable virtual disk.
///
/// Contract: `map` covers exactly the range asked for, in order, with no gaps; ranges must lie
/// within `info().virtual_size`. Implementations never panic on malformed images and never
/// write to their files.
pub trait BlockSource: Send + Sync + Debug {
    /// Size, sectors, format.
    fn info(&self) -> &ImageInfo;
    /// Number of files `Target::Data` may refer to.
    fn n_files(&self) -> usize;
    /// File `idx` of the image, opened read-only.
    fn file(&self, idx: usize) -> Option<&SourceFile>;
    /// Appends the mappings of `[offset, offset + len)` to `out`.
    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()>;
    /// The identity of the source's top file when it was opened.
    fn fingerprint(&self) -> &SourceFingerprint;
    /// The file the image was opened from: the top of a chain, a VMDK's descriptor (not its
    /// first extent), an OVA archive.
    fn opened_path(&self) -> Option<&Path> {
        self.file(0).map(SourceFile::path)
    }
    /// Which disk of a multi-disk file this is (an OVA member's file name), if any.
    fn member(&self) -> Option<&str> {
        None
    }
    /// The files of the chain, top first.
    fn layers(&self) -> Vec<Layer> {
        let info = self.info();
        vec![Layer {
            path: self
                .opened_path()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            format: info.format,
            subformat: info.subformat.clone(),
            virtual_size: info.virtual_size,
            notes: info.notes.clone(),
        }]
    }
    /// The parent this image needs, if it is a child not yet joined to its parent.
    fn parent_link(&self) -> Option<&ParentLink> {
        None
    }
    /// What identifies this image to its children.
    fn identity(&self) -> Option<Identity> {
        None
    }
    /// The top image of a chain (the child, whose allocation is what changed since its
    /// parent was taken), or `None` if this is not a chain.
    fn top_layer(&self) -> Option<&dyn BlockSource> {
        None
    }
}

/// Whether a note about an image says something about its health (an unclean shutdown, a
/// log replayed in memory, a damaged header or table a copy replaced), rather than only
/// describing it.
pub(crate) fn is_health_note(note: &str) -> bool {
    ["unclean", "replayed", "damaged"]
        .iter()
        .any(|w| note.contains(w))
}

/// How images are opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Follow parent locators and extent paths outside the image's folder.
    pub allow_outside_folder: bool,
    /// Longest parent chain accepted.
    pub max_chain_depth: usize,
    /// Which disk of an OVA (index from 0, or file name); the first by default.
    pub ova_disk: Option<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            allow_outside_folder: false,
            max_chain_depth: 64,
            ova_disk: None,
        }
    }
}

/// The format a file's content announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// No known signature: a raw disk.
    Raw,
    /// VHD (footer cookie `conectix`).
    Vhd,
    /// VHDX (file identifier `vhdxfile`).
    Vhdx,
    /// VMDK: a sparse extent (`KDMV`, `COWD`) or a text descriptor.
    Vmdk,
    /// OVA: a tar archive holding an OVF and its disks.
    Ova,
    /// A format recognised but not readable yet.
    Unsupported(&'static str),
}

/// Detects a file's format from its first and last sectors.
pub(crate) fn detect(file: &dyn ReadAt) -> Result<Detected> {
    let size = file.size();
    let mut head = vec![0u8; usize::try_from(size.min(512)).unwrap_or(512)];
    file.read_exact_at(&mut head, 0)?;
    let mut tail = [0u8; 512];
    let tail_ok = size >= 512 && file.read_exact_at(&mut tail, size - 512).is_ok();
    let starts = |magic: &[u8]| head.starts_with(magic);
    Ok(
        if starts(b"conectix") || (tail_ok && tail.starts_with(b"conectix")) {
            Detected::Vhd
        } else if starts(b"vhdxfile") {
            Detected::Vhdx
        } else if ova::is_tar(&head) {
            Detected::Ova
        } else if starts(b"KDMV") || starts(b"COWD") || looks_like_descriptor(&head, size) {
            Detected::Vmdk
        } else if starts(b"QFI\xfb") {
            Detected::Unsupported("qcow2")
        } else if starts(&0xcafe_babe_u64.to_le_bytes()) {
            Detected::Vmdk
        } else {
            Detected::Raw
        },
    )
}

/// Whether the start of a small text file reads as a VMDK descriptor.
fn looks_like_descriptor(head: &[u8], size: u64) -> bool {
    // Lossy: a descriptor with bad bytes is still a descriptor (and then refused as such),
    // never a raw disk.
    size <= 1 << 20
        && String::from_utf8_lossy(head)
            .lines()
            .map(str::trim)
            .any(|l| {
                l.starts_with("# Disk DescriptorFile")
                    || l.starts_with("createType=")
                    || l.starts_with("createType =")
            })
}

/// Virtual bytes [`for_each_extent`] maps per step (bounded memory for any disk size).
const MAP_STEP: u64 = 1 << 30;

/// Calls `f` with the whole disk's allocation map in order, neighbouring mappings that
/// continue each other merged (what `qemu-img map` prints), in bounded memory.
pub fn for_each_extent<E: From<Error>>(
    src: &dyn BlockSource,
    mut f: impl FnMut(&Mapping) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let size = src.info().virtual_size;
    let mut current: Option<Mapping> = None;
    let mut maps = Vec::new();
    let mut off = 0;
    while off < size {
        let len = MAP_STEP.min(size - off);
        maps.clear();
        src.map(off, len, &mut maps)?;
        for m in &maps {
            match &mut current {
                Some(e) if e.continued_by(m) => e.len += m.len,
                _ => {
                    if let Some(e) = current.replace(*m) {
                        f(&e)?;
                    }
                }
            }
        }
        off += len;
    }
    match current {
        Some(e) => f(&e),
        None => Ok(()),
    }
}

/// One row of an image's allocation map as every front end shows it (`blockferry map
/// --json`, Python's `image_map`, C's `bf_image_map_json`): the shape of `qemu-img map`'s
/// JSON (`start`, `length`, `data`, `zero`, `offset`) with the kind and the file spelled out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapRow {
    /// First virtual byte.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Whether the bytes are stored (in `file` at `offset`).
    pub data: bool,
    /// Whether they read as zeros (not stored).
    pub zero: bool,
    /// `data`, `zero` (the image says zero) or `unallocated` (nothing stored, reads as
    /// zeros or from a parent outside the chain).
    pub kind: &'static str,
    /// The file holding the bytes, for data.
    pub file: Option<String>,
    /// Their offset in that file (for compressed grains, the grain's).
    pub offset: Option<u64>,
}

impl MapRow {
    /// The row of a merged mapping of `src` (from [`for_each_extent`]).
    pub fn of(src: &dyn BlockSource, m: &Mapping) -> MapRow {
        let (kind, file, offset) = match m.target {
            Target::Data { file, offset } | Target::Deflate { file, offset, .. } => (
                "data",
                src.file(file).map(|f| f.path().display().to_string()),
                Some(offset),
            ),
            Target::Zero => ("zero", None, None),
            Target::Unallocated => ("unallocated", None, None),
        };
        MapRow {
            start: m.virt,
            length: m.len,
            data: kind == "data",
            zero: kind != "data",
            kind,
            file,
            offset,
        }
    }
}

/// Opens a disk image, detecting its format by content and joining it to its parents.
pub fn open(path: &Path) -> Result<Box<dyn BlockSource>> {
    open_with(path, &OpenOptions::default())
}

/// Opens a disk image with options.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>> {
    let mut seen = Vec::new();
    open_chain(path, opts, &mut seen)
}

/// Opens one image file without joining it to its parents (`info` of a child whose parent is
/// missing); mapping it shows what the child itself holds.
pub fn open_single(path: &Path) -> Result<Box<dyn BlockSource>> {
    open_one(path, &OpenOptions::default())
}

fn open_one(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open the image", path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            "not a regular file or block device",
        )
        .with_path(path));
    }
    let file = SourceFile::open(path)?;
    match detect(&file)? {
        Detected::Raw => Ok(Box::new(RawImage::from_file(file)?)),
        Detected::Vhd => Ok(Box::new(Vhd::open(file)?)),
        Detected::Vhdx => Ok(Box::new(Vhdx::open(file)?)),
        Detected::Vmdk => Ok(Box::new(Vmdk::open(file, opts)?)),
        Detected::Ova => ova::open(file, opts.ova_disk.as_deref(), opts),
        Detected::Unsupported(kind) => Err(Error::new(
            ErrorKind::UnsupportedImage,
            format!("this is a {kind} image, which this version of blockferry cannot read yet"),
        )
        .with_path(path)),
    }
}

fn open_chain(
    path: &Path,
    opts: &OpenOptions,
    seen: &mut Vec<(u64, u64)>,
) -> Result<Box<dyn BlockSource>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open the image", path, e))?;
    let key = (meta.dev(), meta.ino());
    if seen.contains(&key) {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            "the parent chain loops back to an image already in it",
        )
        .with_path(path));
    }
    if seen.len() >= opts.max_chain_depth {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            format!(
                "the parent chain is deeper than {} images",
                opts.max_chain_depth
            ),
        )
        .with_path(path));
    }
    seen.push(key);
    let child = open_one(path, opts)?;
    let Some(link) = child.parent_link().cloned() else {
        return Ok(child);
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut outside = None;
    let parent_path = link
        .candidates
        .iter()
        .find_map(|c| match resolve(folder, c, opts) {
            Ok(p) => Some(p).filter(|p| p.exists()),
            Err(Refusal::Outside(real)) => {
                outside.get_or_insert((c, real));
                None
            }
            Err(Refusal::Other(_)) => None,
        })
        .ok_or_else(|| match &outside {
            Some((recorded, real)) => outside_error(recorded, real, folder).with_path(path),
            None => Error::new(
                ErrorKind::NotFound,
                format!(
                    "parent not found: the image names its parent {} (looked in {})",
                    link.candidates.first().map_or("(none)", String::as_str),
                    folder.display()
                ),
            )
            .with_path(path),
        })?;
    let parent = open_chain(&parent_path, opts, seen)?;
    if parent.identity() != Some(link.identity) {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            format!(
                "parent {} is not the image this child was made from (its identity differs)",
                parent_path.display()
            ),
        )
        .with_path(path));
    }
    if parent.info().virtual_size != child.info().virtual_size {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            format!(
                "parent {} has virtual size {}, the child {}",
                parent_path.display(),
                parent.info().virtual_size,
                child.info().virtual_size
            ),
        )
        .with_path(path));
    }
    Ok(Box::new(Chain::new(child, parent)?))
}

/// Resolves a path recorded inside an image (Windows or POSIX style, relative or absolute)
/// against the image's folder.
///
/// Unless `opts.allow_outside_folder`, the result must lie inside `folder` after following
/// symlinks: absolute paths are tried by file name in `folder`, and `..` or links leading out
/// are refused. Only regular files and block devices are accepted.
pub(crate) fn resolve_path(folder: &Path, recorded: &str, opts: &OpenOptions) -> Result<PathBuf> {
    resolve(folder, recorded, opts).map_err(|r| match r {
        Refusal::Outside(real) => outside_error(recorded, &real, folder),
        Refusal::Other(e) => e,
    })
}

/// Why [`resolve`] did not give a path.
enum Refusal {
    /// The path exists, outside the image's folder (here, resolved).
    Outside(PathBuf),
    Other(Error),
}

fn outside_error(recorded: &str, real: &Path, folder: &Path) -> Error {
    Error::new(
        ErrorKind::InvalidImage,
        format!(
            "the path {recorded:?} recorded in the image leads to {}, outside the image's \
             folder {}: follow it only if you trust the image (allow_outside_folder)",
            real.display(),
            folder.display()
        ),
    )
    .with_setting("allow_outside_folder")
}

fn resolve(folder: &Path, recorded: &str, opts: &OpenOptions) -> Result<PathBuf, Refusal> {
    let refuse = |why: &str| {
        Err(Refusal::Other(Error::new(
            ErrorKind::InvalidImage,
            format!("refusing the path {recorded:?} recorded in the image: {why}"),
        )))
    };
    if recorded.is_empty() || recorded.len() > 4096 || recorded.contains('\0') {
        return refuse("empty, too long or containing NUL");
    }
    let unified = recorded.replace('\\', "/");
    let windows_absolute = unified.len() >= 2 && unified.as_bytes()[1] == b':';
    let candidate = if unified.starts_with('/') || windows_absolute || unified.starts_with("//") {
        if opts.allow_outside_folder && !windows_absolute {
            PathBuf::from(&unified)
        } else {
            // The common case: an absolute path to the same folder, recorded on another host.
            let name = unified.rsplit('/').next().unwrap_or_default();
            if name.is_empty() || name == "." || name == ".." {
                return refuse("no file name");
            }
            let here = folder.join(name);
            if !here.exists() && !windows_absolute && Path::new(&unified).exists() {
                return Err(Refusal::Outside(PathBuf::from(&unified)));
            }
            here
        }
    } else {
        folder.join(Path::new(&unified))
    };
    let real = std::fs::canonicalize(&candidate).map_err(|e| {
        Refusal::Other(Error::io(
            "resolving a path recorded in the image",
            &candidate,
            e,
        ))
    })?;
    if !opts.allow_outside_folder {
        let real_folder = std::fs::canonicalize(folder)
            .map_err(|e| Refusal::Other(Error::io("resolving the image's folder", folder, e)))?;
        if !real.starts_with(&real_folder) {
            return Err(Refusal::Outside(real));
        }
    }
    let ft = std::fs::metadata(&real)
        .map_err(|e| {
            Refusal::Other(Error::io(
                "inspecting a path recorded in the image",
                &real,
                e,
            ))
        })?
        .file_type();
    let allowed = ft.is_file() || (ft.is_block_device() && opts.allow_outside_folder);
    if !allowed {
        return refuse("not a regular file");
    }
    Ok(real)
}

#[cfg(test)]
mod tests;
