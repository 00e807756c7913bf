//! Jobs as seen from outside: typed progress events, observers, cancellation.
//!
//! [`state`]: job records and checkpoints (SQLite) for resume.

#[cfg(feature = "s3")]
pub(crate) mod export_state;
pub(crate) mod journal;
pub(crate) mod resume;
pub(crate) mod state;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A cancellation flag shared between a running operation and whoever may stop it.
///
/// Cancelling is cooperative: stages check the flag between chunks, stop taking new work,
/// drain what is in flight, and the operation returns [`crate::ErrorKind::Cancelled`].
/// Nothing is committed by a cancelled replication.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CancelToken")
            .field(&self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token cancelled by setting `flag` (e.g. from a signal handler).
    pub fn from_flag(flag: Arc<AtomicBool>) -> CancelToken {
        CancelToken(flag)
    }

    /// A fresh, uncancelled token.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Requests cancellation; safe from any thread, any number of times.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What an operation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the source and storing chunks.
    Replicating,
    /// Writing the index and the snapshot manifest.
    Committing,
    /// Writing a snapshot out to a file or device.
    Restoring,
    /// Checking a snapshot.
    Verifying,
    /// Collecting garbage: moving live chunks out of packs that are mostly garbage.
    Collecting,
}

impl Phase {
    /// Lowercase name, for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Replicating => "replicating",
            Phase::Committing => "committing",
            Phase::Restoring => "restoring",
            Phase::Verifying => "verifying",
            Phase::Collecting => "collecting",
        }
    }
}

/// A point-in-time view of an operation's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Virtual bytes the operation covers.
    pub bytes_total: u64,
    /// Virtual bytes done (read, found zero, or skipped as unallocated).
    pub bytes_done: u64,
    /// Bytes read from the source (replicate, verify with an image).
    pub bytes_read: u64,
    /// Bytes found zero or unallocated.
    pub bytes_zero: u64,
    /// Bytes the store already held.
    pub bytes_deduplicated: u64,
    /// Bytes written to the store (replicate) or to the output (restore).
    pub bytes_written: u64,
    /// Parts being uploaded right now (replicate to a multipart store).
    pub parts_in_flight: u64,
    /// Of `bytes_done`, the bytes counted done without work at the start: durable from an
    /// earlier run of the job, or unchanged since a delta's base.
    pub bytes_skipped: u64,
    /// Time since the operation started.
    pub elapsed: Duration,
    /// The read engine of a replication (`pread` or `io_uring`); empty for other operations.
    pub io_engine: &'static str,
}

impl Progress {
    /// Virtual bytes worked through per second, on average since the start (bytes skipped
    /// without work are left out).
    #[allow(clippy::cast_precision_loss)] // a rate needs no exactness
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes_done.saturating_sub(self.bytes_skipped) as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the average rate so far; `None` before any work is done.
    #[allow(clippy::cast_precision_loss)]
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        if rate <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate)
            .ok()
    }
}

/// A progress event. Observers receive them in order from one thread at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An operation phase started.
    Started {
        /// The phase.
        phase: Phase,
        /// Virtual bytes it covers.
        bytes_total: u64,
    },
    /// Counters moved (sent at most every [`PROGRESS_INTERVAL`]).
    Progress(Progress),
    /// Something the user should know that does not stop the operation.
    Warning(String),
    /// What the operation is doing, worth telling (a cutover's steps and predictions).
    Note(String),
    /// The phase finished (successfully or not; the operation's result says which).
    Finished(Progress),
}

/// Shortest time between two [`Event::Progress`] events.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Receives progress events. Called from the engine's threads; keep it quick.
pub trait Observer: Send + Sync {
    /// Called for each event.
    fn event(&self, event: &Event);
}

impl<F: Fn(&Event) + Send + Sync> Observer for F {
    fn event(&self, event: &Event) {
        self(event);
    }
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: &Event) {}
}

/// An observer that turns events into a stream: every event goes to a channel whose receiver
/// the caller iterates (from another thread, or after the operation returns).
///
/// The channel is unbounded so the engine never waits on a slow consumer; it stays small
/// because progress events are rate-limited to one per [`PROGRESS_INTERVAL`].
#[derive(Debug, Clone)]
pub struct EventStream(crossbeam_channel::Sender<Event>);

impl EventStream {
    /// A new stream and the receiving end of its events.
    pub fn new() -> (EventStream, crossbeam_channel::Receiver<Event>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (EventStream(tx), rx)
    }
}

impl Observer for EventStream {
    fn event(&self, event: &Event) {
        // A receiver that was dropped just means nobody is listening any more.
        let _ = self.0.send(event.clone());
    }
}

/// Shared atomic counters behind [`Progress`] (named as its fields are).
#[derive(Debug, Default)]
#[allow(clippy::struct_field_names)]
pub(crate) struct Counters {
    pub(crate) bytes_done: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_zero: AtomicU64,
    pub(crate) bytes_deduplicated: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) parts_in_flight: AtomicU64,
    pub(crate) bytes_skipped: AtomicU64,
    /// Chunk bytes copied in user space between the read buffer and the store writer.
    pub(crate) bytes_copied: AtomicU64,
    /// The read engine, once a replication has started one.
    pub(crate) io_engine: std::sync::OnceLock<&'static str>,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn progress(&self, bytes_total: u64, started: Instant) -> Progress {
        Progress {
            bytes_total,
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_zero: self.bytes_zero.load(Ordering::Relaxed),
            bytes_deduplicated: self.bytes_deduplicated.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            parts_in_flight: self.parts_in_flight.load(Ordering::Relaxed),
            bytes_skipped: self.bytes_skipped.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            io_engine: self.io_engine.get().copied().unwrap_or_default(),
        }
    }
}

/// Sends rate-limited progress events for one phase.
pub(crate) struct Reporter<'a> {
    observer: &'a dyn Observer,
    counters: Arc<Counters>,
    bytes_total: u64,
    started: Instant,
    last: std::sync::Mutex<Instant>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn start(observer: &'a dyn Observer, phase: Phase, bytes_total: u64) -> Self {
        observer.event(&Event::Started { phase, bytes_total });
        let now = Instant::now();
        Reporter {
            observer,
            counters: Arc::new(Counters::default()),
            bytes_total,
            started: now,
            last: std::sync::Mutex::new(now),
        }
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Sends a progress event if the last one is older than [`PROGRESS_INTERVAL`].
    pub(crate) fn tick(&self) {
        let Ok(mut last) = self.last.try_lock() else {
            return; // Another thread is reporting right now.
        };
        if last.elapsed() >= PROGRESS_INTERVAL {
            *last = Instant::now();
            self.observer.event(&Event::Progress(
                self.counters.progress(self.bytes_total, self.started),
            ));
        }
    }

    /// A warning for the user: an event, which the front end shows (logged at INFO only, so
    /// that a front end that shows events and the log does not say it twice).
    pub(crate) fn warn(&self, message: String) {
        tracing::info!(warning = %message);
        self.observer.event(&Event::Warning(message));
    }

    /// What the operation is doing, worth telling the user: an event (logged at INFO).
    pub(crate) fn note(&self, message: String) {
        tracing::info!("{message}");
        self.observer.event(&Event::Note(message));
    }

    pub(crate) fn finish(&self) -> Progress {
        let p = self.counters.progress(self.bytes_total, self.started);
        self.observer.event(&Event::Finished(p.clone()));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_the_average() {
        let mut p = Progress {
            bytes_total: 1000,
            bytes_done: 250,
            elapsed: Duration::from_secs(5),
            ..Progress::default()
        };
        assert!((p.rate() - 50.0).abs() < 1e-9);
        assert_eq!(p.eta(), Some(Duration::from_secs(15)));
        // Bytes skipped at the start (resumed, unchanged) are not work.
        p.bytes_skipped = 200;
        assert!((p.rate() - 10.0).abs() < 1e-9);
        assert_eq!(p.eta(), Some(Duration::from_secs(75)));
        p.bytes_done = 0;
        p.bytes_skipped = 0;
        assert_eq!(p.eta(), None);
        p.elapsed = Duration::ZERO;
        assert!(p.rate().abs() < f64::EPSILON);
    }
}
