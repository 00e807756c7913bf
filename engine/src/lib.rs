//! blockferry moves virtual-machine disks, block by block, into object storage and back:
//! deduplicated, compressed, encrypted, verifiable.
//!
//! # Brief overview
//!
//! - [`BlockSource`] is a readable virtual disk; [`open_image`] detects the format.
//! - [`Store`] is an unlocked repository (docs/FORMAT.md) on an [`ObjectStore`] backend;
//!   [`Store::init`] creates one.
//! - [`replicate`], [`restore`] and [`verify`] are the blocking entry points the CLI and the
//!   bindings wrap; they report progress as typed [`Event`]s to an [`Observer`] and stop on a
//!   [`CancelToken`].
//!
//! ```
//! use blockferry::{InitOptions, ReplicateOptions, RestoreOptions, Store, Silent};
//! # fn main() -> blockferry::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let disk = dir.path().join("disk.raw");
//! std::fs::write(&disk, vec![7u8; 3 << 20]).unwrap();
//! let store_dir = dir.path().join("store");
//! let store_path = store_dir.to_str().unwrap();
//!
//! Store::init(store_path, &InitOptions { chunk_size: 1 << 20, passphrase: Some(b"secret".to_vec()) })?;
//! let store = Store::open(store_path, Some(b"secret"))?;
//! let source = blockferry::open_image(&disk)?;
//! let report = blockferry::replicate(&store, source.as_ref(), &ReplicateOptions::default(), &Silent)?;
//! assert_eq!(report.chunks_stored, 1); // three identical chunks, stored once
//!
//! let out = dir.path().join("restored.raw");
//! blockferry::restore(&store, &report.snapshot, &out, &RestoreOptions::default(), &Silent)?;
//! assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

// The engine's modules are its own: the front ends (the CLI, Python, C) use the facade below,
// and the project's tests, benches and fuzz targets what `internals` lists.
pub(crate) mod boot;
pub(crate) mod changes;
mod error;
pub(crate) mod guest;
pub(crate) mod image;
pub(crate) mod io;
pub(crate) mod job;
pub(crate) mod nbd;
pub(crate) mod pipeline;
pub(crate) mod report;
pub(crate) mod store;
pub(crate) mod validate;
pub(crate) mod vm;

pub use error::{Error, ErrorKind, Result};
pub use job::{
    CancelToken, Event, EventStream, Observer, PROGRESS_INTERVAL, Phase, Progress, Silent,
};
pub use pipeline::{
    ConvertOptions, ConvertReport, DEFAULT_DIRECT_IO_DEPTH, DEFAULT_IO_DEPTH,
    DEFAULT_MEMORY_BUDGET, Problem, ReplicateOptions, ReplicateReport, RestoreOptions,
    RestoreReport, VerifyOptions, VerifyReport, convert, default_memory_budget, replicate, restore,
    verify,
};
pub use pipeline::{ExportFormat, ExportOptions, ExportReport, export};
// Getting the VM out: snapshots served over NBD, booted, and the cutover.
pub use boot::{BootReport, BootTestOptions, DEFAULT_BOOT_EXPECT, Firmware, boot_test};
pub use nbd::{DEFAULT_NBD_CACHE, NbdListen, NbdOptions, NbdServer, NbdStats, serve_nbd};
pub use pipeline::{CutoverReport, CutoverRequest, CutoverStep, cutover};
pub use store::{
    ChangeRecord, ChunkIndex, ChunkLocation, DEFAULT_CHUNK_SIZE, Damage, DiskHistory, DiskMeta,
    Encryption, InitOptions, RepairReport, Snapshot, SnapshotStats, SnapshotSummary,
    SourceFingerprint, SourceIdentity, Store, StoreConfig, StoreSummary,
};
// Deltas and continuous replication.
pub use changes::{ChangeFormat, ChangeList, Extent as ChangeExtent, MAX_LIST_BYTES};
pub use pipeline::{BaseRef, ChangeSource, DEFAULT_VERIFY_SAMPLE, DeltaOptions, DeltaRequest};
pub use pipeline::{
    ContinuousReplication, CycleBase, SyncChanges, SyncCycle, SyncRequest, SyncStatus,
};
// Images as the front ends open, describe, map and list them.
pub use guest::{
    BootMode, FileSystem, GuestOs, Inspection, Partition, PartitionTable, Volume, inspect_bytes,
    inspect_image, inspect_snapshot,
};
pub use image::discover::{Found, Role, discover};
pub use image::{
    BlockSource, Description, Identity as ImageIdentity, ImageInfo, Layer, LayerDescription,
    MapRow, Mapping, OpenOptions, ParentLink, Target, describe, for_each_extent,
    open as open_image, open_single as open_image_alone, open_with as open_image_with,
};
pub use report::{
    ComplianceReport, DiskReport, EncryptionReport, OperationEntry, ReplicationEntry,
    SnapshotEntry, compliance_report,
};
pub use store::audit::{AuditEvent, AuditProblem, AuditRecord, AuditReport, AuditRetention};
pub use validate::{Check, CheckStatus, ImportTarget, ValidateRequest, Validation, validate};
pub use vm::{ConfigKind, Discovery, Nic, Vm, VmDisk, VmFirmware, VmSnapshot, discover_all};
// Backends, the client's job database, the read engine's choice, retention and garbage
// collection.
pub use io::IoEngine;
pub use job::state::{
    CleanupReport, JobDb, JobKey, JobKind, JobLock, JobRecord, JobSource, JobState, OpenPack,
    SourceFile as JobSourceFile, default_state_dir,
};
pub use store::gc::{GcOptions, GcReport, gc};
pub use store::prune::{KeepPolicy, PruneReport, prune};
pub use store::{
    ObjectStore, Part, PartRules, PutMode, PutOutcome, S3Options, Upload, open_backend,
    pin_location,
};

/// The engine's insides that blockferry's own tests, benches and fuzz targets drive: each
/// format's parser and layout, the object format and keys, the in-memory and fault-injecting
/// stores, the read backends. Not an API: it changes with the code, and neither the CLI nor
/// the bindings may use it (`.ci/run` checks).
#[doc(hidden)]
pub mod internals {
    /// Change lists.
    pub mod changes {
        pub use crate::changes::{ChangeFormat, ChangeList, ExtentSet};
    }
    /// Image readers.
    pub mod image {
        pub use crate::image::{
            Descriptor, ExtentLine, MemFile, OpenOptions, ReadAt, SparseLayout, Target, VhdLayout,
            VhdxLayout, discover, inflate_grain, open, ova, ovf,
        };
    }
    /// VM configurations.
    pub mod vm {
        pub use crate::vm::{VmcxFile, VmcxValue, vmx_pairs};
    }
    /// Read backends and buffers.
    pub mod io {
        pub use crate::io::{Engine, Pread, ReadBackend, SourceFile, buf, sys, uring};
    }
    /// The replication pipeline's pieces.
    pub mod pipeline {
        pub use crate::pipeline::{Changes, DeltaOptions, is_zero};
    }
    /// The store format, keys and backends.
    pub mod store {
        pub use crate::store::{crypto, format, mem};
    }
}
