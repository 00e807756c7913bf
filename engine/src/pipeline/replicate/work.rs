//! The work stage: worker threads take chunks from the reader, detect zeros, hash,
//! deduplicate, and compress and seal new chunks into their own pack, which they hand to the
//! uploaders when full.

use std::collections::HashSet;
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};

use super::collect::Msg;
use super::packer::{OpenPack, Outgoing, PackMode, RateLimit};
use super::plan::MemoryPlan;
use super::read::Positions;
use crate::error::{Error, ErrorKind, Result};
use crate::image::BlockSource;
use crate::io::buf::{BufferPool, PooledBuf};
use crate::io::chunks::is_zero;
use crate::job::{CancelToken, Counters};
use crate::store::format::{self, Entry, Id, PackId, ZERO_ID};
use crate::store::{ChunkIndex, Store};

/// Everything the stages share.
pub(super) struct Shared<'a> {
    pub(super) store: &'a Store,
    pub(super) source: &'a dyn BlockSource,
    pub(super) dedup: Dedup<'a>,
    pub(super) counters: &'a Counters,
    pub(super) chunk_size: u64,
    pub(super) n_chunks: u64,
    pub(super) plan: MemoryPlan,
    pub(super) pack_mode: PackMode,
    /// Buffers packs (or parts) are built in: one per worker and one per uploader.
    pub(super) pack_bufs: BufferPool,
    pub(super) compression: bool,
    /// Positions a previous run of the job made durable (a bit each): not read again.
    pub(super) skip: Positions,
    /// Upload bandwidth cap.
    pub(super) bwlimit: Option<RateLimit>,
    /// Pack ids the job database reserved, when the run has a job.
    pub(super) pack_ids: Option<Receiver<PackId>>,
    /// The run's job, whose journal in the store records every acknowledged part.
    pub(super) job: Option<String>,
    /// Set on the first error so every stage winds down.
    pub(super) stop: CancelToken,
    pub(super) cancel: &'a CancelToken,
}

impl Shared<'_> {
    pub(super) fn stopping(&self) -> bool {
        self.stop.is_cancelled() || self.cancel.is_cancelled()
    }

    /// Reports a stage's error to the collector and winds every stage down.
    pub(super) fn fail(&self, msgs: &Sender<Msg>, e: Error) {
        self.stop.cancel();
        let _ = msgs.send(Msg::Failed(e));
    }

    pub(super) fn chunk_len(&self, idx: u64) -> u64 {
        let off = idx * self.chunk_size;
        self.chunk_size.min(self.source.info().virtual_size - off)
    }
}

/// A chunk read from the source, on its way to a worker.
pub(super) struct Work {
    pub(super) idx: u64,
    pub(super) buf: PooledBuf,
}

/// What a chunk turned out to be.
pub(super) enum ChunkKind {
    /// All zeros (read and found so).
    Zero,
    Duplicate,
    New,
    /// Stored by an earlier run of this job (a position it made durable without recording
    /// it): new data of this snapshot, not stored again.
    Resumed,
}

/// Chunks already stored, or claimed by a worker of this run.
pub(super) struct Dedup<'a> {
    pub(super) index: &'a ChunkIndex,
    /// Chunks in the packs the job's earlier runs made durable (indexed or not).
    pub(super) earlier: HashSet<Id>,
    pub(super) claimed: Mutex<HashSet<Id>>,
}

impl Dedup<'_> {
    /// Whether the caller must store the chunk (`New`), or it is stored or being stored
    /// (`Duplicate`), or an earlier run of the job stored it (`Resumed`).
    fn claim(&self, id: &Id) -> ChunkKind {
        if self.earlier.contains(id) {
            ChunkKind::Resumed
        } else if !self.index.contains(id)
            && self.claimed.lock().expect("dedup set lock").insert(*id)
        {
            ChunkKind::New
        } else {
            ChunkKind::Duplicate
        }
    }
}

pub(super) fn run(
    sh: &Shared<'_>,
    work: &Receiver<Work>,
    parts: &Sender<Outgoing>,
    msgs: &Sender<Msg>,
) {
    let mut pack: Option<OpenPack> = None;
    let result = (|| -> Result<()> {
        for Work { idx, buf } in work {
            if sh.stopping() {
                continue; // Drain so the reader is never stuck; drop the buffers.
            }
            let len = buf.len() as u64;
            if is_zero(&buf) {
                let _ = msgs.send(Msg::Chunk {
                    idx,
                    id: ZERO_ID,
                    len,
                    kind: ChunkKind::Zero,
                });
                continue;
            }
            let id = sh.store.keys().chunk_id(&buf);
            let kind = sh.dedup.claim(&id);
            if !matches!(kind, ChunkKind::New) {
                let _ = msgs.send(Msg::Chunk { idx, id, len, kind });
                continue;
            }
            let p = match &mut pack {
                Some(p) => p,
                None => pack.insert(OpenPack::start(sh, msgs)?),
            };
            let offset = p.next_offset();
            let before = p.buf.len();
            if !format::encode_blob(&p.sealer, &id, &buf, sh.compression, &mut p.buf)? {
                // Stored as it is: the chunk's one copy in user space, into the pack.
                Counters::add(&sh.counters.bytes_copied, len);
            }
            drop(buf); // Back to the pool before the (possibly slow) store write.
            p.entries.push(Entry {
                id,
                offset,
                stored_len: u32::try_from(p.buf.len() - before)
                    .map_err(|_| Error::internal("blob too large"))?,
                raw_len: u32::try_from(len).map_err(|_| Error::internal("chunk too large"))?,
            });
            let _ = msgs.send(Msg::Chunk {
                idx,
                id,
                len,
                kind: ChunkKind::New,
            });
            if p.after_add(sh, parts)? {
                let full = pack.take().expect("pack is open");
                full.finish(sh, parts)?;
            }
        }
        // At the end, or cancelled: a pack of complete chunks is worth keeping for the next
        // run. After an error, a multipart pack stays open for the job's next run to finish.
        if let Some(p) = pack.take()
            && !sh.stop.is_cancelled()
        {
            p.finish(sh, parts)?;
        }
        Ok(())
    })();
    if let Err(e) = result
        && e.kind() != ErrorKind::Cancelled
    {
        sh.fail(msgs, e);
    }
}
