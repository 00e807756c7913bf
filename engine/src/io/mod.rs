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
}

impl SourceFile {
    /// Opens `path` read-only. blockferry never writes to a source.
    pub fn open(path: &Path) -> Result<SourceFile> {
        let file = File::open(path).map_err(|e| Error::io("cannot open the image", path, e))?;
        Ok(SourceFile {
            file,
            path: path.to_path_buf(),
        })
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
