//! Restore: a snapshot back to a sparse file or a block device.

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use super::output::Output;
use super::verify::Problem;
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
    /// Replace an existing file, or write onto a block device (destroying what it holds).
    pub force: bool,
    /// Restore every chunk that can be read and list the others (left as zeros) instead of
    /// stopping at the first: the output is kept, and the report says what is missing.
    pub salvage: bool,
    /// Cancels the restore (a file output is then deleted; a device holds a partial disk).
    pub cancel: CancelToken,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// Its disk's name.
    pub disk: String,
    /// Where it was written.
    pub output: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Bytes left as holes (files) or written as zeros (devices): zero chunks, and zero
    /// blocks inside chunks with data. `bytes_written + bytes_zero + bytes_unreadable` is
    /// the virtual size.
    pub bytes_zero: u64,
    /// Bytes of chunks that could not be read (a salvage restore; zeros in the output).
    pub bytes_unreadable: u64,
    /// What could not be read, at which offset (the first 1000; `problems_total` counts all).
    pub unreadable: Vec<Problem>,
    /// Chunks that could not be read.
    pub problems_total: u64,
    /// Whether the output is a block device.
    pub block_device: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl RestoreReport {
    /// Whether every chunk was restored.
    pub fn complete(&self) -> bool {
        self.problems_total == 0
    }
}

/// Restores snapshot `spec` (id, unique prefix, `DISK@latest`, or `latest` when the store
/// holds one disk) to `out`.
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
    let output = Output::create(out, size, opts.force)?;
    let device = output.is_device();
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
    // One writer at a time (see convert): waiters sleep instead of spinning in the kernel.
    let write_lock = Mutex::new(());
    let unreadable = Mutex::new((Vec::<Problem>::new(), 0u64, 0u64));
    let spec = Walk {
        store,
        snapshot: &snapshot,
        workers,
        cancel: &opts.cancel,
        reporter: &reporter,
        // Zero chunks are written on a device; a salvage also learns every chunk's length.
        include_zero: device || opts.salvage,
    };
    let write = |bytes: &[u8], offset: u64| -> Result<()> {
        let _serial = write_lock.lock().expect("write lock");
        let data = output.write_at(bytes, offset)?;
        Counters::add(&counters.bytes_written, data);
        Counters::add(&counters.bytes_zero, bytes.len() as u64 - data);
        Ok(())
    };
    let result = walk(
        &spec,
        &|| {
            (
                Vec::with_capacity(chunk_cap + 64),
                Vec::with_capacity(chunk_cap),
            )
        },
        &|(record, data): &mut (Vec<u8>, Vec<u8>), item| {
            if item.id == ZERO_ID {
                if device {
                    write(&zeros[..item.len], item.offset)?;
                } else {
                    Counters::add(&counters.bytes_zero, item.len as u64);
                }
                return Ok(());
            }
            let read = store
                .read_chunk(&index, &item.id, record, data)
                .map_err(|e| e.at_disk_offset(item.offset))
                .and_then(|()| {
                    if data.len() == item.len {
                        Ok(())
                    } else {
                        Err(Error::new(
                            ErrorKind::Corrupt,
                            "a chunk's length disagrees with its position in the snapshot",
                        )
                        .with_offset(item.offset))
                    }
                });
            match read {
                Ok(()) => write(data, item.offset),
                Err(e) if opts.salvage && salvageable(&e) => {
                    // Zeros in its place (a device must not keep what it held there).
                    if device {
                        write(&zeros[..item.len], item.offset)?;
                    }
                    let mut u = unreadable.lock().expect("unreadable list");
                    u.1 += 1;
                    u.2 += item.len as u64;
                    if u.0.len() < MAX_LISTED {
                        u.0.push(Problem {
                            offset: Some(item.offset),
                            message: e.to_string(),
                        });
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        },
        &|_| OnError::Stop,
    );
    if let Err(e) = result {
        return Err(if e.kind() == ErrorKind::Cancelled {
            Error::new(
                ErrorKind::Cancelled,
                if device {
                    "restore cancelled; the device holds an incomplete disk"
                } else {
                    "restore cancelled; no output was written"
                },
            )
            .with_path(out)
        } else if device {
            Error::new(
                e.kind(),
                format!(
                    "{}; the device holds an incomplete disk (restore again, or use salvage \
                     to restore what can be read)",
                    e.message()
                ),
            )
            .with_path(out)
            .with_source(e)
        } else {
            e
        });
    }
    output.commit()?;
    let p = reporter.finish();
    let (mut listed, problems_total, bytes_unreadable) =
        unreadable.into_inner().expect("unreadable list");
    listed.sort_by_key(|p| p.offset);
    Ok(RestoreReport {
        disk: snapshot.disk.name.clone(),
        snapshot: snapshot.id,
        output: out.display().to_string(),
        virtual_size: size,
        bytes_written: p.bytes_written,
        bytes_zero: p.bytes_zero,
        bytes_unreadable,
        unreadable: listed,
        problems_total,
        block_device: device,
        seconds: p.elapsed.as_secs_f64(),
    })
}

/// Problems listed in a salvage report at most (all are counted).
const MAX_LISTED: usize = 1000;

/// Whether a salvage goes on past an error: damage to the chunk itself, not a failure of the
/// store, the output or the run.
fn salvageable(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound)
}
