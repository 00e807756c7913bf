//! The read engine: reads byte ranges of source files into pooled buffers.
//!
//! The first backend is `pread`; `io_uring` joins it behind [`ReadBackend`]. All `unsafe` of
//! the engine lives in this module (`sys`), each block with a `// SAFETY:` comment.

pub mod buf;
pub mod sys;

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

/// Which read backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// `pread(2)`, one request at a time: portable.
    #[default]
    Pread,
}

impl IoEngine {
    /// The name shown in progress and `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Pread => "pread",
        }
    }

    /// A backend instance for one reader thread.
    pub fn backend(self) -> Box<dyn ReadBackend> {
        match self {
            IoEngine::Pread => Box::new(Pread),
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
