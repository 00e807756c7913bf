//! Progress callbacks, called on the thread that called the operation.
//!
//! The engine reports from its own threads; a C caller's callback should not have to be
//! thread-safe, nor find itself on a thread it did not make. So an operation given a
//! callback runs on a thread of its own while the calling thread waits for its events and
//! calls the callback with each, in order, until the operation returns (libcurl calls its
//! callbacks so). Without a callback the operation runs on the calling thread.

use std::ffi::{CString, c_char, c_void};

use blockferry::{Event, EventStream, Observer, Phase};

use crate::abi::sized;
use crate::error::{Fail, FfiResult};

/// What an operation is doing.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bf_phase {
    /// Reading the source and storing chunks.
    Replicating = 0,
    /// Writing the index and the snapshot manifest.
    Committing = 1,
    /// Writing a snapshot (or an image) out.
    Restoring = 2,
    /// Checking a snapshot.
    Verifying = 3,
    /// Collecting garbage.
    Collecting = 4,
}

/// The kind of a progress event.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bf_event_kind {
    /// A phase started; `bytes_total` is set.
    Started = 0,
    /// Counters moved (at most every 100 ms).
    Progress = 1,
    /// Something the user should know; `message` is set.
    Warning = 2,
    /// The phase finished (the operation's result says whether it succeeded).
    Finished = 3,
}

/// A progress event, valid only during the callback. `size` is this library's
/// `sizeof(bf_event)`: fields a newer header appends are there only when `size` covers them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_event {
    /// The struct's size in bytes (set by blockferry).
    pub size: usize,
    /// What happened.
    pub kind: bf_event_kind,
    /// The phase it belongs to.
    pub phase: bf_phase,
    /// Virtual bytes the phase covers.
    pub bytes_total: u64,
    /// Virtual bytes done (read, found zero, or skipped).
    pub bytes_done: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes found zero or unallocated.
    pub bytes_zero: u64,
    /// Bytes the store already held.
    pub bytes_deduplicated: u64,
    /// Bytes written to the store (replicate) or the output (restore).
    pub bytes_written: u64,
    /// Of `bytes_done`, bytes done without work (durable from an earlier run, or unchanged).
    pub bytes_skipped: u64,
    /// Seconds since the phase started.
    pub elapsed_seconds: f64,
    /// Virtual bytes per second on average.
    pub rate: f64,
    /// For `BF_EVENT_KIND_WARNING`: the text (NUL-terminated); else NULL.
    pub message: *const c_char,
}

sized!(
    bf_event,
    bf_event {
        size: size_of::<bf_event>(),
        kind: bf_event_kind::Progress,
        phase: bf_phase::Replicating,
        bytes_total: 0,
        bytes_done: 0,
        bytes_read: 0,
        bytes_zero: 0,
        bytes_deduplicated: 0,
        bytes_written: 0,
        bytes_skipped: 0,
        elapsed_seconds: 0.0,
        rate: 0.0,
        message: std::ptr::null(),
    }
);

/// A progress callback: `userdata` as given, and the event (valid during the call only).
/// Called on the thread that called the operation, one event at a time and in order, only
/// while that call runs. It may call blockferry functions that do not take the operation's
/// own objects (to cancel, call `bf_cancel_request` on the operation's `bf_cancel`).
pub type bf_progress_cb =
    Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const bf_event)>;

fn phase_code(p: Phase) -> bf_phase {
    match p {
        Phase::Replicating => bf_phase::Replicating,
        Phase::Committing => bf_phase::Committing,
        Phase::Restoring => bf_phase::Restoring,
        Phase::Verifying => bf_phase::Verifying,
        Phase::Collecting => bf_phase::Collecting,
    }
}

/// Turns engine events into C events; remembers the phase, which progress events lack.
struct Converter {
    phase: Phase,
}

impl Converter {
    /// The C event of `e`, and the text its `message` must point to while it is delivered.
    fn convert(&mut self, e: &Event) -> (bf_event, Option<CString>) {
        let mut ev = <bf_event as crate::abi::Sized>::defaults();
        let mut text = None;
        match e {
            Event::Started { phase, bytes_total } => {
                self.phase = *phase;
                ev.kind = bf_event_kind::Started;
                ev.bytes_total = *bytes_total;
            }
            Event::Progress(p) | Event::Finished(p) => {
                if matches!(e, Event::Finished(_)) {
                    ev.kind = bf_event_kind::Finished;
                }
                ev.bytes_total = p.bytes_total;
                ev.bytes_done = p.bytes_done;
                ev.bytes_read = p.bytes_read;
                ev.bytes_zero = p.bytes_zero;
                ev.bytes_deduplicated = p.bytes_deduplicated;
                ev.bytes_written = p.bytes_written;
                ev.bytes_skipped = p.bytes_skipped;
                ev.elapsed_seconds = p.elapsed.as_secs_f64();
                ev.rate = p.rate();
            }
            Event::Warning(w) | Event::Note(w) => {
                ev.kind = bf_event_kind::Warning;
                text = Some(CString::new(w.replace('\0', " ")).unwrap_or_default());
            }
        }
        ev.phase = phase_code(self.phase);
        (ev, text)
    }
}

/// Runs `op` with an observer that delivers its events to `cb` on the calling thread (see
/// the module's documentation); without `cb`, runs it here with no observer. A panic of
/// `op` continues on the calling thread (where the export's boundary catches it).
pub(crate) fn run<R: Send>(
    cb: bf_progress_cb,
    userdata: *mut c_void,
    op: impl FnOnce(&dyn Observer) -> R + Send,
) -> FfiResult<R> {
    let Some(cb) = cb else {
        return Ok(op(&blockferry::Silent));
    };
    let (stream, events) = EventStream::new();
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("blockferry-op".into())
            .spawn_scoped(s, move || op(&stream))
            .map_err(|e| {
                Fail::Engine(blockferry::Error::new(
                    blockferry::ErrorKind::Io,
                    format!("starting the operation's thread: {e}"),
                ))
            })?;
        let mut converter = Converter {
            phase: Phase::Replicating,
        };
        // Ends when the operation returns and drops the stream.
        for e in &events {
            // Notes come from operations the C API does not run (a cutover's steps).
            if matches!(e, Event::Note(_)) {
                continue;
            }
            let (mut ev, text) = converter.convert(&e);
            if let Some(t) = &text {
                ev.message = t.as_ptr();
            }
            // SAFETY: `cb` is the caller's callback, called on the caller's own thread with
            // the caller's `userdata` (the contract of every export taking one); `ev` and
            // `text` outlive the call.
            unsafe { cb(userdata, &raw const ev) };
        }
        Ok(worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}
