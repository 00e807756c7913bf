//! Convert: any readable image to a sparse raw file (or onto a block device).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use serde::Serialize;

use super::output::Output;
use super::{is_zero, worker_count};
use crate::error::{Error, ErrorKind, Result};
use crate::image::BlockSource;
use crate::io::IoEngine;
use crate::io::chunks::ChunkFill;
use crate::job::{CancelToken, Counters, Observer, Phase, Reporter};

/// Bytes each worker reads and writes at a time.
const PIECE: u64 = 2 << 20;

/// Options of [`convert`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Replace an existing output file, or write onto a block device.
    pub force: bool,
    /// Read backend.
    pub io_engine: IoEngine,
    /// Cancels the conversion (a file output is then deleted).
    pub cancel: CancelToken,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// Virtual size written.
    pub virtual_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of data written (the rest left as holes, or zeros on a device).
    pub bytes_written: u64,
    /// Bytes left as holes, or written as zeros on a device: `bytes_written + bytes_zero`
    /// is the virtual size.
    pub bytes_zero: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Writes the virtual disk of `source` to `out` as raw bytes: unallocated and all-zero ranges
/// become holes in a file (zeros on a block device), so the output is as sparse as it can be.
/// A file appears under its name only when it is whole.
pub fn convert(
    source: &dyn BlockSource,
    out: &Path,
    opts: &ConvertOptions,
    observer: &dyn Observer,
) -> Result<ConvertReport> {
    let size = source.info().virtual_size;
    let output = Output::create(out, size, opts.force)?;
    let device = output.is_device();
    let reporter = Reporter::start(observer, Phase::Restoring, size);
    let counters = reporter.counters().clone();
    let next = AtomicU64::new(0);
    let n_pieces = size.div_ceil(PIECE);
    let stop = CancelToken::new();
    // One writer at a time: concurrent writes to one file serialise on its inode lock in
    // the kernel anyway, where waiters spin; here they sleep and leave the CPU to the
    // readers and decompressors (measured: two unserialised writers halve raw throughput).
    let write_lock = std::sync::Mutex::new(());
    let result: Result<()> = thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(opts.workers))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut backend = opts.io_engine.backend();
                    let mut maps = Vec::new();
                    let mut buf = Vec::new();
                    let mut fill = ChunkFill::default();
                    loop {
                        let idx = next.fetch_add(1, Ordering::Relaxed);
                        if idx >= n_pieces || stop.is_cancelled() || opts.cancel.is_cancelled() {
                            return Ok(());
                        }
                        let offset = idx * PIECE;
                        let len = PIECE.min(size - offset);
                        let len_usize = usize::try_from(len).expect("a piece fits in memory");
                        maps.clear();
                        let step = (|| -> Result<()> {
                            source.map(offset, len, &mut maps)?;
                            crate::image::coalesce(&mut maps);
                            // Reused as it is: a fill zero-fills what it does not read.
                            buf.resize(len_usize, 0);
                            let n = fill.fill(source, backend.as_mut(), &maps, offset, &mut buf)?;
                            Counters::add(&counters.bytes_read, n);
                            let data = if !is_zero(&buf) || device {
                                let _serial = write_lock.lock().expect("write lock");
                                output.write_at(&buf, offset)?
                            } else {
                                0
                            };
                            Counters::add(&counters.bytes_written, data);
                            Counters::add(&counters.bytes_zero, len - data);
                            Counters::add(&counters.bytes_done, len);
                            reporter.tick();
                            Ok(())
                        })();
                        if let Err(e) = step {
                            stop.cancel();
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::internal("a convert worker panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    });
    let incomplete = |e: Error| {
        if device {
            Error::new(
                e.kind(),
                format!("{}; the device holds an incomplete disk", e.message()),
            )
            .with_path(out)
            .with_source(e)
        } else {
            e
        }
    };
    result.map_err(incomplete)?;
    if opts.cancel.is_cancelled() {
        return Err(Error::new(
            ErrorKind::Cancelled,
            if device {
                "convert cancelled; the device holds an incomplete disk"
            } else {
                "convert cancelled; no output was written"
            },
        )
        .with_path(out));
    }
    output.commit()?;
    let p = reporter.finish();
    Ok(ConvertReport {
        virtual_size: size,
        bytes_read: p.bytes_read,
        bytes_written: p.bytes_written,
        bytes_zero: p.bytes_zero,
        seconds: p.elapsed.as_secs_f64(),
    })
}
