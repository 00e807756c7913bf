//! Packs on their way to the store: whole objects for backends without multipart uploads
//! (local folders), or multipart uploads whose parts go up in parallel on uploader threads
//! (S3), each part durable on its own.
//!
//! Rules for a multipart pack, which make resuming simple:
//! - every part but the last is at least the part target (≥ the store's minimum part);
//! - part 1 (which starts with the pack header) is acknowledged before any other part is sent,
//!   so a pack with durable parts always has its header;
//! - the last part (the remaining chunk records, then the trailer) is sent only after every
//!   other part was acknowledged, and the upload is completed right after it.
//!
//! A run that stops leaves at most the open packs' uploads; the next run of the job completes
//! them from the parts the job database recorded (see [`crate::job::resume`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::{Msg, Shared};
use crate::error::{Error, ErrorKind, Result};
use crate::io::buf::PooledBuf;
use crate::job::Counters;
use crate::store::format::{self, Entry, PackId, RecordBuf, hex};
use crate::store::{Part, crypto};

/// Largest part a pack is cut into.
pub(super) const MAX_PART_BYTES: usize = 64 << 20;

/// How packs reach the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PackMode {
    /// One put per pack, of at most `target` bytes of chunk records.
    Whole,
    /// Multipart uploads: parts of `part_target` bytes, at most `max_parts` parts a pack.
    Multipart { max_parts: u32 },
}

/// The acknowledged parts of one pack, shared by its worker and the uploaders.
pub(super) struct PackAcks {
    state: Mutex<AckState>,
    cv: Condvar,
}

#[derive(Default)]
struct AckState {
    parts: BTreeMap<u32, Part>,
    failed: bool,
}

impl PackAcks {
    fn new() -> Arc<PackAcks> {
        Arc::new(PackAcks {
            state: Mutex::new(AckState::default()),
            cv: Condvar::new(),
        })
    }

    fn ack(&self, part: Part) {
        let mut s = self.state.lock().expect("acks lock");
        s.parts.insert(part.number, part);
        self.cv.notify_all();
    }

    fn fail(&self) {
        self.state.lock().expect("acks lock").failed = true;
        self.cv.notify_all();
    }

    /// Waits until parts `1..=n` are all acknowledged; false if a part failed or the run
    /// stops for an error.
    fn wait_through(&self, n: u32, sh: &Shared<'_>) -> bool {
        let mut s = self.state.lock().expect("acks lock");
        loop {
            if s.failed || sh.stop.is_cancelled() {
                return false;
            }
            if (1..=n).all(|k| s.parts.contains_key(&k)) {
                return true;
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(100))
                .expect("acks lock")
                .0;
        }
    }

    fn parts(&self) -> Vec<Part> {
        self.state
            .lock()
            .expect("acks lock")
            .parts
            .values()
            .cloned()
            .collect()
    }
}

/// A part on its way to an uploader.
pub(super) struct PartJob {
    pack: PackId,
    upload_id: String,
    number: u32,
    data: Bytes,
    /// The chunk records it carries, offsets within the part.
    chunks: Vec<Entry>,
    acks: Arc<PackAcks>,
    /// For the last part: the pack's entries (pack offsets); the uploader completes the upload.
    last: Option<Vec<Entry>>,
}

/// A pack on its way from its worker to an uploader thread (or, on a store that takes packs
/// whole, the pack writer thread), so that the worker goes on packing meanwhile.
pub(super) enum Outgoing {
    /// A part of a multipart upload.
    Part(PartJob),
    /// A whole pack (records, trailer and footer), put in one piece.
    Whole {
        pack: PackId,
        data: PooledBuf,
        entries: Vec<Entry>,
    },
}

/// The multipart side of an open pack.
struct Upload {
    id: String,
    next_number: u32,
    /// Pack offset where the part being filled starts.
    part_base: u64,
    /// First entry of the part being filled.
    part_first_entry: usize,
    acks: Arc<PackAcks>,
}

/// A worker's pack being filled.
pub(super) struct OpenPack {
    pub(super) id: PackId,
    /// The whole pack (whole mode) or the part being filled (multipart), from the run's pool
    /// of pack buffers: aligned, so that a local store writes it with `O_DIRECT` straight
    /// from here, and reused, so that encoding into it zero-fills nothing.
    pub(super) buf: PooledBuf,
    /// Every chunk record of the pack, pack offsets.
    pub(super) entries: Vec<Entry>,
    pub(super) sealer: crypto::Sealer,
    upload: Option<Upload>,
}

impl OpenPack {
    pub(super) fn start(sh: &Shared<'_>, msgs: &Sender<Msg>) -> Result<OpenPack> {
        let id = next_pack_id(sh)?;
        let mut buf = pack_buffer(sh)?;
        buf.extend_from_slice(&format::pack_header(&id));
        let upload = match sh.pack_mode {
            PackMode::Whole => {
                let _ = msgs.send(Msg::PackStarted {
                    id,
                    upload_id: None,
                });
                None
            }
            PackMode::Multipart { .. } => {
                let upload_id = sh
                    .store
                    .backend()
                    .create_upload(&crate::store::pack_key(&id))?;
                // Recorded before any of its parts can be acknowledged.
                let _ = msgs.send(Msg::PackStarted {
                    id,
                    upload_id: Some(upload_id.clone()),
                });
                Some(Upload {
                    id: upload_id,
                    next_number: 1,
                    part_base: 0,
                    part_first_entry: 0,
                    acks: PackAcks::new(),
                })
            }
        };
        Ok(OpenPack {
            id,
            buf,
            entries: Vec::new(),
            sealer: sh.store.keys().pack_sealer(&id),
            upload,
        })
    }

    /// Pack offset at which the next chunk record goes.
    pub(super) fn next_offset(&self) -> u64 {
        self.upload.as_ref().map_or(0, |u| u.part_base) + self.buf.len() as u64
    }

    /// After a chunk record was added: sends a full part, or says the pack is full.
    /// Returns true when the pack should be finished now.
    pub(super) fn after_add(&mut self, sh: &Shared<'_>, parts: &Sender<Outgoing>) -> Result<bool> {
        let full_entries = self.entries.len() >= format::MAX_PACK_CHUNKS;
        match (&self.upload, sh.pack_mode) {
            (None, _) => {
                Ok(self.buf.len() - format::PACK_HEADER >= sh.plan.pack_target || full_entries)
            }
            (Some(u), PackMode::Multipart { max_parts }) => {
                // The part being filled becomes the last when it is the last one allowed.
                if full_entries || u.next_number >= max_parts {
                    return Ok(true);
                }
                if self.buf.len() >= sh.plan.pack_target {
                    self.send_part(sh, parts, None)?;
                }
                Ok(false)
            }
            (Some(_), PackMode::Whole) => Err(Error::internal("multipart pack in whole mode")),
        }
    }

    /// Hands the part being filled to the uploaders (`last`: the pack's entries, for the
    /// last part).
    fn send_part(
        &mut self,
        sh: &Shared<'_>,
        parts: &Sender<Outgoing>,
        last: Option<Vec<Entry>>,
    ) -> Result<()> {
        let u = self.upload.as_mut().expect("multipart pack");
        let number = u.next_number;
        // Part 1 first; the last part after all the others.
        let wait_for = if last.is_some() {
            number - 1
        } else {
            u32::from(number > 1)
        };
        if wait_for > 0 && !u.acks.wait_through(wait_for, sh) {
            return Err(stopped());
        }
        let chunks = self.entries[u.part_first_entry..]
            .iter()
            .map(|e| Entry {
                offset: e.offset - u.part_base,
                ..*e
            })
            .collect();
        let data = std::mem::replace(&mut self.buf, pack_buffer(sh)?);
        u.part_base += data.len() as u64;
        u.part_first_entry = self.entries.len();
        u.next_number += 1;
        hand_over(
            sh,
            parts,
            Outgoing::Part(PartJob {
                pack: self.id,
                upload_id: u.id.clone(),
                number,
                data: Bytes::from_owner(data),
                chunks,
                acks: Arc::clone(&u.acks),
                last,
            }),
        )
    }

    /// Finishes the pack: whole mode hands it to the pack writer; multipart sends the last
    /// part (records and trailer), and its uploader completes the upload.
    pub(super) fn finish(mut self, sh: &Shared<'_>, parts: &Sender<Outgoing>) -> Result<()> {
        if self.upload.is_none() {
            format::finish_pack(&self.sealer, &mut self.buf, &self.entries)?;
            return hand_over(
                sh,
                parts,
                Outgoing::Whole {
                    pack: self.id,
                    data: self.buf,
                    entries: self.entries,
                },
            );
        }
        let header = format::pack_header(&self.id);
        format::append_trailer(&self.sealer, &header, &self.entries, &mut self.buf)?;
        let entries = self.entries.clone();
        self.send_part(sh, parts, Some(entries))
    }
}

/// A buffer for a pack (or part) from the run's pool: waits for one to come back from the
/// uploaders or the writer, unless the run stops.
fn pack_buffer(sh: &Shared<'_>) -> Result<PooledBuf> {
    loop {
        if let Some(buf) = sh.pack_bufs.get_timeout(Duration::from_millis(100)) {
            return Ok(buf);
        }
        if sh.stop.is_cancelled() {
            return Err(stopped());
        }
    }
}

/// Hands a pack or part to an uploader (or the writer), waiting for one to be free.
fn hand_over(sh: &Shared<'_>, parts: &Sender<Outgoing>, mut job: Outgoing) -> Result<()> {
    loop {
        match parts.send_timeout(job, Duration::from_millis(100)) {
            Ok(()) => return Ok(()),
            Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                if sh.stop.is_cancelled() {
                    return Err(stopped());
                }
                job = j;
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                return Err(stopped());
            }
        }
    }
}

/// The id of a new pack: one the job database reserved (so that a resumed run can find the
/// pack if this run stops before recording it), or a fresh random one without a job.
fn next_pack_id(sh: &Shared<'_>) -> Result<PackId> {
    let Some(ids) = &sh.pack_ids else {
        return crypto::random();
    };
    loop {
        match ids.recv_timeout(Duration::from_millis(100)) {
            Ok(id) => return Ok(id),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if !sh.stopping() => {}
            Err(_) => return Err(stopped()),
        }
    }
}

fn stopped() -> Error {
    Error::new(ErrorKind::Cancelled, "stopped")
}

/// An uploader thread: sends parts, reports acknowledgements, completes finished packs; or,
/// on a store that takes packs whole, the pack writer: puts each pack.
pub(super) fn uploader(sh: &Shared<'_>, parts: &Receiver<Outgoing>, msgs: &Sender<Msg>) {
    /// Stops the run if this thread panics, so that no worker waits for its acks for ever.
    struct StopOnPanic<'a>(&'a crate::job::CancelToken);
    impl Drop for StopOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.cancel();
            }
        }
    }
    let _guard = StopOnPanic(&sh.stop);
    let backend = sh.store.backend();
    for job in parts {
        let job = match job {
            Outgoing::Part(job) => job,
            Outgoing::Whole {
                pack,
                data,
                entries,
            } => {
                put_whole(sh, &pack, &data, entries, msgs);
                continue;
            }
        };
        if sh.stop.is_cancelled() {
            job.acks.fail();
            continue;
        }
        let key = crate::store::pack_key(&job.pack);
        let size = job.data.len() as u64;
        if let Some(limit) = &sh.bwlimit
            && !limit.acquire(size, &|| sh.stop.is_cancelled())
        {
            job.acks.fail();
            continue;
        }
        sh.counters.parts_in_flight.fetch_add(1, Ordering::Relaxed);
        let result = backend.upload_part(&key, &job.upload_id, job.number, job.data);
        sh.counters.parts_in_flight.fetch_sub(1, Ordering::Relaxed);
        let part = match result {
            Ok(part) => part,
            Err(e) => {
                job.acks.fail();
                sh.fail(msgs, e);
                continue;
            }
        };
        // The job's journal in the store records the part before the job database does, so
        // that any host may resume the job without sending it again. (Should the journal
        // fail, the database still learns of the part, for this host's next run, and the
        // run stops: another host would send the part again.)
        let journaled = sh.job.as_ref().map_or(Ok(()), |id| {
            crate::job::journal::record_part(
                sh.store,
                id,
                &job.pack,
                &job.upload_id,
                &part,
                &job.chunks,
                job.last.is_some(),
            )
        });
        Counters::add(&sh.counters.bytes_written, size);
        // Reported before the worker hears of it, so that the database learns of part 1
        // before any later part, and of every part before the pack is complete.
        let _ = msgs.send(Msg::PartAcked {
            pack: job.pack,
            part: part.clone(),
            chunks: job.chunks,
            last: job.last.is_some(),
        });
        job.acks.ack(part);
        if let Err(e) = journaled {
            sh.fail(msgs, e);
            continue;
        }
        if let Some(entries) = job.last {
            let all = job.acks.parts();
            let bytes = all.iter().map(|p| p.size).sum();
            match backend.complete_upload(&key, &job.upload_id, &all) {
                Ok(()) => {
                    tracing::debug!(pack = %hex(&job.pack), bytes, parts = all.len(), "pack completed");
                    let _ = msgs.send(Msg::PackDone {
                        id: job.pack,
                        entries,
                        bytes,
                        whole: false,
                    });
                }
                Err(e) => sh.fail(msgs, e),
            }
        }
    }
}

/// Puts a whole pack and reports it done (or fails the run).
fn put_whole(sh: &Shared<'_>, pack: &PackId, data: &[u8], entries: Vec<Entry>, msgs: &Sender<Msg>) {
    // After a user's cancel the pack is still put: its chunks are complete, and worth keeping
    // for the next run; unless a bandwidth cap would make the cancel wait for its turn.
    if sh.stop.is_cancelled() {
        return;
    }
    let bytes = data.len() as u64;
    if let Some(limit) = &sh.bwlimit
        && !limit.acquire(bytes, &|| sh.stopping())
    {
        return;
    }
    if let Err(e) = sh.store.put_pack(pack, data) {
        sh.fail(msgs, e);
        return;
    }
    Counters::add(&sh.counters.bytes_written, bytes);
    tracing::debug!(pack = %hex(pack), bytes, chunks = entries.len(), "pack stored");
    let _ = msgs.send(Msg::PackDone {
        id: *pack,
        entries,
        bytes,
        whole: true,
    });
}

/// Paces uploads to an average rate: each upload of `n` bytes starts only once the bytes
/// before it have had their time at `rate` bytes per second (bursts of one part at most).
#[derive(Debug)]
pub(super) struct RateLimit {
    rate: f64,
    next: Mutex<Instant>,
}

impl RateLimit {
    pub(super) fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            #[allow(clippy::cast_precision_loss)] // a rate needs no exactness
            rate: bytes_per_sec.max(1) as f64,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the turn of `n` bytes; false if `stopping` turned true meanwhile.
    fn acquire(&self, n: u64, stopping: &dyn Fn() -> bool) -> bool {
        let now = Instant::now();
        let start = {
            let mut next = self.next.lock().expect("rate limit lock");
            let start = (*next).max(now);
            #[allow(clippy::cast_precision_loss)]
            let cost = Duration::from_secs_f64(n as f64 / self.rate);
            *next = start + cost;
            start
        };
        // In short naps, so that a stopping run is not held up by its queued turns.
        while Instant::now() < start {
            if stopping() {
                return false;
            }
            std::thread::sleep((start - Instant::now()).min(Duration::from_millis(100)));
        }
        true
    }
}
