//! Walks a snapshot's chunk map with worker threads: the shared engine of restore and verify.

use std::sync::Mutex;
use std::thread;

use crossbeam_channel::bounded;

use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Reporter};
use crate::store::format::{Id, PAGE_ENTRIES, ZERO_ID};
use crate::store::{Snapshot, Store};

/// One chunk position of a snapshot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item {
    pub(crate) id: Id,
    pub(crate) offset: u64,
    pub(crate) len: usize,
}

/// What to do with a failed item.
pub(crate) enum OnError {
    /// Stop the walk and return this error.
    Stop,
    /// Record it (the callback already did) and go on.
    Continue,
}

/// How to walk a snapshot.
pub(crate) struct Walk<'a> {
    pub(crate) store: &'a Store,
    pub(crate) snapshot: &'a Snapshot,
    pub(crate) workers: usize,
    pub(crate) cancel: &'a CancelToken,
    pub(crate) reporter: &'a Reporter<'a>,
    /// Also visit zero chunk positions.
    pub(crate) include_zero: bool,
}

/// Calls `f` on every chunk position (zero ones too when `include_zero`), from `workers`
/// threads, each with its own state from `init`. Positions come in disk order; they finish
/// in any order. Page objects are read one at a time, so memory stays bounded.
pub(crate) fn walk<S>(
    w: &Walk<'_>,
    init: &(dyn Fn() -> S + Sync),
    f: &(dyn Fn(&mut S, &Item) -> Result<()> + Sync),
    on_error: &(dyn Fn(&Error) -> OnError + Sync),
) -> Result<()> {
    let Walk {
        store,
        snapshot,
        workers,
        cancel,
        reporter,
        include_zero,
    } = *w;
    let chunk = u64::from(snapshot.chunk_size);
    let size = snapshot.disk.virtual_size;
    let stop = CancelToken::new();
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        if let OnError::Stop = on_error(&e) {
            stop.cancel();
            fatal.lock().expect("error slot").get_or_insert(e);
        }
    };
    let counters = reporter.counters().clone();
    let (tx, rx) = bounded::<Item>(4 * workers);
    thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            let (stop, fail, counters) = (&stop, &fail, &counters);
            handles.push(s.spawn(move || {
                let mut state = init();
                for item in rx {
                    if stop.is_cancelled() || cancel.is_cancelled() {
                        continue;
                    }
                    if let Err(e) = f(&mut state, &item) {
                        fail(e);
                    }
                    crate::job::Counters::add(&counters.bytes_done, item.len as u64);
                    reporter.tick();
                }
            }));
        }
        drop(rx);
        'pages: for (page_idx, _) in snapshot.pages.iter().enumerate() {
            let first = page_idx as u64 * PAGE_ENTRIES as u64;
            let ids = match snapshot.page_id(page_idx).and_then(|p| match p {
                Some(id) => store.read_page(&id),
                None => Ok(Vec::new()),
            }) {
                Ok(ids) => ids,
                Err(e) => {
                    fail(e.at_disk_offset(first * chunk));
                    continue;
                }
            };
            let in_page = (snapshot.n_chunks() - first).min(PAGE_ENTRIES as u64);
            if !ids.is_empty() && ids.len() as u64 != in_page {
                fail(
                    Error::corrupt("page", "page length disagrees with the snapshot size")
                        .with_offset(first * chunk),
                );
                continue;
            }
            for i in 0..in_page {
                if stop.is_cancelled() || cancel.is_cancelled() {
                    break 'pages;
                }
                let id = ids
                    .get(usize::try_from(i).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(ZERO_ID);
                let offset = (first + i) * chunk;
                let len = usize::try_from(chunk.min(size - offset)).expect("chunk fits in memory");
                if id == ZERO_ID && !include_zero {
                    crate::job::Counters::add(&counters.bytes_done, len as u64);
                    crate::job::Counters::add(&counters.bytes_zero, len as u64);
                    continue;
                }
                if tx.send(Item { id, offset, len }).is_err() {
                    break 'pages;
                }
            }
        }
        drop(tx);
        for h in handles {
            if h.join().is_err() {
                fatal
                    .lock()
                    .expect("error slot")
                    .get_or_insert(Error::internal("a worker thread panicked"));
            }
        }
    });
    if let Some(e) = fatal.into_inner().expect("error slot") {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(Error::new(ErrorKind::Cancelled, "cancelled"));
    }
    Ok(())
}
