//! The read engine: reads byte ranges of source files into pooled buffers.
//!
//! Single reads go through [`ReadBackend`] (`pread`); the replicate pipeline's bulk reads go
//! through an `io_uring` [`uring::ChunkRing`] (many chunks in flight, `O_DIRECT` where aligned)
//! when the kernel allows it, else through `pread`. All `unsafe` of the engine lives in this
//! module (`sys`, `uring`), each block with a `// SAFETY:` comment.

pub mod buf;
pub(crate) mod chunks;
pub mod sys;
#[cfg(target_os = "linux")]
pub mod uring;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A source file opened read-only.
#[derive(Debug)]
pub struct SourceFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl SourceFile {
    /// Opens `path` read-only (blockferry never writes to a source) and takes its size
    /// (block devices: from the device).
    pub fn open(path: &Path) -> Result<SourceFile> {
        use std::os::unix::fs::FileTypeExt;
        let file = File::open(path).map_err(|e| Error::io("cannot open the image", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("reading image metadata", path, e))?;
        let len = if meta.file_type().is_block_device() {
            sys::block_device_size(&file)
                .map_err(|e| Error::io("reading the block device size", path, e))?
        } else {
            meta.len()
        };
        Ok(SourceFile {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Size in bytes when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Which read engine the replicate pipeline uses for bulk reads.
///
/// The default is `pread`: measured on this project's machines (virtio disk, about 1.3 GB/s),
/// `pread` with the kernel's readahead reached the device's rate on cold reads of 1 MiB and
/// 64 KiB chunks, while `io_uring` at depth 8 to 64 (buffered or `O_DIRECT`) did not beat
/// it; `io_uring` was faster only on warm 64 KiB chunks. `auto` and `uring` select it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// `io_uring` where the kernel allows it, else `pread` (with a one-line notice).
    Auto,
    /// `io_uring`, or fail.
    Uring,
    /// `pread(2)`, one request at a time, with the kernel's readahead: portable.
    #[default]
    Pread,
}

/// The engine a run ended up with.
#[derive(Debug)]
pub enum Engine {
    /// `pread`, one request at a time.
    Pread,
    /// An `io_uring` ring.
    #[cfg(target_os = "linux")]
    Uring(Box<uring::ChunkRing<'static>>),
}

impl Engine {
    /// The name shown in progress and `--json` output.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Pread => "pread",
            #[cfg(target_os = "linux")]
            Engine::Uring(_) => "io_uring",
        }
    }
}

impl IoEngine {
    /// Parses `auto`, `uring` (or `io_uring`), `pread`.
    pub fn from_name(name: &str) -> Option<IoEngine> {
        match name {
            "auto" => Some(IoEngine::Auto),
            "uring" | "io_uring" => Some(IoEngine::Uring),
            "pread" => Some(IoEngine::Pread),
            _ => None,
        }
    }

    /// A backend for single, synchronous reads (metadata, deltas' samples, verify).
    pub fn backend(self) -> Box<dyn ReadBackend> {
        Box::new(Pread)
    }

    /// The bulk-read engine for `depth` chunks in flight. `Auto` falls back to `pread` when
    /// `io_uring` cannot be set up, calling `notice` with the reason; `Uring` fails instead.
    pub fn start(self, depth: usize, notice: &dyn Fn(String)) -> Result<Engine> {
        match self {
            IoEngine::Pread => Ok(Engine::Pread),
            #[cfg(target_os = "linux")]
            IoEngine::Auto | IoEngine::Uring => match uring::ChunkRing::new(depth) {
                Ok(ring) => Ok(Engine::Uring(Box::new(ring))),
                Err(e) if self == IoEngine::Auto => {
                    notice(format!(
                        "io_uring is not available ({e}); reading with pread"
                    ));
                    Ok(Engine::Pread)
                }
                Err(e) => Err(Error::config(format!(
                    "io_uring is not available here ({e}): read with pread, or auto"
                ))
                .with_setting("io_engine")),
            },
            #[cfg(not(target_os = "linux"))]
            IoEngine::Auto => {
                let _ = (depth, notice);
                Ok(Engine::Pread)
            }
            #[cfg(not(target_os = "linux"))]
            IoEngine::Uring => Err(Error::config("io_uring exists on Linux only")),
        }
    }
}

/// Reads byte ranges of source files. One instance per reader thread.
pub trait ReadBackend: Send {
    /// Fills `buf` entirely from `file` at `offset`; reading past the end is an error.
    fn read_exact_at(&mut self, file: &SourceFile, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// The portable backend: `pread(2)` (retrying short reads and EINTR, as std does).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pread;

impl ReadBackend for Pread {
    fn read_exact_at(&mut self, file: &SourceFile, buf: &mut [u8], offset: u64) -> Result<()> {
        file.file.read_exact_at(buf, offset).map_err(|e| {
            let msg = if e.kind() == io::ErrorKind::UnexpectedEof {
                "the image ended before its expected size (was it truncated while reading?)"
            } else {
                "reading the image"
            };
            Error::io(msg, &file.path, e).with_offset(offset)
        })
    }
}
