//! Where restore and convert write a disk: a file that appears under its name only once it is
//! whole, or a block device written in place.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::store::format::hex;

/// A run of bytes to write: its offset in the output, and where it is in the data.
pub(crate) type Run = (u64, std::ops::Range<usize>);

/// Granularity of the holes a sparse write leaves (a file system block).
const HOLE_BLOCK: usize = 4096;

/// An output being written. A file is written under a temporary name beside it and renamed
/// into place by [`Output::commit`]; dropped uncommitted (a failure, a cancel), the temporary
/// file is deleted, so a name never holds a disk that looks whole and is not. A block device
/// cannot be renamed: it is written in place, and an uncommitted one holds a partial disk
/// (the caller's error says so).
#[derive(Debug)]
pub(crate) struct Output {
    file: File,
    /// The same file opened for direct I/O (`O_DIRECT`), where the file system allows it:
    /// aligned runs of data go to the disk without a copy through the page cache, which is
    /// then neither filled with the whole disk nor left to flush it all at the commit.
    direct: Option<File>,
    device: bool,
    /// The name the output gets.
    path: PathBuf,
    /// The temporary file, until committed.
    tmp: Option<PathBuf>,
}

impl Output {
    /// Opens `path` for a disk of `size` bytes: a new sparse file (an existing one is
    /// replaced, at commit, only with `force`), or a block device at least `size` large,
    /// only with `force` (whatever it holds is overwritten) and only if nothing has it
    /// open exclusively (a mounted file system).
    pub(crate) fn create(path: &Path, size: u64, force: bool) -> Result<Output> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("inspecting the output", path, e)),
        };
        match meta {
            Some(m) if m.file_type().is_block_device() => {
                if !force {
                    return Err(Error::config(
                        "the output is a block device: writing the disk onto it destroys what \
                         it holds; confirm with force",
                    )
                    .with_path(path)
                    .with_setting("force"));
                }
                // O_EXCL on a block device: refused (EBUSY) while it is mounted or otherwise
                // held exclusively.
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_EXCL)
                    .open(path)
                    .map_err(|e| {
                        let what = if e.raw_os_error() == Some(libc::EBUSY) {
                            "the output device is in use (mounted, or held by another program)"
                        } else {
                            "opening the output device"
                        };
                        Error::io(what, path, e)
                    })?;
                let dev_size = crate::io::sys::block_device_size(&f)
                    .map_err(|e| Error::io("reading the output device size", path, e))?;
                if dev_size < size {
                    return Err(Error::config(format!(
                        "the device holds {dev_size} bytes, the disk needs {size}"
                    ))
                    .with_path(path));
                }
                Ok(Output {
                    file: f,
                    direct: None,
                    device: true,
                    path: path.to_path_buf(),
                    tmp: None,
                })
            }
            Some(m) if !m.is_file() => Err(Error::config(
                "the output is neither a file nor a block device",
            )
            .with_path(path)),
            Some(m) if m.len() > 0 && !force => Err(Error::config(
                "the output file exists; overwrite it with force",
            )
            .with_path(path)
            .with_setting("force")),
            existing => {
                // A symbolic link is followed: the file it names is the one replaced.
                let path = match existing {
                    Some(_) => std::fs::canonicalize(path)
                        .map_err(|e| Error::io("inspecting the output", path, e))?,
                    None => path.to_path_buf(),
                };
                let name = path
                    .file_name()
                    .ok_or_else(|| Error::config("the output has no file name").with_path(&path))?;
                let tmp = path.with_file_name(format!(
                    ".{}.{}.partial",
                    name.to_string_lossy(),
                    hex(&crate::store::crypto::random::<6>()?)
                ));
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| Error::io("creating the output file", &tmp, e))?;
                // Direct writes where the file system takes them (not tmpfs before Linux
                // 6.6, for one); else every write goes through the page cache.
                let direct = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&tmp)
                    .ok();
                let out = Output {
                    file: f,
                    direct,
                    device: false,
                    path,
                    tmp: Some(tmp),
                };
                out.file
                    .set_len(size)
                    .map_err(|e| Error::io("sizing the output file", out.written_path(), e))?;
                Ok(out)
            }
        }
    }

    /// Whether the output is a block device (written in place, zeros written as zeros).
    pub(crate) fn is_device(&self) -> bool {
        self.device
    }

    /// The file being written (the temporary one, for a file).
    fn written_path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.path)
    }

    /// Writes `data` at `offset`. On a file (created sparse), blocks of zeros are skipped so
    /// they stay holes; a device gets every byte. Returns the bytes of data written.
    pub(crate) fn write_at(&self, data: &[u8], offset: u64) -> Result<u64> {
        let mut runs = Vec::new();
        let written = self.runs(data, offset, &mut runs);
        self.write_runs(data, &runs)?;
        Ok(written)
    }

    /// Appends to `runs` what writing `data` at `offset` writes: the runs of blocks with
    /// data (a file's zero blocks stay holes), or all of it (a device). Returns their bytes.
    /// The scan is apart from the write so that a thread other than the writer can do it.
    pub(crate) fn runs(&self, data: &[u8], offset: u64, runs: &mut Vec<Run>) -> u64 {
        if self.device {
            runs.push((offset, 0..data.len()));
            return data.len() as u64;
        }
        let mut written = 0;
        let mut at = 0;
        while at < data.len() {
            // The next run of blocks with data, then the run of zero blocks after it.
            let block = |i: usize| &data[i..(i + HOLE_BLOCK).min(data.len())];
            while at < data.len() && super::is_zero(block(at)) {
                at += HOLE_BLOCK;
            }
            let start = at;
            while at < data.len() && !super::is_zero(block(at)) {
                at += HOLE_BLOCK;
            }
            let end = at.min(data.len());
            if end > start {
                runs.push((offset + start as u64, start..end));
                written += (end - start) as u64;
            }
        }
        written
    }

    /// Writes the `runs` of `data` (made by [`runs`](Output::runs)).
    pub(crate) fn write_runs(&self, data: &[u8], runs: &[Run]) -> Result<()> {
        for (at, run) in runs {
            let bytes = data
                .get(run.clone())
                .ok_or_else(|| Error::internal("a write run outside its data"))?;
            let done = if self.device {
                self.file.write_all_at(bytes, *at)
            } else {
                self.write_run(bytes, *at)
            };
            done.map_err(|e| {
                Error::io("writing the output", self.written_path(), e).with_offset(*at)
            })?;
        }
        Ok(())
    }

    /// Writes one run of data to a file: directly when its memory, offset and length are
    /// aligned for it, else (or when the file system refuses it) through the page cache.
    fn write_run(&self, run: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            let align = crate::io::sys::DIRECT_ALIGN;
            if run.as_ptr().addr().is_multiple_of(align)
                && run.len().is_multiple_of(align)
                && offset.is_multiple_of(align as u64)
            {
                match direct.write_all_at(run, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    done => return done,
                }
            }
        }
        self.file.write_all_at(run, offset)
    }

    /// Sets a file's length (a device keeps its own).
    pub(crate) fn set_len(&self, size: u64) -> Result<()> {
        if self.device {
            return Ok(());
        }
        self.file
            .set_len(size)
            .map_err(|e| Error::io("sizing the output file", self.written_path(), e))
    }

    /// Makes the output durable and, for a file, gives it its name (replacing any file there).
    pub(crate) fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("flushing the output", self.written_path(), e))?;
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = std::fs::rename(&tmp, &self.path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io("renaming the output into place", &self.path, e));
            }
            let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
            File::open(dir.unwrap_or(Path::new(".")))
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("syncing the output's folder", &self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
