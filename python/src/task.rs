//! A long operation running on its own thread: progress, events, cancel, wait, result.
//!
//! The engine reports to [`Shared`] (an [`Observer`]) from its own threads, which only take a
//! mutex and never touch Python. Python reaches the task through [`Task`]: `wait` and
//! `next_events` wait with the GIL released and check for signals (Ctrl-C) on the main
//! thread between waits; a progress callback runs on a dispatcher thread of the task that
//! attaches to the interpreter only to call it.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockferry::{CancelToken, Error, Event, Observer, Phase, Progress};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::json_to_py;
use crate::errors;

/// Events kept for a caller that does not collect them (progress events coalesce, so only
/// warnings pile up; past this the oldest are dropped).
const MAX_QUEUED_EVENTS: usize = 4096;
/// How often a waiting call looks for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// What the operation returns: its report as JSON, or its error.
pub(crate) type Outcome = Result<serde_json::Value, Error>;

struct State {
    /// The phase the operation is in.
    phase: Phase,
    /// The last counters, and the phase they belong to.
    progress: Option<(Phase, Progress)>,
    /// Events not yet collected, with the phase each belongs to.
    events: VecDeque<(Phase, Event)>,
    /// Set once the operation returned.
    outcome: Option<Outcome>,
    /// Whether the dispatcher (if any) delivered the last event.
    delivered: bool,
    /// An exception a progress callback raised (the operation is then cancelled).
    callback_error: Option<PyErr>,
}

/// What the engine's threads, the dispatcher and Python share.
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    pub(crate) cancel: CancelToken,
    /// Whether events go to a callback (then `next_events` hands out none).
    callback: bool,
    /// The writing ends of the wakers of asyncio waiters, by id.
    wakers: Mutex<Vec<(u64, UnixStream)>>,
    next_waker: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every waiter that something changed: threads blocked on `changed`, and
    /// asyncio loops through their wakers (a byte each; a full socket is already readable).
    fn notify(&self) {
        self.changed.notify_all();
        let wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, w) in wakers.iter() {
            let _ = (&*w).write(&[1]);
        }
    }

    fn finished(&self) -> bool {
        let s = self.lock();
        s.outcome.is_some() && s.delivered
    }
}

impl Observer for Shared {
    fn event(&self, event: &Event) {
        let mut s = self.lock();
        let phase = match event {
            Event::Started { phase, .. } => *phase,
            _ => s.phase,
        };
        s.phase = phase;
        if let Event::Progress(p) | Event::Finished(p) = event {
            s.progress = Some((phase, p.clone()));
        }
        // Progress coalesces: a newer view replaces one nobody collected yet.
        if let (Event::Progress(_), Some((_, Event::Progress(_)))) = (event, s.events.back()) {
            s.events.pop_back();
        }
        if s.events.len() >= MAX_QUEUED_EVENTS {
            s.events.pop_front();
        }
        s.events.push_back((phase, event.clone()));
        drop(s);
        self.notify();
    }
}

/// A running or finished operation (replicate, restore, verify, convert, gc).
#[pyclass(frozen, module = "blockferry._native")]
pub(crate) struct Task {
    shared: Arc<Shared>,
    kind: &'static str,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("kind", &self.kind)
            .field("cancelled", &self.shared.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Task {
    /// Starts `run` on a new thread. With a `callback`, events go to it (progress at most
    /// every `interval`) from a dispatcher thread; otherwise they queue for `next_events`.
    pub(crate) fn start(
        kind: &'static str,
        phase: Phase,
        cancel: CancelToken,
        callback: Option<Py<PyAny>>,
        interval: Duration,
        run: impl FnOnce(&Shared) -> Outcome + Send + 'static,
    ) -> PyResult<Task> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase,
                progress: None,
                events: VecDeque::new(),
                outcome: None,
                delivered: callback.is_none(),
                callback_error: None,
            }),
            changed: Condvar::new(),
            cancel,
            callback: callback.is_some(),
            wakers: Mutex::new(Vec::new()),
            next_waker: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let runner = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name(format!("bf-{kind}"))
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&runner)))
                            .unwrap_or_else(|p| Err(Error::internal(panic_message(&*p))));
                    runner.lock().outcome = Some(outcome);
                    runner.notify();
                })
                .map_err(|e| errors::config_error(format!("cannot start a thread: {e}")))?,
        );
        if let Some(cb) = callback {
            let d = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bf-{kind}-progress"))
                    .spawn(move || dispatch(&d, &cb, interval))
                    .map_err(|e| errors::config_error(format!("cannot start a thread: {e}")))?,
            );
        }
        Ok(Task {
            shared,
            kind,
            threads: Mutex::new(threads),
        })
    }

    /// Waits until the task finished or `deadline`; checks for signals on the way, and on one
    /// (Ctrl-C) cancels the task, waits for it to stop, and returns the signal's exception.
    fn wait_until(&self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<bool> {
        loop {
            let step = deadline.map_or(SIGNAL_POLL, |d| {
                d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL)
            });
            let shared = &self.shared;
            let done = py.detach(|| {
                let mut s = shared.lock();
                if !(s.outcome.is_some() && s.delivered) {
                    s = shared
                        .changed
                        .wait_timeout(s, step)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                s.outcome.is_some() && s.delivered
            });
            if done {
                self.join();
                return Ok(true);
            }
            if let Err(signal) = py.check_signals() {
                self.shared.cancel.cancel();
                py.detach(|| {
                    while !shared.finished() {
                        let s = shared.lock();
                        let _ = shared.changed.wait_timeout(s, SIGNAL_POLL);
                    }
                });
                self.join();
                return Err(signal);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    fn join(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(
            Instant::now() + Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX / 4),
        )),
        Some(t) => Err(errors::config_error(format!(
            "timeout {t} is not a number of seconds"
        ))),
    }
}

#[pymethods]
impl Task {
    /// What the task does: `replicate`, `restore`, `verify`, `convert` or `gc`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// Asks the task to stop; safe from any thread, any number of times. A cancelled
    /// replication keeps what it made durable, for a later run to resume.
    fn cancel(&self) {
        self.shared.cancel.cancel();
    }

    /// Whether cancellation was asked for.
    fn cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Whether the task finished (successfully or not) and its events were delivered.
    fn done(&self) -> bool {
        self.shared.finished()
    }

    /// The latest counters as a dict (with `phase`), or None before the first.
    fn progress(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let current = self.shared.lock().progress.clone();
        current
            .map(|(phase, p)| Ok(progress_dict(py, phase, &p)?.into_any().unbind()))
            .transpose()
    }

    /// Waits until the task finished, at most `timeout` seconds (None: no limit); returns
    /// whether it finished. Ctrl-C cancels the task, waits for it, and raises.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = deadline(timeout)?;
        self.wait_until(py, deadline)
    }

    /// Events not yet collected, waiting up to `timeout` seconds for one; an empty list
    /// means the timeout passed or the task is done with none left. A task started with a
    /// callback hands its events to the callback, and none here.
    #[pyo3(signature = (timeout=None))]
    fn next_events(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<Py<PyAny>>> {
        let deadline = deadline(timeout)?;
        loop {
            let shared = &self.shared;
            let step = deadline.map_or(SIGNAL_POLL, |d| {
                d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL)
            });
            let batch: Vec<(Phase, Event)> = py.detach(|| {
                let mut s = shared.lock();
                if (shared.callback || s.events.is_empty()) && s.outcome.is_none() {
                    s = shared
                        .changed
                        .wait_timeout(s, step)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if shared.callback {
                    Vec::new()
                } else {
                    s.events.drain(..).collect()
                }
            });
            if !batch.is_empty() {
                return batch
                    .iter()
                    .map(|(p, e)| Ok(event_dict(py, *p, e)?.into_any().unbind()))
                    .collect();
            }
            if self.shared.lock().outcome.is_some() {
                return Ok(Vec::new());
            }
            if let Err(signal) = py.check_signals() {
                self.shared.cancel.cancel();
                self.wait_until(py, None)?;
                return Err(signal);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Vec::new());
            }
        }
    }

    /// Waits for the task and returns its report as a dict, or raises its error (or the
    /// exception its progress callback raised).
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.wait_until(py, None)?;
        let mut s = self.shared.lock();
        if let Some(e) = s.callback_error.take() {
            return Err(e);
        }
        match &s.outcome {
            Some(Ok(v)) => json_to_py(py, v),
            Some(Err(e)) => Err(errors::to_py(py, e)),
            None => Err(errors::to_py(
                py,
                &Error::internal("the task finished without a result"),
            )),
        }
    }

    /// A new waker for an asyncio waiter: readable whenever the task has news (an event,
    /// its end), and at once if it already has some.
    fn waker(&self) -> PyResult<Waker> {
        let (read, write) = UnixStream::pair()
            .and_then(|(r, w)| {
                r.set_nonblocking(true)?;
                w.set_nonblocking(true)?;
                Ok((r, w))
            })
            .map_err(|e| errors::config_error(format!("cannot make a waker socket: {e}")))?;
        let id = self.shared.next_waker.fetch_add(1, Ordering::Relaxed);
        // Registered first, then checked: news that comes in between writes to it too.
        self.shared
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((
                id,
                write.try_clone().map_err(|e| {
                    errors::config_error(format!("cannot make a waker socket: {e}"))
                })?,
            ));
        let news = {
            let s = self.shared.lock();
            !s.events.is_empty() || s.outcome.is_some()
        };
        if news {
            let _ = (&write).write(&[1]);
        }
        Ok(Waker {
            read,
            id,
            shared: Arc::clone(&self.shared),
        })
    }

    fn __repr__(&self) -> String {
        let state = if self.shared.finished() {
            "done"
        } else if self.shared.cancel.is_cancelled() {
            "cancelling"
        } else {
            "running"
        };
        format!("<blockferry task {} ({state})>", self.kind)
    }
}

/// What an asyncio waiter watches (see the module's documentation).
#[pyclass(frozen, module = "blockferry._native")]
pub(crate) struct Waker {
    read: UnixStream,
    id: u64,
    shared: Arc<Shared>,
}

#[pymethods]
impl Waker {
    /// The socket to watch for reading.
    fn fileno(&self) -> i32 {
        self.read.as_raw_fd()
    }

    /// Reads what was written, so that the socket is readable again only on new news.
    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.shared
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, _)| *id != self.id);
    }
}

/// The dispatcher: hands events to the callback, progress at most every `interval`.
fn dispatch(shared: &Shared, cb: &Py<PyAny>, interval: Duration) {
    let mut last_progress: Option<Instant> = None;
    loop {
        let (events, finished) = {
            let mut s = shared.lock();
            if s.events.is_empty() && s.outcome.is_none() {
                s = shared
                    .changed
                    .wait_timeout(s, SIGNAL_POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            (s.events.drain(..).collect::<Vec<_>>(), s.outcome.is_some())
        };
        let due: Vec<&(Phase, Event)> = events
            .iter()
            .enumerate()
            .filter(|(i, (_, e))| match e {
                Event::Progress(_) => {
                    // The last progress of the batch, and only if the interval passed.
                    let newest = events[i + 1..]
                        .iter()
                        .all(|(_, n)| !matches!(n, Event::Progress(_)));
                    newest && last_progress.is_none_or(|t| t.elapsed() >= interval)
                }
                _ => true,
            })
            .map(|(_, e)| e)
            .collect();
        if due.iter().any(|(_, e)| matches!(e, Event::Progress(_))) {
            last_progress = Some(Instant::now());
        }
        if !due.is_empty() && shared.lock().callback_error.is_none() {
            // The interpreter may be finalizing (the process is exiting): then nobody listens.
            let raised = Python::try_attach(|py| {
                for (p, e) in &due {
                    let arg = event_dict(py, *p, e)?;
                    cb.call1(py, (arg,))?;
                }
                Ok::<(), PyErr>(())
            });
            if let Some(Err(e)) = raised {
                shared.lock().callback_error = Some(e);
                shared.cancel.cancel();
            }
        }
        if finished && shared.lock().events.is_empty() {
            shared.lock().delivered = true;
            shared.notify();
            return;
        }
    }
}

fn progress_dict<'py>(py: Python<'py>, phase: Phase, p: &Progress) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("phase", phase.name())?;
    d.set_item("bytes_total", p.bytes_total)?;
    d.set_item("bytes_done", p.bytes_done)?;
    d.set_item("bytes_read", p.bytes_read)?;
    d.set_item("bytes_zero", p.bytes_zero)?;
    d.set_item("bytes_deduplicated", p.bytes_deduplicated)?;
    d.set_item("bytes_written", p.bytes_written)?;
    d.set_item("bytes_skipped", p.bytes_skipped)?;
    d.set_item("parts_in_flight", p.parts_in_flight)?;
    d.set_item("elapsed", p.elapsed.as_secs_f64())?;
    d.set_item("rate", p.rate())?;
    d.set_item("eta", p.eta().map(|d| d.as_secs_f64()))?;
    d.set_item("io_engine", p.io_engine)?;
    Ok(d)
}

/// An event as a dict with a `type` (`started`, `progress`, `warning`, `note`, `finished`).
fn event_dict<'py>(py: Python<'py>, phase: Phase, e: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = match e {
        Event::Started { bytes_total, .. } => {
            let d = PyDict::new(py);
            d.set_item("phase", phase.name())?;
            d.set_item("bytes_total", *bytes_total)?;
            d
        }
        Event::Progress(p) | Event::Finished(p) => progress_dict(py, phase, p)?,
        Event::Warning(w) | Event::Note(w) => {
            let d = PyDict::new(py);
            d.set_item("phase", phase.name())?;
            d.set_item("message", w)?;
            d
        }
    };
    let kind = match e {
        Event::Started { .. } => "started",
        Event::Progress(_) => "progress",
        Event::Warning(_) => "warning",
        Event::Note(_) => "note",
        Event::Finished(_) => "finished",
    };
    d.set_item("type", kind)?;
    Ok(d)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("the operation panicked: {what}")
}
