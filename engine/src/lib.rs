//! blockferry moves virtual-machine disks, block by block, into object storage and back:
//! deduplicated, compressed, encrypted, verifiable.
//!
//! # Brief overview
//!
//! - [`image::BlockSource`] is a readable virtual disk; [`image::open`] detects the format.
//! - [`Store`] is an unlocked repository (store format v1, docs/FORMAT.md) on an
//!   [`store::ObjectStore`] backend; [`Store::init`] creates one.
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
//! let source = blockferry::image::open(&disk)?;
//! let report = blockferry::replicate(&store, source.as_ref(), &ReplicateOptions::default(), &Silent)?;
//! assert_eq!(report.chunks_stored, 1); // three identical chunks, stored once
//!
//! let out = dir.path().join("restored.raw");
//! blockferry::restore(&store, &report.snapshot, &out, &RestoreOptions::default(), &Silent)?;
//! assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod changes;
mod error;
pub mod image;
pub mod io;
pub mod job;
pub mod pipeline;
pub mod store;

pub use error::{Error, ErrorKind, Result};
pub use job::{CancelToken, Event, EventStream, Observer, Phase, Progress, Silent};
pub use pipeline::{
    ConvertOptions, ConvertReport, DEFAULT_MEMORY_BUDGET, ReplicateOptions, ReplicateReport,
    RestoreOptions, RestoreReport, VerifyOptions, VerifyReport, convert, replicate, restore,
    verify,
};
pub use store::{InitOptions, Snapshot, Store, StoreConfig, StoreSummary};
// The rest of the facade the front ends use: the read engine's choice, the client's job
// database, retention and garbage collection.
pub use changes::{ChangeFormat, ChangeList};
// Images and backends as the front ends open, describe and list them.
pub use image::discover::{Found, discover};
pub use image::{
    BlockSource, Description, MapRow, OpenOptions, Target, describe, for_each_extent,
    open as open_image, open_with as open_image_with,
};
pub use io::IoEngine;
pub use job::state::{JobDb, default_state_dir};
pub use pipeline::{BaseRef, ChangeSource, DEFAULT_VERIFY_SAMPLE, DeltaRequest};
pub use pipeline::{
    ContinuousReplication, CycleBase, SyncChanges, SyncCycle, SyncRequest, SyncStatus,
};
pub use store::gc::{GcOptions, gc};
pub use store::prune::{KeepPolicy, prune};
pub use store::{S3Options, open_backend};
