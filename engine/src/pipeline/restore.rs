//! Restore: a snapshot back to a sparse file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use serde::Serialize;

use super::walk::{OnError, Walk, walk};
use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};
use crate::store::Store;
use crate::store::format::ZERO_ID;

/// Options of [`restore`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Replace an existing regular file (block devices are always written in place).
    pub force: bool,
    /// Cancels the restore (the output is then incomplete).
    pub cancel: CancelToken,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// Where it was written.
    pub output: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Bytes left as holes (files) or written as zeros (devices).
    pub bytes_zero: u64,
    /// Whether the output is a block device.
    pub block_device: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Opens the output: a new or replaced sparse file of the right size, or a block device
/// large enough. Returns the file and whether it is a device.
pub(crate) fn open_output(path: &Path, size: u64, force: bool) -> Result<(File, bool)> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io("opening the output device", path, e))?;
            let dev_size = crate::io::sys::block_device_size(&f)
                .map_err(|e| Error::io("reading the output device size", path, e))?;
            if dev_size < size {
                return Err(Error::config(format!(
                    "the device holds {dev_size} bytes, the disk needs {size}"
                ))
                .with_path(path));
            }
            Ok((f, true))
        }
        Ok(m) if m.is_file() => {
            if m.len() > 0 && !force {
                return Err(Error::config(
                    "the output file exists; overwrite it with force (--force on the command line)",
                )
                .with_path(path));
            }
            new_file(path, size)
        }
        Ok(_) => {
            Err(Error::config("the output is neither a file nor a block device").with_path(path))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => new_file(path, size),
        Err(e) => Err(Error::io("inspecting the output", path, e)),
    }
}

fn new_file(path: &Path, size: u64) -> Result<(File, bool)> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("creating the output file", path, e))?;
    f.set_len(size)
        .map_err(|e| Error::io("sizing the output file", path, e))?;
    Ok((f, false))
}

/// Restores snapshot `spec` (id, prefix or `latest`) to `out`.
pub fn restore(
    store: &Store,
    spec: &str,
    out: &Path,
    opts: &RestoreOptions,
    observer: &dyn Observer,
) -> Result<RestoreReport> {
    let _lock = super::reader_lock(store, "restore", &opts.cancel, observer)?;
    let snapshot = store.snapshot(spec)?;
    let index = store.load_index()?;
    let workers = super::worker_count(opts.workers);
    let size = snapshot.disk.virtual_size;
    let (file, device) = open_output(out, size, opts.force)?;
    let reporter = Reporter::start(observer, Phase::Restoring, size);
    let zeros = vec![
        0u8;
        if device {
            snapshot.chunk_size as usize
        } else {
            0
        }
    ];
    let counters = reporter.counters().clone();
    let chunk_cap = store.chunk_size() as usize;
    let write_lock = std::sync::Mutex::new(());
    let spec = Walk {
        store,
        snapshot: &snapshot,
        workers,
        cancel: &opts.cancel,
        reporter: &reporter,
        include_zero: device,
    };
    walk(
        &spec,
        &|| {
            (
                Vec::with_capacity(chunk_cap + 64),
                Vec::with_capacity(chunk_cap),
            )
        },
        &|(record, data): &mut (Vec<u8>, Vec<u8>), item| {
            let bytes: &[u8] = if item.id == ZERO_ID {
                Counters::add(&counters.bytes_zero, item.len as u64);
                &zeros[..item.len]
            } else {
                store
                    .read_chunk(&index, &item.id, record, data)
                    .map_err(|e| e.with_offset(item.offset))?;
                if data.len() != item.len {
                    return Err(Error::corrupt(
                        "snapshot",
                        "chunk length disagrees with its position",
                    )
                    .with_offset(item.offset));
                }
                Counters::add(&counters.bytes_written, item.len as u64);
                data
            };
            // One writer at a time (see convert): waiters sleep instead of spinning in the kernel.
            let _serial = write_lock.lock().expect("write lock");
            file.write_all_at(bytes, item.offset)
                .map_err(|e| Error::io("writing the output", out, e).with_offset(item.offset))
        },
        &|_| OnError::Stop,
    )
    .map_err(|e| {
        if e.kind() == ErrorKind::Cancelled {
            Error::new(
                ErrorKind::Cancelled,
                "restore cancelled; the output is incomplete",
            )
            .with_path(out)
        } else {
            e
        }
    })?;
    file.sync_all()
        .map_err(|e| Error::io("flushing the output", out, e))?;
    let p = reporter.finish();
    Ok(RestoreReport {
        snapshot: snapshot.id,
        output: out.display().to_string(),
        virtual_size: size,
        bytes_written: p.bytes_written,
        bytes_zero: p.bytes_zero,
        block_device: device,
        seconds: p.elapsed.as_secs_f64(),
    })
}
