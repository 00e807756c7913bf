//! The engine's operations on a store: replicate (plan → read → zero-detect → hash → dedup →
//! compress → encrypt → pack → store), restore, verify and convert.

mod convert;
mod cutover;
mod delta;
mod disk;
pub(crate) mod export;
mod output;
mod replicate;
mod restore;
mod sync;
mod verify;
mod walk;

pub use crate::io::chunks::is_zero;
pub use convert::{ConvertOptions, ConvertReport, convert};
pub use cutover::{CutoverReport, CutoverRequest, CutoverStep, cutover};
pub(crate) use delta::PageCache;
pub use delta::{
    BaseRef, ChangeSource, Changes, DEFAULT_VERIFY_SAMPLE, DeltaOptions, DeltaRequest,
};
pub use export::{ExportFormat, ExportOptions, ExportReport, export};
pub(crate) use replicate::worker_count;
pub use replicate::{
    DEFAULT_DIRECT_IO_DEPTH, DEFAULT_IO_DEPTH, DEFAULT_MEMORY_BUDGET, ReplicateOptions,
    ReplicateReport, default_memory_budget, replicate,
};
pub use restore::{RestoreOptions, RestoreReport, restore};
pub use sync::{ContinuousReplication, CycleBase, SyncChanges, SyncCycle, SyncRequest, SyncStatus};
pub use verify::{Problem, VerifyOptions, VerifyReport, verify};

use crate::error::Result;
use crate::image::BlockSource;
use crate::io::ReadBackend;
use crate::io::chunks::ChunkFill;
use crate::store::Store;
use crate::store::format::{Id, ZERO_ID};

/// The name a replication of `source` with `name` (if given) records its disk under (see
/// [`ReplicateOptions::disk_name`]).
pub(crate) fn disk_name(
    store: &Store,
    source: &dyn BlockSource,
    name: Option<&str>,
) -> Result<String> {
    disk::resolve_name(store, source, name, name.is_some()).map(|(n, _)| n)
}

/// Reads single chunks of a source again and tells their ids, as a snapshot records them
/// (the zero id for a chunk of zeros): a delta's sample, a resumed job's check.
#[derive(Default)]
pub(crate) struct ChunkProbe {
    maps: Vec<crate::image::Mapping>,
    buf: Vec<u8>,
    fill: ChunkFill,
}

impl ChunkProbe {
    /// The id of `[offset, offset + len)` of `source`, and the bytes read from files for it.
    pub(crate) fn id_at(
        &mut self,
        store: &Store,
        source: &dyn BlockSource,
        backend: &mut dyn ReadBackend,
        offset: u64,
        len: u64,
    ) -> Result<(Id, u64)> {
        let (data, read) =
            self.fill
                .read_range(source, backend, &mut self.maps, offset, len, &mut self.buf)?;
        let id = match data {
            Some(data) if !is_zero(data) => store.keys().chunk_id(data),
            _ => ZERO_ID,
        };
        Ok((id, read))
    }
}
