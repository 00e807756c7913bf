//! Continuous replication from C: a `bf_sync_builder` (settings by setter, so that a new
//! setting never changes a struct a caller compiled against), the `bf_sync` it builds, and
//! one call per cycle.

use std::ffi::{c_char, c_void};
use std::path::PathBuf;

use blockferry::{
    ChangeFormat, ContinuousReplication, ReplicateOptions, SyncChanges, SyncCycle, SyncRequest,
};

use crate::error::{FfiResult, boundary, invalid};
use crate::handle::{box_out, bytes_arg, free_box, mut_arg, opt_str_arg, ref_arg, str_arg};
use crate::observe::{bf_progress_cb, run};
use crate::query::{to_json, write_json};
use crate::store::bf_store;
use crate::{bf_cancel, bf_result, token};

/// Settings of a continuous replication (opaque): made by `bf_sync_builder_new`, changed by
/// the `bf_sync_builder_set_*` functions, turned into a `bf_sync` by `bf_sync_new`, released
/// by `bf_sync_builder_free`.
#[derive(Debug)]
pub struct bf_sync_builder {
    changes: Option<SyncChanges>,
    name: Option<String>,
    state_dir: Option<PathBuf>,
    no_state: bool,
    verify_sample: f64,
    memory_budget: usize,
}

/// A continuous replication of one disk (opaque): made by `bf_sync_new`, a cycle per
/// `bf_sync_cycle`, released by `bf_sync_free`. One cycle at a time.
#[derive(Debug)]
pub struct bf_sync {
    sync: ContinuousReplication,
    /// What the last cycle did, as JSON.
    last: Option<serde_json::Value>,
}

/// Makes a builder with the defaults: no change source yet (one must be set), the default
/// job folder, a 1% verify sample, the default memory budget.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_new(out: *mut *mut bf_sync_builder) -> bf_result {
    boundary(|| {
        let b = bf_sync_builder {
            changes: None,
            name: None,
            state_dir: None,
            no_state: false,
            verify_sample: blockferry::DEFAULT_VERIFY_SAMPLE,
            memory_budget: 0,
        };
        // SAFETY: forwarded contract.
        unsafe { box_out(out, b, "out") }
    })
}

/// Releases a builder (NULL is ignored).
///
/// # Safety
/// `builder` is NULL or from `bf_sync_builder_new`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_free(builder: *mut bf_sync_builder) {
    // SAFETY: forwarded contract.
    unsafe { free_box(builder) };
}

/// Where each cycle's changes come from: `"hash"` (compare every chunk), `"chain"` (the
/// image is a snapshot-chain child), `"dir"` (lists dropped in the folder `arg`; a cycle takes
/// those waiting and moves them to `arg/done/` once its snapshot is written) or `"given"`
/// (each `bf_sync_cycle` gets its list). `format` (NULL: detected) names the lists' format:
/// `vmware-cbt`, `hyperv-rct` or `extents`.
///
/// # Safety
/// `builder` live; `source` NUL-terminated; `arg` and `format` NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_set_changes(
    builder: *mut bf_sync_builder,
    source: *const c_char,
    arg: *const c_char,
    format: *const c_char,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { mut_arg(builder, "builder")? };
        // SAFETY: forwarded contract.
        let source = unsafe { str_arg(source, "source")? };
        // SAFETY: forwarded contract.
        let arg = unsafe { opt_str_arg(arg, "arg")? };
        // SAFETY: forwarded contract.
        let format = unsafe { opt_str_arg(format, "format")? };
        let format = format.map(ChangeFormat::from_name).transpose()?;
        b.changes = Some(match (source, arg) {
            ("hash", None) => SyncChanges::Hash,
            ("chain", None) => SyncChanges::Chain,
            ("given", None) => SyncChanges::Given { format },
            ("dir", Some(dir)) => SyncChanges::Folder {
                dir: dir.into(),
                format,
            },
            ("dir", None) => return Err(invalid("a \"dir\" source needs the folder (arg)")),
            _ => {
                return Err(invalid(format!(
                    "changes source {source:?} with arg {arg:?}: give \"hash\", \"chain\", \
                     \"given\" (without arg) or \"dir\" with the folder"
                )));
            }
        });
        Ok(())
    })
}

/// The disk's name in the store (NULL: as a replication of the image names it).
///
/// # Safety
/// `builder` live; `name` NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_set_name(
    builder: *mut bf_sync_builder,
    name: *const c_char,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { mut_arg(builder, "builder")? };
        // SAFETY: forwarded contract.
        let name = unsafe { opt_str_arg(name, "name")? };
        b.name = name.map(str::to_owned);
        Ok(())
    })
}

/// The job folder, where each cycle records what a killed cycle's successor resumes (NULL:
/// the default); `no_state` records nothing.
///
/// # Safety
/// `builder` live; `dir` NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_set_state_dir(
    builder: *mut bf_sync_builder,
    dir: *const c_char,
    no_state: bool,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { mut_arg(builder, "builder")? };
        // SAFETY: forwarded contract.
        let dir = unsafe { opt_str_arg(dir, "dir")? };
        b.state_dir = dir.map(PathBuf::from);
        b.no_state = no_state;
        Ok(())
    })
}

/// The share (0 to 1) of the chunks a list calls unchanged that each cycle reads to check it.
///
/// # Safety
/// `builder` live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_set_verify_sample(
    builder: *mut bf_sync_builder,
    share: f64,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        unsafe { mut_arg(builder, "builder")? }.verify_sample = share;
        Ok(())
    })
}

/// The memory budget of each cycle in bytes (0: the default).
///
/// # Safety
/// `builder` live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_builder_set_memory_budget(
    builder: *mut bf_sync_builder,
    bytes: u64,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        unsafe { mut_arg(builder, "builder")? }.memory_budget =
            usize::try_from(bytes).unwrap_or(usize::MAX);
        Ok(())
    })
}

/// Starts a continuous replication of `image` into `store` with the builder's settings (the
/// builder stays the caller's, to free or to build again).
///
/// # Safety
/// `store` and `builder` live; `image` NUL-terminated; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_new(
    store: *const bf_store,
    image: *const c_char,
    builder: *const bf_sync_builder,
    out: *mut *mut bf_sync,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let store = unsafe { ref_arg(store, "store")? };
        // SAFETY: forwarded contract.
        let image = unsafe { str_arg(image, "image")? };
        // SAFETY: forwarded contract.
        let b = unsafe { ref_arg(builder, "builder")? };
        let changes = b.changes.clone().ok_or_else(|| {
            invalid("the builder has no source of changes (bf_sync_builder_set_changes)")
        })?;
        let job_state = if b.no_state {
            None
        } else {
            Some(match &b.state_dir {
                Some(d) => d.clone(),
                None => blockferry::default_state_dir()?,
            })
        };
        let request = SyncRequest {
            image: image.into(),
            open: blockferry::OpenOptions::default(),
            name: b.name.clone(),
            changes,
            verify_sample: b.verify_sample,
            replicate: ReplicateOptions {
                memory_budget: b.memory_budget,
                job_state,
                ..ReplicateOptions::default()
            },
        };
        let sync = bf_sync {
            sync: ContinuousReplication::new(&store.store, request)?,
            last: None,
        };
        // SAFETY: forwarded contract.
        unsafe { box_out(out, sync, "out") }
    })
}

/// Releases a sync (NULL is ignored).
///
/// # Safety
/// `sync` is NULL or from `bf_sync_new`, freed once, with no cycle running.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_free(sync: *mut bf_sync) {
    // SAFETY: forwarded contract.
    unsafe { free_box(sync) };
}

/// Runs one cycle: a delta on the disk's newest snapshot (a full copy when it has none)
/// from the sync's change source; with the source `"given"`, `(changes, len)` is the cycle's
/// list (taken against the base `bf_sync_base_json` tells), else NULL and 0. A cycle with no
/// list dropped does nothing and succeeds. Blocks; `progress` and `cancel` as for
/// `bf_replicate`. `bf_sync_cycle_json` then tells what it did; a failed cycle still counts
/// (the next one tries again).
///
/// # Safety
/// `sync` and `store` live (the store the sync was made with); `changes` NULL or readable
/// for `len` bytes; `progress` callable with `userdata` as for `bf_replicate`; `cancel` NULL
/// or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_cycle(
    sync: *mut bf_sync,
    store: *const bf_store,
    changes: *const u8,
    len: usize,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let s = unsafe { mut_arg(sync, "sync")? };
        // SAFETY: forwarded contract.
        let store = unsafe { ref_arg(store, "store")? };
        // SAFETY: forwarded contract.
        let changes = unsafe { bytes_arg(changes, len, "changes")? };
        // SAFETY: forwarded contract.
        let cancel = unsafe { token(cancel) };
        s.last = None;
        let sync = &mut s.sync;
        let cycle: SyncCycle = run(progress, userdata, |observer| {
            sync.cycle(&store.store, changes, &cancel, observer)
        })??;
        s.last = Some(to_json(&cycle)?);
        Ok(())
    })
}

/// What the last successful cycle did, as a JSON object (`cycle`, `lag_seconds`,
/// `last_success_unix_ms`, and `report`: the replication's report, or null when there was
/// no list); after a failed cycle, where the sync stands (the same without `report`). See
/// `bf_store_snapshots_json` for the buffer rules.
///
/// # Safety
/// `sync` live; buffer as for `bf_store_snapshots_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_cycle_json(
    sync: *const bf_sync,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let s = unsafe { ref_arg(sync, "sync")? };
        let value = match &s.last {
            Some(v) => v.clone(),
            None => to_json(&s.sync.status())?,
        };
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &value) }
    })
}

/// The base of the next cycle as a JSON object (`snapshot`, `change_id`: null before the
/// first; `disk_size`): what a change list given to `bf_sync_cycle` is taken against. See
/// `bf_store_snapshots_json` for the buffer rules.
///
/// # Safety
/// `sync` and `store` live; buffer as for `bf_store_snapshots_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_sync_base_json(
    sync: *const bf_sync,
    store: *const bf_store,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| -> FfiResult {
        // SAFETY: forwarded contract.
        let s = unsafe { ref_arg(sync, "sync")? };
        // SAFETY: forwarded contract.
        let store = unsafe { ref_arg(store, "store")? };
        let base = s.sync.base(&store.store)?;
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &to_json(&base)?) }
    })
}
